"""Memory-saving paths: attention slicing computes exactly what whole attention does; tiled VAE decoding blends
overlapping tiles with weights that sum to one (exact for a local function, approximate for the decoder)."""
import torch
import torch.nn.functional as F

from minisd.attention import attention
from minisd.config import UNetConfig, VAEConfig
from minisd.unet import UNet
from minisd.vae import VAE, tiled


def test_sliced_attention_equals_whole_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 100, 64, generator=g), torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    for fast in (True, False):
        whole = attention(q, k, v, heads=4, fast=fast)
        sliced = attention(q, k, v, heads=4, fast=fast, slice_size=33)
        assert (whole - sliced).abs().max() <= 1e-6 * whole.std()      # the same fp32 sums, reassociated at most


def test_unet_with_attention_slicing_gives_the_same_output():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), context_dim=16)).eval()
    x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 16), torch.tensor([500.0])
    with torch.no_grad():
        whole = unet(x, t, ctx)
        unet.set_attention_slicing(37)
        sliced = unet(x, t, ctx)
    assert (whole - sliced).abs().max() <= 1e-5 * whole.std()


def test_tiled_blending_reproduces_a_local_function_exactly():
    # nearest-neighbour upsampling is local, so blending tiles of it must give the untiled result: this checks
    # that the ramps of overlapping tiles sum to one everywhere, including the shifted last tile
    x = torch.randn(1, 3, 29, 41)
    up = lambda z: F.interpolate(z, scale_factor=8, mode="nearest")
    out = tiled(up, x, tile=12, overlap=4, scale=8)
    assert torch.allclose(out, up(x), atol=1e-6)
    assert not torch.allclose(tiled(lambda z: up(z) + 1e-2 * z.mean(), x, 12, 4, 8), up(x), atol=1e-4)


def test_vae_tiled_decode_shape_and_single_tile_identity():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()
    z = torch.randn(1, 4, 24, 24) * 0.18215 * 0.5
    with torch.no_grad():
        whole = vae.decode(z)
        same = vae.decode(z, tile=24)                 # one tile covering everything is the plain decode
        parts = vae.decode(z, tile=16, overlap=8)
    assert torch.equal(whole, same)
    assert parts.shape == whole.shape and torch.isfinite(parts).all()
    # How close a tiled decode is depends on the decoder: this random one mixes the whole tile in its mid-block
    # attention (measured: mean abs difference 0.084 at pixel std 0.32), so no closeness bound is asserted here.
    assert not torch.equal(parts, whole)
