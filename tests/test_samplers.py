"""The samplers and sigma schedules equal k-diffusion's and diffusers', and behave as the theory says on a toy
problem with an exact denoiser."""
import dataclasses
import inspect
import math

import warnings

import diffusers
import k_diffusion as K
import pytest
import torch
import torchsde
from _sampler_refs import (ALPHAS_CUMPROD, CONTEXT_DIM, SD_SCHEDULER_CONFIG, SHAPE, SIGMAS_TRAIN, ToyModel,
                           rel_err, run_diffusers)
from k_diffusion.external import DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser

from minisd import samplers as S
from minisd import schedules
from minisd.brownian import BrownianTree, brownian_noise
from minisd.diffusion import make_denoiser, sigmas_from_alphas_cumprod, t_to_sigma
from minisd.unet import UNet
from minisd.config import UNetConfig



pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


CONTEXT = torch.randn(SHAPE[0], 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(3))
K_WRAPPERS = {"eps": DiscreteEpsDDPMDenoiser, "v": DiscreteVDDPMDenoiser}
K_NAMES = {"euler": "euler", "euler_a": "euler_ancestral", "heun": "heun", "dpm2": "dpm_2",
           "dpm2_a": "dpm_2_ancestral", "lms": "lms", "dpmpp_2s_a": "dpmpp_2s_ancestral", "dpmpp_2m": "dpmpp_2m",
           "dpmpp_sde": "dpmpp_sde", "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_3m_sde": "dpmpp_3m_sde"}


def run_both(name, model, prediction, sigmas, context, dtype):
    """Our sampler and k-diffusion's on the same model, sigmas, starting latent and noise stream."""
    ref = K_WRAPPERS[prediction](model, ALPHAS_CUMPROD.to(dtype), quantize=False)
    denoise = make_denoiser(model, ALPHAS_CUMPROD, prediction)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype) * sigmas[0].item()
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ours = S.SAMPLERS[name](lambda x, s: denoise(x, s, context), x, sigmas,
                            noise=S.noise_from(g_ours, SHAPE, dtype=dtype))
    fn = getattr(K.sampling, "sample_" + K_NAMES[name])
    kwargs = {}
    if "noise_sampler" in inspect.signature(fn).parameters:
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn(SHAPE, generator=g_ref).to(dtype)
    theirs = fn(ref, x, sigmas.to(dtype), extra_args={"context": context}, disable=True, **kwargs)
    return ours, theirs


# ---------------------------------------------------------------------------------------------------------------
# vs k-diffusion
# ---------------------------------------------------------------------------------------------------------------


def test_schedules_equal_k_diffusion():
    ref = DiscreteEpsDDPMDenoiser(None, ALPHAS_CUMPROD, quantize=False)            # float64 schedule
    smin, smax = ref.sigma_min.item(), ref.sigma_max.item()
    for steps in (1, 10, 25):
        # float64 on both sides: equal to rounding
        assert rel_err(schedules.get_sigmas("discrete", steps, SIGMAS_TRAIN), ref.get_sigmas(steps)) < 1e-12
        karras = K.sampling.get_sigmas_karras(steps, smin, smax).double()            # k-diffusion: float32 ramp
        assert rel_err(schedules.get_sigmas("karras", steps, SIGMAS_TRAIN), karras) < 1e-6
        expo = K.sampling.get_sigmas_exponential(steps, smin, smax).double()
        assert rel_err(schedules.get_sigmas("exponential", steps, SIGMAS_TRAIN), expo) < 1e-6
    assert schedules.get_sigmas("karras", 10, SIGMAS_TRAIN)[1] != schedules.get_sigmas("discrete", 10, SIGMAS_TRAIN)[1]


# float64 end to end, so the comparison sees our arithmetic, not float32 rounding in either (k-diffusion's
# float32 sigma_to_t alone moves t by ~4e-5). 1e-5 of the output std is the bound; we measure ~1e-12.
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["discrete", "karras"])
@pytest.mark.parametrize("name", list(K_NAMES))
def test_sampler_equals_k_diffusion(name, schedule, prediction):
    sigmas = schedules.get_sigmas(schedule, 10, SIGMAS_TRAIN)
    ours, theirs = run_both(name, ToyModel(), prediction, sigmas, CONTEXT.double(), torch.float64)
    assert rel_err(ours, theirs) <= 1e-5


def test_k_diffusion_comparison_can_fail():
    """A different noise stream or a perturbed schedule is caught by the same comparison."""
    sigmas = schedules.get_sigmas("karras", 10, SIGMAS_TRAIN)
    ours, theirs = run_both("euler", ToyModel(), "eps", sigmas * (1 + 1e-3), CONTEXT.double(), torch.float64)
    ref_x = run_both("euler", ToyModel(), "eps", sigmas, CONTEXT.double(), torch.float64)[1]
    assert rel_err(ours, ref_x) > 1e-4
    ours, theirs = run_both("euler_a", ToyModel(), "eps", sigmas, CONTEXT.double(), torch.float64)
    other = S.euler_a(lambda x, s: make_denoiser(ToyModel(), ALPHAS_CUMPROD)(x, s, CONTEXT.double()),
                      torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double() * sigmas[0].item(),
                      sigmas, noise=S.noise_from(torch.Generator().manual_seed(2), SHAPE, dtype=torch.float64))
    assert rel_err(other, theirs) > 1e-2


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


