"""The diffusion process of Stable Diffusion, in the two coordinate systems the papers use.

DDPM (Ho et al. 2020) writes a noised latent as

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,      eps ~ N(0, I),  t = 0 .. 999     ("abar space")

and this x_t is what the U-Net sees. Karras et al. 2022 ("EDM") write the same point as

    x = x0 + sigma eps,        sigma = sqrt((1 - abar) / abar)                           ("sigma space")

The two differ only by a scale: x = x_t / sqrt(abar_t) = x_t * sqrt(1 + sigma^2). Samplers live in sigma space,
where the probability-flow ODE is just dx/dsigma = (x - D(x, sigma)) / sigma, with D the denoiser (an estimate of
x0). This file holds the schedule, the forward process, the map from a U-Net that predicts eps or v to D, and
classifier-free guidance. The samplers and the sigma schedules they walk are in `samplers.py`.
"""
import torch

# ---------------------------------------------------------------------------------------------------------------
# The noise schedule
# ---------------------------------------------------------------------------------------------------------------


def scaled_linear_betas(beta_start=0.00085, beta_end=0.012, num_timesteps=1000):
    """LDM's "linear" schedule (diffusers calls it "scaled_linear"): linear in sqrt(beta). float64, like LDM."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2


def alphas_cumprod_from_betas(betas):
    """abar_t = prod_{s <= t} (1 - beta_s) (DDPM eq. 4): the signal fraction left after t noising steps."""
    return torch.cumprod(1 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """sigma_t = sqrt((1 - abar_t) / abar_t): the noise-to-signal ratio, increasing in t (0.0292 .. 14.61 for SD)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def snr(alphas_cumprod):
    """Signal-to-noise ratio abar / (1 - abar) = 1 / sigma^2 (Kingma et al. 2021)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def _interp(x, xp, fp):
    """np.interp in torch: piecewise-linear through (xp, fp), xp increasing, clamped to the end values."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


INTERPOLATIONS = ("log", "linear", "nearest")


