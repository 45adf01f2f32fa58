"""The schedule, the forward process, the eps/v parametrizations and classifier-free guidance equal the
references (LDM, k-diffusion, diffusers) and their closed forms."""
import numpy as np
import pytest
import torch
from _sampler_refs import ALPHAS_CUMPROD, CONTEXT_DIM, SD_SCHEDULER_CONFIG, SHAPE, SIGMAS_TRAIN, ToyModel, rel_err
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from k_diffusion.external import DiscreteEpsDDPMDenoiser, DiscreteSchedule, DiscreteVDDPMDenoiser

from minisd.diffusion import (add_noise, cfg_denoiser, make_denoiser, q_sample, scalings, sigma_to_t, snr,
                              t_to_sigma)

CONTEXT = torch.randn(SHAPE[0], 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(3))


def test_schedule_equals_ldm_and_diffusers():
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)     # float64 numpy
    ldm = torch.from_numpy(np.cumprod(1.0 - betas))
    assert torch.allclose(ALPHAS_CUMPROD, ldm, rtol=1e-12, atol=0)
    # diffusers takes the cumprod in float32: equal to float32 rounding accumulated over 1000 products
    diffusers_ac = DDPMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod.double()
    assert ((diffusers_ac - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).abs().max() < 1e-5
    assert abs(SIGMAS_TRAIN[-1].item() - 14.6146) < 1e-3 and abs(SIGMAS_TRAIN[0].item() - 0.02917) < 1e-4
    assert torch.allclose(snr(ALPHAS_CUMPROD), SIGMAS_TRAIN ** -2, rtol=1e-12)


def test_sigma_t_conversions_equal_k_diffusion():
    ref = DiscreteSchedule(SIGMAS_TRAIN, quantize=False)                                    # float64
    g = torch.Generator().manual_seed(0)
    sigmas = torch.exp(torch.empty(200, dtype=torch.float64).uniform_(-4.5, 3.5, generator=g))   # beyond both ends
    assert torch.allclose(sigma_to_t(sigmas, SIGMAS_TRAIN), ref.sigma_to_t(sigmas), rtol=0, atol=1e-9)
    assert torch.equal(sigma_to_t(sigmas, SIGMAS_TRAIN, "nearest"), ref.sigma_to_t(sigmas, quantize=True).double())
    t = torch.empty(200, dtype=torch.float64).uniform_(0, 999, generator=g)
    # k-diffusion casts t to float32 first (t ~ 999 then moves by <= 3e-5, sigma by < 1e-6 relative)
    assert torch.allclose(t_to_sigma(t, SIGMAS_TRAIN), ref.t_to_sigma(t), rtol=1e-6, atol=0)
    assert torch.allclose(t_to_sigma(t.float().double(), SIGMAS_TRAIN), ref.t_to_sigma(t), rtol=1e-12, atol=0)
    assert torch.allclose(sigma_to_t(t_to_sigma(t, SIGMAS_TRAIN), SIGMAS_TRAIN), t, rtol=0, atol=1e-9)
    # diffusers' rule, linear in sigma: np.interp, and its inverse
    lin = t_to_sigma(t, SIGMAS_TRAIN, "linear")
    assert torch.allclose(lin, torch.from_numpy(np.interp(t.numpy(), np.arange(1000), SIGMAS_TRAIN.numpy())))
    assert torch.allclose(sigma_to_t(lin, SIGMAS_TRAIN, "linear"), t, rtol=0, atol=1e-9)
    # at integer t all rules agree; at fractional t the log and linear rules differ
    ints = torch.arange(0, 1000, 37, dtype=torch.float64)
    assert torch.allclose(t_to_sigma(ints, SIGMAS_TRAIN, "linear"), t_to_sigma(ints, SIGMAS_TRAIN), rtol=1e-12)
    assert (lin / t_to_sigma(t, SIGMAS_TRAIN) - 1).abs().max() > 1e-6
    with pytest.raises(ValueError, match="valid: log, linear, nearest"):
        sigma_to_t(1.0, SIGMAS_TRAIN, "cubic")


def test_forward_process_moments_match_the_closed_form():
    x0 = torch.tensor([-1.5, 0.0, 0.7, 2.0], dtype=torch.float64).repeat(50000, 1)[:, :, None, None]   # (N, 4, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = 600
    xt = q_sample(x0, noise, torch.full((x0.shape[0],), t), ALPHAS_CUMPROD)
    abar = ALPHAS_CUMPROD[t]
    # 50000 draws: the standard error of the mean is sqrt(1 - abar) / 224 ~ 0.004; 5 of them bound it
    assert torch.allclose(xt.mean(0).flatten(), abar.sqrt() * x0[0].flatten(), atol=5 * (1 / 50000) ** 0.5)
    assert torch.allclose(xt.var(0).flatten(), (1 - abar).expand(4), rtol=0.03)
    # sigma space is the same draw, scaled by 1 / sqrt(abar) = sqrt(1 + sigma^2)
    sigma = SIGMAS_TRAIN[t]
    assert torch.allclose(add_noise(x0, noise, sigma), xt * (1 + sigma ** 2) ** 0.5, rtol=1e-12, atol=1e-12)
    # and equals diffusers' add_noise (float32 schedule)
    ts = torch.randint(0, 1000, (SHAPE[0],), generator=torch.Generator().manual_seed(1))
    x0s, ns = torch.randn(SHAPE), torch.randn(SHAPE)
    theirs = DDPMScheduler(**SD_SCHEDULER_CONFIG).add_noise(x0s, ns, ts)
    assert rel_err(q_sample(x0s, ns, ts, ALPHAS_CUMPROD), theirs) < 1e-5


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_equals_k_diffusion_wrappers(prediction):
    """make_denoiser is k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser (float64: exact)."""
    wrapper = {"eps": DiscreteEpsDDPMDenoiser, "v": DiscreteVDDPMDenoiser}[prediction]
    model = ToyModel()
    ref = wrapper(model, ALPHAS_CUMPROD, quantize=False)
    ours = make_denoiser(model, ALPHAS_CUMPROD, prediction)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ctx = CONTEXT.double()
    for sigma in (0.05, 0.7, 3.3, 14.0):
        assert rel_err(ours(x, sigma, ctx), ref(x, torch.full((SHAPE[0],), sigma, dtype=torch.float64),
                                                 context=ctx)) < 1e-10
    batch_sigma = torch.tensor([0.3, 9.0], dtype=torch.float64)
    assert rel_err(ours(x, batch_sigma, ctx), ref(x, batch_sigma, context=ctx)) < 1e-10
    # the comparison can fail: the other parametrization gives another x0
    other = make_denoiser(model, ALPHAS_CUMPROD, "v" if prediction == "eps" else "eps")
    assert rel_err(other(x, 0.7, ctx), ours(x, 0.7, ctx)) > 1e-2


def test_scalings_turn_eps_and_v_targets_into_x0():
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    sigma = 2.5
    x = x0 + sigma * eps
    abar = 1 / (1 + sigma ** 2)
    v = abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0                  # Salimans & Ho 2022, the v target
    for prediction, target in (("eps", eps), ("v", v)):
        c_skip, c_out, c_in = scalings(sigma, prediction)
        assert torch.allclose(c_skip * x + c_out * target, x0)
        assert torch.allclose(c_in * x, abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps)    # the U-Net's x_t
    with pytest.raises(ValueError, match="valid: eps, v"):
        make_denoiser(ToyModel(), ALPHAS_CUMPROD, "x0")


def test_cfg_is_one_batched_call_and_skips_uncond_at_scale_1():
    model = ToyModel()
    denoise = make_denoiser(model, ALPHAS_CUMPROD, "eps")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 3
    cond, uncond = CONTEXT, torch.randn(CONTEXT.shape, generator=torch.Generator().manual_seed(9))
    guided = cfg_denoiser(denoise, cond, uncond, scale=7.5)(x, 3.0)
    assert [b for b, _ in model.calls] == [2 * SHAPE[0]]            # one U-Net call on the doubled batch
    d_cond, d_uncond = denoise(x, 3.0, cond), denoise(x, 3.0, uncond)
    assert torch.allclose(guided, d_uncond + 7.5 * (d_cond - d_uncond), atol=1e-5)
    # = diffusers' guidance on eps: eps_u + g (eps_c - eps_u), then x0 = x - sigma eps
    t = sigma_to_t(3.0, SIGMAS_TRAIN).float().expand(SHAPE[0])
    xin = x / (1 + 3.0 ** 2) ** 0.5
    eps_c, eps_u = model(xin, t, cond), model(xin, t, uncond)
    assert rel_err(guided, x - 3.0 * (eps_u + 7.5 * (eps_c - eps_u))) < 1e-6
    model.calls.clear()
    assert torch.equal(cfg_denoiser(denoise, cond, uncond, scale=1.0)(x, 3.0), denoise(x, 3.0, cond))
    assert [b for b, _ in model.calls] == [SHAPE[0], SHAPE[0]]      # the guided call and our check: no 2B call
    # a negative prompt is the uncond context: changing it changes the result
    other = cfg_denoiser(denoise, cond, uncond + 1, scale=7.5)(x, 3.0)
    assert rel_err(other, guided) > 1e-3


def test_guidance_rescale_equals_diffusers_on_a_v_model():
    model = ToyModel()
    denoise = make_denoiser(model, ALPHAS_CUMPROD, "v")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 2
    cond, uncond = CONTEXT, torch.randn(CONTEXT.shape, generator=torch.Generator().manual_seed(9))
    sigma, scale, phi = 1.7, 9.0, 0.7
    ours = cfg_denoiser(denoise, cond, uncond, scale=scale, rescale=phi)(x, sigma)
    # diffusers: guidance and rescale on the v output, then the scheduler's v -> x0
    t = sigma_to_t(sigma, SIGMAS_TRAIN).float().expand(SHAPE[0])
    xin = x / (1 + sigma ** 2) ** 0.5
    v_c, v_u = model(xin, t, cond), model(xin, t, uncond)
    v = rescale_noise_cfg(v_u + scale * (v_c - v_u), v_c, guidance_rescale=phi)
    theirs = v * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    assert rel_err(ours, theirs) < 1e-5
    plain = cfg_denoiser(denoise, cond, uncond, scale=scale)(x, sigma)
    assert rel_err(plain, theirs) > 1e-3                            # rescale did something
