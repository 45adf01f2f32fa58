"""4. Forward diffusion: one image noised across t = 0..999, the abar and SNR curves; the noising is not learned."""
# %% [markdown]
# Diffusion models learn to undo a *fixed* noising process. DDPM (Ho et al. 2020) adds Gaussian noise in 1000
# small steps with variances beta_1..beta_1000; the steps compose in closed form (DDPM eq. 4):
#
#     q(x_t | x_0) = N( sqrt(abar_t) x_0,  (1 - abar_t) I ),        abar_t = prod_{s <= t} (1 - beta_s)
#
# so x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I), in one line (`diffusion.q_sample`).
# Stable Diffusion's betas are "scaled linear": linear in sqrt(beta) from 0.00085 to 0.012. Nothing here has a
# parameter to train; these are fixed numbers, the same for SD 1.5, SD 2.1 and the tiny model.

# %%
import torch

from minisd import diffusion

betas = diffusion.scaled_linear_betas(0.00085, 0.012, 1000)       # float64, as LDM
abar = diffusion.alphas_cumprod_from_betas(betas)
sigmas = diffusion.sigmas_from_alphas_cumprod(abar)
snr = diffusion.snr(abar)
for t in (0, 250, 500, 750, 999):
    print(f"t = {t:>3}: abar = {abar[t]:.5f}   signal sqrt(abar) = {abar[t] ** 0.5:.3f}   "
          f"noise sqrt(1 - abar) = {(1 - abar[t]) ** 0.5:.3f}   SNR = {snr[t]:.4g}   sigma = {sigmas[t]:.4g}")

# %% [markdown]
# abar falls from almost 1 to 0.0047; the signal-to-noise ratio abar / (1 - abar) (Kingma et al. 2021) spans
# five orders of magnitude, which is why it is plotted on a log scale. The samplers of tutorial 6 use the same
# numbers as sigma = sqrt((1 - abar) / abar) = 1 / sqrt(SNR), the noise std when the signal is kept at scale 1
# (Karras et al. 2022): x = x_0 + sigma eps, which is x_t / sqrt(abar_t).

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _figures import grid, save

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
axes[0].plot(abar, label="abar_t (signal variance)")
axes[0].plot(1 - abar, label="1 - abar_t (noise variance)")
axes[0].legend(fontsize=8)
axes[1].semilogy(snr)
axes[1].set_title("SNR = abar / (1 - abar)", fontsize=9)
axes[2].semilogy(sigmas)
axes[2].set_title("sigma = sqrt((1 - abar) / abar)", fontsize=9)
for ax in axes:
    ax.set_xlabel("t")
save(fig, "04_schedule.png")

# %% [markdown]
# ## One image across t
# The same formula noises pixels (top row) or latents (bottom row: the tiny model's latent noised, then decoded
# by its VAE). Stable Diffusion noises latents. One `eps` is drawn and reused for every t, so only the mix
# changes along the row.

# %%
from minisd.tiny import shapes
from minisd.model import load_model, tiny_model_path
from minisd.images import to_pil, to_tensor

vae = load_model(tiny_model_path(), verbose=False).vae
x0_pixels = to_tensor([shapes.draw("yellow", "triangle", "purple")])          # (1, 3, 64, 64)
with torch.no_grad():
    x0 = vae.encode(x0_pixels)                                                 # (1, 4, 16, 16), std ~ 1
generator = torch.Generator().manual_seed(0)
eps_pixels = torch.randn(x0_pixels.shape, generator=generator)
eps = torch.randn(x0.shape, generator=generator)
ts = [0, 100, 200, 300, 400, 500, 600, 800, 999]
pixel_row = [to_pil(diffusion.q_sample(x0_pixels, eps_pixels, t, abar))[0] for t in ts]
with torch.no_grad():
    latent_row = [to_pil(vae.decode(diffusion.q_sample(x0, eps, t, abar)))[0] for t in ts]
save(grid([pixel_row, latent_row], labels=[f"t={t}" for t in ts], row_labels=["pixels", "latents"],
          label_width=50), "04_noising.png")

# %% [markdown]
# ## Not learned, and checkable
# Because q(x_t | x_0) is a known Gaussian, we can test it by drawing many noises: the mean and variance of x_t
# must be sqrt(abar_t) x_0 and 1 - abar_t. And the sigma form used by the samplers, `add_noise`
# (x = x_0 + sigma eps), is the same point scaled by 1 / sqrt(abar_t).

# %%
t = 600
draws = torch.randn(20000, *x0.shape[1:], generator=generator)
x_t = diffusion.q_sample(x0.expand_as(draws), draws, t, abar)
print(f"t = {t}: max |mean(x_t) - sqrt(abar) x0| = {(x_t.mean(0) - abar[t] ** 0.5 * x0[0]).abs().max():.3f}, "
      f"variance {x_t.var(0).mean():.3f} vs 1 - abar = {1 - abar[t]:.3f}")
x_sigma = diffusion.add_noise(x0, eps, sigmas[t].item())
print("max |add_noise - q_sample / sqrt(abar)| =",
      f"{(x_sigma - diffusion.q_sample(x0, eps, t, abar) / abar[t] ** 0.5).abs().max():.2e}")

# %% [markdown]
# The U-Net is trained on exactly these pairs (`tiny.diffusion_loss`, DDPM eq. 14): draw t and eps, make x_t with
# `q_sample`, and regress eps from (x_t, t, text). Everything the model learns is how to go *back*.
#
# One detail worth knowing: at t = 999, sqrt(abar) = 0.068, so 6.8% of the signal is still in x_T. SD was never
# trained on pure noise, yet is sampled from pure noise; Lin et al. 2023 ("Common Diffusion Noise Schedules and
# Sample Steps are Flawed") trace SD's trouble with very dark or very bright images to this.
#
# Next: tutorial 5, the network that learns the reverse.
