"""A ControlNet as a command or a request names it: a file, a condition image and how to preprocess it, loaded into a
`controlnet.Control` with the line sd-webui-controlnet writes into the PNG's parameters. Shared by `minisd
generate / img2img / inpaint --controlnet` (cli/generate.py) and `minisd serve`'s ControlNet units, so both make the
same image from the same settings.
"""
import hashlib
import os
from pathlib import Path

from .config import ModelConfig
from .controlnet import Control, load_controlnet


# ControlNets shipped inside the package, by the name --controlnet takes (offline): the tiny model's canny one
# (minisd/tiny/canny.py; its recipe: `minisd train-tiny-controlnet`, train/tiny_controlnet.py)
NAMED = {"tiny-canny": Path(__file__).parent / "assets" / "minisd-tiny-canny.safetensors"}


def resolve(name):
    """A --controlnet value as a path: a built-in name (NAMED), else the file or folder it names."""
    if name not in NAMED:
        return name
    if not NAMED[name].exists():
        raise FileNotFoundError(f"the built-in ControlNet {name} is missing ({NAMED[name]}); rebuild it with "
                                f"`minisd train-tiny-controlnet --out DIR` and copy DIR/{NAMED[name].name} there")
    return str(NAMED[name])


def condition_image(image, how, canny=(100, 200), openpose_weights=None):
    """The condition image the ControlNet reads: the image itself ("none"), or its canny edges (low, high
    thresholds) / openpose skeleton (minisd/annotators, imported only when asked for)."""
    if how == "none":
        return image
    try:
        if how == "canny":
            from .annotators.canny import canny as annotate
        else:
            from .annotators.openpose import openpose as annotate
    except ImportError as e:
        raise ValueError(f"--control-preprocess {how}: this minisd has no minisd/annotators/{how}.py ({e})") from None
    if how == "canny":
        return annotate(image, low=canny[0], high=canny[1])
    return annotate(image, weights=openpose_weights)


def legacy_hash(path):
    """A1111's short model hash, which sd-webui-controlnet writes beside a ControlNet's name: the first 8 hex
    digits of sha256 over the 64 KiB at offset 1 MiB of the file (a diffusers folder: of its weights file)."""
    if os.path.isdir(path):
        path = next(os.path.join(path, n) for n in os.listdir(path) if n.startswith("diffusion_pytorch_model"))
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def load_control(file, image, how, scale, start, end, guess_mode, model_config: ModelConfig, canny=(100, 200),
                 openpose_weights=None):
    """(Control, its A1111 infotext value as sd-webui-controlnet writes it: "Module: ..., Model: NAME [hash], ...")
    for one ControlNet file and its image, preprocessed by `how` (condition_image)."""
    net = load_controlnet(file, model_config)
    control = Control(net, condition_image(image, how, canny, openpose_weights), scale, start, end, guess_mode)
    name = os.path.splitext(os.path.basename(os.path.normpath(file)))[0]
    thresholds = f"Threshold A: {canny[0]}, Threshold B: {canny[1]}, " if how == "canny" else ""
    mode = "ControlNet is more important" if guess_mode else "Balanced"
    field = (f"Module: {how}, Model: {name} [{legacy_hash(file)}], Weight: {scale:g}, Resize Mode: Just Resize, "
             f"{thresholds}Guidance Start: {start:g}, Guidance End: {end:g}, Control Mode: {mode}")
    return control, field
