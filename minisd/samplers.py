"""Samplers: walk a latent from noise level sigmas[0] down to sigmas[-1] (usually 0), in sigma space.

Read next to Karras et al. 2022 ("EDM"), DDIM (Song et al. 2021), PNDM (Liu et al. 2022), DPM-Solver++ (Lu et al.
2022), UniPC (Zhao et al. 2023), LCM (Luo et al. 2023) and k-diffusion's `sampling.py`, which these functions
follow line for line (and are tested against, with diffusers' schedulers and LDM's own DDIM / PLMS samplers).

Every sampler has the same signature:

    sampler(denoise, x, sigmas, noise=None, callback=None[, eta]) -> x at sigmas[-1]

  denoise(x, sigma) -> x0 estimate, the D of Karras et al. (`diffusion.make_denoiser` / `cfg_denoiser`)
  x         the starting latent at sigmas[0], already scaled: x = initial_noise * sigmas[0] in k-diffusion's
            convention (see `schedules.init_noise_sigma` for diffusers')
  sigmas    1-D, decreasing; `schedules.get_sigmas` makes them
  noise(sigma, sigma_next)   an N(0, I) tensor shaped like x for the step sigma -> sigma_next, for the ancestral
            and SDE samplers and churn: k-diffusion's `noise_sampler`. `noise_from` ignores the interval (fresh
            draws); `brownian.brownian_noise` returns the normalised increment of one Brownian path over it
  callback(i, x, denoised, sigma)   after each model call: x is the latent at noise level sigma, denoised is D(x)

Noise convention (the pipeline and tests rely on it): one CPU torch.Generator seeded with the user's seed draws the
initial latents first, then every noise draw, in exactly the order k-diffusion calls its `noise_sampler`. The SDE
samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) instead read a Brownian tree seeded with the user's seed, as
k-diffusion (A1111) and diffusers do by default (see `Plan.brownian`). A batch of one seed per image has one
generator (or tree) per image, each drawing that image's share of every draw: `noise` returns them concatenated
(see pipeline.py).

Host/device: the sigmas are read to the host ONCE (Python floats); all per-step scalar arithmetic is on the CPU in
float64, and the loops test `sigma_next > 0` on floats, so no step waits on the GPU (no per-step `.item()`).

The sampling settings are read and checked in one place: `check(sampler, schedule, steps, eta, churn)` parses
the sampler's name (a key or an A1111 name), picks its default schedule and refuses an eta or churn the sampler does
not take; it needs no model, so the CLI calls it before loading one. `plan(..., sigmas_train)` adds what the
model's noise schedule decides (the sigmas, the final sigma, the starting noise scale, the sigma -> t
interpolation, the Brownian tree's interval), and `sample(plan, denoise, x, noise, callback)` runs it.
"""
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import schedules
from .diffusion import sigma_to_t
from .brownian import brownian_noise  # noqa: F401  (the SDE samplers' noise source, beside noise_from)


def noise_from(generator, shape, device="cpu", dtype=torch.float32):
    """The noise source: each call draws randn(shape) from the CPU `generator`, then moves it to the device.
    Drawing on the CPU makes a seed give the same image on every device (and the same as diffusers).
    For a GPU the draw lands in pinned (page-locked) memory, so the copy is queued behind the running step
    instead of waiting for it (a copy from ordinary memory synchronises the host with the GPU)."""
    pinned = torch.device(device).type == "cuda"
    return lambda sigma=None, sigma_next=None: torch.randn(
        shape, generator=generator, dtype=torch.float32, pin_memory=pinned).to(device, dtype, non_blocking=pinned)


# ---------------------------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------------------------


