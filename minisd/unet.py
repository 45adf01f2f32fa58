"""The denoising U-Net: eps_theta(x_t, t, context), the network every sampling step calls.

    x_t      (B, 4, h, w)          noisy latents
    t        (B,)                  timesteps in [0, 999]; fractional values are fine (k-diffusion samplers use them)
    context  (B, 77, context_dim)  text-encoder output, read through cross-attention
    ->       (B, 4, h, w)          the prediction (eps for SD1.5 / SD2.1-base, v for SD2.1-768)

It is the U-Net of DDPM (Ho et al. 2020, App. B: ResBlocks with a timestep embedding, self-attention at low
resolution, skip connections) as refined by Dhariwal & Nichol 2021, with the self-attention replaced by a
"spatial transformer" whose cross-attention reads the text (Rombach et al. 2022, Sec. 3.3, eq. 3).

Module names follow `ldm.modules.diffusionmodules.openaimodel.UNetModel` so the official
`model.diffusion_model.*` weights load by attribute path. Its numbered containers are hard to read, so here is
the map at SD's config (model_channels 320, channel_mult (1, 2, 4, 4), 2 ResBlocks per level; `ds` is the
downsampling factor, 64x64 latents for a 512px image at ds 1):

    input_blocks                                       channels   ds
      0       conv 3x3 (in)                             4 -> 320    1
      1, 2    ResBlock + SpatialTransformer             320         1
      3       Downsample                                320         1 -> 2
      4, 5    ResBlock + SpatialTransformer             640         2
      6       Downsample                                640         2 -> 4
      7, 8    ResBlock + SpatialTransformer             1280        4
      9       Downsample                                1280        4 -> 8
      10, 11  ResBlock (no attention at ds 8)           1280        8
    middle_block: ResBlock, SpatialTransformer, ResBlock           1280        8
    output_blocks (each first concatenates the output of one input block, last in first out)
      0, 1    ResBlock                                  1280        8
      2       ResBlock + Upsample                       1280        8 -> 4
      3, 4    ResBlock + SpatialTransformer             1280        4
      5       ResBlock + SpatialTransformer + Upsample  1280        4 -> 2
      6, 7    ResBlock + SpatialTransformer             640         2
      8       ResBlock + SpatialTransformer + Upsample  640         2 -> 1
      9-11    ResBlock + SpatialTransformer             320         1
    out: GroupNorm, SiLU, conv 3x3                      320 -> 4

SD1 and SD2 differ only in the transformer: SD1 uses 8 heads at every level (head width 40/80/160) and 1x1-conv
proj_in/proj_out; SD2 uses 64-wide heads (5/10/20 heads) and Linear proj_in/proj_out.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from minisd.attention import AttentionLayer, AttentionSettings, attention, attention_probs
from minisd.config import UNetConfig


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps, (B,) -> (B, dim), always in float32.

    The Transformer's position encoding (Vaswani et al. 2017, Sec. 3.5) applied to t, with frequencies
    max_period**(-i/half) for i < half. LDM puts the cos half first (diffusers: flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                          # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))                                  # LDM zero-pads an odd dim


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 for a half-precision model, cast back after (LDM's `GroupNorm32`); a float64
    model's in float64 (at least float32, never less than the model's own precision).

    In fp16 the variance of wide feature maps loses too much precision; the ResBlocks and the output norm of
    the U-Net were run this way in the original code, the transformer's GroupNorm was not."""

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype),
                            self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Residual block that adds the timestep embedding between its two convs (Ho et al. 2020, App. B).

    The nn.Sequential containers and their indices mirror LDM so the weights load by name."""

    def __init__(self, in_channels, out_channels, emb_dim, groups=32):
        super().__init__()
        # SiLU may overwrite the norm's output in place (inplace=True): nothing else reads that temporary. Not in
        # emb_layers, whose input is the embedding every ResBlock shares.
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, in_channels), nn.SiLU(inplace=True), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(inplace=True),
            nn.Identity(),   # index 2 is LDM's Dropout (p=0 for SD); kept so the conv is still `out_layers.3`
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]   # one bias per channel, chosen by the timestep
        return self.out_layers(h).add_(self.skip_connection(x))    # the skip, added into a fresh output


class CrossAttention(AttentionLayer):
    """Multi-head attention from the image tokens to `context` (the text), or to themselves when it is None.

    Queries come from x, keys and values from the context: softmax(Q K^T / sqrt(d)) V (LDM eq. 3)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])   # LDM: Sequential(Linear, Dropout) -> key `to_out.0`
        self.recorded = None    # a list: every call appends its attention probabilities (off: None; see UNet)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.recorded is not None:
            self.recorded.append(attention_probs(q, k, self.heads))            # (B, H*W, tokens)
        out = attention(q, k, v, self.heads, fast=self.fast, slice_size=self.slice_size, upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one Linear makes both halves, out = a * gelu(gate)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)        # a * gelu(gate), multiplied into gelu's fresh output (no new tensor)


