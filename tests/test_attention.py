"""The readable attention path and the SDPA fast path compute the same function."""
import pytest
import torch

from minisd.attention import attention


@pytest.mark.parametrize("causal", [False, True])
def test_math_and_sdpa_paths_agree(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 77, 8 * 40, generator=g) for _ in range(3))
    slow = attention(q, k, v, heads=8, causal=causal, fast=False)
    fast = attention(q, k, v, heads=8, causal=causal, fast=True)
    # both are fp32 softmax(QK^T/sqrt(d))V; only summation order differs
    assert (slow - fast).abs().max() <= 1e-5 * slow.std()


def test_cross_attention_shapes_and_causality():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 16, 64, generator=g)
    k, v = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    assert attention(q, k, v, heads=2).shape == (1, 16, 64)
    # causal: changing a later token must not change earlier outputs, and must change its own
    x = torch.randn(1, 6, 32, generator=g)
    y = x.clone()
    y[0, 4] += 1.0
    a, b = (attention(t, t, t, heads=4, causal=True, fast=False) for t in (x, y))
    assert torch.equal(a[0, :4], b[0, :4])
    assert not torch.allclose(a[0, 4], b[0, 4])


# SD2 in fp16: real SD2.1 weights give attention scores beyond fp16's largest value (65504), the known black-image
# failure. The U-Net of an SD2 config computes attention in fp32 (LDM's _ATTN_PRECISION, diffusers'
# upcast_attention). Here the first self-attention's input LayerNorm of a small SD2-shaped U-Net gets a large bias
# and a small gain: every token becomes nearly the same large vector, so q.k is far beyond 65504 for every pair while
# the softmax over keys stays smooth (its shift invariance removes the common part). With upcasting, the fp16
# output must stay finite and within fp16 rounding of the fp32 output.
SD2_LIKE = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                num_head_channels=16, context_dim=32, use_linear_in_transformer=True, norm_groups=8)


def _overflowing_unet(upcast):
    from minisd.config import UNetConfig
    from minisd.unet import UNet
    torch.manual_seed(0)
    unet = UNet(UNetConfig(**SD2_LIKE, upcast_attention=upcast)).eval()
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name.endswith("transformer_blocks.0.norm1"):
                m.weight.mul_(0.02)
                m.bias.copy_(torch.randn(m.bias.shape) * 150)
    return unet


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 32, generator=g)


@pytest.mark.parametrize("fast", [False, True], ids=["math", "sdpa"])
def test_sd2_fp16_attention_is_upcast_and_stays_finite(fast):
    x, t, context = _inputs()
    unet = _overflowing_unet(upcast=True)
    unet.set_fast_attention(fast)
    with torch.no_grad():
        want = unet(x, t, context)
        half = unet.half()(x.half(), t, context.half())
    assert torch.isfinite(half).all()
    # fp16 keeps 11 significant bits: measured 1.0e-3 x the output's scale; a wrong upcast is inf/nan or O(1)
    err = (half.float() - want).abs().max() / want.abs().max()
    assert err <= 1e-2, f"fp16 vs fp32: {err:.4f} of the output's scale"


def test_without_upcasting_fp16_attention_overflows():
    """The premise: the same U-Net without upcasting returns non-finite values in fp16 on the math path."""
    x, t, context = _inputs()
    unet = _overflowing_unet(upcast=False)
    unet.set_fast_attention(False)
    with torch.no_grad():
        half = unet.half()(x.half(), t, context.half())
    assert not torch.isfinite(half).all()


def test_sd2_presets_upcast_and_sd1_does_not():
    from minisd.config import SD15, SD21_BASE, SD21_V
    assert SD21_BASE.unet.upcast_attention and SD21_V.unet.upcast_attention
    assert not SD15.unet.upcast_attention
