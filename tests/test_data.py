"""Training folders: which files are examples, their captions, the errors found before training, and preprocessing
equal to the torchvision transform diffusers' train_dreambooth / train_text_to_image build."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from minisd.train.data import Example, find_examples, make_batch


def noise_image(w, h, seed=0, mode="RGB"):
    """Random pixels, so that a crop or resize off by one pixel changes the result by far more than rounding."""
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def folder_with(tmp_path, names, sizes=None):
    for i, name in enumerate(names):
        noise_image(*(sizes[i] if sizes else (24, 16)), seed=i).save(tmp_path / name)
    return tmp_path


def quiet(*_):
    pass


def test_images_of_every_extension_in_any_case_are_read_in_sorted_order(tmp_path):
    folder_with(tmp_path, ["d.webp", "b.PNG", "a.jpg", "e.bmp", "c.JpEg"])
    examples = find_examples(tmp_path, 64, fallback_caption="a photo of sks dog", log=quiet)
    assert [os.path.basename(e.path) for e in examples] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp"]
    assert all(e.caption == "a photo of sks dog" for e in examples)


def test_caption_comes_from_the_same_name_txt_stripped(tmp_path):
    folder_with(tmp_path, ["cat.png", "dog.png"])
    (tmp_path / "cat.txt").write_text("  a cat on a mat\n\n", encoding="utf-8")
    examples = find_examples(tmp_path, 64, fallback_caption="fallback", log=quiet)
    assert examples == [Example(str(tmp_path / "cat.png"), "a cat on a mat"),
                        Example(str(tmp_path / "dog.png"), "fallback")]


def test_caption_comes_from_metadata_jsonl(tmp_path):
    folder_with(tmp_path, ["0.png", "1.png"])
    lines = [{"file_name": "1.png", "text": "second "}, {"file_name": "0.png", "text": "first", "extra": 3}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [e.caption for e in find_examples(tmp_path, 64, log=quiet)] == ["first", "second"]


def test_txt_caption_wins_over_metadata_with_a_note(tmp_path):
    folder_with(tmp_path, ["0.png", "1.png"])
    (tmp_path / "0.txt").write_text("from txt")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "from metadata"}\n'
                                             '{"file_name": "1.png", "text": "only metadata"}\n')
    notes = []
    examples = find_examples(tmp_path, 64, log=notes.append)
    assert [e.caption for e in examples] == ["from txt", "only metadata"]
    assert len(notes) == 1 and "1 images" in notes[0] and "using the .txt" in notes[0]


def test_an_image_without_caption_or_fallback_is_an_error(tmp_path):
    folder_with(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "b.txt").write_text("b")
    with pytest.raises(ValueError, match=r"^2 images in .* have no caption \(first: a.png\)"):
        find_examples(tmp_path, 64, log=quiet)


def test_other_files_are_skipped_with_one_note(tmp_path):
    folder_with(tmp_path, ["a.png"])
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "orphan.txt").write_text("a caption of no image")
    (tmp_path / "sub").mkdir()
    folder_with(tmp_path / "sub", ["nested.png"])          # subfolders are not read
    notes = []
    examples = find_examples(tmp_path, 64, fallback_caption="p", log=notes.append)
    assert len(examples) == 1
    assert notes == [f"skipped 3 entries in {tmp_path} that are not images or captions (first: notes.md)"]


def test_a_corrupt_png_is_a_one_line_error(tmp_path):
    folder_with(tmp_path, ["a.png"])
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(ValueError) as e:
        find_examples(tmp_path, 64, fallback_caption="p", log=quiet)
    assert str(e.value).startswith(f"{tmp_path / 'b.png'} is not a readable image (") and "\n" not in str(e.value)


def test_a_truncated_jpeg_is_caught_where_verify_would_pass_it(tmp_path):
    noise_image(64, 64).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "whole.jpg").unlink()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as im:
        im.verify()                                         # what a header-only check would accept
    with pytest.raises(ValueError, match="cut.jpg is not a readable image"):
        find_examples(tmp_path, 64, fallback_caption="p", log=quiet)


def test_an_empty_missing_or_non_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"^no images \(png, jpg, jpeg, webp, bmp\) and no N_prompt subfolders "
                                         r"\(kohya's layout\) in .*empty$"):
        find_examples(tmp_path / "empty", 64, fallback_caption="p", log=quiet)
    with pytest.raises(ValueError, match="nowhere does not exist"):
        find_examples(tmp_path / "nowhere", 64, fallback_caption="p", log=quiet)
    with pytest.raises(ValueError, match="readme.txt is not a folder"):
        find_examples(tmp_path / "empty" / "readme.txt", 64, fallback_caption="p", log=quiet)
    (tmp_path / "empty" / "readme.txt").unlink()
    with pytest.raises(ValueError, match=r"^\S*empty is empty$"):
        find_examples(tmp_path / "empty", 64, fallback_caption="p", log=quiet)


def test_bad_metadata_is_an_error_naming_the_line(tmp_path):
    folder_with(tmp_path, ["a.png"])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl line 2 is not"):
        find_examples(tmp_path, 64, log=quiet)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "typo.png", "text": "t"}\n')
    with pytest.raises(ValueError, match="names typo.png, which is not an image"):
        find_examples(tmp_path, 64, fallback_caption="p", log=quiet)


@pytest.mark.parametrize("resolution", [0, -8, 100, 512.0, "512"])
def test_resolution_must_be_a_positive_multiple_of_8(tmp_path, resolution):
    folder_with(tmp_path, ["a.png"])
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        find_examples(tmp_path, resolution, fallback_caption="p", log=quiet)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        make_batch([Example(str(tmp_path / "a.png"), "p")], [0], resolution)


# Preprocessing against torchvision, as diffusers' scripts build it. Tolerance 1e-6: the pixels after resize and
# crop are the same uint8 values on both sides (checked exactly); only the scaling to [-1, 1] differs
# (x / 127.5 - 1 here, (x / 255 - 0.5) / 0.5 there), by at most one float32 ulp near 1 (1.2e-7).
SIZES = [(67, 45), (45, 91), (300, 200), (50, 333), (64, 64), (40, 64)]     # (w, h): wide, tall, down, up, exact
MODES = ["RGB", "RGBA", "L", "RGB", "P", "RGB"]


def torchvision_transform(resolution, center_crop, random_flip):
    """diffusers' examples/text_to_image/train_text_to_image.py (train_dreambooth.py is the same minus the flip)."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


