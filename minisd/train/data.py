"""Training images from a folder: what `--data DIR`, `--instance-dir DIR`, `--class-dir DIR` and `--reg-data-dir DIR`
point at.

Two layouts:

- a plain folder of images (png, jpg, jpeg, webp, bmp, any case), read in sorted order, not from subfolders (as
  diffusers' train_dreambooth and kohya's default);
- kohya-ss/sd-scripts' DreamBooth layout: no images at the top, only subfolders named `N_prompt` (`10_sks dog`),
  each a plain folder whose images an epoch holds N times (their `repeats`) and whose uncaptioned images take
  `prompt` as caption (kohya's `class_tokens`: the name after the first "_"). Hidden subfolders are skipped; a
  subfolder with another name is an error (kohya skips it with a warning, which silently trains on less).

Each image's caption is, first found:

1. `NAME.txt` beside `NAME.png` (the A1111 / kohya convention; `--caption-extension .caption` for kohya's other
   name), stripped of surrounding whitespace;
2. the `text` of its line `{"file_name": "NAME.png", "text": ...}` in `metadata.jsonl` (diffusers' ImageFolder);
3. the prompt of its `N_prompt` folder, when not empty;
4. the caller's fallback prompt (DreamBooth's instance or class prompt).

The per-image file wins over metadata.jsonl because it is the more specific of the two and the one captioning
tools (BLIP, WD14 taggers) write last; a note says how many images had both. Nothing in the folder is written:
files are opened read-only and no cache is left behind.

Preprocessing is diffusers' train_dreambooth / train_text_to_image transform, done with PIL: resize the shorter
side to `resolution` (torchvision's Resize on a PIL image is PIL's antialiased bilinear), centre or random crop,
optional horizontal flip, to (3, H, W) in [-1, 1]. The random choices come from a torch.Generator drawn in
torchvision's order (crop top, crop left, flip), so a batch is a pure function of the generators it is given
(fine-tuning gives each example its own, seeded from (seed, step, place in the batch): step.py), and a resumed
run sees the same pixels. With --enable-bucket, buckets.py crops to each image's bucket instead.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image, ImageOps

from ..images import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Example:
    """One training image. caption: a str, or a tuple of alternatives drawn per use (textual inversion's
    templates, a dataset row's list of captions: batches.pick_caption). repeats: how many times an epoch holds it
    (kohya's `N_prompt` folders; 1 in a plain folder). size: (width, height) as decoded and turned upright, what
    aspect-ratio buckets need (None: not known, read from the image when needed); it describes the image, so it
    takes no part in comparisons. `path` is the image file, read by load_image; with a `loader` (a dataset's row:
    hf_dataset.py) it only names the image in messages, and loader() returns the image, upright RGB as load_image
    returns it. condition: the file of its ControlNet conditioning image (train/control_data.py), else None; with
    a `condition_loader` (a dataset row's conditioning column) it only names that image, as `path` with `loader`."""
    path: str
    caption: str
    repeats: int = 1
    size: tuple | None = field(default=None, compare=False)
    loader: Callable | None = field(default=None, compare=False)
    condition: str | None = None
    condition_loader: Callable | None = field(default=None, compare=False)

    def image(self):
        """The PIL image every batch and cached latent of this example is made from."""
        return self.loader() if self.loader is not None else load_image(self.path)

    def condition_image(self):
        """The conditioning image at the size of image() (resized with PIL's bilinear if it differs), so that
        one crop and flip (the same draws) fit both."""
        image = self.condition_loader() if self.condition_loader is not None else load_image(self.condition)
        size = self.size or self.image().size
        return image if image.size == size else image.resize(size, Image.BILINEAR)


def check_resolution(resolution):
    """The VAE downsamples by 8, so a training side must be a positive multiple of 8."""
    if not (isinstance(resolution, int) and resolution > 0 and resolution % 8 == 0):
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution!r}")


def read_text(path):
    """The text of a caption or metadata file: UTF-8, else a one-line error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def read_metadata(folder):
    """{file_name: text} from folder/metadata.jsonl, or {} without one."""
    path = os.path.join(folder, METADATA)
    if not os.path.exists(path):
        return {}
    captions = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
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


def check_caption_extension(caption_extension):
    if not (isinstance(caption_extension, str) and len(caption_extension) > 1 and caption_extension[0] == "."
            and caption_extension.lower() not in IMAGE_EXTENSIONS + (".jsonl",)):
        raise ValueError(f"--caption-extension must be a file extension such as .txt or .caption, got "
                         f"{caption_extension!r}")


def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def repeats_and_prompt(name, folder):
    """(N, prompt) of a kohya subfolder named `N_prompt` (kohya's extract_dreambooth_params: the prompt is the
    name after the first "_"; N alone is allowed and has no prompt)."""
    head, _, prompt = name.partition("_")
    if not (head.isascii() and head.isdigit() and int(head) > 0):
        raise ValueError(f"{os.path.join(folder, name)}: the subfolders of kohya's layout are named N_prompt with N "
                         f"a positive integer (the repeats), got {name!r}")
    return int(head), prompt


def is_kohya_layout(folder):
    """Whether `folder` holds no images and at least one subfolder (not hidden): kohya's `N_prompt` layout."""
    if not os.path.isdir(folder):
        return False
    names = os.listdir(folder)
    return not any(map(is_image, names)) and any(
        not n.startswith(".") and os.path.isdir(os.path.join(folder, n)) for n in names)


def find_examples(folder, resolution, fallback_caption=None, log=print, caption_extension=".txt",
                  skip_bad_images=False):
    """Every image in `folder` (a plain folder or kohya's `N_prompt` layout: module docstring) with its caption,
    repeats and size, checked before any training starts.

    Every image is decoded once here: `Image.verify()` only checks PNG checksums, and a truncated JPEG or WebP
    passes it and would fail hours into a run. Decoding costs ~2 ms per 512 px JPEG, a second per 500 images.
    An image that cannot be decoded is an error naming it, or with skip_bad_images a note counting them."""
    check_resolution(resolution)
    check_caption_extension(caption_extension)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder" if os.path.exists(folder) else f"{folder} does not exist")
    names = sorted(os.listdir(folder))
    if not names:
        raise ValueError(f"{folder} is empty")
    bad = []
    if not is_kohya_layout(folder):
        if not any(map(is_image, names)):
            raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) and no N_prompt subfolders "
                             f"(kohya's layout) in {folder}")
        kohya = [n for n in names if os.path.isdir(os.path.join(folder, n)) and "_" in n
                 and n.partition("_")[0].isdigit()]
        if kohya:
            raise ValueError(f"{folder} holds both images and kohya's N_prompt subfolders ({kohya[0]}); in kohya's "
                             f"layout every image is in a N_prompt subfolder")
        examples = _read_folder(folder, names, fallback_caption, 1, caption_extension, bad, skip_bad_images, log)
    else:
        examples, skipped = [], []
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith(".") or not os.path.isdir(path):
                skipped.append(name)
                continue
            repeats, prompt = repeats_and_prompt(name, folder)
            inner = sorted(os.listdir(path))
            if not any(map(is_image, inner)):
                raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {path}")
            examples += _read_folder(path, inner, prompt or fallback_caption, repeats, caption_extension, bad,
                                     skip_bad_images, log)
        if skipped:
            log(f"skipped {len(skipped)} entries in {folder} that are not N_prompt subfolders (first: {skipped[0]})")
    if bad:
        log(f"skipped {len(bad)} images that cannot be decoded (--skip-bad-images; first: {bad[0]})")
        if not examples:
            raise ValueError(f"no readable images in {folder}: all {len(bad)} cannot be decoded")
    return examples


