"""Scaled dot-product attention, the one function every network here calls.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V          (Vaswani et al. 2017, eq. 1)

Two paths compute the same thing: `attention_math` spells the equation out for readers, and the default path
calls `torch.nn.functional.scaled_dot_product_attention`, which dispatches to fused (flash / memory-efficient)
kernels. tests/test_attention.py checks that they agree.

Every attention layer of the three networks is an `AttentionLayer`, and every network an `AttentionSettings`:
`net.set_fast_attention(False)` / `net.set_attention_slicing(n)` reach each layer inside it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class AttentionLayer(nn.Module):
    """What the attention layers share: which path computes them, and how many queries at a time."""

    def __init__(self):
        super().__init__()
        self.fast = True        # SDPA (True) or the readable math path (False)
        self.slice_size = None  # queries per attention slice (None: all at once); see `attention`
        self.upcast = False     # compute in fp32 when the weights are fp16/bf16 (SD2's U-Net); see `attention`


class AttentionSettings:
    """Mixed into each network (UNet, VAE, TextEncoder): settings that reach every AttentionLayer inside it."""

    def set_fast_attention(self, fast: bool):
        """Choose SDPA (True) or the readable math path (False) for every attention layer."""
        for m in self.modules():
            if isinstance(m, AttentionLayer):
                m.fast = fast

    def set_attention_upcast(self, upcast: bool):
        """Compute every attention layer in fp32 whatever the weights' dtype (SD2's U-Net: see `attention`)."""
        for m in self.modules():
            if isinstance(m, AttentionLayer):
                m.upcast = upcast

    def set_attention_slicing(self, slice_size):
        """Compute attention `slice_size` queries at a time (None: off); same result, less peak memory."""
        for m in self.modules():
            if isinstance(m, AttentionLayer):
                m.slice_size = slice_size


def attention_math(q, k, v, causal=False):
    """q: (B, heads, Nq, d), k and v: (B, heads, Nk, d) -> (B, heads, Nq, d)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5              # (B, heads, Nq, Nk)
    if causal:  # token i may only look at tokens j <= i (CLIP's text transformer)
        nq, nk = scores.shape[-2:]
        future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    # softmax in at least fp32: in fp16 the exp of large scores overflows (why diffusers "upcasts" SD2's attention)
    weights = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)
    return weights @ v


def attention_probs(q, k, heads):
    """softmax(Q K^T / sqrt(d)) averaged over the heads: q (B, Nq, heads*d), k (B, Nk, heads*d) -> (B, Nq, Nk),
    in fp32. Row i says where query i looks; in cross-attention, which text tokens each image token reads, the
    word maps of Hertz et al. 2022 ("Prompt-to-Prompt"). Only recorded on request (unet.UNet.record_cross_attention)."""
    q, k = (rearrange(t, "b n (h d) -> b h n d", h=heads).float() for t in (q, k))
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1).mean(dim=1)


def attention(q, k, v, heads, causal=False, fast=True, slice_size=None, upcast=False):
    """Multi-head attention on already-projected tokens.

    q: (B, Nq, heads*d), k and v: (B, Nk, heads*d) -> (B, Nq, heads*d). `fast=False` takes the readable path.
    slice_size: compute at most that many queries at a time ("attention slicing"). Each query's softmax runs over
    the keys only, so slices are independent and the result is the same; the (Nq, Nk) score matrix of the math
    path (4096 x 4096 per head at 512 px) then never exists whole.
    upcast: with fp16/bf16 inputs, compute the attention in fp32 and return the input dtype. SD2's real weights
    give q.k scores beyond fp16's 65504 (the known black images); the original code computes attention in fp32
    for that reason (LDM `_ATTN_PRECISION = "fp32"`) and diffusers upcasts SD2's U-Net (`upcast_attention`).
    """
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return attention(q.float(), k.float(), v.float(), heads, causal, fast, slice_size).to(q.dtype)
    if slice_size and q.shape[1] > slice_size:
        if causal:
            raise ValueError("attention slicing is for the U-Net and VAE; causal (text) attention is not sliced")
        return torch.cat([attention(q[:, i:i + slice_size], k, v, heads, fast=fast)
                          for i in range(0, q.shape[1], slice_size)], dim=1)
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    if fast:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = attention_math(q, k, v, causal=causal)
    return rearrange(out, "b h n d -> b n (h d)")
