"""6. Sampling: the denoising loop by hand, equal to minisd's sampler; sigma schedules; Euler vs Euler a."""
# %% [markdown]
# Sampling runs the forward process of tutorial 4 backwards. The samplers work in the sigma form
# x = x_0 + sigma eps (Karras et al. 2022, "EDM"), where generation is an ordinary differential equation, the
# *probability-flow ODE* (Song et al. 2021; Karras et al. eq. 3 with sigma(t) = t):
#
#     dx/dsigma = (x - D(x, sigma)) / sigma
#
# D is the *denoiser*, the network's estimate of x_0. Start at x = sigma_max * noise and integrate down to
# sigma = 0. An eps-predicting U-Net gives D in one line (Karras et al. eq. 7): D(x, sigma) = x - sigma eps_theta,
# where the U-Net is shown x scaled back to the variance-preserving x_t = x / sqrt(sigma^2 + 1) and the training
# step t whose noise level is sigma.
#
# ## The whole sampler, by hand
# Everything below comes from minisd except the loop itself: the U-Net, the prompt encoding, the sigma schedule.

# %%
import torch

from minisd import diffusion, samplers, schedules
from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline

pipe = Pipeline(load_model(tiny_model_path(), verbose=False))     # the tiny built-in model, on the CPU in fp32
unet, sigmas_train = pipe.model.unet, pipe.sigmas_train           # the 1000 training sigmas (tutorial 4)


def D(x, sigma, context):
    """The denoiser for an eps-prediction U-Net (Karras et al. 2022, eq. 7): an estimate of the clean latent."""
    t = diffusion.sigma_to_t(sigma, sigmas_train).float().reshape(1)   # the training step with this noise level
    eps = unet(x / (sigma ** 2 + 1) ** 0.5, t, context)                # the U-Net sees x_t = sqrt(abar) x
    return x - sigma * eps


@torch.no_grad()
def my_euler(prompt, seed, steps, cfg=7.5):
    cond, uncond = pipe.encode_prompts(prompt)                         # (1, 77, 64) each; uncond: "" (tutorial 7)
    sigmas = schedules.get_sigmas("karras", steps, sigmas_train).tolist()   # Karras et al. eq. 5, then 0
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised_uncond, denoised_cond = D(x, sigma, uncond), D(x, sigma, cond)
        denoised = denoised_uncond + cfg * (denoised_cond - denoised_uncond)   # classifier-free guidance
        d = (x - denoised) / sigma                                             # dx/dsigma
        x = x + d * (sigma_next - sigma)                                       # one Euler step
    return x


prompt, seed, steps = "a yellow square on a black background", 1, 20
mine = my_euler(prompt, seed, steps)
theirs = pipe.generate(prompt, seed=seed, steps=steps, sampler="euler").latents
print("max |my_euler - Pipeline.generate(sampler='euler')| =", f"{(mine - theirs).abs().max().item():.2e}")
assert torch.allclose(mine, theirs, atol=1e-4)     # not bit-equal: the pipeline runs cond and uncond as one batch

# %% [markdown]
# Twenty lines: that is Stable Diffusion's sampling loop. Every other sampler in `minisd/samplers.py` changes only
# the step: Heun averages two slopes, DPM++ 2M extrapolates D from the previous step, ancestral samplers add
# noise back. `samplers.euler` is the loop above with the denoiser passed in. The last step lands exactly on
# D(x, sigma_min): at sigma_next = 0, x + d (0 - sigma) = D.
#
# ## Sigma schedules
# *Which* noise levels the loop visits is a separate choice, `schedules.get_sigmas(schedule, steps, sigmas_train)`:
#
# - `discrete` (k-diffusion's and A1111's default): steps evenly spaced in t from 999 to 0;
# - `karras`: Karras et al. 2022 eq. 5 with rho = 7, the same endpoints, more steps at low noise where detail
#   is decided (minisd's default for every sampler but DDIM/DDPM);
# - `leading`: diffusers' default for SD (t = 951, 901, ..., 1 for 20 steps): it never starts at t = 999.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _figures import grid, save

fig, ax = plt.subplots(figsize=(6, 3.5))
for schedule in ("discrete", "karras", "leading"):
    sigmas = schedules.get_sigmas(schedule, steps, sigmas_train)
    print(f"{schedule:>8}: first {sigmas[0]:.3f}, then {sigmas[1]:.3f}, ..., last nonzero {sigmas[-2]:.4f}, "
          f"steps below sigma 1: {(sigmas[:-1] < 1).sum().item()} of {steps}")
    ax.semilogy(range(steps), sigmas[:-1], "o-", markersize=3, label=schedule)
ax.set_xlabel("step")
ax.set_ylabel("sigma")
ax.legend()
ax.set_title(f"{steps} steps (the final sigma = 0 is not shown)", fontsize=9)
save(fig, "06_schedules.png")

# %% [markdown]
# ## Euler vs Euler a as the number of steps grows
# Euler solves an ODE, so as its steps get smaller its result converges to the ODE's solution: one image per seed.
# Euler a ("ancestral", `samplers.euler_a`) steps down to a lower sigma and adds *fresh* noise back up to the next
# level (the DDPM posterior, Ho et al. 2020 eq. 6-7), so it samples a stochastic process and different step counts
# draw different noise: it keeps changing. We measure the mean absolute change of the final latent each time the
# step count doubles.

# %%
step_counts = [8, 16, 32, 64, 128]
latents, images = {}, {}
for sampler in ("euler", "euler_a"):
    results = [pipe.generate(prompt, seed=seed, steps=n, sampler=sampler) for n in step_counts]
    latents[sampler] = [r.latents for r in results]
    images[sampler] = [r.images[0] for r in results]
    changes = [(b - a).abs().mean().item() for a, b in zip(latents[sampler], latents[sampler][1:])]
    print(f"{sampler:>8}: change per doubling {' '.join(f'{c:.3f}' for c in changes)}")

fig, ax = plt.subplots(figsize=(5, 3))
for sampler in ("euler", "euler_a"):
    changes = [(b - a).abs().mean().item() for a, b in zip(latents[sampler], latents[sampler][1:])]
    ax.loglog(step_counts[1:], changes, "o-", label=sampler)
ax.set_xlabel("steps n")
ax.set_ylabel("mean |latent(n) - latent(n/2)|")
ax.legend()
save(fig, "06_convergence.png")
save(grid([images["euler"], images["euler_a"]], labels=[f"{n} steps" for n in step_counts],
          row_labels=["Euler", "Euler a"], label_width=50), "06_euler_vs_euler_a.png")

# %% [markdown]
# Euler's change shrinks roughly in proportion to the step size from 16 steps on (it is a first-order method; 8
# steps are still far from the ODE's solution); Euler a's does not.
# Neither is "better": ancestral samplers forgive errors of the model by re-noising, but you cannot raise their
# step count to refine an image you liked.
#
# Next: tutorial 7, the `cfg` in the loop above.
