"""Saving images: A1111's parameters text, the PNG chunk it lives in, atomic writes and output names.

The expected strings below are written out by hand from A1111's create_infotext (modules/processing.py of
AUTOMATIC1111/stable-diffusion-webui): key order Steps, Sampler, Schedule type, CFG scale, Seed, Size,
Model hash, Model, ...; values holding ',', ':' or a newline are JSON-quoted; no Negative prompt line when empty.
"""
import os

import numpy as np
import pytest
from PIL import Image

from minisd.images import a1111_parameters, output_paths, parse_a1111_parameters, read_png_parameters, save_png


def _image(value=0):
    return Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8))


def test_parameters_layout_matches_a1111():
    text = a1111_parameters("a cat", "blurry", steps=20, sampler="Euler a", cfg=7.5, seed=1,
                            width=512, height=512, model="sd15")
    assert text == ("a cat\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15")


def test_empty_negative_prompt_has_no_line():
    text = a1111_parameters("a cat", "", 20, "Euler", 7.0, 3, 768, 512, "sd21")
    assert text == "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 3, Size: 768x512, Model: sd21"


def test_extra_fields_take_a1111_positions_and_labels():
    text = a1111_parameters("p", "", 20, "DPM++ 2M", 7.5, 1, 512, 512, "sd15", version="minisd 0.1.0",
                            eta=0.5, clip_skip=2, schedule_type="Karras", model_hash="6ce0161689", rng="CPU",
                            denoising_strength=None)
    assert text == ("p\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, "
                    "Size: 512x512, Model hash: 6ce0161689, Model: sd15, Clip skip: 2, RNG: CPU, Eta: 0.5, "
                    "Version: minisd 0.1.0")


def test_values_with_commas_or_colons_are_quoted():
    text = a1111_parameters("p", "", 20, "Euler", 7.5, 1, 512, 512, "my, model: v2")
    assert text.endswith('Model: "my, model: v2"')


def test_parameters_round_trip():
    prompt = "a (red:1.2) circle, on a [blue] background\nsecond line: with colon"
    negative = "blurry, lowres\nugly"
    text = a1111_parameters(prompt, negative, 30, "Euler a", 7.5, 1234, 640, 512, 'odd, "name"',
                            schedule_type="Karras")
    parsed = parse_a1111_parameters(text)
    assert parsed == {"Prompt": prompt, "Negative prompt": negative, "Steps": "30", "Sampler": "Euler a",
                      "Schedule type": "Karras", "CFG scale": "7.5", "Seed": "1234", "Size": "640x512",
                      "Model": 'odd, "name"'}


def test_parse_reads_a1111_docstring_example():
    # The example in the docstring of A1111's parse_generation_parameters (modules/infotext_utils.py)
    text = ("girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish)\n"
            "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    parsed = parse_a1111_parameters(text)
    assert parsed["Prompt"] == "girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish)"
    assert parsed["Negative prompt"] == "ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy"
    assert parsed["Seed"] == "965400086" and parsed["Model hash"] == "45dee52b" and parsed["Size"] == "512x512"


def test_parse_without_parameter_line_keeps_all_text_as_prompt():
    assert parse_a1111_parameters("just a prompt: with a colon") == {
        "Prompt": "just a prompt: with a colon", "Negative prompt": ""}


def test_save_png_writes_a_text_chunk_pil_reads_back(tmp_path):
    text = a1111_parameters("a cat", "dog", 20, "Euler a", 7.5, 1, 8, 8, "sd15")
    path = save_png(_image(7), tmp_path / "a.png", text)
    raw = path.read_bytes()
    assert raw.startswith(b"\x89PNG") and b"tEXtparameters\x00" in raw   # a tEXt chunk with keyword "parameters"
    assert read_png_parameters(path) == text
    with Image.open(path) as image:
        assert image.text["parameters"] == text
        assert np.array_equal(np.asarray(image), np.asarray(_image(7)))
    assert os.listdir(tmp_path) == ["a.png"]                              # no temporary file left behind


def test_save_png_refuses_to_overwrite_without_flag(tmp_path):
    path = save_png(_image(1), tmp_path / "a.png", "first")
    with pytest.raises(FileExistsError, match=r"a\.png.*--overwrite"):
        save_png(_image(2), path, "second")
    assert read_png_parameters(path) == "first"
    save_png(_image(2), path, "second", overwrite=True)
    assert read_png_parameters(path) == "second"


def test_save_png_failure_leaves_no_partial_file(tmp_path):
    image = _image(3)
    image.save = None                          # makes the write itself fail, after the temporary file exists
    with pytest.raises(TypeError):
        save_png(image, tmp_path / "a.png", "x")
    assert os.listdir(tmp_path) == []


def test_save_png_rejects_non_images(tmp_path):
    with pytest.raises(TypeError, match="PIL"):
        save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png", "x")


def test_directory_names_continue_numbering_and_never_clobber(tmp_path):
    assert output_paths(tmp_path, [42, 43]) == [tmp_path / "00000-42.png", tmp_path / "00001-43.png"]
    for name in ("00000-42.png", "00007-1.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert output_paths(tmp_path, [5]) == [tmp_path / "00008-5.png"]


def test_new_directory_without_suffix(tmp_path):
    assert output_paths(tmp_path / "new", [1]) == [tmp_path / "new" / "00000-1.png"]


def test_file_name_batch_gets_index_suffix(tmp_path):
    assert output_paths(tmp_path / "cat.png", [9]) == [tmp_path / "cat.png"]
    assert output_paths(tmp_path / "cat.png", [9, 10]) == [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]


def test_existing_output_file_is_an_early_error(tmp_path):
    (tmp_path / "cat-1.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"cat-1\.png.*--overwrite"):
        output_paths(tmp_path / "cat.png", [1, 2])
    assert len(output_paths(tmp_path / "cat.png", [1, 2], overwrite=True)) == 2


def test_a_file_name_of_another_format_is_rejected(tmp_path):
    # .png, .jpg/.jpeg and .webp are written (tests/test_conveniences.py); anything else is one clear error
    with pytest.raises(ValueError, match="PNG, JPEG or WebP"):
        output_paths(tmp_path / "cat.gif", [1])