def to_d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE, (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3 with
    sigma(t) = t, s(t) = 1). It is also the eps the denoiser implies."""
    return (x - denoised) / sigma


def ancestral_split(sigma, sigma_next, eta=1.0):
    """Split a step sigma -> sigma_next into a deterministic move to sigma_down plus fresh noise of std sigma_up,
    sigma_down^2 + sigma_up^2 = sigma_next^2.

    eta = 1: sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, the DDPM posterior variance written in
    sigma space (DDIM eq. 16 with eta = 1); eta = 0: deterministic (DDIM). k-diffusion's get_ancestral_step.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def churn(x, sigma, steps, noise, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Karras et al. 2022, Alg. 2 lines 4-6: before the step, raise the noise level from sigma to
    sigma_hat = (1 + gamma) sigma by adding fresh noise of std s_noise sqrt(sigma_hat^2 - sigma^2), with
    gamma = min(s_churn / steps, sqrt(2) - 1) for s_tmin <= sigma <= s_tmax and 0 elsewhere. Returns
    (x_hat, sigma_hat); s_churn = 0 (the default) returns x and sigma themselves and draws nothing."""
    gamma = min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    return x + noise(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5, sigma_hat


def _host(sigmas):
    """The sigmas as Python floats: one device->host read per sampling run, none per step."""
    return sigmas.tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]


def _steps(sigmas):
    return enumerate(zip(sigmas[:-1], sigmas[1:]))


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def euler(denoise, x, sigmas, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with Euler steps; = DDIM, eta = 0
    without churn). With s_churn > 0 each step first adds noise up to sigma_hat (see `churn`), then steps from
    sigma_hat to sigma_next."""
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        x, sigma_hat = churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        if callback:
            callback(i, x, denoised, sigma_hat)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def euler_a(denoise, x, sigmas, noise=None, callback=None, eta=1.0):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise back up to sigma_next.

    With eta = 1 each step is the DDPM posterior (see `ddpm`). The fresh noise means the result keeps changing as
    the number of steps grows: ancestral samplers do not converge to one image."""
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def heun(denoise, x, sigmas, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1; Alg. 2 with churn, see `churn`): an Euler step, then
    average its slope with the slope at the end point. The last step (to sigma = 0, where the slope is undefined)
    is plain Euler. 2n - 1 model calls."""
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        x, sigma_hat = churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        if callback:
            callback(i, x, denoised, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        x_euler = x + d * (sigma_next - sigma_hat)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))
            x = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
    return x


def _dpm2_step(denoise, x, d, sigma, sigma_to):
    """DPM-Solver-2 from sigma to sigma_to (Lu et al. 2022a, Alg. 1 with r = 1/2; k-diffusion's sample_dpm_2): the
    slope at the midpoint sigma_mid = sqrt(sigma sigma_to) (halfway in log sigma) carries the whole step. d is the
    slope at sigma. A step to 0 has no midpoint in log sigma and is a plain Euler step (it lands on D)."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_mid = x + d * (sigma_mid - sigma)
    return x + to_d(x_mid, sigma_mid, denoise(x_mid, sigma_mid)) * (sigma_to - sigma)


@torch.no_grad()
def dpm2(denoise, x, sigmas, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """DPM2: one DPM-Solver-2 step per interval (see _dpm2_step), from sigma_hat after churn (see `churn`; k-diffusion's
    sample_dpm_2); two model calls per step but the last."""
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        x, sigma_hat = churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        if callback:
            callback(i, x, denoised, sigma_hat)
        x = _dpm2_step(denoise, x, to_d(x, sigma_hat, denoised), sigma_hat, sigma_next)
    return x


@torch.no_grad()
def dpm2_a(denoise, x, sigmas, noise=None, callback=None, eta=1.0):
    """DPM2 ancestral: a DPM-Solver-2 step down to sigma_down, then fresh noise up to sigma_next."""
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = _dpm2_step(denoise, x, to_d(x, sigma, denoised), sigma, sigma_down)
        if sigma_down != 0:     # as k-diffusion: no noise after a step that lands on D
            x = x + noise(sigma, sigma_next) * sigma_up
    return x


def lms_coefficient(sigmas, i, j, order):
    """Weight of the slope from step i - j in the LMS step i -> i + 1: the integral over [sigma_i, sigma_{i+1}] of
    the Lagrange basis polynomial through sigma_i .. sigma_{i-order+1} that is 1 at sigma_{i-j}.
    (k-diffusion integrates it numerically with scipy; a polynomial integrates exactly.)"""
    others = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.poly1d(others, r=True) / np.prod([sigmas[i - j] - s for s in others])
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


@torch.no_grad()
def lms(denoise, x, sigmas, noise=None, callback=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma): extrapolate the slope with a polynomial through the last
    `order` slopes and integrate it over the step. One model call per step; orders 1, 2, 3 while warming up."""
    sigmas = _host(sigmas)
    ds = []
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        ds = [to_d(x, sigma, denoised)] + ds[:order - 1]            # newest first
        x = x + sum(lms_coefficient(sigmas, i, j, len(ds)) * d for j, d in enumerate(ds))
    return x


