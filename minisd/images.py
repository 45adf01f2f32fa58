"""Images in and out: PIL <-> tensors, and PNG files that carry their generation parameters.

Tensors hold images as (B, 3, H, W) in [-1, 1], the range the VAE was trained on; `to_pil` / `from_pil` /
`to_tensor` convert with diffusers' rounding and resizing, so the same seed gives the same pixels.

The parameters go into a PNG text chunk named `parameters` in the layout AUTOMATIC1111's web UI writes
(`create_infotext` in its modules/processing.py), so A1111's "PNG Info" tab, civitai and most image viewers
show them, and `parse_a1111_parameters` reads them back:

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15

JPEG and WebP files carry the same text where A1111 puts it (modules/images.py, save_image_with_geninfo): the EXIF
UserComment, encoded as piexif.helper.UserComment.dump(text, encoding="unicode") writes it, in the EXIF block
piexif.dump builds (`a1111_exif`). `read_png_parameters` reads all three formats back.

A file is written under a temporary name in the same directory and then renamed, so an interrupted run never
leaves a half-written image under the final name; an existing file is only replaced when asked (`--overwrite`).
"""
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from weights_convert.io import temp_file_beside


def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers does."""
    images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (images * 255).round().astype("uint8")]


def to_tensor(images):
    """PIL RGB images of one size -> (B, 3, H, W) in [-1, 1]."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def from_pil(image, multiple=8, log=print):
    """PIL image of any mode -> (1, 3, H, W) in [-1, 1], resized down to a multiple of `multiple` if needed."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"init_image must be a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")           # RGBA, L, P, CMYK... -> RGB (alpha dropped, as diffusers does)
    w, h = image.size
    w8, h8 = w - w % multiple, h - h % multiple
    if w8 == 0 or h8 == 0:
        raise ValueError(f"init image is {w}x{h}; it must be at least {multiple}x{multiple}")
    if (w8, h8) != (w, h):
        log(f"init image {w}x{h} resized to {w8}x{h8} (a multiple of {multiple})")
        image = image.resize((w8, h8), Image.LANCZOS)      # diffusers' VaeImageProcessor does the same
    return to_tensor([image])


# ---------------------------------------------------------------------------------------------------------------
# PNG files with A1111 parameters

# A1111's key order (create_infotext); keyword argument -> label. Other keywords are written after these, in the
# order given, labelled by sentence-casing the keyword (eta -> "Eta"), and "Version" comes last, as in A1111.
A1111_LABELS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "schedule_type": "Schedule type",   # newer A1111 writes the sigma schedule separately: "Karras", "Automatic"
    "cfg": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model_hash": "Model hash",
    "model": "Model",
    "vae_hash": "VAE hash",
    "vae": "VAE",
    "denoising_strength": "Denoising strength",
    "clip_skip": "Clip skip",
    "rng": "RNG",                       # A1111 writes "RNG: CPU" when the noise came from a CPU generator
}


def _quote(value):
    """A1111's infotext quoting: a value holding a comma, newline or colon is written as a JSON string."""
    text = str(value)
    if "," in text or "\n" in text or ":" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def a1111_parameters(prompt, negative_prompt, steps, sampler, cfg, seed, width, height, model, **extra) -> str:
    """The generation parameters as A1111 writes them. Fields whose value is None are left out (A1111 omits
    unused ones, e.g. "Clip skip" when it is 1); the "Negative prompt" line is left out when it is empty."""
    fields = dict(steps=steps, sampler=sampler, cfg=cfg, seed=seed, size=f"{width}x{height}", model=model)
    fields.update(extra)
    version = fields.pop("version", None)
    known = [key for key in A1111_LABELS if key in fields]
    others = [key for key in fields if key not in A1111_LABELS]
    labelled = [(A1111_LABELS[key], fields[key]) for key in known]
    # a keyword that is already a label ("ControlNet 0", as sd-webui-controlnet writes it) is kept as it is
    labelled += [(key if " " in key else key.replace("_", " ").capitalize(), fields[key]) for key in others]
    labelled.append(("Version", version))
    # A1111 writes a field whose value equals its label as the bare label
    params = ", ".join(label if label == value else f"{label}: {_quote(value)}"
                       for label, value in labelled if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{params}".strip()


# One "Key: value" pair of the last line; a value is a JSON string (may hold commas) or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict:
    """Read A1111 generation parameters back (the core of A1111's `parse_generation_parameters`).

    Returns {"Prompt": str, "Negative prompt": str, label: value, ...} with every value a string, as A1111
    does. Unlike A1111 it keeps "Size" whole ("512x512") and adds no defaults for missing fields.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:     # as A1111: a last line with fewer than 3 pairs is still prompt text
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass                       # A1111 keeps a value it cannot unquote as it is
        result[key] = value
    return result


# Image file formats by suffix; JPEG and WebP at A1111's default quality (its options jpeg_quality=80, and
# webp_lossless=False, saved with the same quality)
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 80
EXIF_IFD, USER_COMMENT, UNDEFINED = 0x8769, 0x9286, 7      # EXIF 2.32 tags, and the TIFF type of UserComment


def a1111_exif(parameters: str) -> bytes:
    """The EXIF block A1111 writes into a JPEG or WebP: piexif.dump({"Exif": {UserComment: piexif.helper.
    UserComment.dump(parameters, encoding="unicode")}}), byte for byte.

    UserComment.dump is the 8-byte character-code prefix "UNICODE\0" (EXIF 2.32, table 9) and the text in
    UTF-16BE. piexif.dump writes a big-endian TIFF header, IFD0 holding only the pointer to the Exif IFD, then
    the Exif IFD with one entry of type UNDEFINED and (piexif's habit) no next-IFD offset, then the value.
    Not pillow's Image.Exif: it stores bytes as type BYTE, which piexif reads back as a tuple of ints that
    A1111's reader cannot decode."""
    comment = b"UNICODE\0" + parameters.encode("utf-16-be", errors="replace")
    tiff_header = b"MM\x00\x2a" + struct.pack(">I", 8)                       # IFD0 right after the header
    exif_ifd_offset = 8 + 2 + 12 + 4                                          # header + IFD0
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", EXIF_IFD, 4, 1, exif_ifd_offset) + struct.pack(">I", 0)
    value_offset = exif_ifd_offset + 2 + 12
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", USER_COMMENT, UNDEFINED, len(comment), value_offset)
    return b"Exif\x00\x00" + tiff_header + ifd0 + exif_ifd + comment


def save_image(image: Image.Image, path, parameters: str, overwrite: bool = False, fmt=None) -> Path:
    """Write `image` to `path` with the generation parameters where A1111 puts them: a PNG text chunk named
    "parameters" (.png), or the EXIF UserComment (.jpg, .jpeg, .webp; see a1111_exif). fmt: "PNG", "JPEG" or
    "WEBP" whatever the name says; None: by the suffix.

    Written to a hidden temporary file in the same directory, then renamed over `path` (a rename within one
    directory is atomic), so `path` is either absent, the old file, or the complete new one. The directory is
    created if needed. Raises FileExistsError if `path` exists and `overwrite` is False.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"save_image needs a PIL.Image.Image, got {type(image).__name__}")
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: minisd writes {', '.join(FORMATS)} files")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("parameters", parameters)   # tEXt when latin-1 encodable, else PIL writes an iTXt chunk
        options = dict(pnginfo=info)
    else:
        image = image.convert("RGB")              # as A1111: JPEG has no alpha
        options = dict(quality=QUALITY, exif=a1111_exif(parameters))
    fd, tmp = temp_file_beside(path, suffix=path.suffix + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_png(image: Image.Image, path, parameters: str, overwrite: bool = False) -> Path:
    """save_image as a PNG, whatever the name."""
    return save_image(image, path, parameters, overwrite, fmt="PNG")


def read_png_parameters(path) -> str | None:
    """The generation parameters of an image written by minisd or A1111: a PNG's "parameters" chunk, or a
    JPEG's / WebP's EXIF UserComment (A1111's read_info_from_image); None if it has none."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not isinstance(comment, bytes) or len(comment) < 8:
        return None
    # piexif.helper.UserComment.load: the 8-byte prefix names the code; A1111 reads an unknown one as UTF-8
    codes = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis"}
    code = codes.get(comment[:8])
    text = comment[8:].decode(code, errors="replace") if code else comment.decode("utf-8", errors="ignore")
    return text or None


def image_grid(images, rows=None):
    """The images pasted into one grid, as A1111's images.image_grid with its default options: rows =
    round(sqrt(n)) (n_rows=-1, grid_prevent_empty_spots off), cols = ceil(n / rows), cells the size of the
    largest image with smaller images centred, on white (grid_background_color #ffffff)."""
    if not images:
        raise ValueError("a grid needs at least one image")
    rows = min(rows or round(math.sqrt(len(images))), len(images))
    cols = math.ceil(len(images) / rows)
    w, h = map(max, zip(*(im.size for im in images)))
    grid = Image.new("RGB", (cols * w, rows * h), color="#ffffff")
    for i, im in enumerate(images):
        grid.paste(im, box=(i % cols * w + (w - im.width) // 2, i // cols * h + (h - im.height) // 2))
    return grid


_GRID = re.compile(r"^grid-(\d+)\.")
_NUMBERED = re.compile(r"^(\d+)-")


def _next_number(folder: Path, numbered) -> int:
    """One more than the highest number the file names in `folder` carry (`numbered`'s group 1), 0 for none:
    A1111's numbering on, which never replaces an earlier file."""
    taken = [int(m.group(1)) for name in (os.listdir(folder) if folder.is_dir() else [])
             if (m := numbered.match(name))]
    return max(taken, default=-1) + 1


def grid_path(out, suffix=".png") -> Path:
    """Where a grid of the images written for `--out OUT` goes: in a folder, A1111's grid-NNNN numbered on from
    the highest there (grid-0000.png, grid-0001.png, ...); beside a file OUT, OUT's stem + "-grid"."""
    out = Path(out)
    if out.suffix.lower() in FORMATS:
        return out.with_name(f"{out.stem}-grid{out.suffix}")
    return out / f"grid-{_next_number(out, _GRID):04d}{suffix}"


def output_paths(out, seeds, overwrite: bool = False, suffix=None) -> list[Path]:
    """The files to write one image per seed to, for `--out OUT` (suffix: .png, .jpg or .webp; None: OUT's own,
    else .png).

    - OUT is a directory (it exists as one, ends with a path separator, or has no file suffix): files are named
      like A1111's, `NNNNN-SEED.png`, numbered on from the highest number already there, so earlier images
      are never replaced: 00000-42.png, 00001-43.png, then a later run writes 00002-....png.
    - OUT is a file name ending in .png, .jpg, .jpeg or .webp: one image is written to OUT itself; a batch of
      several is written to OUT with the batch index before the suffix: out-0.png, out-1.png, ... Existing
      files raise FileExistsError unless `overwrite` (checked here, before any image is generated).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("output_paths needs at least one seed")
    text = str(out)
    out = Path(out)
    is_dir = out.is_dir() or text.endswith(("/", os.sep)) or out.suffix == ""
    if is_dir:
        start = _next_number(out, _NUMBERED)
        return [out / f"{start + i:05d}-{seed}{suffix or '.png'}" for i, seed in enumerate(seeds)]
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"--out {text}: minisd writes PNG, JPEG or WebP files; give a name ending in "
                         f"{', '.join(FORMATS)} or a directory")
    if suffix is not None and FORMATS[out.suffix.lower()] != FORMATS[suffix]:
        raise ValueError(f"--out {text} and --format {suffix[1:]} disagree: give one of them")
    paths = [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(seeds))]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    return paths
