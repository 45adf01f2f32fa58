"""CLIP's text transformer (Radford et al. 2021), the prompt encoder of Stable Diffusion.

One network serves both models, configured by `TextConfig`:
- SD1: OpenAI CLIP ViT-L/14's text tower, 12 layers of width 768, 12 heads, quick_gelu;
- SD2: OpenCLIP ViT-H/14's text tower, width 1024, 16 heads, exact gelu. SD2 conditions on the penultimate of
  its 24 layers, so minisd builds only 23 (see config.SD2_TEXT).

It is a GPT-2 style pre-LayerNorm transformer with a causal mask: token i attends to tokens 0..i only, the way
CLIP was trained (it pooled the <|endoftext|> token). Stable Diffusion does not pool: the U-Net cross-attends
to all 77 per-token outputs after the final LayerNorm.

Module names are open_clip's text-tower names, so SD2's official weights load by stripping a prefix
(`cond_stage_model.model.`); weights_convert/text.py maps transformers' CLIPTextModel names (SD1) onto them.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import AttentionLayer, AttentionSettings, attention
from .config import TextConfig


class SelfAttention(AttentionLayer):
    """Multi-head self-attention with q, k, v packed in one projection (nn.MultiheadAttention's names). Causal in
    the text tower; CLIP's image tower (metrics/clip_image.py) lets every patch attend to every other."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))   # rows: q, then k, then v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):                                                  # x: (B, N, width)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(attention(q, k, v, self.heads, causal=self.causal, fast=self.fast))


class MLP(nn.Module):
    def __init__(self, width, activation):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)
        self.activation = activation

    def forward(self, x):
        h = self.c_fc(x)
        if self.activation == "quick_gelu":   # OpenAI CLIP's sigmoid approximation of gelu (Hendrycks & Gimpel)
            if h.requires_grad:                   # autograd needs the sigmoid's output as it was
                h = (1.702 * h).sigmoid() * h
            else:
                h = (1.702 * h).sigmoid_().mul_(h)    # h * sigmoid(1.702 h), in one temporary instead of three
        else:                                 # OpenCLIP-H: exact gelu, x * Phi(x)
            h = F.gelu(h)
        return self.c_proj(h)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, activation, causal):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, activation)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`layers` blocks; the text tower's and the image tower's differ only in the mask (and their sizes)."""

    def __init__(self, width, heads, layers, activation, causal):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, activation, causal)
                                       for _ in range(layers))


class TextEncoder(AttentionSettings, nn.Module):
    """tokens (B, N) -> per-token conditioning (B, N, width), N <= 77."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown activation {cfg.activation!r}; expected 'quick_gelu' or 'gelu'")
        self.cfg = cfg
        # On the meta device (model.build_on_meta: shapes only, the checkpoint gives every value) nothing is drawn:
        # there an init runs through torch._refs, whose first use imports torch._dynamo and sympy, ~1.5 s of every
        # load. On a real device the draws are the ones nn.Embedding's init and CLIP's make, in the same order.
        token_weight = torch.empty(cfg.vocab_size, cfg.width)
        meta = token_weight.is_meta
        if not meta:
            token_weight.normal_()          # nn.Embedding's own N(0, 1) init (overwritten below; kept for the stream)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=token_weight)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))  # learned
        self.transformer = Transformer(cfg.width, cfg.heads, cfg.layers, cfg.activation, causal=True)
        self.ln_final = nn.LayerNorm(cfg.width)
        if not meta:                                        # CLIP's init
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
        self.gradient_checkpointing = False     # training only: recompute each layer in backward (unet.py)

    def forward(self, tokens, clip_skip=1, extra=None):
        """clip_skip=1: the last computed layer, then ln_final (what SD conditions on). clip_skip=k: the output
        of the layer k-1 before it, then ln_final (A1111's "CLIP skip"; 2 is common with anime SD1 models).
        For SD2 the last computed layer already is OpenCLIP-H's penultimate one.

        extra: (n, width) vectors for the ids vocab_size .. vocab_size + n - 1, textual-inversion words
        (embeddings.py): looked up there instead of in the token table, as if they were rows appended to it
        (what diffusers does with resize_token_embeddings). Gradients flow into them (textual_inversion.py)."""
        n_layers = len(self.transformer.resblocks)
        if not (isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and not tokens.is_floating_point()):
            raise ValueError(f"tokens must be an integer tensor of shape (B, N), got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        if not 1 <= tokens.shape[1] <= self.cfg.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens; the text encoder takes 1..{self.cfg.context_length}")
        n_ids = self.cfg.vocab_size + (0 if extra is None else len(extra))
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < n_ids:
            raise ValueError(f"token ids must lie in 0..{n_ids - 1}")
        if not (isinstance(clip_skip, int) and 1 <= clip_skip <= n_layers):
            raise ValueError(f"clip_skip must be an integer in 1..{n_layers}, got {clip_skip!r}")

        vocab = self.cfg.vocab_size
        x = self.token_embedding(tokens.clamp(max=vocab - 1))                              # (B, N, width)
        if extra is not None:
            rows = extra.to(x)[(tokens - vocab).clamp(min=0)]                             # (B, N, width)
            x = torch.where((tokens >= vocab)[..., None], rows, x)
        x = x + self.positional_embedding[:tokens.shape[1]]
        for block in self.transformer.resblocks[:n_layers - (clip_skip - 1)]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_final(x)
