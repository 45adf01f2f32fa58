r"""The tiny world's own feature network: FID that means something offline.

FID is a distance between two Gaussians fitted to a classifier's features (fid.py). With Inception's weights out
of reach offline, its random-weight stand-in measures nothing; and even with them, ImageNet features say little
about 64x64 pictures of one coloured shape. So the tiny world (minisd/tiny/shapes.py) gets its own classifier,
trained by minisd's own loop on the procedural images, read out the way FID reads Inception:

    image (N, 3, 64, 64) -> 4 strided conv layers (64 -> 4 px) -> global average pool -> features (N, 128)
                                                                                         |-> colour      (8 logits)
                                                                                         |-> shape       (3 logits)
                                                                                         '-> background  (8 logits)

The 128 pooled features (Inception's pool3 analogue: the input of the heads, after the global pool) are what
`minisd fid --features tiny` and `minisd eval --features tiny` compare. The network is trained on all 168
(colour, shape, background) combinations, including the 12 the tiny diffusion model never saw, so it can read
what the model makes of a held-out prompt. GroupNorm, not BatchNorm: a feature must not depend on what else is in
the batch.

Here: the network, and its weights file (the config, and the training report, in the safetensors metadata). The
recipe that trains it on the shapes world, and its command, are minisd/train/tiny_features.py:

    minisd train-tiny-features --out runs/tiny-features    # reproduces the shipped weights
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FILENAME = "minisd-tiny-features.safetensors"


@dataclass(frozen=True)
class FeaturesConfig:
    image_size: int = 64                            # inputs of another size are resized to this (bilinear, antialias)
    widths: tuple = (16, 32, 64, 128)               # conv layers; the last width is the feature dimension
    strides: tuple = (2, 2, 2, 2)                   # 64 -> 32 -> 16 -> 8 -> 4
    groups: int = 8                                 # GroupNorm groups


class TinyFeatures(nn.Module):
    """uint8 images -> `input` -> pooled features (N, D) -> `heads` -> three sets of logits.

    `colours` and `shapes` are how many classes the heads tell apart (the shapes world's 8 colours, the colour and
    background heads, and its 3 shapes): the recipe gives the world's, `load_tiny_features` reads them off the
    weights."""

    def __init__(self, cfg: FeaturesConfig, colours: int, shapes: int):
        super().__init__()
        self.cfg = cfg
        layers, c_in = [], 3
        for width, stride in zip(cfg.widths, cfg.strides):
            layers += [nn.Conv2d(c_in, width, 3, stride=stride, padding=1), nn.GroupNorm(cfg.groups, width),
                       nn.ReLU()]
            c_in = width
        self.trunk = nn.Sequential(*layers)
        self.colour = nn.Linear(c_in, colours)
        self.shape = nn.Linear(c_in, shapes)
        self.background = nn.Linear(c_in, colours)

    @property
    def dim(self):
        return self.cfg.widths[-1]

    def input(self, images):
        """uint8 RGB (N, 3, H, W) or a list of (3, H, W), any size -> (N, 3, 64, 64) in [-1, 1] (the range
        images.to_tensor gives the training images)."""
        size = self.cfg.image_size
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-2:] == (size, size):
            x = images.float()
        else:
            x = torch.cat([F.interpolate(i[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                         align_corners=False) if i.shape[-2:] != (size, size) else i[None].float()
                           for i in images])
        return x / 127.5 - 1.0

    def forward(self, x):                                           # (N, 3, 64, 64) in [-1, 1]
        return self.trunk(x).mean(dim=(2, 3))                       # (N, D): the features FID compares

    def heads(self, features):
        return self.colour(features), self.shape(features), self.background(features)


# ---- weights ---------------------------------------------------------------------------------------------------

def default_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / FILENAME


def save(model, path, report=None):
    metadata = {"config": json.dumps(asdict(model.cfg))}
    if report is not None:
        metadata["report"] = json.dumps(report)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)


def load_tiny_features(path=None, device="cpu") -> TinyFeatures:
    """The shipped network (minisd/assets/) or the one at `path`, in eval mode."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise ValueError(f"tiny feature network {path} does not exist")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} is not a minisd tiny feature network (no 'config' in its metadata)")
    cfg = json.loads(meta["config"])
    state = load_file(str(path))
    model = TinyFeatures(FeaturesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}),
                         colours=len(state["colour.bias"]), shapes=len(state["shape.bias"]))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)
