"""minisd's VAE computes what LDM's AutoencoderKL (Encoder/Decoder + quant convs) and diffusers' AutoencoderKL
compute, with random weights at SD's autoencoder config and 64x64 images (8x8 latents).

SD1.5 and SD2.1 use the same autoencoder config (v1- and v2-inference.yaml have the same ddconfig; minisd's
presets share one VAEConfig, checked below), so one config is tested. Tolerances, fp32 on CPU: encoded mean and
log-variance max abs error <= 1e-4 x their std (only summation order differs, ~1e-6 relative); decoded pixels
<= 1e-3 absolute, the issue's bound for images in [-1, 1] (the random decoder's output std is printed: it is
O(1), so 1e-3 is also ~1e-3 relative, far below what an eps, padding or upsampling mistake produces).
"""
import gc
from types import SimpleNamespace

import pytest
import torch

import _image_refs as R
from minisd.config import SD15, SD21_BASE, SD21_V, VAEConfig
from minisd.vae import VAE

LATENT_TOL = 1e-4      # x std of the compared latent statistic
PIXEL_TOL = 1e-3       # absolute, images live in [-1, 1]
SCALE = 0.18215        # scale_factor of v1-/v2-inference.yaml


@pytest.fixture(scope="module")
def ref():
    """LDM outputs on fixed inputs, the LDM state dict, and a minisd VAE holding the same tensors."""
    ldm = R.ldm_vae(seed=0)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1             # in [-1, 1]
    latents = torch.randn(1, 4, 8, 8, generator=g)                     # scaled latents, as the sampler makes
    with torch.no_grad():
        mean, logvar = ldm.moments(images)
        decoded = ldm.decode(latents / SCALE)
    state_dict = ldm.state_dict()
    del ldm
    vae = R.minisd_with(lambda: VAE(SD15.vae), state_dict)
    yield SimpleNamespace(state_dict=state_dict, vae=vae, images=images, latents=latents, mean=mean,
                          logvar=logvar, decoded=decoded, ours={})
    del state_dict, vae
    gc.collect()


def ours_fp32(ref, what):
    """minisd's posterior or decoded images, computed once (the passes through the networks are the cost)."""
    if what not in ref.ours:
        with torch.no_grad():
            ref.ours[what] = ref.vae.posterior(ref.images) if what == "posterior" else ref.vae.decode(ref.latents)
    return ref.ours[what]


def report(what, err, std):
    print(f"\n[vae] {what}: max abs err {err:.3g}, reference std {std:.4g}, ratio {err / std:.3g}")


def test_sd1_and_sd2_share_one_autoencoder_config():
    assert SD15.vae == SD21_BASE.vae == SD21_V.vae
    assert SD15.vae.scale_factor == SCALE