def _read_folder(folder, names, fallback_caption, repeats, caption_extension, bad, skip_bad_images, log):
    """The examples of one plain folder whose sorted entries are `names` (at least one an image); undecodable
    images are appended to `bad` when skip_bad_images, else an error."""
    images = [n for n in names if is_image(n)]
    metadata = read_metadata(folder)
    unknown = sorted(set(metadata) - set(images))
    if unknown:
        raise ValueError(f"{os.path.join(folder, METADATA)} names {unknown[0]}, which is not an image in {folder}")

    caption_files = {os.path.splitext(n)[0] + caption_extension for n in images}
    skipped = [n for n in names if n not in images and n not in caption_files and n != METADATA]
    if skipped:
        log(f"skipped {len(skipped)} entries in {folder} that are not images or captions (first: {skipped[0]})")

    examples, both, missing = [], 0, []
    for name in images:
        path = os.path.join(folder, name)
        try:
            size = load_image(path).size
        except Exception as e:                   # PIL raises OSError, SyntaxError, ValueError... for bad files
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            if not skip_bad_images:
                raise ValueError(f"{path} is not a readable image ({reason}); --skip-bad-images skips such "
                                 f"images") from None
            bad.append(f"{path}: {reason}")
            continue
        caption_file = os.path.join(folder, os.path.splitext(name)[0] + caption_extension)
        if os.path.isfile(caption_file):
            caption = read_text(caption_file).strip()
            both += name in metadata
        elif name in metadata:
            caption = metadata[name]
        elif fallback_caption is not None:
            caption = fallback_caption
        else:
            missing.append(name)
            continue
        examples.append(Example(path, caption, repeats, size))
    if missing:
        raise ValueError(f"{len(missing)} images in {folder} have no caption (first: {missing[0]}); add "
                         f"NAME{caption_extension} or {METADATA} lines, or put them in a subfolder named N_prompt (kohya's "
                         "layout: the prompt is their caption)")
    if both:
        log(f"{both} images in {folder} have both a {caption_extension} caption and a {METADATA} line; using the "
            f"{caption_extension}")
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