# fp32 here (the U-Net's real precision): per step both sides run the same U-Net on inputs that differ by float32
# rounding of sigma -> t (k-diffusion's float32 interpolation); measured ~1e-6.
@pytest.mark.parametrize("name,schedule", [("dpmpp_2m", "karras"), ("euler_a", "discrete")])
def test_sampler_through_unet_equals_k_diffusion(small_unet, name, schedule):
    sigmas = schedules.get_sigmas(schedule, 6, SIGMAS_TRAIN).float()
    ours, theirs = run_both(name, small_unet, "eps", sigmas, CONTEXT, torch.float32)
    assert rel_err(ours, theirs) <= 1e-5


# fp32, as above (measured 2e-6); k-diffusion's tree draws in float32 at float32 sigmas, ours at the same values
def test_sde_sampler_through_unet_equals_k_diffusion_default_noise(small_unet):
    sigmas = schedules.get_sigmas("karras", 6, SIGMAS_TRAIN).float()
    ours, theirs = run_sde_with_k_diffusion_default_noise("dpmpp_2m_sde", small_unet, sigmas, CONTEXT, torch.float32)
    assert rel_err(ours, theirs) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The SDE samplers' noise: a Brownian tree, equal to torchsde's and to k-diffusion's default noise sampler
# ---------------------------------------------------------------------------------------------------------------