class FeedForward(nn.Module):
    """dim -> 4*dim (GEGLU) -> dim. `net` indices mirror LDM: 0 GEGLU, 1 Dropout (p=0, kept as a slot), 2 Linear."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer on image tokens: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)                  # self-attention (context=None)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)     # cross-attention to the text
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treat a feature map as H*W tokens, run transformer layers on them, and add the result back (residual).

    proj_in/proj_out are per-token linear maps: 1x1 convs applied before flattening (SD1) or nn.Linear after it
    (SD2, `use_linear_in_transformer`): the same function, kept as two branches so both official files load."""

    def __init__(self, channels, heads, depth, context_dim, linear_proj, groups=32):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)   # LDM's `Normalize`: eps 1e-6, no fp32 upcast
        proj = (lambda: nn.Linear(channels, channels)) if linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_proj:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")                       # (B, H*W, C) tokens
        if self.linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)
        if not self.linear_proj:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with symmetric padding 1 (the U-Net's; the VAE pads asymmetrically)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv.

    `size` is the size of the skip connection this output meets: a side that was odd on the way down (a 520 px
    image has 65 latents -> 33 -> 17 -> 9) comes back to it instead of to twice the smaller side (diffusers'
    `upsample_size`; for even sides it is the same 2x)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        return self.conv(F.interpolate(x, size=size or (2 * x.shape[-2], 2 * x.shape[-1]), mode="nearest"))


class UNetBlock(nn.ModuleList):
    """One numbered entry of input_blocks / output_blocks (or the middle_block): a few layers run in order,
    each given what it needs: ResBlocks also get the timestep embedding, transformers the text context.
    (LDM's `TimestepEmbedSequential`; a ModuleList has the same `<index>.` key names as its nn.Sequential.)"""

    def __init__(self, *layers):
        super().__init__(layers)

    def forward(self, x, emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def embed_time(time_embed, t, batch, model_channels):
    """t (B,) or a scalar -> the timestep embedding (B, 4 * model_channels) in time_embed's dtype: the sinusoidal
    features are made in float32 and then cast (LDM)."""
    t = torch.as_tensor(t, device=time_embed[0].weight.device)
    t = t.expand(batch) if t.ndim == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return time_embed(timestep_embedding(t, model_channels).to(time_embed[0].weight.dtype))


def _transformer(cfg: UNetConfig, channels):
    # SD1: fixed number of heads; SD2: fixed head width (num_head_channels=64)
    heads = channels // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
    return SpatialTransformer(channels, heads, cfg.transformer_depth, cfg.context_dim, cfg.use_linear_in_transformer,
                              cfg.norm_groups)


def time_embedding(cfg: UNetConfig):
    """t's sinusoidal features (model_channels) -> MLP -> emb (4 * model_channels), shared by every ResBlock."""
    mc = cfg.model_channels
    return nn.Sequential(nn.Linear(mc, 4 * mc), nn.SiLU(), nn.Linear(4 * mc, 4 * mc))


def encoder(cfg: UNetConfig):
    """The down path and the middle block: (input_blocks, middle_block, skips), where skips[i] is the number of
    channels of input block i's output (the up path concatenates them). A ControlNet (controlnet.py) builds its
    trainable copy of the encoder with this same function."""
    mc, groups, emb_dim = cfg.model_channels, cfg.norm_groups, 4 * cfg.model_channels
    input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skips, ch, ds = [mc], mc, 1
    last_level = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, mult * mc, emb_dim, groups)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            input_blocks.append(UNetBlock(*layers))
            skips.append(ch)
        if level != last_level:
            input_blocks.append(UNetBlock(Downsample(ch)))
            skips.append(ch)
            ds *= 2
    middle_block = UNetBlock(ResBlock(ch, ch, emb_dim, groups), _transformer(cfg, ch),
                             ResBlock(ch, ch, emb_dim, groups))
    return input_blocks, middle_block, skips


class UNet(AttentionSettings, nn.Module):
    """The LDM U-Net; state_dict keys equal the official `model.diffusion_model.*` keys minus that prefix."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc                                             # 1280 at SD's config
        self.time_embed = time_embedding(cfg)
        self.input_blocks, self.middle_block, skips = encoder(cfg)
        ch, ds = skips[-1], 2 ** (len(cfg.channel_mult) - 1)

        # Up path: one more ResBlock per level than the down path, so every skip is consumed exactly once
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * mc, emb_dim, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(inplace=True),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.set_attention_upcast(cfg.upcast_attention)
        # training only: recompute each block's activations in the backward pass instead of storing them
        # (Chen et al. 2016), memory for ~30% more compute; minisd.train turns it on with --gradient-checkpointing
        self.gradient_checkpointing = False

    def record_cross_attention(self, store):
        """From now on every cross-attention layer appends its probabilities (B, H*W, text tokens), averaged over
        heads, to the list `store` at each call; None stops. Off by default: `minisd serve`'s word maps use it."""
        for block in self.modules():
            if isinstance(block, BasicTransformerBlock):
                block.attn2.recorded = store

    def _run(self, block, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def forward(self, x, t, context, down_residuals=None, mid_residual=None):
        """x (B, 4, h, w), t (B,) or a scalar, context (B, N, context_dim) -> (B, 4, h, w) in x's dtype.

        Runs in the dtype of the weights (`unet.to(torch.float16)`); the timestep features are made in float32
        and then cast, and the GroupNorms of the ResBlocks compute in float32, as in LDM.

        down_residuals (one per input block) and mid_residual: a ControlNet's outputs (controlnet.py), added to
        the skip connections and to the middle block's output (Zhang et al. 2023, Fig. 3; cldm's
        ControlledUnetModel, diffusers' down_block_additional_residuals / mid_block_additional_residual)."""
        self._check_inputs(x, context)
        dtype = self.time_embed[0].weight.dtype
        emb = embed_time(self.time_embed, t, x.shape[0], self.cfg.model_channels)      # (B, 4*mc)
        h, context = x.to(dtype), context.to(dtype)

        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual.to(dtype)
        if down_residuals is not None:
            skips = [s + r.to(dtype) for s, r in zip(skips, down_residuals, strict=True)]
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)                        # skip connection: concat channels
            h = self._run(block, h, emb, context, upsample_size=skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype)

    def _check_inputs(self, x, context):
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, h, w), got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be ({x.shape[0]}, N, {cfg.context_dim}), got {tuple(context.shape)}")
