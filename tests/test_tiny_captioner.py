"""The tiny captioner (minisd/assets/tiny_captioner/, trained by minisd/train/tiny_captioner.py): BLIP at a tiny
config that writes the shapes world's captions. Measured on pictures it never saw: colour/shape/background
combinations held out of its training, shape sizes between the two bands it trained on, square, landscape and
portrait pictures. transformers' BlipForConditionalGeneration reads the same folder and writes the same captions."""
import json

import pytest
import torch

from minisd import cli
from minisd.caption import TINY, load
from minisd.caption.blip import load_blip
from minisd.tiny import shapes
from minisd.train import tiny_captioner as tc

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread

SEED = 2026                     # a held-out stream neither the recipe (seed 0) nor its own measurement (1) drew


@pytest.fixture(scope="module")
def captioner():
    return load("tiny")


def held_out(n, seed=SEED):
    return [tc.held_out_picture(seed, i) for i in range(n)]


def test_shipped_folder_is_transformers_blip_layout_under_5_mb():
    folder = TINY
    files = {f.name: f.stat().st_size for f in folder.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
                          "preprocessor_config.json"}
    assert sum(files.values()) <= 5 * 2 ** 20, files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "blip" and config["architectures"] == ["BlipForConditionalGeneration"]
    vocab = (folder / "vocab.txt").read_text().split()
    assert vocab[config["text_config"]["bos_token_id"]] == "[DEC]"
    assert vocab[config["text_config"]["sep_token_id"]] == "[SEP]"


def test_held_out_pictures_are_what_training_never_showed():
    pictures = held_out(60)
    assert {truth for _, truth in pictures} <= set(shapes.HELD_OUT)
    assert {image.size[0] * 2 == image.size[1] * 3 or image.size[0] * 3 == image.size[1] * 2 or
            image.size[0] == image.size[1] for image, _ in pictures} == {True}
    assert {image.size for image, _ in pictures[:3]} != {pictures[0][0].size}           # three aspect ratios
    # training never draws a held-out combination, nor a size in the held-out band
    for i in range(300):
        _, truth = tc.training_picture(0, i)
        assert truth not in shapes.HELD_OUT
    lo, hi = tc.HELD_OUT_SCALES
    assert all(not (a < hi and lo < b) for a, b in tc.TRAIN_SCALES)


def test_minisd_caption_model_tiny_writes_exactly_right_captions_of_held_out_pictures(tmp_path, captioner):
    # >= 95% of 150 pictures (50 per aspect ratio), greedy, through `minisd caption --model tiny` with its
    # defaults; the card's number is on 300 pictures of another stream
    pictures = held_out(150)
    for i, (image, _) in enumerate(pictures):
        image.save(tmp_path / f"{i:03d}.png")
    assert cli.main(["caption", str(tmp_path), "--model", "tiny"]) == 0
    # one caption a file, ended by a newline as kohya's make_captions writes it
    captions = [(tmp_path / f"{i:03d}.txt").read_text().removesuffix("\n") for i in range(len(pictures))]
    right = [shapes.parse_caption(text) == truth and text == shapes.caption(*truth)
             for text, (_, truth) in zip(captions, pictures)]
    wrong = [(text, truth, image.size) for ok, text, (image, truth) in zip(right, captions, pictures) if not ok]
    assert sum(right) >= 0.95 * len(pictures), wrong
    for ratio in range(3):                               # and on each aspect ratio alone
        assert sum(right[ratio::3]) >= 0.9 * len(right[ratio::3]), (tc.ASPECTS[ratio], wrong)
    assert captions == tc.accuracy(captioner, pictures)[1]        # the Python API writes the same


def test_transformers_loads_the_shipped_folder_and_writes_the_same_captions(captioner):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = TINY
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    images = [image for image, _ in held_out(6, seed=SEED + 1)]
    # our pixels into both (transformers 5's default image processor is a torchvision port, a few levels off PIL)
    pixels = captioner.processor(images)
    with torch.no_grad():
        theirs = model.generate(pixel_values=pixels, max_length=75, min_length=5)
    ours = captioner.caption(images, max_length=75, min_length=5)
    assert [processor.decode(ids, skip_special_tokens=True) for ids in theirs] == ours
    assert all(text.startswith("a ") and text.endswith(" background") for text in ours)


def test_the_recipe_is_deterministic_and_its_loss_falls(tmp_path):
    recipe = tc.Recipe(steps=40, batch=16, warmup_steps=5, bank_size=128, eval_samples=6)
    _, report = tc.train_captioner(tmp_path / "a", recipe, log=lambda *_: None)
    tc.train_captioner(tmp_path / "b", recipe, log=lambda *_: None)
    a = (tmp_path / "a" / tc.FOLDER / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / tc.FOLDER / "model.safetensors").read_bytes()
    assert a != (TINY / "model.safetensors").read_bytes()           # and the comparison can fail
    curve = report["loss_curve"]
    assert curve[-1] < 0.5 * curve[0], curve
    assert load_blip(tmp_path / "a" / tc.FOLDER).caption([held_out(1)[0][0]])   # a folder our loader reads


def test_bad_recipe_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        tc.train_captioner(tmp_path, tc.Recipe(steps=0))
    with pytest.raises(ValueError, match="bank"):
        tc.train_captioner(tmp_path, tc.Recipe(bank_size=0))


@pytest.mark.slow
def test_the_full_recipe_reproduces_the_shipped_accuracy(tmp_path):
    # `minisd train-tiny-captioner`'s defaults (about 13 CPU-minutes, 2.2 GB): >= 95% of two held-out streams of
    # 300, and >= 90% of each aspect ratio, as the shipped folder is tested above
    folder, report = tc.train_captioner(tmp_path, log=lambda *_: None)
    pictures = held_out(300)
    acc, captions = tc.accuracy(load_blip(folder), pictures)
    assert acc >= 0.95 and report["held_out_accuracy"] >= 0.95, (acc, report["held_out_accuracy"])
    right = [text == shapes.caption(*truth) for text, (_, truth) in zip(captions, pictures)]
    assert all(sum(right[ratio::3]) >= 0.9 * len(right[ratio::3]) for ratio in range(3)), right
