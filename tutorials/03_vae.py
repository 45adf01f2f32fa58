"""3. The VAE: pixels -> latents -> pixels, the latent channels as images, and why latents are scaled by 0.18215."""
# %% [markdown]
# Latent diffusion (Rombach et al. 2022, "LDM") does not denoise pixels. A KL autoencoder (`minisd/vae.py`) first
# compresses an image 8x per side into 4 channels, and diffusion runs on that code. For SD a 512 x 512 x 3 image
# becomes a 64 x 64 x 4 latent, 48 times fewer numbers, and the U-Net's cost drops accordingly. The tiny model
# compresses 4x per side (as LDM's kl-f4 does): its 64 x 64 x 3 pictures become 16 x 16 x 4, 12 times fewer. At
# SD's factor 8 its latents were 8 x 8, too coarse to hold a small shape's corners or a ring's hole.
#
#     encoder:  x (B, 3, H, W) in [-1, 1]  ->  q(z|x) = N(mean, exp(logvar)),   z: (B, 4, H/f, W/f), f = 8 (SD), 4 (tiny)
#     decoder:  z  ->  x_hat (B, 3, H, W)

# %%
import torch

from minisd.tiny import shapes
from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline
from minisd.images import to_pil, to_tensor

pipe = Pipeline(load_model(tiny_model_path(), verbose=False))     # the tiny built-in model, on the CPU in fp32
vae = pipe.model.vae
samples = [shapes.sample(seed=1, index=i) for i in range(8)]       # the procedural images the tiny model knows
images = to_tensor([s.image for s in samples])                    # (8, 3, 64, 64) in [-1, 1]
with torch.no_grad():
    latents = vae.encode(images)                                  # posterior mean, times scale_factor
    recon = vae.decode(latents)
print("images", tuple(images.shape), "-> latents", tuple(latents.shape), "-> images", tuple(recon.shape))
print(f"{images[0].numel()} numbers -> {latents[0].numel()}: {images[0].numel() // latents[0].numel()}x fewer")
print("SD 1.5 at 512 px:", 512 * 512 * 3, "->", 64 * 64 * 4)

# %% [markdown]
# ## Reconstructions
# Top: the inputs. Bottom: decode(encode(x)). The autoencoder is trained for reconstruction (LDM used L1 plus a
# perceptual and a patch-GAN loss; the tiny model only L1), so what survives the round trip is what the
# diffusion model can ever draw: it only ever produces latents, and the decoder makes every pixel.

# %%
from _figures import grid, save

recon_images = to_pil(recon)
error = (recon.clamp(-1, 1) - images).abs().mean().item() * 127.5
print(f"mean absolute error: {error:.1f} / 255 per pixel channel")
save(grid([[s.image for s in samples], recon_images], row_labels=["input", "recon"], label_width=44),
     "03_reconstructions.png")

# %% [markdown]
# ## The latent channels as images
# A latent is a tiny 4-channel image that still looks like the picture: each channel, shown here in grey (each
# scaled to its own min..max), keeps the layout of the scene. This spatial structure is why a convolutional U-Net
# works well on latents, and why img2img (tutorial 8) can start from one.

# %%
from PIL import Image


def channel_images(latent):
    """(4, h, w) -> four greyscale PIL images, each channel scaled to 0..255 on its own."""
    out = []
    for c in latent:
        c = (c - c.min()) / (c.max() - c.min() + 1e-8)
        out.append(Image.fromarray((c * 255).round().byte().numpy(), mode="L"))
    return out


rows = [[samples[i].image.resize((16, 16), Image.BOX), *channel_images(latents[i])] for i in range(4)]
save(grid(rows, labels=["input/4", "ch 0", "ch 1", "ch 2", "ch 3"], scale=4), "03_latent_channels.png")

# %% [markdown]
# ## The 0.18215 scale, and why
# The autoencoder's own latents are not standardised: its loss pulls q(z|x) toward N(0, I) only very weakly (KL
# weight 1e-6 for SD), so their spread is whatever reconstruction needed. But the diffusion process (tutorial 4)
# is designed for data of unit variance: its largest noise level, sigma_max = 14.6, is "pure noise" only relative
# to a signal of std 1. LDM's fix (Sec. 4.3.2; `scale_by_std` in its code) is one scalar: measure the std of the
# latents of a training batch once, and multiply every latent by 1/std before diffusion (and divide before
# decoding). For SD's autoencoder that number is 0.18215 (its latents have std about 5.5). minisd applies it in
# exactly one place: `VAE.encode` multiplies, `VAE.decode` divides.
#
# The tiny model's autoencoder was measured the same way (`minisd/train/tiny.py`). We can repeat the measurement on a
# fresh batch of training images:

# %%
batch = to_tensor([shapes.sample(seed=2, index=i).image for i in range(256)])
with torch.no_grad():
    z = vae.encode(batch, generator=torch.Generator().manual_seed(0)) / vae.cfg.scale_factor   # unscaled sample
print(f"std of the unscaled latents: {z.std().item():.3f} -> 1/std = {1 / z.std().item():.5f}")
print(f"the model's scale_factor:     {vae.cfg.scale_factor:.5f}")
print(f"std of the scaled latents:    {(z * vae.cfg.scale_factor).std().item():.3f}")
print("per-channel mean:", [round(v, 2) for v in (z * vae.cfg.scale_factor).mean(dim=(0, 2, 3)).tolist()])

# %% [markdown]
# The scale matters because noise is *added* to the latent: with a signal of std s the signal-to-noise ratio at
# every step is s^2 times what the schedule intends. Without the scale, SD's latents (s = 1/0.18215 = 5.49) would
# still be clearly visible at the last training step, t = 999, so the model would never learn to start from pure
# noise. (The per-channel means are not zero either; only one scalar is applied, as in LDM.)

# %%
from minisd import diffusion

abar = diffusion.alphas_cumprod_from_betas(diffusion.scaled_linear_betas())
snr_999 = diffusion.snr(abar)[999].item()
for s in (1.0, 1 / 0.18215):
    print(f"signal std {s:.2f}: SNR at t=999 = {s ** 2 * snr_999:.4f}")

# %% [markdown]
# Next: tutorial 4 adds that noise.
