"""OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models"), the frozen language model of
BLIP-2's blip2-opt-2.7b: a GPT-style decoder.

    input embeddings (N, T, width): token embeddings, or BLIP-2's projected queries in front of them
    + learned positions, looked up at position + 2     (fairseq reserved rows 0 and 1: its padding convention)
    -> `layers` pre-LN blocks: x + attn(ln_1 x) (causal), x + fc2(relu(fc1(ln_2 x)))
    -> ln_final -> @ token_embedding^T                 (the output matrix is the input one, tied)
    -> next-token logits (N, T, vocab)

OPT-2.7B: width 2560, 32 layers, 32 heads, MLP 10240, vocabulary 50272 (BLIP-2's file: 50304, with <image>).
The 350M model is post-LN and projects its 512-wide embeddings to 1024; BLIP-2 uses the 2.7B and 6.7B ones, so
only the pre-LN, unprojected form is built.

Generation feeds the decoder incrementally: `forward` takes the new positions' embeddings and the keys/values of
the earlier ones (a cache), and returns the new ones'. A prompt runs causally in one call; then each new token
attends to everything before it, which is the same thing.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention

POSITION_OFFSET = 2


@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    width: int = 2560
    layers: int = 32
    heads: int = 32
    ffn_width: int = 10240
    max_positions: int = 2048
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 2            # </s>: OPT starts every text with it
    eos_token_id: int = 2            # BLIP-2's OPT configs end a caption at "\n" (50118) instead
    pad_token_id: int = 1


class Attention(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.width, cfg.width)
        self.k = nn.Linear(cfg.width, cfg.width)
        self.v = nn.Linear(cfg.width, cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, past_k, past_v):
        """x: the new positions (N, T, width); past_k/v: the earlier ones' (N, P, width). -> out, k, v."""
        k = torch.cat([past_k, self.k(x)], dim=1)
        v = torch.cat([past_v, self.v(x)], dim=1)
        # causal among the new positions when there is no past; one new position sees the whole past anyway
        out = attention(self.q(x), k, v, self.heads, causal=x.shape[1] > 1 and past_k.shape[1] == 0)
        return self.out(out), k, v


class Block(nn.Module):
    """Pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_width)
        self.fc2 = nn.Linear(cfg.ffn_width, cfg.width)

    def forward(self, x, past_k, past_v):
        h, k, v = self.attn(self.ln_1(x), past_k, past_v)
        x = x + h
        return x + self.fc2(F.relu(self.fc1(self.ln_2(x)))), k, v


class OPT(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.max_positions + POSITION_OFFSET, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def empty_cache(self, n, like):
        """The cache before the first position: [k_0, v_0, k_1, v_1, ...], each (n, 0, width)."""
        return [like.new_zeros(n, 0, self.cfg.width)] * (2 * len(self.blocks))

    def forward(self, x, cache):
        """x: embeddings of the new positions (N, T, width); cache: keys/values of the earlier ones.
        Returns the last layer's output after ln_final (N, T, width) and the cache including the new positions."""
        start = cache[0].shape[1]
        if start + x.shape[1] > self.cfg.max_positions:
            raise ValueError(f"a sequence longer than OPT's {self.cfg.max_positions} positions")
        x = x + self.positional_embedding[POSITION_OFFSET + start:POSITION_OFFSET + start + x.shape[1]]
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cache[2 * i], cache[2 * i + 1])
            new_cache += [k, v]
        return self.ln_final(x), new_cache

    def logits(self, h):
        """Output (..., width) -> next-token scores (..., vocab), through the tied token embedding."""
        return h @ self.token_embedding.weight.T
