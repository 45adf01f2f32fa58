"""Shared fixtures for the diffusion / sampler tests: SD's schedule, a cheap deterministic stand-in for the U-Net,
and a driver that runs a diffusers scheduler the way StableDiffusionPipeline does."""
import math

import torch

from minisd.diffusion import alphas_cumprod_from_betas, scaled_linear_betas, sigmas_from_alphas_cumprod

ALPHAS_CUMPROD = alphas_cumprod_from_betas(scaled_linear_betas())           # float64, SD's schedule
SIGMAS_TRAIN = sigmas_from_alphas_cumprod(ALPHAS_CUMPROD)
SHAPE = (2, 4, 8, 8)
CONTEXT_DIM = 16


class ToyModel:
    """A fixed random nonlinear map (x_t, t, context) -> eps or v, of unit scale, sensitive to t like a U-Net
    (sinusoidal time features up to frequency 1, so a timestep off by 0.01 moves the output by ~1e-2 relative)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(16, 4, generator=g) / 2
        self.w2 = torch.randn(4, 16, generator=g) / 4
        self.freqs = torch.exp(-math.log(1000) * torch.arange(8) / 8)      # 1 .. ~1/1000, like LDM's embedding
        self.wt = torch.randn(16, 16, generator=g) / 4
        self.wc = torch.randn(16, CONTEXT_DIM, generator=g) / 4
        self.calls = []

    def __call__(self, x, t, context=None):
        self.calls.append((x.shape[0], t.clone()))
        w1, w2, wt, wc, freqs = (w.to(x.dtype) for w in (self.w1, self.w2, self.wt, self.wc, self.freqs))
        t = t.to(x.dtype)
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
        bias = emb @ wt.T                                               # (B, 16)
        if context is not None:
            bias = bias + context.to(x.dtype).mean(1) @ wc.T
        h = w1 @ x.flatten(2) + bias[:, :, None]                            # a 1x1 convolution, (B, 16, h*w)
        return 0.5 * x + (w2 @ torch.tanh(h)).view_as(x)


def rel_err(ours, ref):
    """max |ours - ref| in units of the reference's std (the contract's "x output scale")."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().std()).item()


SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", steps_offset=1)


def run_diffusers(scheduler, model, steps, context, seed, eta=None):
    """StableDiffusionPipeline's denoising loop with `scheduler` and a CPU generator seeded with `seed`, which
    draws the initial latents first and then every ancestral draw (scheduler.step(generator=...)).

    steps: a step count, or a list of the timesteps themselves (schedulers that take custom timesteps).
    Returns the latents at the start of every (first-order) step, and the final latents."""
    if isinstance(steps, list):
        scheduler.set_timesteps(timesteps=steps)
    else:
        scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    trajectory = []
    for t in scheduler.timesteps:
        if getattr(scheduler, "state_in_first_order", True):
            trajectory.append(latents)
        inp = scheduler.scale_model_input(latents, t)
        out = model(inp, t.to(torch.float32).expand(SHAPE[0]), context)
        kwargs = {"eta": eta} if eta is not None else {}
        if "generator" in scheduler.step.__code__.co_varnames:
            kwargs["generator"] = g
        latents = scheduler.step(out, t, latents, **kwargs).prev_sample
    return trajectory + [latents]
