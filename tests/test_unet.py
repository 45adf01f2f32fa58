"""minisd's U-Net computes what the original LDM UNetModel and diffusers' UNet2DConditionModel compute, at the
real SD1.5 and SD2.1 configs (SD2.1-base and SD2.1-v share the U-Net), with random weights and small 16x16 latents.
The weights, not the spatial size, make a config, but the size must let every layer matter: at 8x8 latents the
middle block sees one token, where self-attention returns its value whatever q and k are; at 16x16 it sees 2x2
tokens (test_every_self_attention_sees_several_tokens).

One LDM U-Net per config is built and redrawn (tests/_image_refs.py); minisd and diffusers take the same weight
tensors, so a config costs one 3.4 GB copy. Tolerances: fp32 on CPU, max abs error <= 1e-4 x output std: the
three implementations differ only in summation order (SDPA vs einsum attention, 1x1 conv vs linear), whose
rounding is ~1e-6 relative through this depth; a wrong head split, norm eps or timestep layout is >1e-2.
"""
import gc
from types import SimpleNamespace

import pytest
import torch

import _image_refs as R
from minisd.config import SD15, SD21_BASE, UNetConfig
from minisd.unet import UNet, timestep_embedding

PRESETS = {"sd15": SD15, "sd21-base": SD21_BASE}
FP32_TOL = 1e-4      # x output std, see the module docstring