@torch.no_grad()
def dpmpp_2s_a(denoise, x, sigmas, noise=None, callback=None, eta=1.0):
    """DPM-Solver++(2S) ancestral (Lu et al. 2022b, Alg. 1 with r = 1/2, then noise up to sigma_next).

    In lambda = -log sigma, x_next = (sigma_next / sigma) x - (e^{-h} - 1) D with h = lambda_next - lambda
    (first order, exact for a constant D), using D at the midpoint lambda + h/2 (second order)."""
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = math.exp(math.log(sigma) - h / 2)
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoise(x_mid, sigma_mid)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def dpmpp_2m(denoise, x, sigmas, noise=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): the first-order DPM-Solver++ update with D replaced by a linear
    extrapolation from the previous step's D, D_d = (1 + 1/(2r)) D - 1/(2r) D_prev, r = h_prev / h.
    First and last steps are first order (no history yet; h is infinite at sigma_next = 0)."""
    sigmas = _host(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised                                          # the first-order update's limit as h -> inf
        else:
            h = math.log(sigma) - math.log(sigma_next)
            denoised_d = denoised
            if old_denoised is not None:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
    return x


def _unipc_step(x, sigma, sigma_next, ds, lams, new=None):
    """One UniPC update from x at sigma to sigma_next (Zhao et al. 2023, Sec. 3: UniP, and UniC with `new`; data
    prediction, B(h) = e^{-h} - 1, their "bh2"), in lambda = -log sigma, h = lambda_next - lambda:

        x_next = (sigma_next / sigma) x - (e^{-h} - 1) D_0 - B(h) sum_m a_m (D_m - D_0) / r_m

    D_0 = ds[0] is D at sigma, ds[1:] earlier D at lambdas lams[1:], r_m = (lambda_m - lambda) / h. `new`, D at
    sigma_next itself (the corrector UniC), is one more point with r = 1. The a_m solve the Vandermonde system
    sum_m r_m^(k-1) a_m = k! g_k / B(h), k = 1..K, with g_k = z phi_{k+1}(z) at z = -h (phi_1(z) = (e^z - 1) / z,
    phi_{k+1}(z) = (phi_k(z) - 1/k!) / z, the exponential integrator's phi functions); one point takes a = 1/2
    instead, the h -> 0 limit (as the paper's code and diffusers do). With one earlier D and no `new` this is
    DPM-Solver++(2M); with none, DDIM."""
    h = math.log(sigma) - math.log(sigma_next)
    rks = [(lam - lams[0]) / h for lam in lams[1:]]
    d1s = [(d - ds[0]) / r for d, r in zip(ds[1:], rks)]
    if new is not None:
        rks, d1s = rks + [1.0], d1s + [new - ds[0]]
    b_h = math.expm1(-h)
    x = (sigma_next / sigma) * x - math.expm1(-h) * ds[0]
    if not rks:
        return x
    g, factorial, b = math.expm1(-h) / -h - 1, 1, []
    for k in range(1, len(rks) + 1):
        b.append(g * factorial / b_h)
        factorial *= k + 1
        g = g / -h - 1 / factorial
    a = [0.5] if len(rks) == 1 else np.linalg.solve(np.vander(rks, increasing=True).T, b).tolist()
    return x - b_h * sum(a_m * d for a_m, d in zip(a, d1s))


@torch.no_grad()
def unipc(denoise, x, sigmas, noise=None, callback=None, order=2):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler with its defaults: a predictor-corrector pair
    of multistep exponential integrators, one model call per step (see `_unipc_step`).

    Each step: D = D(x, sigma) at the predicted x; then the corrector UniC redoes the previous step from its start
    with D as one more point (no extra model call: the next step keeps the uncorrected D); then the predictor
    UniP-p steps to sigma_next with this and the last p - 1 D. p = `order` (2), lower while the history fills and
    1 at the last step (diffusers' lower_order_final), so the step to 0 lands on D."""
    sigmas = _host(sigmas)
    n = len(sigmas) - 1
    ds, lams, start = [], [], None                  # newest first; start: (x, sigma, order) of the last predictor
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        if start is not None:                       # UniC: correct the step that brought x here
            x_prev, sigma_prev, p = start
            x = _unipc_step(x_prev, sigma_prev, sigma, ds[:p], lams[:p], new=denoised)
        ds, lams = [denoised] + ds[:order - 1], [-math.log(sigma)] + lams[:order - 1]
        p = min(order, n - i, len(ds))
        start = (x, sigma, p)
        x = denoised if sigma_next == 0 else _unipc_step(x, sigma, sigma_next, ds[:p], lams[:p])
    return x


@torch.no_grad()
def dpmpp_sde(denoise, x, sigmas, noise=None, callback=None, eta=1.0, r=0.5):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde; diffusers' DPMSolverSDEScheduler at r = 1/2): a 2-stage
    DPM-Solver++ step, each stage ancestral. Two noise reads per step, over (sigma, sigma_s) and (sigma, sigma_next):
    with a Brownian tree (`brownian.brownian_noise`, k-diffusion's and diffusers' default) they are increments of one
    path, so the result converges as the step count grows; with `noise_from` they are independent draws."""
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        lam, lam_next = -math.log(sigma), -math.log(sigma_next)
        sigma_s = math.exp(-(lam + r * (lam_next - lam)))
        sd, su = ancestral_split(sigma, sigma_s, eta)             # stage 1: to sigma_s
        x_2 = (sd / sigma) * x - math.expm1(lam + math.log(sd)) * denoised
        x_2 = x_2 + noise(sigma, sigma_s) * su
        denoised_2 = denoise(x_2, sigma_s)
        sd, su = ancestral_split(sigma, sigma_next, eta)          # stage 2: to sigma_next
        denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (sd / sigma) * x - math.expm1(lam + math.log(sd)) * denoised_d
        x = x + noise(sigma, sigma_next) * su
    return x


@torch.no_grad()
def dpmpp_2m_sde(denoise, x, sigmas, noise=None, callback=None, eta=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022b, the SDE solver of Sec. 5; k-diffusion's
    sample_dpmpp_2m_sde): the data-prediction SDE step x = (sigma_next/sigma) e^{-eta h} x + (1 - e^{-(1+eta)h}) D
    + sigma_next sqrt(1 - e^{-2 eta h}) z, with the 2M correction from the previous D. z = noise(sigma, sigma_next):
    a Brownian tree's increment by default in k-diffusion and the pipeline (see `dpmpp_sde`)."""
    sigmas = _host(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            x = sigma_next / sigma * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                x = x - 0.5 * math.expm1(-h - eta_h) * (h / h_last) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def dpmpp_3m_sde(denoise, x, sigmas, noise=None, callback=None, eta=1.0):
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde): the SDE step of `dpmpp_2m_sde` in the form
    x = e^{-h_eta} x + (1 - e^{-h_eta}) D, h_eta = (1 + eta) h, h = log(sigma / sigma_next), plus the exponential
    integrator's higher-order terms from the last two steps' D (Lu et al. 2022b, Sec. 3.3, multistep form):
        x += phi_2 d1 - phi_3 d2,   phi_2 = 1 - (1 - e^{-h_eta}) / h_eta,   phi_3 = phi_2 / h_eta - 1/2
    with d1 ~ h dD/dlambda and d2 ~ h^2 d2D/dlambda2 / 2 from divided differences over the uneven steps h_1, h_2
    (second step: the phi_2 term alone; first step: neither), then the noise sigma_next sqrt(1 - e^{-2 eta h}) z,
    z = noise(sigma, sigma_next), a Brownian tree's increment by default (see `dpmpp_sde`). The step to 0 lands
    on D."""
    sigmas = _host(sigmas)
    old = []                                             # (D, h) of the last two steps, newest first
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if len(old) == 2:
            (d_1, h_1), (d_2, h_2) = old
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1          # divided differences, in units of h
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif old:
            d_1, h_1 = old[0]
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        if eta:
            x = x + noise(sigma, sigma_next) * sigma_next * (-math.expm1(-2 * h * eta)) ** 0.5
        old = [(denoised, h)] + old[:1]
    return x


@torch.no_grad()
def ddim(denoise, x, sigmas, noise=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12) in sigma space.

    eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s_t^2) eps + s_t z, s_t = eta sqrt(posterior var).
    Divide by sqrt(abar_prev) (sigma-space x = x_t / sqrt(abar)): x_prev = x0 + sigma_down eps + sigma_up z with
    (sigma_down, sigma_up) = ancestral_split(sigma, sigma_next, eta) — so DDIM with eta = 0 is exactly Euler, and
    with eta > 0 an Euler-ancestral step. Equals diffusers' DDIMScheduler step by step when sigmas are its
    timesteps' sigmas (get_sigmas("leading", n, final="sigma_min") for SD's config) and x_t = x / sqrt(1 + sigma^2).
    """
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        eps = to_d(x, sigma, denoised)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
    return x


# Adams-Bashforth weights for equal steps, newest eps first (PNDM's PLMS; LDM's plms.py)
ADAMS_BASHFORTH = {0: (1.0,), 1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12),
                   3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def plms(denoise, x, sigmas, noise=None, callback=None):
    """PLMS, pseudo linear multistep (Liu et al. 2022, "PNDM": linear multistep on eps with DDIM as the transfer
    step; LDM's PLMSSampler, SD 1.x's `txt2img.py --plms`; diffusers' PNDMScheduler with skip_prk_steps).

    A DDIM step moved by eps', a 4th-order Adams-Bashforth extrapolation of this and the last three eps, instead of
    by eps. DDIM's step is an Euler step in sigma space (see `ddim`), so in sigma space PLMS is linear multistep
    x_next = x + (sigma_next - sigma) eps',  eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24
    with the weights of *equal* steps (its timesteps are evenly spaced in t, not in sigma: these are not `lms`'s
    integrated weights), and orders 2 and 3 while the history fills. The first step has no history: a Heun step
    ("pseudo improved Euler"), eps' = (e(x) + e(x_euler)) / 2, with a second model call."""
    sigmas = _host(sigmas)
    eps_old = []                                        # newest first
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        eps = to_d(x, sigma, denoised)
        if not eps_old and sigma_next > 0:
            x_euler = x + eps * (sigma_next - sigma)
            eps_prime = (eps + to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))) / 2
        else:
            eps_prime = sum(w * e for w, e in zip(ADAMS_BASHFORTH[len(eps_old)], [eps] + eps_old))
        x = x + eps_prime * (sigma_next - sigma)
        eps_old = [eps] + eps_old[:2]
    return x