def test_state_dict_has_exactly_the_ldm_keys(ref):
    with torch.device("meta"):
        vae = VAE(SD15.vae)
    ours = vae.state_dict()
    assert set(ours) == set(ref.state_dict), (sorted(set(ours) - set(ref.state_dict))[:5],
                                              sorted(set(ref.state_dict) - set(ours))[:5])
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.state_dict.items()}
    result = vae.load_state_dict(ref.state_dict, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_posterior_matches_ldm(ref):
    mean, logvar = ours_fp32(ref, "posterior")
    for name, ours, expected in [("mean", mean, ref.mean), ("logvar", logvar, ref.logvar)]:
        err, std = R.max_err(ours, expected), expected.std().item()
        report(f"posterior {name} vs LDM", err, std)
        assert ours.shape == (1, 4, 8, 8)
        assert err <= LATENT_TOL * std


def test_encode_is_the_scaled_posterior_mean(ref):
    with torch.no_grad():
        latents = ref.vae.encode(ref.images)
    expected = ref.mean * SCALE
    assert R.max_err(latents, expected) <= LATENT_TOL * expected.std().item()


def test_decode_matches_ldm(ref):
    images = ours_fp32(ref, "decode")
    err = R.max_err(images, ref.decoded)
    report("decode vs LDM (pixels)", err, ref.decoded.std().item())
    assert images.shape == (1, 3, 64, 64)
    assert err <= PIXEL_TOL


def test_matches_diffusers_autoencoder(ref):
    diffusers_vae = R.diffusers_vae(ref.state_dict)   # weights through diffusers' own converter
    with torch.no_grad():
        dist = diffusers_vae.encode(ref.images).latent_dist
        decoded = diffusers_vae.decode(ref.latents / SCALE).sample
    del diffusers_vae
    mean, _ = ours_fp32(ref, "posterior")
    ours_decoded = ours_fp32(ref, "decode")
    err, std = R.max_err(mean, dist.mean), dist.mean.std().item()
    report("posterior mean vs diffusers", err, std)
    assert err <= LATENT_TOL * std
    err = R.max_err(ours_decoded, decoded)
    report("decode vs diffusers (pixels)", err, decoded.std().item())
    assert err <= PIXEL_TOL


def test_posterior_sample_is_mean_plus_std_times_seeded_noise(ref):
    # the draw, spelled out independently: mean + exp(logvar / 2) * randn(shape, generator) (LDM's
    # DiagonalGaussianDistribution.sample, with the generator made explicit)
    noise = torch.randn(ref.mean.shape, generator=torch.Generator().manual_seed(7))
    expected = (ref.mean + torch.exp(0.5 * ref.logvar) * noise) * SCALE
    with torch.no_grad():
        sample = ref.vae.encode(ref.images, generator=torch.Generator().manual_seed(7))
    assert R.max_err(sample, expected) <= LATENT_TOL * expected.std().item()
    assert R.max_err(sample, ref.mean * SCALE) > 100 * LATENT_TOL * expected.std().item()   # not the mean


def test_math_and_sdpa_attention_paths_agree(ref):
    ref.vae.set_fast_attention(False)
    try:
        with torch.no_grad():
            mean, _ = ref.vae.posterior(ref.images)
            images = ref.vae.decode(ref.latents)
    finally:
        ref.vae.set_fast_attention(True)
    assert R.max_err(mean, ref.mean) <= LATENT_TOL * ref.mean.std().item()
    assert R.max_err(images, ref.decoded) <= PIXEL_TOL


def test_comparison_can_fail(ref):
    """One changed weight (encoder: the mid-block attention's value projection; decoder: the first upsampling
    conv) moves the output far beyond the tolerances."""
    changes = {"encoder": ("encoder.mid.attn_1.v.weight", (0, 0, 0, 0)),
               "decoder": ("decoder.up.3.upsample.conv.weight", (0, 0, 1, 1))}
    moved = {}
    with torch.no_grad():
        for part, (key, index) in changes.items():
            weight = ref.state_dict[key]                                # shared with ref.vae
            old = weight[index].item()
            weight[index] += 0.5
            try:
                moved[part] = ref.vae.posterior(ref.images)[0] if part == "encoder" else ref.vae.decode(ref.latents)
            finally:
                weight[index] = old
    print(f"\n[vae] one weight changed: mean err {R.max_err(moved['encoder'], ref.mean):.3g}, "
          f"pixel err {R.max_err(moved['decoder'], ref.decoded):.3g}")
    assert R.max_err(moved["encoder"], ref.mean) > 10 * LATENT_TOL * ref.mean.std().item()
    assert R.max_err(moved["decoder"], ref.decoded) > 10 * PIXEL_TOL


TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def test_logvar_is_clamped_like_ldm():
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
    vae = VAE(TINY).eval()
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        for bias in (100.0, -100.0):                 # push the log-variance channels far past 20 / below -30
            vae.quant_conv.bias[4:] = bias
            _, logvar = vae.posterior(images)
            moments = vae.quant_conv(vae.encoder(images))
            assert torch.equal(logvar, DiagonalGaussianDistribution(moments).logvar)
            assert logvar.abs().max() == (20.0 if bias > 0 else 30.0)


@pytest.mark.parametrize("method, shape, message", [
    ("encode", (1, 4, 16, 16), "images must be"),
    ("encode", (1, 3, 15, 16), "multiples of 2"),
    ("decode", (1, 3, 2, 2), "latents must be"),
])
def test_bad_inputs_raise_value_error(method, shape, message):
    vae = VAE(TINY)
    with pytest.raises(ValueError, match=message):
        getattr(vae, method)(torch.zeros(shape))
