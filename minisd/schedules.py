"""Sigma schedules: which noise levels a sampler visits, from the 1000 the model was trained on.

A sampler walks a latent from noise level sigmas[0] down to sigmas[-1]; *which* sigmas is a choice of its own,
made here. Two families exist and users meet both:
  k-diffusion / A1111 start at the model's sigma_max and interpolate sigma(t) in log sigma ("discrete"), and
  re-space the range Karras-style (Karras et al. 2022, eq. 5) or log-uniformly;
  diffusers lays out integer or fractional *timesteps* ("linspace", "leading", "trailing"; Lin et al. 2023,
  Table 2) and interpolates sigma(t) linearly.
`get_sigmas` reads a schedule name such as "karras" or "leading karras" and returns the sigmas.
"""
import math

import numpy as np
import torch

from .diffusion import t_to_sigma

def sigmas_karras(steps, sigma_min, sigma_max, rho=7.0):
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    rho = 7 spends more steps at low noise, where detail is decided. No final zero appended."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigmas_exponential(steps, sigma_min, sigma_max):
    """Evenly spaced in log sigma (the time variable of DPM-Solver). No final zero appended."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def diffusers_timesteps(spacing, steps, num_train=1000, steps_offset=1):
    """diffusers' `timestep_spacing` for its *DiscreteSchedulers (Euler, Euler a, Heun, LMS, KDPM2, KDPM2 a;
    DDIM and DDPM round "linspace" to integers), Lin et al. 2023, Table 2:

      linspace  t = linspace(0, 999, n) reversed: fractional, starts at 999, ends at 0.
      leading   t = (0, r, 2r, ...) * reversed + steps_offset, r = 1000 // n: SD's own config (steps_offset = 1).
                It never reaches t = 999 (t_max = 901 for 10 steps), so the first step is not at sigma_max.
      trailing  t = round(1000, 1000 - r, ...) - 1, r = 1000 / n: starts at 999 and stops short of 0.
      lcm       LCMScheduler's: n of the 50 timesteps LCM was distilled on (999, 979, ..., 19; its
                original_inference_steps = 50), evenly spaced by index: 4 steps are 999, 759, 499, 259.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, steps) * (num_train // steps)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(num_train, 0, -num_train / steps).round().astype(np.float64) - 1
    if spacing == "lcm":
        if steps > LCM_ORIGINAL_STEPS:
            raise ValueError(f"the lcm schedule has at most {LCM_ORIGINAL_STEPS} steps (the timesteps LCM was "
                             f"distilled on), got {steps}")
        grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * (num_train // LCM_ORIGINAL_STEPS) - 1)[::-1]
        return grid[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, steps, endpoint=False)).astype(np.int64)].astype(
            np.float64)
    raise ValueError(f"unknown timestep spacing {spacing!r}; valid: linspace, leading, trailing, lcm")


SPACINGS = ("discrete", "linspace", "leading", "trailing", "lcm")
LCM_ORIGINAL_STEPS = 50       # LCMScheduler's original_inference_steps: the distillation's timestep grid
SHAPES = ("karras", "exponential")
SCHEDULES = ("discrete", "karras", "exponential", "linspace", "leading", "trailing", "lcm",
             "<spacing> karras", "<spacing> exponential")


def check(schedule):
    """A schedule name as [spacing, shape?] words ("karras" = "discrete karras"); ValueError naming the valid ones."""
    words = schedule.lower().split()
    if words in (["karras"], ["exponential"]):
        words = ["discrete"] + words
    if not (words and words[0] in SPACINGS and (len(words) == 1 or (len(words) == 2 and words[1] in SHAPES))):
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)} "
                         f"(spacing: {', '.join(SPACINGS)})")
    return words


def get_sigmas(schedule, steps, sigmas_train, steps_offset=1, final="zero"):
    """The noise levels to visit: `steps` model noise levels then a final one (0, or the model's sigma_min).

    schedule is a spacing, optionally followed by a shape:
      "discrete"   k-diffusion's default (A1111's): t = linspace(999, 0, n), sigma(t) log-interpolated between
                   the 1000 training sigmas (DiscreteSchedule.get_sigmas). Runs from sigma_max to sigma_min.
      "linspace" / "leading" / "trailing" / "lcm"   diffusers' timestep_spacing (see `diffusers_timesteps`) with its
                   *linear* sigma interpolation (np.interp). At fractional t (only "linspace") that differs from
                   k-diffusion's log interpolation; sample with make_denoiser(interpolation="linear") to feed the
                   U-Net the same t as diffusers does.
      "... karras" / "... exponential"   re-space the same endpoints Karras-style (rho = 7) or log-uniformly.
                   "karras" alone = "discrete karras" = k-diffusion's get_sigmas_karras(n, sigma_min, sigma_max)
                   with the model's sigma range (A1111's "X Karras"). "leading karras" is diffusers'
                   use_karras_sigmas=True on SD's config: diffusers takes the endpoints of its *spaced* sigmas, so
                   with "leading" Karras starts at sigma(t=1 + (n-1) * (1000 // n)), not at sigma_max — a
                   deliberate diffusers/k-diffusion difference, both offered here.
    final: "zero" (k-diffusion; diffusers' final_sigmas_type="zero") or "sigma_min", the model's smallest sigma
    (diffusers' DDIM with set_alpha_to_one=False, SD's config, ends its last step at abar_0, not at 1).
    Returns a float64 CPU tensor of steps + 1 sigmas.
    """
    words = check(schedule)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final {final!r}; valid: zero, sigma_min")
    sigmas_train = sigmas_train.to(torch.float64).cpu()
    n_train = len(sigmas_train)
    if words[0] == "discrete":
        sigmas = t_to_sigma(torch.linspace(n_train - 1, 0, steps, dtype=torch.float64), sigmas_train, "log")
    else:
        t = torch.from_numpy(diffusers_timesteps(words[0], steps, n_train, steps_offset).copy())
        sigmas = t_to_sigma(t, sigmas_train, "linear")
    if words[1:] == ["karras"]:
        sigmas = sigmas_karras(steps, sigmas[-1].item(), sigmas[0].item())
    elif words[1:] == ["exponential"]:
        sigmas = sigmas_exponential(steps, sigmas[-1].item(), sigmas[0].item())
    last = sigmas_train[:1] if final == "sigma_min" else sigmas.new_zeros(1)
    return torch.cat([sigmas, last])


def init_noise_sigma(sigma_max, variance_preserving=False):
    """The std of the starting latent: x = randn * init_noise_sigma.

    k-diffusion / A1111 use sigma_max. Exact for the forward process is sqrt(sigma_max^2 + 1) (x = x0 + sigma eps
    with unit-variance latents x0), which is what diffusers uses with "leading" spacing and, written in abar space
    as x_T = randn, in DDIM / DDPM / DPMSolverMultistep; its Euler-family schedulers use sigma_max with "linspace"
    and "trailing". Pass variance_preserving=True to get sqrt(sigma_max^2 + 1).
    """
    return (sigma_max ** 2 + 1) ** 0.5 if variance_preserving else sigma_max
