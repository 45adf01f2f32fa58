"""BLIP-2's Querying Transformer (Li et al. 2023, sec. 3.1): 32 learned queries read the frozen image encoder's
tokens and hand a fixed-size summary to the frozen language model.

    queries (32, 768), learned, the same for every image -> LayerNorm
    -> 12 post-LN BERT layers (Devlin et al. 2019), each:
         x = LN(x + self-attention(x))                  the queries talk to each other (no mask)
         x = LN(x + cross-attention(x, image tokens))   every `cross_attention_frequency`-th layer (0, 2, 4, ...)
         x = LN(x + MLP(x))                              gelu
    -> (N, 32, 768)

The paper's Q-Former is BERT-base with a text path beside the queries (used in its first training stage for
image-text contrastive and matching losses); captioning runs the queries alone, so only their weights are built
(transformers' `intermediate_query`/`output_query`). The first stage initialised the Q-Former from BERT-base and
the cross-attention layers at random, inserted every other block ("every other transformer block", sec. 3.1).

transformers keeps the Q-Former in float32 whatever the rest's dtype (`_keep_in_fp32_modules`); blip2.py does too.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blip import Attention


@dataclass(frozen=True)
class QFormerConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_width: int = 1408        # the image encoder's width (EVA ViT-g)
    queries: int = 32


class QFormerLayer(nn.Module):
    """Post-LN (BERT): each sub-layer's output is added to its input, then normalised."""

    def __init__(self, cfg: QFormerConfig, cross: bool):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.heads, cfg.width)
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cross:
            self.cross_attn = Attention(cfg.width, cfg.heads, cfg.encoder_width)
            self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        else:
            self.cross_attn = self.ln_2 = None
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.ln_3 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x, image):                     # x: (N, queries, width); image: (N, tokens, encoder_width)
        attn = self.self_attn
        x = self.ln_1(x + attn(x, attn.k(x), attn.v(x)))
        if self.cross_attn is not None:
            attn = self.cross_attn
            x = self.ln_2(x + attn(x, attn.k(image), attn.v(image)))
        return self.ln_3(x + self.fc2(F.gelu(self.fc1(x))))


class QFormer(nn.Module):
    """Image tokens (N, T, encoder_width) -> query outputs (N, queries, width)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {cfg.cross_attention_frequency}")
        self.cfg = cfg
        self.queries = nn.Parameter(torch.zeros(cfg.queries, cfg.width))
        self.ln_in = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(cfg, cross=i % cfg.cross_attention_frequency == 0)
                                    for i in range(cfg.layers))

    def forward(self, image):
        image = image.to(self.queries.dtype)
        x = self.ln_in(self.queries.expand(image.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x, image)
        return x
