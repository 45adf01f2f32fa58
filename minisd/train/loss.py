"""The training objective of latent diffusion."""
import torch
import torch.nn.functional as F

from ..diffusion import q_sample


def diffusion_loss(model, x0, tokens, generator, alphas_cumprod):
    """The simple DDPM objective (Ho et al. 2020, eq. 14): t ~ U{0..999}, eps ~ N(0, I),
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = || eps - eps_theta(x_t, t, text(c)) ||^2.

    x0: scaled latents (B, 4, h, w); tokens: (B, 77). Shared by from-scratch training and fine-tuning."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)    # drawn on the CPU: same on any device
    x_t = q_sample(x0, noise, t, alphas_cumprod)
    eps = model.unet(x_t, t.float().to(x0.device), model.text_encoder(tokens.to(x0.device)))
    return F.mse_loss(eps, noise)
