"""The samplers SD was released with: `ddim` and `plms` equal LDM's own DDIMSampler and PLMSSampler
(ldm/models/diffusion/ddim.py, plms.py; SD 1.x's scripts/txt2img.py, `--plms` its default) on the same model and
noise, and the pipeline's PLMS and DPM++ SDE images equal diffusers' StableDiffusionPipeline with PNDMScheduler
(SD 1.5's own scheduler, PLMS) and DPMSolverSDEScheduler (a Brownian tree seeded with `noise_sampler_seed`).

LDM works in abar space (x_t = x_sigma / sqrt(1 + sigma^2)) with float32 schedule buffers; the comparisons map our
sigma-space latents into its space.
"""
import numpy as np
import pytest
import torch
from _sampler_refs import ALPHAS_CUMPROD, CONTEXT_DIM, SHAPE, SIGMAS_TRAIN, ToyModel, rel_err
from checkpoints import (SMALL_SD1, diffusers_from_single_file, schedule_buffers, write_diffusers_config,
                         write_ldm_checkpoint)
from ldm.models.diffusion import ddim as ldm_ddim
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_ddim_timesteps

from minisd import samplers as S
from minisd.config import SD15, UNetConfig
from minisd.diffusion import make_denoiser
from minisd.unet import UNet


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


CONTEXT = torch.randn(SHAPE[0], 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(3))


class LDMStandIn:
    """What LDM's DDIMSampler / PLMSSampler read from a LatentDiffusion: its schedule buffers (float32, as LDM's
    register_schedule makes them), num_timesteps, device, parameterization and apply_model(x_t, t, c)."""

    def __init__(self, model, parameterization="eps"):
        for name, value in schedule_buffers(SD15).items():
            setattr(self, name, value)
        self.num_timesteps, self.device, self.parameterization, self.model = 1000, "cpu", parameterization, model

    def apply_model(self, x, t, c):
        return self.model(x, t, c)

    # ldm/models/diffusion/ddpm.py, DDPM (copied: importing ddpm.py needs pytorch_lightning)
    def predict_start_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)


def run_both(name, model, steps, prediction="eps", eta=0.0, monkeypatch=None, noise_seed=1):
    """LDM's sampler and ours, planned as the pipeline plans `name`, from the same x_T = randn and (eta > 0) the
    same noise: LDM draws its eta noise with noise_like (torch.randn, global RNG), patched here to read the stream
    our noise_from reads. Returns both final latents in LDM's abar space."""
    plan = S.plan(name, None, steps, SIGMAS_TRAIN)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    denoise = make_denoiser(model, ALPHAS_CUMPROD, prediction, plan.interpolation)
    kwargs = {"eta": eta} if name == "ddim" else {}
    ours = S.SAMPLERS[name](lambda x, s: denoise(x, s, CONTEXT), x_T * plan.init_sigma, plan.sigmas,
                            noise=S.noise_from(torch.Generator().manual_seed(noise_seed), SHAPE), **kwargs)
    ours = ours / (1 + plan.sigmas[-1].item() ** 2) ** 0.5          # sigma space -> abar space at abar_0
    sampler = {"ddim": DDIMSampler, "plms": PLMSSampler}[name](LDMStandIn(model, prediction))
    g = torch.Generator().manual_seed(noise_seed)
    with monkeypatch.context() as m:
        m.setattr(ldm_ddim, "noise_like", lambda shape, device, repeat=False: torch.randn(shape, generator=g))
        theirs, _ = sampler.sample(steps, SHAPE[0], SHAPE[1:], conditioning=CONTEXT, eta=eta, x_T=x_T,
                                   verbose=False)
    return ours, theirs


def test_plms_plan_is_ldms_schedule_and_start():
    """LDM's make_ddim_timesteps("uniform") + 1 (SD's "leading" with steps_offset 1), ending at abar_0, starting
    from x_T = randn in abar space — for step counts that divide 1000 (others: LDM runs 1000 // (1000 // n)
    rounded up, more than n steps; we, as diffusers' PNDMScheduler, run n)."""
    for steps in (10, 20, 25, 50):
        plan = S.plan("PLMS", None, steps, SIGMAS_TRAIN)
        t = make_ddim_timesteps("uniform", steps, 1000, verbose=False)[::-1].copy()
        assert torch.allclose(plan.sigmas[:-1], SIGMAS_TRAIN[t], rtol=1e-12)
        assert plan.sigmas[-1] == SIGMAS_TRAIN[0]                     # LDM's alphas_prev[0] = alphas_cumprod[0]
        assert plan.init_sigma == (plan.sigmas[0].item() ** 2 + 1) ** 0.5
        assert plan.schedule == "leading" and plan.brownian is None


