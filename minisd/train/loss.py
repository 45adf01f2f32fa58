"""The training objective of latent diffusion, and the parts fine-tuning adds to it.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                      (DDPM eq. 4)
    target = eps                     (eps-prediction, DDPM eq. 14)
           = sqrt(abar_t) eps - sqrt(1 - abar_t) x0                   (v-prediction, Salimans & Ho 2022, Sec. 4)
    loss = mean_b  w_b * mean_pixels (model(x_t, t, c) - target)^2

w_b = 1 is the simple objective; Min-SNR-gamma (Hang et al. 2023, eq. 9) weights each sample by
min(SNR_t, gamma) / SNR_t for eps and min(SNR_t, gamma) / (SNR_t + 1) for v. DreamBooth's prior preservation
(Ruiz et al. 2023, eq. 2) adds the same loss on the class half of the batch times `prior_weight`.
"""
import torch
import torch.nn.functional as F

from ..diffusion import _per_sample, q_sample, snr


def diffusion_loss(model, x0, tokens, generator, alphas_cumprod):
    """The simple DDPM objective (Ho et al. 2020, eq. 14): t ~ U{0..999}, eps ~ N(0, I),
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = || eps - eps_theta(x_t, t, text(c)) ||^2.

    x0: scaled latents (B, 4, h, w); tokens: (B, 77). The tiny model's from-scratch training."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=generator)
    dtype = torch.promote_types(x0.dtype, torch.float32)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, dtype)   # drawn on the CPU: same on any device
    x_t = q_sample(x0, noise, t, alphas_cumprod)
    eps = model.unet(x_t, t.to(x0.device, dtype), model.text_encoder(tokens.to(x0.device)))
    return F.mse_loss(eps, noise)


def training_target(x0, noise, t, alphas_cumprod, prediction):
    """What the U-Net should output: the noise (eps), or v = sqrt(abar) eps - sqrt(1 - abar) x0 (diffusers'
    DDPMScheduler.get_velocity)."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        abar = alphas_cumprod.to(torch.float64)[t.cpu()]
        return _per_sample(abar ** 0.5, x0) * noise - _per_sample((1 - abar) ** 0.5, x0) * x0
    raise ValueError(f"unknown prediction {prediction!r}; valid: eps, v")


def min_snr_weights(t, alphas_cumprod, gamma, prediction):
    """(B,) Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v (the
    v-loss is (SNR + 1) times the eps-loss, so this gives the same weighting of the x0 error). In float64;
    weighted_mse casts them to the loss's dtype."""
    s = snr(alphas_cumprod.to(torch.float64))[t.cpu()]
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s if prediction == "eps" else s + 1)


def weighted_mse(pred, target, weights=None):
    """mean_b w_b * mean_pixels (pred - target)^2 in float32, or float64 when an input is; weights None = plain
    MSE. (A low-precision pred under autocast is upcast: the squared errors are summed in at least float32.)"""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    if weights is None:
        return F.mse_loss(pred.to(dtype), target.to(dtype))
    per_sample = F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


def finetune_loss(pred, target, weights=None, n_instance=None, prior_weight=1.0):
    """The fine-tuning loss over a batch; with prior preservation (n_instance < B) the batch is the instance
    examples first, then the class examples, and the loss is diffusers' train_dreambooth
    mse(instance) + prior_weight * mse(class), each a mean over its own half. Min-SNR weights apply per sample
    in both halves (diffusers' script applies them to the instance half only when both are on: issue 5791)."""
    if n_instance is None or n_instance == pred.shape[0]:
        return weighted_mse(pred, target, weights)
    w_inst, w_class = (None, None) if weights is None else (weights[:n_instance], weights[n_instance:])
    instance = weighted_mse(pred[:n_instance], target[:n_instance], w_inst)
    prior = weighted_mse(pred[n_instance:], target[n_instance:], w_class)
    return instance + prior_weight * prior
