"""Scaled dot-product attention, the one function every network here calls.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V          (Vaswani et al. 2017, eq. 1)

Two paths compute the same thing: `attention_math` spells the equation out for readers, and the default path
calls `torch.nn.functional.scaled_dot_product_attention`, which dispatches to fused (flash / memory-efficient)
kernels. tests/test_attention.py checks that they agree.
"""
import torch
import torch.nn.functional as F
from einops import rearrange


def attention_math(q, k, v, causal=False):
    """q: (B, heads, Nq, d), k and v: (B, heads, Nk, d) -> (B, heads, Nq, d)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5              # (B, heads, Nq, Nk)
    if causal:  # token i may only look at tokens j <= i (CLIP's text transformer)
        nq, nk = scores.shape[-2:]
        future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    # softmax in fp32: in fp16 the exp of large scores overflows (why diffusers "upcasts" SD2's attention)
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    return weights @ v


def attention(q, k, v, heads, causal=False, fast=True):
    """Multi-head attention on already-projected tokens.

    q: (B, Nq, heads*d), k and v: (B, Nk, heads*d) -> (B, Nq, heads*d). `fast=False` takes the readable path.
    """
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    if fast:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = attention_math(q, k, v, causal=causal)
    return rearrange(out, "b h n d -> b n (h d)")