TREE_SIGMAS = schedules.get_sigmas("karras", 10, SIGMAS_TRAIN).tolist()
# every step of a run, the DPM++ SDE midpoints, and two queries spanning many tree nodes, up and down
TREE_QUERIES = ([(a, b) for a, b in zip(TREE_SIGMAS[:-2], TREE_SIGMAS[1:-1])]
                + [(a, (a * b) ** 0.5) for a, b in zip(TREE_SIGMAS[:-2], TREE_SIGMAS[1:-1])] + [(0.5, 3.0), (3.0, 0.5)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brownian_tree_equals_torchsde_bit_for_bit(dtype):
    lo, hi = TREE_SIGMAS[-2], TREE_SIGMAS[0]
    for seed in (0, 42, 2 ** 62 + 5):
        ours = BrownianTree(seed, SHAPE, lo, hi, dtype)
        theirs = torchsde.BrownianTree(lo, torch.zeros(SHAPE, dtype=dtype), hi, entropy=seed)  # k-diffusion's call
        for a, b in TREE_QUERIES:
            a, b = min(a, b), max(a, b)
            with warnings.catch_warnings():         # torchsde warns when a query at sigma_max rounds past t1
                warnings.simplefilter("ignore")
                assert torch.equal(ours(a, b), theirs(a, b)), (seed, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brownian_noise_equals_k_diffusion_brownian_tree_noise_sampler_bit_for_bit(dtype):
    lo, hi = TREE_SIGMAS[-2], TREE_SIGMAS[0]
    ref = K.sampling.BrownianTreeNoiseSampler(torch.zeros(SHAPE, dtype=dtype), torch.tensor(lo, dtype=torch.float64),
                                              torch.tensor(hi, dtype=torch.float64), seed=1234)
    ours = brownian_noise(1234, SHAPE, lo, hi, dtype=dtype)
    for a, b in TREE_QUERIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = ref(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        assert torch.equal(ours(a, b), theirs), (a, b)


def test_brownian_noise_is_one_path_fixed_by_the_seed():
    """Increments add up (one path), each step's noise is N(0, 1), the order of queries does not matter, and
    another seed gives another path: what lets an SDE sampler converge as its step count grows."""
    tree = BrownianTree(7, (4, 64, 64), 0.03, 14.6)
    assert torch.allclose(tree(0.5, 3.0), tree(0.5, 1.234567) + tree(1.234567, 3.0), atol=1e-5)
    noise = brownian_noise(7, (4, 64, 64), 0.03, 14.6)
    z = noise(3.0, 2.0)
    assert abs(z.std().item() - 1) < 0.02 and abs(z.mean().item()) < 0.02
    assert torch.equal(brownian_noise(7, (4, 64, 64), 0.03, 14.6)(3.0, 2.0), z)         # a fresh tree, same path
    assert torch.equal(noise(2.0, 3.0), -z)                                              # k-diffusion's sign
    assert (brownian_noise(8, (4, 64, 64), 0.03, 14.6)(3.0, 2.0) - z).abs().max() > 1


def run_sde_with_k_diffusion_default_noise(name, model, sigmas, context, dtype, global_seed=5):
    """k-diffusion's sampler with its *default* noise (a BrownianTreeNoiseSampler it seeds from the global RNG),
    and ours on brownian_noise seeded with the number k-diffusion draws."""
    ref = DiscreteEpsDDPMDenoiser(model, ALPHAS_CUMPROD.to(dtype), quantize=False)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype) * sigmas[0].item()
    fn = getattr(K.sampling, "sample_" + K_NAMES[name])
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(global_seed)
        tree_seed = torch.randint(0, 2 ** 63 - 1, []).item()     # BatchedBrownianTree's draw
        torch.manual_seed(global_seed)
        theirs = fn(ref, x, sigmas.to(dtype), extra_args={"context": context}, disable=True)
    denoise = make_denoiser(model, ALPHAS_CUMPROD, "eps")
    noise = brownian_noise(tree_seed, SHAPE, sigmas[sigmas > 0].min().item(), sigmas.max().item(), dtype=dtype)
    ours = S.SAMPLERS[name](lambda x, s: denoise(x, s, context), x, sigmas, noise=noise)
    return ours, theirs


# float64 end to end; measured ~1e-13 (the tree's noise is bit-equal, see above)
@pytest.mark.parametrize("schedule", ["discrete", "karras"])
@pytest.mark.parametrize("name", sorted(S.BROWNIAN))
def test_sde_samplers_equal_k_diffusion_with_its_default_noise(name, schedule):
    sigmas = schedules.get_sigmas(schedule, 10, SIGMAS_TRAIN)
    ours, theirs = run_sde_with_k_diffusion_default_noise(name, ToyModel(), sigmas, CONTEXT.double(), torch.float64)
    assert rel_err(ours, theirs) <= 1e-5
    # the tree matters: fresh independent draws (minisd's noise before) give another sample
    denoise = make_denoiser(ToyModel(), ALPHAS_CUMPROD, "eps")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double() * sigmas[0].item()
    fresh = S.SAMPLERS[name](lambda x, s: denoise(x, s, CONTEXT.double()), x, sigmas,
                             noise=S.noise_from(torch.Generator().manual_seed(5), SHAPE, dtype=torch.float64))
    assert rel_err(fresh, theirs) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Churn (Karras et al. 2022, Alg. 2) vs k-diffusion, with the same injected noise
# ---------------------------------------------------------------------------------------------------------------

CHURN = dict(s_churn=2.0, s_tmin=0.1, s_tmax=10.0, s_noise=1.003)


def run_churn(name, monkeypatch, churn=CHURN, seed=3):
    """k-diffusion draws torch.randn_like(x) at every step and uses it where gamma > 0; we draw only there. Both
    get the same tensors: k-diffusion through a patched torch.randn_like, ours through noise()."""
    sigmas = schedules.get_sigmas("karras", 10, SIGMAS_TRAIN)
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(10)]
    churned = [i for i, s in enumerate(sigmas[:-1].tolist())
               if churn.get("s_churn", 0) and churn.get("s_tmin", 0) <= s <= churn.get("s_tmax", math.inf)]
    ours_draws = iter([draws[i] for i in churned])
    model = ToyModel()
    denoise = make_denoiser(model, ALPHAS_CUMPROD, "eps")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double() * sigmas[0].item()
    ours = S.SAMPLERS[name](lambda x, s: denoise(x, s, CONTEXT.double()), x, sigmas,
                            noise=lambda *interval: next(ours_draws), **churn)
    ref = DiscreteEpsDDPMDenoiser(model, ALPHAS_CUMPROD, quantize=False)
    their_draws = iter(draws)
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", lambda x: next(their_draws))
        fn = getattr(K.sampling, "sample_" + K_NAMES[name])
        theirs = fn(ref, x, sigmas, extra_args={"context": CONTEXT.double()}, disable=True, **churn)
    return ours, theirs, churned


# float64 end to end: measured ~5e-14
@pytest.mark.parametrize("name", sorted(S.CHURN))
def test_churn_equals_k_diffusion(name, monkeypatch):
    ours, theirs, churned = run_churn(name, monkeypatch)
    assert 0 < len(churned) < 9                           # s_tmin / s_tmax leave some steps without churn
    assert rel_err(ours, theirs) <= 1e-5
    plain = run_churn(name, monkeypatch, churn={})[1]
    assert rel_err(plain, theirs) > 1e-2                  # churn changed the sample
    other = run_churn(name, monkeypatch, seed=4)[1]
    assert rel_err(ours, other) > 1e-2                    # and other churn noise would be noticed


@pytest.mark.parametrize("name", sorted(S.CHURN))
def test_no_churn_draws_no_noise(name):
    def no_noise(*interval):
        raise AssertionError("drew noise")
    sigmas = toy_sigmas(6)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    plain = S.SAMPLERS[name](gmm_denoiser, x, sigmas)
    assert torch.equal(S.SAMPLERS[name](gmm_denoiser, x, sigmas, noise=no_noise, s_churn=0.0), plain)
    # churn only inside [s_tmin, s_tmax]: a window no sigma falls in draws nothing
    assert torch.equal(S.SAMPLERS[name](gmm_denoiser, x, sigmas, noise=no_noise, s_churn=5.0, s_tmin=100.0), plain)


def toy_plan(sampler, steps=5, **settings):
    """samplers.plan's Plan for `sampler` (eta, churn: settings), on the toy problem's sigmas."""
    return dataclasses.replace(S.plan(sampler, None, steps, SIGMAS_TRAIN, **settings), sigmas=toy_sigmas(steps))


def test_sample_runs_the_plans_churn_and_check_refuses_churn_elsewhere():
    sigmas = toy_sigmas(5)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    noise = lambda: S.noise_from(torch.Generator().manual_seed(1), (10, 2), dtype=torch.float64)   # noqa: E731
    plan = toy_plan("Heun", churn={"s_churn": 1.0, "s_noise": 1.01})
    assert plan.churn == {"s_churn": 1.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.01}
    assert torch.equal(S.sample(plan, gmm_denoiser, x, noise()),
                       S.heun(gmm_denoiser, x, sigmas, noise(), s_churn=1.0, s_noise=1.01))
    assert not torch.equal(S.sample(toy_plan("euler", churn={"s_churn": 1.0}), gmm_denoiser, x, noise()),
                           S.euler(gmm_denoiser, x, sigmas))
    assert S.check("euler_a", None, 5, churn={"s_tmin": 0.0}).churn is None      # the defaults are no churn
    with pytest.raises(ValueError, match="takes no churn"):
        S.check("euler_a", None, 5, churn={"s_churn": 1.0})
    with pytest.raises(ValueError, match="unknown churn setting 's_chrun'"):
        S.check("euler", None, 5, churn={"s_chrun": 1.0})
    with pytest.raises(ValueError, match="draws fresh noise"):
        S.sample(toy_plan("dpm2", churn={"s_churn": 1.0}), gmm_denoiser, x)


# ---------------------------------------------------------------------------------------------------------------
# vs diffusers, step by step
# ---------------------------------------------------------------------------------------------------------------

# (diffusers scheduler, its extra config, our sampler, our schedule, sigma -> t interpolation, start at
# sqrt(sigma^2 + 1) (True) or sigma (False), final sigma, whether diffusers works in abar space)
DIFFUSERS_CASES = {
    "euler-linspace": ("EulerDiscreteScheduler", dict(timestep_spacing="linspace"), "euler", "linspace", "linear"),
    "euler-leading": ("EulerDiscreteScheduler", dict(timestep_spacing="leading"), "euler", "leading", "log"),
    "euler-trailing": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing"), "euler", "trailing", "log"),
    "euler-linspace-karras": ("EulerDiscreteScheduler", dict(timestep_spacing="linspace", use_karras_sigmas=True),
                              "euler", "linspace karras", "log"),
    "euler-leading-karras": ("EulerDiscreteScheduler", dict(timestep_spacing="leading", use_karras_sigmas=True),
                             "euler", "leading karras", "log"),
    "euler-trailing-karras": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", use_karras_sigmas=True),
                              "euler", "trailing karras", "log"),
    "euler_a-leading": ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading"), "euler_a", "leading",
                        "log"),
    "euler_a-linspace": ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="linspace"), "euler_a",
                         "linspace", "linear"),
    "heun-leading": ("HeunDiscreteScheduler", dict(timestep_spacing="leading"), "heun", "leading", "log"),
    "heun-leading-karras": ("HeunDiscreteScheduler", dict(timestep_spacing="leading", use_karras_sigmas=True),
                            "heun", "leading karras", "log"),
    "lms-leading": ("LMSDiscreteScheduler", dict(timestep_spacing="leading"), "lms", "leading", "log"),
    "lms-trailing-karras": ("LMSDiscreteScheduler", dict(timestep_spacing="trailing", use_karras_sigmas=True),
                            "lms", "trailing karras", "log"),
    "dpm2-leading": ("KDPM2DiscreteScheduler", dict(timestep_spacing="leading"), "dpm2", "leading", "log"),
    "dpm2_a-leading": ("KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="leading"), "dpm2_a", "leading",
                       "log"),
    "dpmpp_2m-leading": ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading"), "dpmpp_2m", None, "log"),
    "dpmpp_2m-karras": ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading", use_karras_sigmas=True),
                        "dpmpp_2m", "karras", "nearest"),
    "ddim-leading": ("DDIMScheduler", dict(timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False),
                     "ddim", "leading", "log"),
    "ddim-eta-leading": ("DDIMScheduler", dict(timestep_spacing="leading", set_alpha_to_one=False,
                                               clip_sample=False), "ddim", "leading", "log"),
    "ddpm-leading": ("DDPMScheduler", dict(timestep_spacing="leading", clip_sample=False), "ddpm", "leading", "log"),
    # a Brownian tree seeded with noise_sampler_seed; ours with the same seed (the tests' seed, 42)
    "dpmpp_sde-leading": ("DPMSolverSDEScheduler", dict(timestep_spacing="leading", noise_sampler_seed=42),
                          "dpmpp_sde", "leading", "log"),
    # UniPC (diffusers' defaults: order 2, bh2, predict_x0, lower_order_final). Its "leading" is
    # DPMSolverMultistep's (n + 1 partitions: the scheduler's own timesteps, as dpmpp_2m-leading); its "trailing" is
    # the Euler family's; its Karras timesteps are rounded to integers ("nearest", as dpmpp_2m-karras)
    "unipc-leading": ("UniPCMultistepScheduler", dict(timestep_spacing="leading"), "unipc", None, "log"),
    "unipc-trailing": ("UniPCMultistepScheduler", dict(timestep_spacing="trailing"), "unipc", "trailing", "log"),
    "unipc-karras": ("UniPCMultistepScheduler", dict(use_karras_sigmas=True), "unipc", "karras", "nearest"),
    "unipc-order3-trailing": ("UniPCMultistepScheduler", dict(timestep_spacing="trailing", solver_order=3),
                              "unipc", "trailing", "log"),
    # LCM: the 50-step distillation grid, fresh noise from the generator after every step but the last
    "lcm": ("LCMScheduler", {}, "lcm", "lcm", "linear"),
    "dpmpp_sde-leading-karras": ("DPMSolverSDEScheduler", dict(timestep_spacing="leading", use_karras_sigmas=True,
                                                               noise_sampler_seed=42), "dpmpp_sde", "leading karras",
                                 "log"),
}
ABAR_SPACE = {"DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
              "LCMScheduler"}   # init_noise_sigma = 1, x_t