@torch.no_grad()
def ddpm(denoise, x, sigmas, noise=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7): draw x_prev from the posterior q(x_prev | x_t, x0 = D).

    In abar space the posterior mean is sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) /
    (1 - abar_t) x_t and its variance (1 - abar_prev) / (1 - abar_t) beta_t. Divided by sqrt(abar_prev), with
    abar = 1 / (1 + sigma^2), both become simple (r = sigma_next^2 / sigma^2):
        x_prev = r x + (1 - r) D + sigma_next sqrt(1 - r) z
    i.e. a lerp toward the denoised image, plus noise: DDIM with eta = 1 (= Euler ancestral). Equals diffusers'
    DDPMScheduler step by step.
    """
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        r = sigma_next ** 2 / sigma ** 2
        x = r * x + (1 - r) * denoised
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next * (1 - r) ** 0.5
    return x


@torch.no_grad()
def lcm(denoise, x, sigmas, noise=None, callback=None, timesteps=None, timestep_scaling=10.0, sigma_data=0.5):
    """Latent consistency model sampling (Luo et al. 2023, Alg. 1: the multistep consistency sampler of Song et al.
    2023; diffusers' LCMScheduler). Each step maps x straight to a clean estimate with the consistency function

        f(x, t) = c_skip(t) x_t + c_out(t) D,
        c_skip = s_d^2 / ((10 t)^2 + s_d^2),   c_out = 10 t / sqrt((10 t)^2 + s_d^2)

    (LCM's boundary condition f(x, 0) = x: s_d = sigma_data = 0.5, t scaled by timestep_scaling = 10; x_t =
    x / sqrt(1 + sigma^2), the latent in abar space), then noises it afresh to sigma_next: x = f + sigma_next z
    (the forward process in sigma space). The boundary condition is a function of the training timestep t, not
    of sigma: `timesteps` holds each sigma's t (`plan` computes them). Meant for an LCM-distilled U-Net (an
    LCM-LoRA) at 2-8 steps and cfg ~1."""
    if timesteps is None:
        raise ValueError("lcm needs the training timestep of each sigma: timesteps=[...] (samplers.plan sets them)")
    sigmas = _host(sigmas)
    for i, (sigma, sigma_next) in _steps(sigmas):
        denoised = denoise(x, sigma)
        if callback:
            callback(i, x, denoised, sigma)
        t = float(timesteps[i]) * timestep_scaling
        c_skip = sigma_data ** 2 / (t ** 2 + sigma_data ** 2)
        c_out = t / (t ** 2 + sigma_data ** 2) ** 0.5
        x = c_skip * x / (1 + sigma ** 2) ** 0.5 + c_out * denoised
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next
    return x


# ---------------------------------------------------------------------------------------------------------------
# Names and plans
# ---------------------------------------------------------------------------------------------------------------

SAMPLERS = {
    "euler": euler, "euler_a": euler_a, "heun": heun, "dpm2": dpm2, "dpm2_a": dpm2_a, "lms": lms,
    "dpmpp_2s_a": dpmpp_2s_a, "dpmpp_2m": dpmpp_2m, "dpmpp_sde": dpmpp_sde, "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde, "unipc": unipc, "ddim": ddim, "plms": plms, "ddpm": ddpm, "lcm": lcm,
}
ANCESTRAL = {"euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim"}   # take eta
BROWNIAN = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"}   # a Brownian tree's noise (k-diffusion's, diffusers' default)
CHURN = {"euler", "heun", "dpm2"}          # take s_churn, s_tmin, s_tmax, s_noise (Karras et al. 2022, Alg. 2)
# A1111's display names (the web UI's sampler dropdown)
DISPLAY_NAMES = {
    "Euler": "euler", "Euler a": "euler_a", "Heun": "heun", "DPM2": "dpm2", "DPM2 a": "dpm2_a", "LMS": "lms",
    "DPM++ 2S a": "dpmpp_2s_a", "DPM++ 2M": "dpmpp_2m", "DPM++ SDE": "dpmpp_sde", "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 3M SDE": "dpmpp_3m_sde", "UniPC": "unipc", "DDIM": "ddim", "PLMS": "plms", "DDPM": "ddpm", "LCM": "lcm",
}
DEFAULT = "dpmpp_2m"                       # A1111's default since 1.6 ("DPM++ 2M" with the Karras schedule)
# SD's own DDIM / PLMS / DDPM run on its training timesteps ("leading": diffusers' config, and LDM's
# make_ddim_timesteps("uniform") when the step count divides 1000); every other sampler on Karras
DEFAULT_SCHEDULE = {"ddim": "leading", "plms": "leading", "ddpm": "leading", "lcm": "lcm"}
# diffusers' DDIM, PLMS, DDPM, UniPC and LCM schedulers start at x_T = randn in abar space (init_noise_sigma = 1)
STARTS_VARIANCE_PRESERVING = {"ddim", "plms", "ddpm", "unipc", "lcm"}
# LDM's DDIM / PLMS (and diffusers' DDIM / PNDM with set_alpha_to_one=False) end their last step at abar_0
ENDS_AT_SIGMA_MIN = {"ddim", "plms"}


def parse_sampler(name):
    """"dpmpp_2m" -> ("dpmpp_2m", None); "DPM++ 2M Karras" -> ("dpmpp_2m", "karras"): the sampler and the schedule
    its A1111 name asks for (None: the caller's default). Raises ValueError listing the valid names."""
    schedule = None
    for shape in schedules.SHAPES:
        if name.lower().endswith(" " + shape):
            name, schedule = name[: -len(shape) - 1], shape
    key = DISPLAY_NAMES.get(name, name)
    if key not in SAMPLERS:
        valid = ", ".join(list(SAMPLERS) + [f'"{n}"' for n in DISPLAY_NAMES])
        raise ValueError(f"unknown sampler {name!r}; valid: {valid} (display names may end in ' Karras' or "
                         f"' Exponential')")
    return key, schedule


def display_name(key):
    """A1111's name for a sampler key ("dpmpp_2m" -> "DPM++ 2M"), as written into PNG parameters."""
    return next((d for d, k in DISPLAY_NAMES.items() if k == key), key)


def resolve(sampler, schedule=None):
    """(sampler key, schedule) from a sampler name that may carry A1111's " Karras" suffix and an explicit
    schedule (None or "default" picks the sampler's default). Checks both names; reads no model."""
    key, from_name = parse_sampler(sampler)
    if schedule in (None, "default"):
        schedule = from_name or DEFAULT_SCHEDULE.get(key, "karras")
    elif from_name and from_name not in schedule.split():
        raise ValueError(f"sampler {sampler!r} asks for the {from_name} schedule but --schedule is {schedule!r}")
    schedules.check(schedule)
    return key, schedule


CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}     # no churn


