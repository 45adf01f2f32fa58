"""CLIP's image tower: a Vision Transformer (Dosovitskiy et al. 2021) as CLIP trained it (Radford et al. 2021).

    pixels (N, 3, 224, 224), normalised with CLIP's mean/std (clip_score.preprocess)
    -> conv1: 14x14 patches, stride 14, no bias                      (N, width, 16, 16) -> (N, 256, width)
    -> prepend class_embedding, add positional_embedding             (N, 257, width)
    -> ln_pre (CLIP adds this LayerNorm before the transformer; ViT did not)
    -> `layers` pre-LN blocks: x + attn(ln_1 x), x + mlp(ln_2 x), attention NOT causal (unlike the text tower)
    -> ln_post of the class token, times proj                        (N, embed_dim)

The blocks are minisd/clip.py's, the text tower's, with the causal mask off. Module names are open_clip's
(`visual.` stripped), like the text tower's. `from_transformers` maps transformers' CLIPModel (`vision_model.*`,
`visual_projection.weight`) onto them: the per-block names are the text tower's (weights_convert/text.py), the
embeddings and LayerNorms are renamed, q/k/v are packed into in_proj, and visual_projection.weight
(embed_dim, width) is transposed into proj (width, embed_dim).
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from minisd.clip import Transformer
from weights_convert.io import check_shapes
from weights_convert.text import TRANSFORMERS_BLOCK, TRANSFORMERS_QKV


@dataclass(frozen=True)
class VisionConfig:
    """open_clip's CLIPVisionCfg fields that OpenAI's ViTs use."""
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16                   # head width 64, as in every OpenAI CLIP ViT
    embed_dim: int = 768              # the joint image-text space
    activation: str = "quick_gelu"    # OpenAI's weights were trained with x * sigmoid(1.702 x)


VIT_L_14 = VisionConfig()             # OpenAI CLIP ViT-L/14, whose text tower is SD1's (config.SD1_TEXT)


class ImageEncoder(nn.Module):
    """Normalised pixels (N, 3, S, S) -> image embeddings (N, embed_dim), not yet L2-normalised."""

    def __init__(self, cfg: VisionConfig = VIT_L_14):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, cfg.width) * cfg.width ** -0.5)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.heads, cfg.layers, cfg.activation, causal=False)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.randn(cfg.width, cfg.embed_dim) * cfg.width ** -0.5)

    def forward(self, pixels):
        size = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixels (N, 3, {size}, {size}), got {tuple(pixels.shape)}")
        x = self.conv1(pixels).flatten(2).transpose(1, 2)                         # (N, grid^2, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding                # (N, grid^2 + 1, width)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj                                  # (N, embed_dim)


# ---- weights: open_clip names are ours; transformers' CLIPModel is mapped by these tables --------------------

TRANSFORMERS = {    # ours: transformers CLIPModel
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",          # sic: transformers' spelling
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
TRANSFORMERS_PROJ = ("proj", "visual_projection.weight")          # transposed: (embed_dim, width) -> (width, ...)
TRANSFORMERS_UNUSED = ("vision_model.embeddings.position_ids",)   # a buffer older transformers saved
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")


def check(ours, cfg: VisionConfig):
    """Raise ValueError naming the first unknown, missing or mis-shaped key of an image-tower state dict."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ImageEncoder(cfg).state_dict().items()}
    check_shapes(ours, shapes, "image-tower", cfg)


def from_open_clip(sd, cfg: VisionConfig = VIT_L_14):
    """open_clip CLIP state dict (all of it, or just `visual.*`) -> our image-tower state dict."""
    ours = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    check(ours, cfg)
    return ours


def from_transformers(sd, cfg: VisionConfig = VIT_L_14):
    """transformers CLIPModel state dict (all of it, or just the vision keys) -> our image-tower state dict."""
    ours, qkv = {}, {}
    by_name = {v: k for k, v in TRANSFORMERS.items()}
    block_names = {v: k for k, v in TRANSFORMERS_BLOCK.items()}
    for key, tensor in sd.items():
        layer = _LAYER.match(key)
        if key in by_name:
            ours[by_name[key]] = tensor
        elif key == TRANSFORMERS_PROJ[1]:
            ours[TRANSFORMERS_PROJ[0]] = tensor.T.contiguous()
        elif layer and layer[2] in block_names:
            ours[f"transformer.resblocks.{layer[1]}.{block_names[layer[2]]}"] = tensor
        elif layer and any(layer[2] in parts for parts in TRANSFORMERS_QKV.values()):
            qkv[(layer[1], layer[2])] = tensor
        elif key.startswith("vision_model.") and key not in TRANSFORMERS_UNUSED:
            raise ValueError(f"unknown key {key!r} in a transformers CLIPModel vision tower")
    for i in sorted({i for i, _ in qkv}, key=int):
        for packed, parts in TRANSFORMERS_QKV.items():
            missing = [p for p in parts if (i, p) not in qkv]
            if missing:
                raise ValueError(f"missing key 'vision_model.encoder.layers.{i}.{missing[0]}'")
            ours[f"transformer.resblocks.{i}.{packed}"] = torch.cat([qkv[(i, p)] for p in parts], dim=0)
    check(ours, cfg)
    return ours
