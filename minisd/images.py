"""Images in and out: PIL <-> tensors, and PNG files that carry their generation parameters.

Tensors hold images as (B, 3, H, W) in [-1, 1], the range the VAE was trained on; `to_pil` / `from_pil` /
`to_tensor` convert with diffusers' rounding and resizing, so the same seed gives the same pixels.

The parameters go into a PNG text chunk named `parameters` in the layout AUTOMATIC1111's web UI writes
(`create_infotext` in its modules/processing.py), so A1111's "PNG Info" tab, civitai and most image viewers
show them, and `parse_a1111_parameters` reads them back:

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15

A file is written under a temporary name in the same directory and then renamed, so an interrupted run never
leaves a half-written PNG under the final name; an existing file is only replaced when asked (`--overwrite`).
"""
import json
import os
import re
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


def save_png(image: Image.Image, path, parameters: str, overwrite: bool = False) -> Path:
    """Write `image` to `path` as a PNG with `parameters` in a text chunk named "parameters".

    Written to a hidden temporary file in the same directory, then renamed over `path` (a rename within one
    directory is atomic), so `path` is either absent, the old file, or the complete new one. The directory is
    created if needed. Raises FileExistsError if `path` exists and `overwrite` is False.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"save_png needs a PIL.Image.Image, got {type(image).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)   # tEXt when latin-1 encodable, else PIL writes an iTXt chunk
    fd, tmp = temp_file_beside(path, suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_png_parameters(path) -> str | None:
    """The "parameters" text of a PNG written by minisd or A1111, or None if it has none."""
    with Image.open(path) as image:
        return image.info.get("parameters")


_NUMBERED = re.compile(r"^(\d+)-")


def output_paths(out, seeds, overwrite: bool = False) -> list[Path]:
    """The files to write one image per seed to, for `--out OUT`.

    - OUT is a directory (it exists as one, ends with a path separator, or has no file suffix): files are named
      like A1111's, `NNNNN-SEED.png`, numbered on from the highest number already there, so earlier images
      are never replaced: 00000-42.png, 00001-43.png, then a later run writes 00002-....png.
    - OUT is a file name ending in .png: one image is written to OUT itself; a batch of several is written to
      OUT with the batch index before the suffix: out-0.png, out-1.png, ... Existing files raise
      FileExistsError unless `overwrite` (checked here, before any image is generated).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("output_paths needs at least one seed")
    text = str(out)
    out = Path(out)
    is_dir = out.is_dir() or text.endswith(("/", os.sep)) or out.suffix == ""
    if is_dir:
        taken = [int(m.group(1)) for name in (os.listdir(out) if out.is_dir() else [])
                 if (m := _NUMBERED.match(name))]
        start = max(taken, default=-1) + 1
        return [out / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {text}: minisd writes PNG files; give a name ending in .png or a directory")
    paths = [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(seeds))]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    return paths
