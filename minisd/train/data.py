"""Training images from a folder: what `--data DIR`, `--instance-dir DIR` and `--class-dir DIR` point at.

A folder holds images (png, jpg, jpeg, webp, bmp, any case), read in sorted order, not from subfolders (as
diffusers' train_dreambooth and kohya's default). Each image's caption is, first found:

1. `NAME.txt` beside `NAME.png` (the A1111 / kohya convention), stripped of surrounding whitespace;
2. the `text` of its line `{"file_name": "NAME.png", "text": ...}` in `metadata.jsonl` (diffusers' ImageFolder);
3. the caller's fallback prompt (DreamBooth's instance or class prompt).

The per-image file wins over metadata.jsonl because it is the more specific of the two and the one captioning
tools (BLIP, WD14 taggers) write last; a note says how many images had both. Nothing in the folder is written:
files are opened read-only and no cache is left behind.

Preprocessing is diffusers' train_dreambooth / train_text_to_image transform, done with PIL: resize the shorter
side to `resolution` (torchvision's Resize on a PIL image is PIL's antialiased bilinear), centre or random crop,
optional horizontal flip, to (3, H, W) in [-1, 1]. The random choices come from a torch.Generator drawn in
torchvision's order (crop top, crop left, flip), so a batch is a pure function of the generators it is given
(fine-tuning gives each example its own, seeded from (seed, step, place in the batch): step.py), and a resumed
run sees the same pixels.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, ImageOps

from ..images import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Example:
    """A training image and its caption (a str; a tuple holds alternatives, one drawn per use: batches.pick_caption).
    `path` is the image file, read by load_image; with a `loader` (a dataset's row: hf_dataset.py) it only names
    the image in messages, and loader() returns the image, upright RGB as load_image returns it."""
    path: str
    caption: str
    loader: Callable | None = None

    def image(self):
        """The PIL image every batch and cached latent of this example is made from."""
        return self.loader() if self.loader is not None else load_image(self.path)


def check_resolution(resolution):
    """The VAE downsamples by 8, so a training side must be a positive multiple of 8."""
    if not (isinstance(resolution, int) and resolution > 0 and resolution % 8 == 0):
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution!r}")


def read_metadata(folder):
    """{file_name: text} from folder/metadata.jsonl, or {} without one."""
    path = os.path.join(folder, METADATA)
    if not os.path.exists(path):
        return {}
    captions = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[entry["file_name"]] = entry["text"].strip()
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path} line {n} is not {{\"file_name\": ..., \"text\": ...}}") from None
    return captions


def load_image(path):
    """The image at `path` as RGB, upright (EXIF orientation applied, as train_dreambooth does)."""
    with Image.open(path) as image:            # read-only; the file is closed on leaving
        return ImageOps.exif_transpose(image).convert("RGB")


def find_examples(folder, resolution, fallback_caption=None, log=print):
    """Every image in `folder` with its caption, checked before any training starts.

    Every image is decoded once here: `Image.verify()` only checks PNG checksums, and a truncated JPEG or WebP
    passes it and would fail hours into a run. Decoding costs ~2 ms per 512 px JPEG, a second per 500 images."""
    check_resolution(resolution)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder" if os.path.exists(folder) else f"{folder} does not exist")
    names = sorted(os.listdir(folder))
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {folder}")
    metadata = read_metadata(folder)
    unknown = sorted(set(metadata) - set(images))
    if unknown:
        raise ValueError(f"{os.path.join(folder, METADATA)} names {unknown[0]}, which is not an image in {folder}")

    captions_txt = {os.path.splitext(n)[0] + ".txt" for n in images}
    skipped = [n for n in names if n not in images and n not in captions_txt and n != METADATA]
    if skipped:
        log(f"skipped {len(skipped)} entries in {folder} that are not images or captions (first: {skipped[0]})")

    examples, both, missing = [], 0, []
    for name in images:
        path = os.path.join(folder, name)
        try:
            load_image(path)
        except Exception as e:                   # PIL raises OSError, SyntaxError, ValueError... for bad files
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path} is not a readable image ({reason})") from None
        txt = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                caption = f.read().strip()
            both += name in metadata
        elif name in metadata:
            caption = metadata[name]
        elif fallback_caption is not None:
            caption = fallback_caption
        else:
            missing.append(name)
            continue
        examples.append(Example(path, caption))
    if missing:
        raise ValueError(f"{len(missing)} images in {folder} have no caption (first: {missing[0]}); add NAME.txt "
                         f"or {METADATA} lines, or give a prompt")
    if both:
        log(f"{both} images in {folder} have both a .txt caption and a {METADATA} line; using the .txt")
    return examples


def resize_and_crop(image, resolution, center_crop=True, random_flip=False, generator=None):
    """torchvision's Resize(resolution, BILINEAR) + CenterCrop or RandomCrop + RandomHorizontalFlip on a PIL
    image, drawing from `generator` where torchvision draws from the global RNG."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(resolution * long / short)              # torchvision truncates the longer side
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)         # PIL's bilinear widens its filter when shrinking
    w, h = size
    if center_crop:
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))  # Python's round
    elif (w, h) == (resolution, resolution):
        top = left = 0                                     # torchvision draws nothing for an exact fit
    else:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand(1, generator=generator) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def make_batch(examples, indices, resolution, center_crop=True, random_flip=False, generator=None):
    """Images (B, 3, resolution, resolution) in [-1, 1] and their captions for examples[i], i in `indices`."""
    check_resolution(resolution)
    if (not center_crop or random_flip) and generator is None:
        raise ValueError("random crops and flips need a torch.Generator (seeded from (seed, step) by the loop)")
    picked = [examples[i] for i in indices]
    images = [resize_and_crop(e.image(), resolution, center_crop, random_flip, generator) for e in picked]
    return to_tensor(images), [e.caption for e in picked]