def run_ours_like_diffusers(case, prediction, steps, seed, scheduler, interpolation=None, model=None):
    cls, _, name, schedule, default_interp = DIFFUSERS_CASES[case]
    # The same schedule table as the scheduler: diffusers' float32 cumprod makes 1 - abar_0 lose ~4 digits, so
    # its sigma_min (hence every Karras sigma) differs from LDM's float64 one by up to 1.3e-5 relative.
    alphas_cumprod = scheduler.alphas_cumprod.double()
    sigmas_train = sigmas_from_alphas_cumprod(alphas_cumprod)
    if schedule is None:                          # DPMSolverMultistep's own "leading": (n + 1) partitions
        t = scheduler.timesteps.double()
        sigmas = torch.cat([t_to_sigma(t, sigmas_train, "linear"), torch.zeros(1, dtype=torch.float64)])
    else:
        final = "sigma_min" if cls == "DDIMScheduler" else "zero"
        sigmas = schedules.get_sigmas(schedule, steps, sigmas_train, final=final)
    abar_space = cls in ABAR_SPACE
    vp_start = abar_space or "leading" in schedule_of(case)
    denoise = make_denoiser(model or ToyModel(), alphas_cumprod, prediction, interpolation or default_interp)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * schedules.init_noise_sigma(sigmas[0].item(), vp_start)
    trajectory = []
    kwargs = {"eta": 0.5} if case == "ddim-eta-leading" else {}
    if "order3" in case:
        kwargs["order"] = 3
    if name == "lcm":                             # the plan's t of each sigma, LCM's boundary condition
        kwargs["timesteps"] = S.plan(name, schedule, steps, sigmas_train).timesteps
    noise = S.noise_from(g, SHAPE)
    if name in S.BROWNIAN:                        # the tree on the schedule's range, seeded with the seed
        noise = brownian_noise(seed, SHAPE, sigmas[sigmas > 0].min().item(), sigmas.max().item())
    x = S.SAMPLERS[name](lambda x, s: denoise(x, s, CONTEXT), x, sigmas, noise=noise,
                         callback=lambda i, x, d, s: trajectory.append(x), **kwargs)
    trajectory.append(x)
    if abar_space:                                # x_t = x / sqrt(1 + sigma^2): diffusers' coordinates
        trajectory = [x / (1 + s ** 2) ** 0.5 for x, s in zip(trajectory, sigmas.tolist())]
    return trajectory


