"""The image encoder of BLIP and BLIP-2: a Vision Transformer (Dosovitskiy et al. 2021).

    pixels (N, 3, S, S), normalised with CLIP's mean/std (preprocess.py)
    -> patch_embed: P x P patches, stride P, with bias               (N, width, S/P, S/P) -> (N, (S/P)^2, width)
    -> prepend class_embedding, add the learned positional_embedding  (N, (S/P)^2 + 1, width)
    -> `layers` pre-LN blocks: x + attn(ln_1 x), x + mlp(ln_2 x)      (no mask: every patch sees every patch)
    -> ln_post on every token                                        (N, (S/P)^2 + 1, width)

Unlike CLIP's image tower (metrics/clip_image.py) there is no LayerNorm before the blocks, the patch convolution
has a bias, and the whole token sequence comes out: the text decoder (BLIP) or the Q-Former (BLIP-2)
cross-attends to all of it. BLIP uses ViT-B/16 or ViT-L/16 at 384 px (Li et al. 2022, sec. 3.1); BLIP-2 uses
EVA-CLIP's ViT-g/14 at 224 px (Fang et al. 2022; Li et al. 2023, sec. 3.1) with an MLP 4.36x its width and
LayerNorm eps 1e-6: `ViTConfig` holds what differs. q, k and v are one Linear with a bias (BLIP's file stores
it so; BLIP-2's stores q_bias and v_bias with no k bias, which its key map turns into one bias with zeros for k).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention


@dataclass(frozen=True)
class ViTConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    image_size: int = 384
    patch_size: int = 16
    layer_norm_eps: float = 1e-5

    @property
    def tokens(self):
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)          # rows: q, then k, then v
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):                                        # x: (N, T, width)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attention(q, k, v, self.heads))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))                     # exact gelu, x * Phi(x)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """Normalised pixels (N, 3, S, S) -> image features (N, (S/P)^2 + 1, width), class token first."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.tokens, cfg.width))   # learned, one per token
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        size = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixels (N, 3, {size}, {size}), got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2)                                          # (N, (S/P)^2, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)    # (N, (S/P)^2 + 1, width)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)