@pytest.fixture(scope="module", params=list(PRESETS))
def ref(request):
    """The LDM U-Net's outputs on fixed inputs, its state dict, and a minisd U-Net holding the same tensors."""
    name = request.param
    cfg = PRESETS[name].unet
    ldm = R.ldm_unet(name, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    # float timesteps, one whole and one fractional (k-diffusion's samplers pass fractional ones); int64
    # timesteps are checked on a small config below, to save two forwards of the full model
    t = torch.tensor([999.0, 500.5])
    with torch.no_grad():
        out = ldm(x, t, context=context)
        x8 = x[..., :8, :8].contiguous()        # the reduced-precision checks run at 8x8 (time budget, below)
        out8 = ldm(x8, t, context=context)
    state_dict = ldm.state_dict()
    del ldm                                     # its parameters live on in state_dict
    unet = R.minisd_with(lambda: UNet(cfg), state_dict)
    yield SimpleNamespace(name=name, cfg=cfg, state_dict=state_dict, unet=unet, x=x, context=context,
                          t=t, out=out, x8=x8, out8=out8, ours={})
    del state_dict, unet
    gc.collect()


def ours_fp32(ref):
    """minisd's fp32 output on the fixture's inputs, computed once per config (forwards are the cost)."""
    if "out" not in ref.ours:
        with torch.no_grad():
            ref.ours["out"] = ref.unet(ref.x, ref.t, ref.context)
    return ref.ours["out"]


def report(what, ref, err, std):
    print(f"\n[{ref.name}] {what}: max abs err {err:.3g}, output std {std:.4g}, ratio {err / std:.3g}")


def test_state_dict_has_exactly_the_ldm_keys(ref):
    with torch.device("meta"):
        unet = UNet(ref.cfg)
    ours = unet.state_dict()
    assert set(ours) == set(ref.state_dict), (sorted(set(ours) - set(ref.state_dict))[:5],
                                              sorted(set(ref.state_dict) - set(ours))[:5])
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.state_dict.items()}
    assert len(ours) == 686      # the official files' `model.diffusion_model.*` count at both configs
    result = unet.load_state_dict(ref.state_dict, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_matches_ldm_unet(ref):
    ours = ours_fp32(ref)
    expected = ref.out
    err, std = R.max_err(ours, expected), expected.std().item()
    report("vs LDM UNetModel", ref, err, std)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert err <= FP32_TOL * std


def test_matches_diffusers_unet(ref):
    diffusers_unet = R.diffusers_unet(ref.name, ref.state_dict)   # weights through diffusers' own converter
    with torch.no_grad():
        expected = diffusers_unet(ref.x, ref.t, encoder_hidden_states=ref.context).sample
    del diffusers_unet
    ours = ours_fp32(ref)
    err, std = R.max_err(ours, expected), expected.std().item()
    report("vs diffusers UNet2DConditionModel", ref, err, std)
    assert err <= FP32_TOL * std


def test_math_and_sdpa_attention_paths_agree(ref):
    fast = ours_fp32(ref)
    with torch.no_grad():
        ref.unet.set_fast_attention(False)
        try:
            slow = ref.unet(ref.x, ref.t, ref.context)
        finally:
            ref.unet.set_fast_attention(True)
    std = ref.out.std().item()
    report("math path vs LDM", ref, R.max_err(slow, ref.out), std)
    assert R.max_err(slow, ref.out) <= FP32_TOL * std
    assert R.max_err(slow, fast) <= FP32_TOL * std


# Reduced precision, vs the fp32 LDM output. fp16 meets the 1e-2 x std. bf16 cannot at these random
# weights: it keeps 8 significant bits to fp16's 11 (eps 2^-7 vs 2^-10), and merely rounding the weights and
# inputs to bf16 and computing in fp32 already moves the output by ~0.05 x std. How far a bf16 forward lands
# beyond that depends on the CPU's bf16 kernels (native avx512_bf16 dot products or emulation), so bf16 is judged
# against the reference in the same precision on the same machine: diffusers' bf16 U-Net holding the same weights
# (measured on an AMD EPYC with avx512_bf16: diffusers 0.067 / 0.077 x std, minisd 0.064 / 0.082 x std for
# SD1.5 / SD2.1). minisd may be at most 1.25x the reference's error: a max over ~500 outputs of rounding noise
# moves by that much between two correct implementations, while precision bugs cost far more, e.g. timestep
# features made in bf16 (999 rounds to 1000) or a GroupNorm whose variance is accumulated in half precision.
FP16_TOL = 1e-2                 # x output std
BF16_VS_REFERENCE = 1.25        # x diffusers' bf16 error on the same inputs


# fp16 runs at the SD2.1 config only: CPU fp16 forwards are the slowest here, the two configs run the same code
# in every dtype-sensitive place, and SD2's attention is the one known to overflow fp16 in other implementations.
# These run at 8x8 latents: precision is a property of every layer's arithmetic, which 8x8 exercises; the 16x16
# fp32 tests above are what show every attention layer matters. (16x16 in fp16 on the CPU took 2+ minutes.)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_inference(ref, dtype):
    if dtype == torch.float16 and ref.name != "sd21-base":
        pytest.skip("fp16 is checked at the SD2.1 config (time budget)")
    unet = R.minisd_with(lambda: UNet(ref.cfg), ref.state_dict, dtype=dtype)
    with torch.no_grad():
        out = unet(ref.x8.to(dtype), ref.t, ref.context.to(dtype))
    del unet
    expected = ref.out8
    err, std = R.max_err(out, expected), expected.std().item()
    report(f"{dtype} vs fp32 LDM", ref, err, std)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float16:
        assert err <= FP16_TOL * std
        return
    reference = R.diffusers_unet(ref.name, ref.state_dict).to(dtype)
    with torch.no_grad():
        ref_out = reference(ref.x8.to(dtype), ref.t, encoder_hidden_states=ref.context.to(dtype)).sample
    del reference
    ref_err = R.max_err(ref_out, expected)
    report("diffusers bf16 vs fp32 LDM", ref, ref_err, std)
    assert err <= BF16_VS_REFERENCE * ref_err


def test_comparison_can_fail(ref):
    """One changed weight moves the output far beyond the tolerance."""
    tol = FP32_TOL * ref.out.std().item()
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"   # a cross-attention value projection
    weight = ref.state_dict[key]                                       # shared with ref.unet
    with torch.no_grad():
        old = weight[0, 0].item()
        weight[0, 0] += 0.5                                            # its entries have std 1/sqrt(768 or 1024)
        try:
            moved = ref.unet(ref.x, ref.t, ref.context)
        finally:
            weight[0, 0] = old
    print(f"\n[{ref.name}] one weight changed: err {R.max_err(moved, ref.out) / tol:.3g} x tol")
    assert R.max_err(moved, ref.out) > 10 * tol


def test_every_self_attention_sees_several_tokens(ref):
    """The middle block's self-attention q projection changes the output: it attends over more than one token."""
    tol = FP32_TOL * ref.out.std().item()
    key = "middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    weight = ref.state_dict[key]                                       # shared with ref.unet
    with torch.no_grad():
        old = weight.clone()
        weight.mul_(4.0)                                               # sharper attention over the 2x2 tokens
        try:
            moved = ref.unet(ref.x, ref.t, ref.context)
        finally:
            weight.copy_(old)
    print(f"\n[{ref.name}] middle-block q scaled: err {R.max_err(moved, ref.out) / tol:.3g} x tol")
    assert R.max_err(moved, ref.out) > 10 * tol


# A small U-Net with the features the presets do not combine: transformer depth 2, both projection types and
# both head rules, integer (int64) timesteps, a non-square latent. Cheap, so it also checks one context token.
SMALL = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1,
             channel_mult=[1, 2], use_spatial_transformer=True, transformer_depth=2, legacy=False)


