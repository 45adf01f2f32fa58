"""The KL autoencoder: images <-> the latent space Stable Diffusion denoises in.

Latent diffusion (Rombach et al. 2022, Sec. 3.1) runs the diffusion model on a compressed code instead of pixels:

    encoder  E: x (B, 3, H, W) in [-1, 1]  ->  q(z|x) = N(mean, diag(exp(logvar))),  z: (B, 4, H/8, W/8)
    decoder  D: z -> x_hat (B, 3, H, W)

The autoencoder was trained with a reconstruction + perceptual + patch-GAN loss and a very light KL pull toward
N(0, I) (weight 1e-6), so its latents are far from unit variance. LDM therefore multiplies them by one scalar,
`scale_factor` = 0.18215 (1 / std of the latents of a training batch; LDM's `LatentDiffusion.scale_by_std`),
before diffusion. That scale is applied in exactly ONE place here: `VAE.encode` multiplies by it and
`VAE.decode` divides by it. Everything else (Encoder, Decoder, `posterior`) works in the autoencoder's own,
unscaled latent space, like LDM's `AutoencoderKL`.

Module names follow `ldm.modules.diffusionmodules.model` (Encoder / Decoder) and `ldm.models.autoencoder`
(quant_conv / post_quant_conv), so the official `first_stage_model.*` weights load by attribute path.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minisd.attention import AttentionLayer, AttentionSettings, attention
from minisd.config import VAEConfig


def Normalize(channels, groups=32):
    # every norm in the autoencoder: GroupNorm with 32 groups and LDM's eps of 1e-6 (not torch's 1e-5)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): two (GroupNorm, SiLU, 3x3 conv) stages plus a skip."""

    def __init__(self, in_channels, out_channels, groups=32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv ("network in network") matches the channels of the skip path when they change
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        # SiLU overwrites the norm's output in place: nothing else reads that temporary, and one fewer full-size
        # map is alive (256 MiB at the decoder's last level for a 512 px image). Autograd allows it: the norm's
        # backward needs the norm's input, not its output.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))    # LDM's dropout sits before conv2; SD used p=0
        return h.add_(self.nin_shortcut(x))        # the skip, added into conv2's fresh output (no new map)


class AttnBlock(AttentionLayer):
    """Single-head self-attention over all H*W positions (only in the lowest-resolution middle block)."""

    def __init__(self, channels, groups=32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        # 1x1 convs are per-pixel linear maps: the q/k/v/out projections of a transformer layer
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(conv(h), "b c h w -> b (h w) c") for conv in (self.q, self.k, self.v))
        h = attention(q, k, v, heads=1, fast=self.fast, slice_size=self.slice_size)   # (B, H*W, C), 1/sqrt(C)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. LDM pads (left 0, right 1, top 0, bottom 1) instead of torch's symmetric padding=1,
    so the kernel windows start on even pixels; the weights were trained with this, so it must be kept."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> self-attention -> ResnetBlock at the lowest resolution (encoder.mid / decoder.mid)."""

    def __init__(self, channels, groups=32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): `block` ResnetBlocks, then optionally a
    resampler. LDM also gives every level an `attn` list, but it is empty at SD's config (attn_resolutions=[])."""

    def __init__(self, in_channels, out_channels, num_blocks, resample=None, groups=32):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_blocks))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """x (B, 3, H, W) -> moments (B, 2*z_channels, H/8, W/8): the mean and log-variance, concatenated."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]                 # SD: 128, 256, 512, 512
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        # down.i: level i at 1/2**i resolution; every level but the last halves the resolution at its end
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks,
                  resample="down" if i != last else None, groups=cfg.norm_groups)
            for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = Normalize(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # "double_z": mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, 3, 8h, 8w). `up.i` is again level i (1/2**i resolution), so the
    levels run in reverse index order; each has one more ResnetBlock than the encoder's (LDM's choice)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1,
                  resample="up" if i != 0 else None, groups=cfg.norm_groups)
            for i in range(len(widths)))
        self.norm_out = Normalize(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):          # lowest resolution first
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


def sample_posterior(mean, logvar, generator=None):
    """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick, Kingma & Welling 2014, eq. 10).

    eps is drawn in float32 on the generator's device and then moved, so one seed gives the same draw whatever
    the model's dtype or device. generator=None returns the mean (the posterior's mode)."""
    if generator is None:
        return mean
    eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)


class VAE(AttentionSettings, nn.Module):
    """The whole autoencoder, with state_dict keys equal to LDM's `first_stage_model.*` minus that prefix."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convs between the conv nets and the latent ("embedding") space; the identity-sized leftovers of
        # LDM's VQ models, where the quantiser sat between them
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def posterior(self, images):
        """images (B, 3, H, W) in [-1, 1] -> (mean, logvar) of q(z|x), each (B, embed_dim, H/8, W/8), UNSCALED.

        This is what a training loss wants: the KL term of the LDM autoencoder is
        0.5 * sum(mean**2 + exp(logvar) - 1 - logvar) (ldm.modules.distributions.DiagonalGaussianDistribution)."""
        factor = 2 ** (len(self.cfg.ch_mult) - 1)
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(f"images must be (B, {self.cfg.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(f"image height and width must be multiples of {factor}, got {tuple(images.shape[2:])}")
        moments = self.quant_conv(self.encoder(images.to(self.quant_conv.weight.dtype)))   # in the weights' dtype
        mean, logvar = moments.chunk(2, dim=1)
        # LDM clamps the log-variance so exp() can neither overflow nor underflow to a zero std
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images, generator=None):
        """images in [-1, 1] -> latents (B, 4, H/8, W/8) multiplied by scale_factor (the diffusion model's space).

        Returns the posterior mean when `generator` is None, else a sample drawn with that torch.Generator,
        in the images' dtype."""
        mean, logvar = self.posterior(images)
        return (sample_posterior(mean, logvar, generator) * self.cfg.scale_factor).to(images.dtype)

    def decode(self, latents, tile=None, overlap=None):
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] but NOT clamped.

        Runs in the dtype of the weights (`vae.to(torch.float16)`) and returns the latents' dtype.
        tile: decode `tile` x `tile` latent tiles overlapping by `overlap` (default a quarter tile, as diffusers)
        and blend them (see `tiled`), for images whose full-resolution decoder activations would not fit in
        memory; None decodes in one piece."""
        if latents.ndim != 4 or latents.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"latents must be (B, {self.cfg.embed_dim}, h, w), got {tuple(latents.shape)}")
        z = latents.to(self.post_quant_conv.weight.dtype) / self.cfg.scale_factor
        decode = lambda z: self.decoder(self.post_quant_conv(z))
        if tile is not None and max(z.shape[-2:]) > tile:
            factor = 2 ** (len(self.cfg.ch_mult) - 1)
            overlap = tile // 4 if overlap is None else overlap
            return tiled(decode, z, tile, overlap, factor).to(latents.dtype)
        return decode(z).to(latents.dtype)


def _tile_starts(size, tile, overlap):
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]    # the last tile ends at the edge


def _ramp(n, width, first, last):
    """Blend weights along one side of a tile: rising over `width` pixels where a neighbour overlaps it."""
    w = torch.ones(n)
    up = (torch.arange(width) + 0.5) / width
    if not first:
        w[:width] = up
    if not last:
        w[n - width:] = torch.minimum(w[n - width:], up.flip(0))
    return w


def tiled(fn, x, tile, overlap, scale):
    """fn on overlapping tiles of x, the outputs blended with linear ramps across each overlap, so no seam shows.

    fn maps (B, C, h, w) -> (B, C', h * scale, w * scale) (the decoder: scale 8). The decoder is not local (its
    mid-block attention sees the whole tile, its convs see a few latents around each one), so a tiled decode is
    close to, not equal to, a whole one; the overlap gives each tile's border context that is then faded out.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    H, W = x.shape[-2:]
    ys, xs = _tile_starts(H, tile, overlap), _tile_starts(W, tile, overlap)
    out, total = None, torch.zeros(H * scale, W * scale, device=x.device)
    for y in ys:
        for x0 in xs:
            part = fn(x[..., y:y + tile, x0:x0 + tile])
            h, w = part.shape[-2:]
            weight = (_ramp(h, overlap * scale, y == ys[0], y == ys[-1])[:, None]
                      * _ramp(w, overlap * scale, x0 == xs[0], x0 == xs[-1])[None, :]).to(part.device)
            if out is None:
                out = part.new_zeros(*part.shape[:2], H * scale, W * scale)
            out[..., y * scale:y * scale + h, x0 * scale:x0 * scale + w] += part * weight.to(part.dtype)
            total[y * scale:y * scale + h, x0 * scale:x0 * scale + w] += weight
    return out / total.to(out.dtype)