@pytest.fixture
def mixed_folder(tmp_path):
    for i, (size, mode) in enumerate(zip(SIZES, MODES)):
        noise_image(*size, seed=i, mode=mode).save(tmp_path / f"{i}.png")
    return find_examples(tmp_path, 64, fallback_caption="p", log=quiet)


def reference_batch(examples, resolution, center_crop, random_flip):
    transform = torchvision_transform(resolution, center_crop, random_flip)
    return torch.stack([transform(Image.open(e.path).convert("RGB")) for e in examples])


@pytest.mark.parametrize("resolution", [32, 64])
def test_center_crop_preprocessing_equals_torchvision(mixed_folder, resolution):
    ours, captions = make_batch(mixed_folder, range(len(SIZES)), resolution)
    ref = reference_batch(mixed_folder, resolution, center_crop=True, random_flip=False)
    assert ours.shape == (len(SIZES), 3, resolution, resolution) and captions == ["p"] * len(SIZES)
    assert torch.equal(((ours + 1) * 127.5).round(), ((ref + 1) * 127.5).round())     # the same uint8 pixels
    assert (ours - ref).abs().max() <= 1e-6
    # the comparison could fail: the same pipeline with the crop one pixel lower is far outside the tolerance
    resized = transforms.Resize(resolution)(Image.open(mixed_folder[1].path).convert("RGB"))    # 45 x 91: tall
    top = int(round((resized.height - resolution) / 2.0)) + 1
    lower = transforms.functional.to_tensor(transforms.functional.crop(resized, top, 0, resolution, resolution))
    assert (ours[1] - (lower * 2 - 1)).abs().max() > 0.1


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_crop_and_flip_equal_torchvision_drawing_from_the_same_seed(mixed_folder, seed):
    generator = torch.Generator().manual_seed(seed)
    ours, _ = make_batch(mixed_folder, range(len(SIZES)), 32, center_crop=False, random_flip=True,
                         generator=generator)
    torch.manual_seed(seed)             # torchvision draws from the global RNG, in the same order as we do
    ref = reference_batch(mixed_folder, 32, center_crop=False, random_flip=True)
    assert (ours - ref).abs().max() <= 1e-6


def test_random_batches_are_a_pure_function_of_the_generator(mixed_folder):
    def batch(seed):
        return make_batch(mixed_folder, [2, 3, 0], 32, center_crop=False, random_flip=True,
                          generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(batch(5), batch(5))
    assert not torch.equal(batch(5), batch(6))              # and the generator does move the crops


def test_random_preprocessing_without_a_generator_is_an_error(mixed_folder):
    with pytest.raises(ValueError, match="need a torch.Generator"):
        make_batch(mixed_folder, [0], 32, center_crop=False)


def test_exif_orientation_is_applied_as_train_dreambooth_does(tmp_path):
    image = noise_image(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6                                        # "rotate 90 CW to display"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    examples = find_examples(tmp_path, 24, fallback_caption="p", log=quiet)
    ours, _ = make_batch(examples, [0], 24)
    with Image.open(tmp_path / "phone.jpg") as raw:
        upright = raw.convert("RGB").transpose(Image.ROTATE_270)          # 90 degrees clockwise
    ref = torchvision_transform(24, True, False)(upright)
    assert (ours[0] - ref).abs().max() <= 1e-6


def test_nothing_in_the_folder_is_modified(tmp_path):
    folder_with(tmp_path, ["a.png", "b.jpg", "c.webp"], sizes=[(67, 45), (45, 91), (64, 64)])
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "b.jpg", "text": "b"}\n')
    (tmp_path / "notes.md").write_text("x")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    examples = find_examples(tmp_path, 32, fallback_caption="p", log=quiet)
    make_batch(examples, [0, 1, 2], 32, center_crop=False, random_flip=True, generator=torch.Generator())
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    assert after == before