@pytest.mark.parametrize("heads, linear", [(dict(num_heads=2), False), (dict(num_head_channels=16), True)],
                         ids=["num_heads-conv", "head_channels-linear"])
def test_small_config_matches_ldm_with_integer_timesteps(heads, linear):
    # this LDM version wants one context (dim) per transformer layer once depth > 1: hence the lists
    args = dict(SMALL, use_linear_in_transformer=linear, context_dim=[16, 16], **heads)
    ldm = R.ldm_unet(args, seed=3)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                     num_heads=heads.get("num_heads", 8), num_head_channels=heads.get("num_head_channels", -1),
                     transformer_depth=2, context_dim=16, use_linear_in_transformer=linear)
    unet = R.minisd_with(lambda: UNet(cfg), ldm.state_dict())
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 16, generator=g)
    t = torch.tensor([0, 999])                                         # int64
    with torch.no_grad():
        expected = ldm(x, t, context=[context, context])
        ours = unet(x, t, context)
        context[1, 3] += 1.0
        moved = unet(x, t, context)
    assert R.max_err(ours, expected) <= FP32_TOL * expected.std().item()
    assert R.max_err(moved[1], expected[1]) > 100 * FP32_TOL * expected.std().item()   # one token matters
    assert torch.equal(moved[0], ours[0])                                               # ...to its own sample


def test_timestep_embedding_matches_ldm_and_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    from ldm.modules.diffusionmodules.util import timestep_embedding as ldm_timestep_embedding
    t = torch.tensor([0.0, 0.5, 1.0, 37.25, 500.5, 999.0])
    ours = timestep_embedding(t, 320)
    assert ours.dtype == torch.float32 and ours.shape == (6, 320)
    # same float32 ops in the same order: exact
    assert torch.equal(ours, ldm_timestep_embedding(t, 320))
    assert torch.allclose(ours, get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0),
                          atol=1e-6)
    assert not torch.allclose(timestep_embedding(t + 0.25, 320), ours)   # fractional steps are seen


TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), context_dim=16)


@pytest.mark.parametrize("x_shape, t, ctx_shape, message", [
    ((1, 3, 8, 8), [1.0], (1, 77, 16), "x must be"),
    ((1, 4, 8, 8), [1.0], (1, 77, 15), "context must be"),
    ((2, 4, 8, 8), [1.0, 2.0], (1, 77, 16), "context must be"),
    ((2, 4, 8, 8), [1.0, 2.0, 3.0], (2, 77, 16), "t must be"),
])
def test_bad_inputs_raise_value_error(x_shape, t, ctx_shape, message):
    unet = UNet(TINY)
    with pytest.raises(ValueError, match=message):
        unet(torch.zeros(x_shape), torch.tensor(t), torch.zeros(ctx_shape))


def test_scalar_timestep_is_broadcast():
    unet = UNet(TINY).eval()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(unet(x, 10.5, context), unet(x, torch.tensor([10.5, 10.5]), context))