def sigma_to_t(sigma, sigmas_train, interpolation="log"):
    """The (fractional) training timestep whose noise level is `sigma`.

    The model only knows the 1000 sigmas it was trained at; between them we must pick an interpolation:
      "log"     log(sigma) is piecewise linear in t: k-diffusion's DiscreteSchedule.sigma_to_t, A1111, and diffusers
                for Karras/exponential sigmas (`_sigma_to_t`). The default.
      "linear"  sigma is piecewise linear in t: the inverse of diffusers' `np.interp(timesteps, arange, sigmas)`,
                which its *DiscreteSchedulers use for fractional "linspace" timesteps. Needed to reproduce them.
      "nearest" the closest training step in log sigma: k-diffusion's `quantize=True`, and what diffusers'
                DPMSolverMultistepScheduler feeds the U-Net with Karras sigmas (it rounds the log-interpolated t).
    At integer timesteps all three agree. Out-of-range sigmas clamp to t = 0 or 999.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sigmas_train = sigmas_train.to(torch.float64)
    steps = torch.arange(len(sigmas_train), dtype=torch.float64)
    if interpolation == "log":
        return _interp(sigma.log(), sigmas_train.log(), steps)
    if interpolation == "linear":
        return _interp(sigma, sigmas_train, steps)
    if interpolation == "nearest":
        return (sigma.log()[..., None] - sigmas_train.log()).abs().argmin(-1).to(torch.float64)
    raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")


def t_to_sigma(t, sigmas_train, interpolation="log"):
    """The noise level at a (fractional) timestep t: log-linear between training steps (k-diffusion) or linear
    (diffusers' np.interp); see `sigma_to_t`."""
    t = torch.as_tensor(t, dtype=torch.float64)
    sigmas_train = sigmas_train.to(torch.float64)
    steps = torch.arange(len(sigmas_train), dtype=torch.float64)
    if interpolation == "log":
        return _interp(t, steps, sigmas_train.log()).exp()
    if interpolation == "linear":
        return _interp(t, steps, sigmas_train)
    raise ValueError(f"unknown interpolation {interpolation!r}; valid: log, linear")


# ---------------------------------------------------------------------------------------------------------------
# The forward process q(x_t | x0)
# ---------------------------------------------------------------------------------------------------------------


def _per_sample(value, x):
    """A scalar or a (B,) tensor of per-sample values, shaped to broadcast against x (B, C, H, W).

    A Python float is returned as it is: it becomes a kernel argument, so nothing is copied to x's device (on a
    GPU, copying a tensor from pageable host memory waits until the GPU has finished all work queued before)."""
    if isinstance(value, float):
        return value
    value = torch.as_tensor(value, dtype=torch.float64)
    return value.reshape(-1, *[1] * (x.ndim - 1)).to(x.device, x.dtype)


def q_sample(x0, noise, t, alphas_cumprod):
    """Draw x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (DDPM eq. 4) with the given noise.

    t: integer timesteps, an int or a (B,) long tensor.
    """
    abar = alphas_cumprod.to(torch.float64)[torch.as_tensor(t, dtype=torch.long).cpu()]
    return _per_sample(abar ** 0.5, x0) * x0 + _per_sample((1 - abar) ** 0.5, x0) * noise


def add_noise(x0, noise, sigma):
    """The same draw in sigma space: x = x0 + sigma * noise = q_sample(...) * sqrt(1 + sigma^2) (Karras eq. 2)."""
    return x0 + _per_sample(sigma, x0) * noise


# ---------------------------------------------------------------------------------------------------------------
# Parametrizations: from what the U-Net predicts to a denoiser D(x, sigma) ~ x0
# ---------------------------------------------------------------------------------------------------------------

PREDICTIONS = ("eps", "v")


def scalings(sigma, prediction):
    """(c_skip, c_out, c_in) with D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)) (Karras et al. 2022, eq. 7).

    c_in = 1 / sqrt(sigma^2 + 1) turns sigma-space x back into the abar-space x_t the U-Net was trained on.
    eps-prediction (DDPM): x = x0 + sigma eps  =>  x0 = x - sigma eps.
    v-prediction (Salimans & Ho 2022, v = alpha eps - s x0 with alpha = sqrt(abar), s = sqrt(1 - abar)):
      x0 = alpha x_t - s v = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v   (k-diffusion DiscreteVDDPMDenoiser).
    """
    if prediction == "eps":
        return 1.0, -sigma, 1 / (sigma ** 2 + 1) ** 0.5
    if prediction == "v":
        return 1 / (sigma ** 2 + 1), -sigma / (sigma ** 2 + 1) ** 0.5, 1 / (sigma ** 2 + 1) ** 0.5
    raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def make_denoiser(model, alphas_cumprod, prediction="eps", interpolation="log", sigmas=None, device="cpu",
                  dtype=torch.float32):
    """Wrap a U-Net `model(x_t, t, context)` that predicts eps or v into D(x, sigma, context) -> x0 estimate.

    sigma: a Python float (what the samplers pass) or a (B,) tensor. The U-Net gets t = sigma_to_t(sigma) as a
    (B,) float tensor, fractional in general; `interpolation` picks the sigma -> t rule (see `sigma_to_t`).
    This is k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser, written as a closure.

    sigmas (optional): the schedule about to be sampled, with the `device` and `dtype` of the model's input. Its
    timesteps are computed now and put on the device in one copy, so that a step at one of those sigmas (a Python
    float) sends nothing from the host to the device: its scalings are Python floats (kernel arguments) and its t
    is looked up. On a GPU each host-to-device copy would otherwise wait for the previous step to finish, leaving
    the GPU idle while Python prepares the next one.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    sigmas_train = sigmas_from_alphas_cumprod(alphas_cumprod.to(torch.float64).cpu())
    sigma_to_t(1.0, sigmas_train, interpolation)  # fail now, not at the first step, on a bad name
    # t in float32 even for a half-precision x (t = 999 has a resolution of 0.5 in fp16); float64 for float64
    timesteps = {}
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        t = sigma_to_t(sigmas, sigmas_train, interpolation)
        timesteps = dict(zip(sigmas.tolist(), t.to(device, torch.promote_types(dtype, torch.float32))))

    def denoise(x, sigma, context=None):
        if not isinstance(sigma, float):
            sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        c_skip, c_out, c_in = (_per_sample(c, x) for c in scalings(sigma, prediction))
        t_dtype = torch.promote_types(x.dtype, torch.float32)
        t = timesteps.get(sigma) if isinstance(sigma, float) else None
        if t is None or t.dtype != t_dtype or t.device != x.device:
            t = sigma_to_t(sigma, sigmas_train, interpolation).to(x.device, t_dtype)
        return c_skip * x + c_out * model(x * c_in, t.expand(x.shape[0]), context)

    return denoise


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------


def cfg_denoiser(denoise, cond, uncond=None, scale=7.5, rescale=0.0):
    """Classifier-free guidance (Ho & Salimans 2022): D = D_uncond + scale * (D_cond - D_uncond) -> (x, sigma).

    cond / uncond: (B, N, C) text contexts; `uncond` is the empty prompt's, or a negative prompt's (the same
    formula then pushes away from it). Both halves run in ONE U-Net call on a doubled batch. scale == 1 (or no
    uncond) is plain conditional sampling and skips the unconditional half. Guiding D is the same as guiding eps
    or v, because D is affine in the model output with coefficients that do not depend on the prompt.

    rescale (phi, Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16):
    scale the guided prediction back to the std of the conditional one, then blend: v = phi v_rescaled + (1 - phi)
    v_cfg. It is done in v-space, as the paper does (it was made for v-models like SD 2.1-v); this equals
    diffusers' `guidance_rescale` on v-models. (diffusers rescales the raw model output, so for eps-models it
    rescales eps instead; the std ratio is not the same there.)
    """
    def guided(x, sigma):
        if scale == 1 or uncond is None:
            return denoise(x, sigma, cond)
        batch_sigma = sigma             # a float (the samplers' case) or a scalar tensor serves both halves
        if torch.is_tensor(sigma) and sigma.ndim == 1:
            batch_sigma = torch.cat([sigma, sigma])
        d_uncond, d_cond = denoise(torch.cat([x, x]), batch_sigma, torch.cat([uncond, cond])).chunk(2)
        d = d_uncond + scale * (d_cond - d_uncond)
        if rescale:
            # D = c_skip x + c_out v: std(v) is the std of D - c_skip x, up to the per-sample factor |c_out|
            s = sigma if isinstance(sigma, float) else torch.as_tensor(sigma, dtype=torch.float64)
            base = _per_sample(1 / (s ** 2 + 1), x) * x
            dims = list(range(1, x.ndim))
            ratio = (d_cond - base).std(dim=dims, keepdim=True) / (d - base).std(dim=dims, keepdim=True)
            d = base + (d - base) * (rescale * ratio + 1 - rescale)
        return d

    return guided