@dataclass(frozen=True)
class Sampling:
    """The sampling settings a user chooses, checked (`check`); no model is needed to make them."""
    sampler: str            # the key in SAMPLERS
    schedule: str
    steps: int
    eta: float | None       # ancestral samplers' noise amount; None: the sampler's default (1; ddim 0)
    churn: dict | None      # euler, heun, dpm2: all four of CHURN_DEFAULTS' keys (see `churn`); None: no churn


def check(sampler, schedule, steps, eta=None, churn=None) -> Sampling:
    """The settings, checked: a known sampler (a key or an A1111 name such as "DPM++ 2M Karras") and schedule,
    a positive step count, eta only for ancestral samplers, churn ({"s_churn": ..., "s_tmin": ..., "s_tmax": ...,
    "s_noise": ...}, any of them) only for euler, heun and dpm2. Raises ValueError saying what is wrong."""
    key, schedule = resolve(sampler, schedule)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if schedule.split()[0] == "lcm" and steps > schedules.LCM_ORIGINAL_STEPS:
        raise ValueError(f"the lcm schedule has at most {schedules.LCM_ORIGINAL_STEPS} steps (the timesteps LCM "
                         f"was distilled on), got {steps}")
    if eta is not None and key not in ANCESTRAL:
        raise ValueError(f"sampler {key!r} takes no eta; ancestral samplers: {', '.join(sorted(ANCESTRAL))}")
    unknown = sorted(set(churn or {}) - set(CHURN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown churn setting {unknown[0]!r}; valid: {', '.join(CHURN_DEFAULTS)}")
    churn = {**CHURN_DEFAULTS, **(churn or {})}
    if churn == CHURN_DEFAULTS:
        churn = None
    elif key not in CHURN:
        raise ValueError(f"sampler {key!r} takes no churn (s_churn, s_tmin, s_tmax, s_noise); samplers with "
                         f"churn: {', '.join(sorted(CHURN))}")
    return Sampling(key, schedule, steps, eta, churn)


@dataclass(frozen=True)
class Plan:
    """Everything one sampling run needs: the checked settings (`check`) and what the model's noise schedule
    decides from them."""
    sampler: str            # the key in SAMPLERS
    schedule: str
    sigmas: torch.Tensor    # steps + 1 noise levels, float64 on the CPU
    init_sigma: float       # the starting latent is randn * init_sigma
    interpolation: str      # how the denoiser turns sigma into the U-Net's t: "linear" (diffusers) or "log"
    # (sigma_min, sigma_max): the SDE samplers' noise is a Brownian tree on this interval, seeded with the seed;
    # None: fresh draws from the seed's generator
    brownian: tuple | None = None
    eta: float | None = None        # as in Sampling
    churn: dict | None = None       # as in Sampling
    timesteps: tuple | None = None  # lcm: the training timestep t of each sigma but the last (its c_skip, c_out)
    # the sigmas as Python floats, read off the tensor once, when the plan is made: `sample` reads no tensor
    host_sigmas: list = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "host_sigmas", _host(self.sigmas))

    def last(self, n):
        """The plan of the last n steps (img2img): it starts at sigmas[-n - 1]. The Brownian tree keeps the whole
        schedule's interval, as diffusers' DPMSolverSDEScheduler does in img2img."""
        timesteps = None if self.timesteps is None else self.timesteps[len(self.timesteps) - n:]
        return replace(self, sigmas=self.sigmas[len(self.sigmas) - 1 - n:], timesteps=timesteps)

    @property
    def draws_noise(self):
        """Whether the sampler reads its noise source: DDPM, an ancestral sampler at eta != 0, or churn."""
        eta = (0.0 if self.sampler == "ddim" else 1.0) if self.eta is None else self.eta
        return (self.sampler in ("ddpm", "lcm") or (self.sampler in ANCESTRAL and eta != 0)
                or (self.churn is not None and self.churn["s_churn"] > 0))


def plan(sampler, schedule, steps, sigmas_train, eta=None, churn=None):
    """The Plan for `steps` steps of `sampler` (a key or an A1111 name; checked with eta and churn by `check`) on a
    model with these training sigmas.

    The rules, each one a difference between the libraries users compare against:
      final sigma   SD's DDIM and PLMS (LDM; diffusers with set_alpha_to_one=False) end their last step at abar_0,
                    i.e. at the model's sigma_min, not at 0; every other sampler ends at 0.
      start         k-diffusion and A1111 start at x = sigma_max * randn. diffusers starts DDIM / DDPM at x_T = randn
                    in the variance-preserving space (sqrt(sigma^2 + 1) in sigma space), and its Euler-family
                    schedulers do the same with "leading" timesteps (`init_noise_sigma`). Following both keeps
                    the same-seed-same-image promise.
      sigma -> t    diffusers interpolates linearly between the training sigmas, k-diffusion in log sigma; only a
                    fractional t (between two training steps) tells them apart.
      noise         the SDE samplers read a Brownian tree on [smallest nonzero sigma, sigma_max] of the schedule
                    (k-diffusion's BrownianTreeNoiseSampler, diffusers' DPMSolverSDEScheduler), seeded by the
                    pipeline with the image's seed: diffusers' noise_sampler_seed=seed for a batch of one seed,
                    A1111's one tree per image for a batch of one seed per image.
    """
    s = check(sampler, schedule, steps, eta, churn)
    final = "sigma_min" if s.sampler in ENDS_AT_SIGMA_MIN else "zero"
    sigmas = schedules.get_sigmas(s.schedule, steps, sigmas_train, final=final)
    spacing = s.schedule.split()[0]
    variance_preserving = s.sampler in STARTS_VARIANCE_PRESERVING or spacing == "leading"
    init_sigma = schedules.init_noise_sigma(sigmas[0].item(), variance_preserving)
    interpolation = "linear" if spacing in ("linspace", "leading", "trailing", "lcm") else "log"
    brownian = (sigmas[sigmas > 0].min().item(), sigmas.max().item()) if s.sampler in BROWNIAN else None
    timesteps = None
    if s.sampler == "lcm":        # LCM's boundary condition reads t: the t the U-Net is fed at each sigma
        timesteps = tuple(sigma_to_t(sigmas[:-1], sigmas_train.to(torch.float64).cpu(), interpolation).tolist())
    return Plan(s.sampler, s.schedule, sigmas, init_sigma, interpolation, brownian, s.eta, s.churn, timesteps)


def sample(plan, denoise, x, noise=None, callback=None):
    """Run the plan: its sampler from x at plan.sigmas[0] down its sigmas, with its eta and churn. A run that draws
    noise (`Plan.draws_noise`) needs `noise`: noise_from(generator, shape, ...), or for the SDE samplers
    brownian_noise(seed, shape, *plan.brownian)."""
    if plan.draws_noise and noise is None:
        raise ValueError(f"sampler {plan.sampler!r} draws fresh noise: pass noise=noise_from(generator, shape, ...)"
                         + (" or brownian_noise(seed, shape, sigma_min, sigma_max)" if plan.brownian else ""))
    options = dict(plan.churn or {}) | ({} if plan.eta is None else {"eta": plan.eta})
    if plan.timesteps is not None:
        options["timesteps"] = plan.timesteps
    return SAMPLERS[plan.sampler](denoise, x, plan.host_sigmas, noise=noise, callback=callback, **options)