# LDM computes in float32 from float32 buffers, we with float64 scalars; measured: ddim ~1.3e-6, plms ~1.7e-6 (toy),
# ~1e-6 through the U-Net. 1e-4 of the output's std leaves room for that and none for a wrong coefficient.
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_equals_ldm_ddim_sampler(prediction, eta, monkeypatch):
    ours, theirs = run_both("ddim", ToyModel(), 10, prediction, eta, monkeypatch)
    assert rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("steps", [4, 10, 20])
def test_plms_equals_ldm_plms_sampler(steps, monkeypatch):
    """4 steps: Heun start + AB2 + AB3 + AB4; 10 and 20 run on AB4. (LDM's PLMS has no v-prediction branch.)"""
    ours, theirs = run_both("plms", ToyModel(), steps, monkeypatch=monkeypatch)
    assert rel_err(ours, theirs) <= 1e-4


def test_ldm_comparison_can_fail(monkeypatch):
    """Other eta noise, or DDIM where PLMS was run, is noticed by the same comparison."""
    ours, theirs = run_both("ddim", ToyModel(), 10, eta=0.5, monkeypatch=monkeypatch)
    other, _ = run_both("ddim", ToyModel(), 10, eta=0.5, monkeypatch=monkeypatch, noise_seed=2)
    assert rel_err(other, theirs) > 1e-2
    ddim, _ = run_both("ddim", ToyModel(), 10, monkeypatch=monkeypatch)
    _, plms = run_both("plms", ToyModel(), 10, monkeypatch=monkeypatch)
    assert rel_err(ddim, plms) > 1e-3


@pytest.fixture(scope="module")
def small_unet():
    """minisd's U-Net at a tiny config, every parameter redrawn (its init zeroes output layers)."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                           num_heads=2, context_dim=CONTEXT_DIM, norm_groups=8)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return unet


@pytest.mark.parametrize("name,eta", [("plms", 0.0), ("ddim", 1.0)])
def test_ldm_samplers_through_unet(small_unet, name, eta, monkeypatch):
    ours, theirs = run_both(name, small_unet, 10, eta=eta, monkeypatch=monkeypatch)
    assert rel_err(ours, theirs) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The pipeline vs diffusers' StableDiffusionPipeline: PLMS (PNDMScheduler) and DPM++ SDE (DPMSolverSDEScheduler)
# ---------------------------------------------------------------------------------------------------------------

TOL = 2 / 255           # test_pipeline.py's figure: max abs pixel difference in [0, 1], fp32 on CPU
PROMPT = "a red circle on a blue background, highly detailed"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from minisd.pipeline import Pipeline
    d = tmp_path_factory.mktemp("sd1")
    write_ldm_checkpoint(d / "model.safetensors", SMALL_SD1, seed=1, parameterization="eps")
    write_diffusers_config(d / "config", SMALL_SD1)
    ours = Pipeline.load(str(d / "model.safetensors"), device="cpu", dtype="fp32", log=lambda *_: None)
    ref = diffusers_from_single_file(d / "model.safetensors", d / "config")
    ref.set_progress_bar_config(disable=True)
    ref.sd_scheduler_config = ref.scheduler.config     # the file's own; each test builds its scheduler from it
    return ours, ref


def _diffusers(ref, scheduler, negative, steps, seed, **options):
    import diffusers
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.sd_scheduler_config, **options)
    return ref(PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(seed), width=32, height=32, output_type="np").images


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def test_plms_equals_diffusers_pndm_pipeline(sd1):
    """SD 1.5's own diffusers scheduler (PNDM, skip_prk_steps) is PLMS. Measured max pixel error ~0.002."""
    ours, ref = sd1
    theirs = _diffusers(ref, "PNDMScheduler", "blurry", 10, 7, timestep_spacing="leading", skip_prk_steps=True)
    mine = ours.generate(PROMPT, "blurry", 10, 7.5, "PLMS", seed=7, width=32, height=32).images
    assert np.abs(_np(mine) - theirs).max() <= TOL


def test_dpmpp_sde_equals_diffusers_dpmsolver_sde_pipeline(sd1):
    """The same seed gives the same image as diffusers with DPMSolverSDEScheduler(noise_sampler_seed=seed): the
    pipeline seeds the Brownian tree with the seed. (Without noise_sampler_seed diffusers seeds its tree from the
    global torch RNG, not from the generator, and no two runs agree.) Measured max pixel error ~0.002, float32
    sigma rounding in diffusers' tree queries (see brownian_noise); another seed differs by ~1."""
    ours, ref = sd1
    theirs = _diffusers(ref, "DPMSolverSDEScheduler", "", 5, 7, timestep_spacing="leading", noise_sampler_seed=7)
    mine = ours.generate(PROMPT, "", 5, 7.5, "dpmpp_sde", "leading", seed=7, width=32, height=32).images
    assert np.abs(_np(mine) - theirs).max() <= TOL
    other = ours.generate(PROMPT, "", 5, 7.5, "dpmpp_sde", "leading", seed=8, width=32, height=32).images
    assert np.abs(_np(other) - theirs).max() > 10 * TOL
