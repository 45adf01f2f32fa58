"""Captioning: BLIP (blip.py) and BLIP-2 (blip2.py) written by hand, with their tokenizers, image processing and
decoding (decode.py). `minisd caption` (cli/caption.py) writes a caption file beside each picture.

`load(model)` is what `--model` names: `blip-base`, `blip-large`, `blip2-opt-2.7b` (transformers folders fetched
once into the cache, download.FOLDERS), `tiny` (the tiny world's captioner shipped in minisd/assets/), or the
path of a transformers folder. The folder's config.json says which network it is (`model_type`).
"""
from pathlib import Path

import torch

TINY = Path(__file__).resolve().parent.parent / "assets" / "tiny_captioner"


def resolve(model: str) -> Path:
    """The local transformers folder `model` names (downloading a named one the first time)."""
    from ..download import FOLDERS, fetch_folder
    if model in FOLDERS:
        return fetch_folder(model)
    if model == "tiny":
        if not (TINY / "config.json").is_file():
            raise ValueError(f"the tiny captioner is not installed ({TINY} has no config.json)")
        return TINY
    path = Path(model)
    if not path.exists():
        raise ValueError(f"unknown model {model!r}: not a folder, nor one of {', '.join([*FOLDERS, 'tiny'])}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{model} is not a transformers model folder (no config.json in it)")
    return path


def load(model: str, device="cpu", dtype=torch.float32):
    """The captioner `model` names, on `device` in `dtype`: an object with
    `.caption(images, prompt=None, num_beams=1, min_length=5, max_length=75) -> list of str`."""
    from weights_convert.folders import read_config
    folder = resolve(model)
    kind = read_config(folder).get("model_type")
    if kind == "blip":
        from .blip import load_blip
        return load_blip(folder, device, dtype)
    if kind == "blip-2":
        try:
            from .blip2 import load_blip2
        except ImportError:
            raise ValueError("this minisd has no BLIP-2 captioner (minisd/caption/blip2.py)") from None
        return load_blip2(folder, device, dtype)
    raise ValueError(f"{folder}: model_type {kind!r} is not a captioner minisd knows (blip, blip-2)")