def schedule_of(case):
    return DIFFUSERS_CASES[case][1].get("timestep_spacing", "")


def diffusers_trajectory(case, prediction, steps, seed):
    cls, extra, *_ = DIFFUSERS_CASES[case]
    scheduler = getattr(diffusers, cls)(**SD_SCHEDULER_CONFIG, **extra,
                                        prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    eta = 0.5 if case == "ddim-eta-leading" else None
    return run_diffusers(scheduler, ToyModel(), steps, CONTEXT, seed, eta=eta), scheduler


# diffusers computes its schedule and steps in float32 (we in float64 for the scalars): 1e-4 of the std, the
# issue's bound, leaves room for that rounding (~1e-6 measured) and none for a wrong t, sigma or step.
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_sampler_equals_diffusers_step_by_step(case, prediction):
    # 7 steps: "linspace" timesteps are fractional (999 / 6 = 166.5), "leading" ones are 1 + 142 k
    theirs, scheduler = diffusers_trajectory(case, prediction, 7, seed=42)
    ours = run_ours_like_diffusers(case, prediction, 7, 42, scheduler)
    assert len(ours) == len(theirs)
    # DPMSolverSDE queries its Brownian tree at float32 sigmas (round-tripped through exp(-(-log sigma))), which the
    # tree rounds to 1e-6: a query one grid point away moves that step's noise by ~1e-3 (measured 3.4e-3 at the end;
    # the noise itself is bit-equal at equal query times, see test_brownian_*). Another seed is off by ~1.
    tol = 1e-2 if DIFFUSERS_CASES[case][2] in S.BROWNIAN else 1e-4
    assert max(rel_err(a, b) for a, b in zip(ours, theirs)) <= tol


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_lcm_boundary_condition_equals_diffusers_at_small_t(prediction):
    """At LCM's own timesteps (t >= 19) c_skip <= 7e-6 and c_out >= 0.99999: the step is D plus noise, and the
    comparisons above would not see a wrong boundary condition. At t = 3 and 1 (diffusers' custom timesteps)
    c_skip is 0.007 and 0.0025 of x_t, far above the tolerance."""
    timesteps = [999, 259, 3, 1]
    scheduler = diffusers.LCMScheduler(**SD_SCHEDULER_CONFIG,
                                       prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    with warnings.catch_warnings():        # diffusers warns that 3 and 1 are off its 50-step grid
        warnings.simplefilter("ignore")
        theirs = run_diffusers(scheduler, ToyModel(), timesteps, CONTEXT, 42)
    sigmas_train = sigmas_from_alphas_cumprod(scheduler.alphas_cumprod.double())
    t = torch.tensor(timesteps, dtype=torch.float64)
    sigmas = torch.cat([t_to_sigma(t, sigmas_train, "linear"), torch.zeros(1, dtype=torch.float64)])
    denoise = make_denoiser(ToyModel(), scheduler.alphas_cumprod.double(), prediction, "linear")
    g = torch.Generator().manual_seed(42)
    x = torch.randn(SHAPE, generator=g) * schedules.init_noise_sigma(sigmas[0].item(), True)
    trajectory = []
    x = S.lcm(lambda x, s: denoise(x, s, CONTEXT), x, sigmas, noise=S.noise_from(g, SHAPE),
              callback=lambda i, x, d, s: trajectory.append(x), timesteps=timesteps)
    ours = [x / (1 + s ** 2) ** 0.5 for x, s in zip(trajectory + [x], sigmas.tolist())]
    assert max(rel_err(a, b) for a, b in zip(ours, theirs)) <= 1e-4          # float32 diffusers, as above


def test_lcm_and_unipc_plans_start_and_step_as_diffusers():
    """LCM's plan: LCMScheduler's timesteps (the U-Net's t and the boundary condition's), cut with the sigmas by
    Plan.last (img2img); LCM and UniPC start at sqrt(sigma_max^2 + 1), diffusers' init_noise_sigma = 1 in abar
    space."""
    scheduler = diffusers.LCMScheduler(**SD_SCHEDULER_CONFIG)
    for steps in (1, 4, 7):
        scheduler.set_timesteps(steps)
        plan = S.plan("LCM", None, steps, SIGMAS_TRAIN)
        assert max(abs(a - b) for a, b in zip(plan.timesteps, scheduler.timesteps.tolist())) < 1e-6
        assert len(plan.timesteps) == steps and plan.interpolation == "linear"
    assert plan.last(2).timesteps == plan.timesteps[-2:] and len(plan.last(2).sigmas) == 3
    for name in ("LCM", "UniPC"):
        plan = S.plan(name, None, 4, SIGMAS_TRAIN)
        assert plan.init_sigma == pytest.approx((plan.sigmas[0].item() ** 2 + 1) ** 0.5, rel=1e-12)
    assert S.plan("UniPC", None, 4, SIGMAS_TRAIN).timesteps is None


def test_diffusers_linspace_needs_linear_interpolation():
    """diffusers' fractional "linspace" timesteps come with linearly interpolated sigmas: mapping those sigmas
    back to t log-linearly (k-diffusion's rule) feeds the U-Net other timesteps than diffusers does."""
    scheduler = diffusers.EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, timestep_spacing="linspace")
    scheduler.set_timesteps(7)
    fed = {}
    for interpolation in ("linear", "log"):
        fed[interpolation] = ToyModel()
        run_ours_like_diffusers("euler-linspace", "eps", 7, 42, scheduler, interpolation, fed[interpolation])
        fed[interpolation] = torch.stack([t[0] for _, t in fed[interpolation].calls]).double()
    # measured: linear ~1e-5 (diffusers' timesteps are float32), log 6e-4 at t = 166.5, 499.5, 832.5
    assert (fed["linear"] - scheduler.timesteps.double()).abs().max() < 1e-4
    assert (fed["log"] - scheduler.timesteps.double()).abs().max() > 3e-4


def test_diffusers_comparison_can_fail_on_the_seed():
    theirs, scheduler = diffusers_trajectory("euler_a-leading", "eps", 10, seed=42)
    ours = run_ours_like_diffusers("euler_a-leading", "eps", 10, 43, scheduler)
    assert rel_err(ours[-1], theirs[-1]) > 1e-2


def test_diffusers_sigmas_equal_get_sigmas():
    """The schedules alone, for each spacing, with and without Karras (diffusers' EulerDiscreteScheduler)."""
    for spacing in ("linspace", "leading", "trailing"):
        for karras in (False, True):
            for steps in (7, 10, 30):
                sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, timestep_spacing=spacing,
                                                         use_karras_sigmas=karras)
                sched.set_timesteps(steps)
                ours = schedules.get_sigmas(spacing + (" karras" if karras else ""), steps, SIGMAS_TRAIN)
                assert rel_err(ours, sched.sigmas) < 1e-5, (spacing, karras, steps)
    # SD's own config ("leading") never starts at sigma_max; k-diffusion's always does
    assert schedules.get_sigmas("leading", 10, SIGMAS_TRAIN)[0] < 0.9 * SIGMAS_TRAIN[-1]
    assert schedules.get_sigmas("leading karras", 10, SIGMAS_TRAIN)[0] != schedules.get_sigmas("karras", 10, SIGMAS_TRAIN)[0]


# ---------------------------------------------------------------------------------------------------------------
# A toy problem with an exact denoiser: a 2-D Gaussian mixture
# ---------------------------------------------------------------------------------------------------------------

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def gmm_denoiser(x, sigma):
    """E[x0 | x0 + sigma eps = x] for the mixture sum_k w_k N(mu_k, s_k^2 I): the posterior-weighted mean of each
    component's Gaussian posterior mean mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k). Exact, closed form."""
    var = STDS ** 2 + sigma ** 2                                            # (K,) variance of x given component k
    diff = x[:, None, :] - MEANS                                            # (N, K, 2)
    logp = WEIGHTS.log() - diff.pow(2).sum(-1) / (2 * var) - var.log()      # 2-D isotropic Gaussian, up to a const
    post = torch.softmax(logp, dim=1)                                       # (N, K)
    return (post[..., None] * (MEANS + (STDS ** 2 / var)[:, None] * diff)).sum(1)


def gmm_moments():
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = (WEIGHTS[:, None, None] * (STDS[:, None, None] ** 2 * torch.eye(2)
                                        + MEANS[:, :, None] * MEANS[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def toy_sigmas(steps):
    return torch.cat([schedules.sigmas_karras(steps, 0.002, 80.0), torch.zeros(1, dtype=torch.float64)])


def moment_error(x):
    mean, cov = gmm_moments()
    return max((x.mean(0) - mean).abs().max().item(), (torch.cov(x.T) - cov).abs().max().item())


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2", "lms", "dpmpp_2m", "unipc", "ddim"])
def test_deterministic_samplers_reach_the_target_moments(name):
    x = torch.randn(10000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    errors = [moment_error(S.SAMPLERS[name](gmm_denoiser, x, toy_sigmas(n))) for n in (4, 16, 64)]
    # the error shrinks with the step count (measured, euler: 1.8, 0.45, 0.10; 2nd-order: ~0.04 at 64 steps);
    # the Monte Carlo error of 10000 samples' covariance is ~0.03, so 0.12 separates "converged" from 16 steps
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < (0.12 if name in ("euler", "ddim") else 0.05), errors


def test_euler_converges_with_steps_but_euler_a_does_not():
    """For one seed, Euler's sample settles as steps double (first order: the change halves); Euler a's keeps
    changing by O(data scale), because each run injects differently-sized fresh noise at different sigmas."""
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0

    def final(name, n):
        noise = S.noise_from(torch.Generator().manual_seed(1), (2000, 2), dtype=torch.float64)
        return S.SAMPLERS[name](gmm_denoiser, x, toy_sigmas(n), noise=noise)

    def change(name, n):                         # mean distance between the n- and 2n-step samples
        return (final(name, n) - final(name, 2 * n)).norm(dim=1).mean().item()

    euler = [change("euler", n) for n in (10, 40, 160)]
    euler_a = [change("euler_a", n) for n in (10, 40, 160)]
    assert euler[2] < euler[0] / 8 and euler[2] < 0.01, euler
    assert min(euler_a) > 0.3, euler_a          # the mixture's components are 0.3 .. 0.5 wide


# ---------------------------------------------------------------------------------------------------------------
# Callback, names, errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_callback_exposes_x_denoised_and_sigma(name):
    sigmas = toy_sigmas(6)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    seen = []
    noise = S.noise_from(torch.Generator().manual_seed(1), (50, 2), dtype=torch.float64)
    extra = {"timesteps": [999.0 - 150 * i for i in range(6)]} if name == "lcm" else {}     # LCM's t per sigma
    S.SAMPLERS[name](gmm_denoiser, x0, sigmas, noise=noise, callback=lambda *a: seen.append(a), **extra)
    assert [i for i, *_ in seen] == list(range(6))
    assert [s for *_, s in seen] == sigmas[:-1].tolist()
    assert torch.equal(seen[0][1], x0)
    for i, x, denoised, sigma in seen:       # denoised is D(x, sigma) of the x reported with it
        assert torch.allclose(denoised, gmm_denoiser(x, sigma))


def test_names_identifiers_and_a1111_display_names():
    for key in S.SAMPLERS:
        assert S.parse_sampler(key) == (key, None)
    assert S.parse_sampler("Euler a") == ("euler_a", None)
    assert S.parse_sampler("DPM2 a") == ("dpm2_a", None)
    assert S.parse_sampler("DPM++ 2S a Karras") == ("dpmpp_2s_a", "karras")
    assert S.parse_sampler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert S.parse_sampler("DPM++ 2M SDE Exponential") == ("dpmpp_2m_sde", "exponential")
    assert S.parse_sampler("LMS Karras") == ("lms", "karras")
    assert S.parse_sampler("PLMS") == ("plms", None) and S.display_name("plms") == "PLMS"
    assert S.parse_sampler("DPM++ 3M SDE Karras") == ("dpmpp_3m_sde", "karras")
    assert S.parse_sampler("UniPC") == ("unipc", None) and S.display_name("unipc") == "UniPC"
    assert S.parse_sampler("LCM") == ("lcm", None) and S.display_name("lcm") == "LCM"


def test_check_reads_the_settings_once_and_refuses_bad_ones():
    assert S.check("DPM++ 2M Karras", None, 20) == S.Sampling("dpmpp_2m", "karras", 20, None, None)
    assert S.check("DDIM", "default", 20, eta=0.5) == S.Sampling("ddim", "leading", 20, 0.5, None)
    with pytest.raises(ValueError, match="takes no eta"):
        S.check("euler", None, 5, eta=0.5)
    with pytest.raises(ValueError, match="euler_a.*DPM\\+\\+ 2M"):
        S.check("Euler b", None, 5)
    with pytest.raises(ValueError, match="asks for the karras schedule"):
        S.check("Euler Karras", "exponential", 5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        S.check("euler", None, 0)
    assert S.check("LCM", None, 4) == S.Sampling("lcm", "lcm", 4, None, None)
    with pytest.raises(ValueError, match="lcm schedule has at most 50 steps"):
        S.check("LCM", None, 51)
    with pytest.raises(ValueError, match="takes no eta"):
        S.check("UniPC", None, 5, eta=0.5)
    with pytest.raises(ValueError, match="valid: discrete, karras"):
        schedules.get_sigmas("cosine", 10, SIGMAS_TRAIN)
    with pytest.raises(ValueError, match="valid: discrete, karras"):
        schedules.get_sigmas("leading karras rho", 10, SIGMAS_TRAIN)
    with pytest.raises(ValueError, match="positive integer"):
        schedules.get_sigmas("karras", 0, SIGMAS_TRAIN)


def test_sample_runs_the_plans_sampler_with_its_eta():
    sigmas = toy_sigmas(5)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    assert torch.equal(S.sample(toy_plan("Heun"), gmm_denoiser, x), S.heun(gmm_denoiser, x, sigmas))
    noise = lambda: S.noise_from(torch.Generator().manual_seed(1), (10, 2), dtype=torch.float64)   # noqa: E731
    plan = toy_plan("Euler a", eta=0.5)
    assert plan.eta == 0.5
    assert torch.equal(S.sample(plan, gmm_denoiser, x, noise()), S.euler_a(gmm_denoiser, x, sigmas, noise(), eta=0.5))
    # the eta reaches the sampler: eta 1 is another image
    assert not torch.equal(S.sample(toy_plan("Euler a"), gmm_denoiser, x, noise()), S.sample(plan, gmm_denoiser, x,
                                                                                               noise()))
    with pytest.raises(ValueError, match="draws fresh noise"):
        S.sample(toy_plan("euler_a"), gmm_denoiser, x)
    assert S.sample(toy_plan("ddim"), gmm_denoiser, x).isfinite().all()      # ddim's default eta 0 draws none


def test_ancestral_split_is_the_ddpm_posterior_at_eta_1():
    sigma, sigma_next = 3.0, 1.5
    down, up = S.ancestral_split(sigma, sigma_next, 1.0)
    assert math.isclose(down ** 2 + up ** 2, sigma_next ** 2)
    assert math.isclose(up ** 2, sigma_next ** 2 * (1 - sigma_next ** 2 / sigma ** 2))
    assert S.ancestral_split(sigma, sigma_next, 0.0) == (sigma_next, 0.0)
    assert S.ancestral_split(sigma, 0.0, 1.0) == (0.0, 0.0)
