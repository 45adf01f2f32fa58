"""One training step on a whole SD model: its random numbers and its loss, as diffusers' train_dreambooth.py /
train_text_to_image.py compute them:

    x0   = (mean + exp(logvar / 2) * e) * scale_factor        VAE posterior sample, e ~ N(0, I)
    eps  = n + noise_offset * o                                n ~ N(0, I) (B, 4, h, w), o ~ N(0, I) (B, 4, 1, 1)
    t    ~ U{0, ..., 999}
    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = finetune_loss(unet(x_t, t, text(c)), eps or v)      loss.py: SNR weights, prior preservation

Every example of a batch has its own random numbers: the generator of example j of micro-batch k is seeded with
(seed, k, j) (`example_generator`), and gives its template prompt (textual inversion), crop and flip (batches.py),
then its four draws (e, n, o, t) in that order (`draw`). j is the example's place in the whole micro-batch
(instances 0 .. G-1, then DreamBooth's class examples G .. 2G-1, for a global batch of G), never a process's rank:
so a batch split over several processes (torchrun; batches.py) is made of the same examples with the same noise as
the batch of one process. A test can hand `fit.fit` its own `draws` function to put the same numbers into a
reference implementation.
"""
from dataclasses import dataclass

import torch

from ..diffusion import q_sample
from .loss import finetune_loss, min_snr_weights, training_target
from .settings import TrainSettings


@dataclass
class Draws:
    """The random numbers of one micro-batch (see the module docstring)."""
    posterior: torch.Tensor          # (B, 4, h, w): e of the VAE posterior sample
    noise: torch.Tensor              # (B, 4, h, w): n
    offset: torch.Tensor | None      # (B, 4, 1, 1): o, drawn only when noise_offset > 0
    timesteps: torch.Tensor          # (B,) long


def example_generator(seed, k, j):
    """The generator of example j of micro-batch k (module docstring)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + k) * 100_003 + j) % 2**63)


def draw(generator, latent_shape, num_timesteps, noise_offset=0.0):
    """Draws for latent_shape[0] examples from one generator, on the CPU (the same numbers on any device)."""
    posterior = torch.randn(latent_shape, generator=generator)
    noise = torch.randn(latent_shape, generator=generator)
    offset = torch.randn(*latent_shape[:2], 1, 1, generator=generator) if noise_offset else None
    timesteps = torch.randint(0, num_timesteps, (latent_shape[0],), generator=generator)
    return Draws(posterior, noise, offset, timesteps)


def concat_draws(parts):
    """One Draws for a batch from the Draws of its examples, in order."""
    return Draws(*(None if getattr(parts[0], f) is None else torch.cat([getattr(d, f) for d in parts])
                   for f in ("posterior", "noise", "offset", "timesteps")))


def text_in_backward(cfg: TrainSettings, embeddings=None):
    """Whether gradients go through the text encoder: it trains, or textual inversion trains vectors at its input
    (the words of `embeddings`)."""
    return cfg.train_text_encoder or embeddings is not None


def step_loss(model, pixels, moments, tokens, d: Draws, alphas_cumprod, cfg: TrainSettings, n_instance,
              prior_loss_weight=1.0, embeddings=None, replaced=None, controlnet=None, hints=None):
    """The loss of one micro-batch (module docstring). pixels (B, 3, H, W) in [-1, 1], or moments = the cached
    (mean, logvar); tokens (B, 77); the first n_instance examples are instances, the rest class examples, whose
    loss counts prior_loss_weight times (DreamBooth; n_instance None: no class examples).
    embeddings: the textual-inversion words whose ids (past the vocabulary) `tokens` may hold.
    replaced: {param name: tensor} the U-Net and text encoder compute with in place of their own parameters
    (torch.func.functional_call; LoRA's W + (alpha / r) up down, train/lora.py).
    controlnet, hints (B, 3, H, W) in [0, 1]: the ControlNet's residuals on (x_t, t, text, hints) are added to the
    U-Net's skips and middle block, at scale 1 (diffusers' train_controlnet.py; train/controlnet.py).

    The step computes in the latents' dtype, at least float32: a low-precision VAE (--mixed-precision) gives fp32
    latents, noise and loss as autocast wants them, and a float64 model (cfg.dtype) stays float64 throughout."""
    unet, text_encoder = model.unet, model.text_encoder
    if replaced:
        unet, text_encoder = (_with_tensors(net, prefix, replaced) for net, prefix in
                              ((unet, "unet."), (text_encoder, "text_encoder.")))
    device = next(model.unet.parameters()).device
    with torch.no_grad():
        mean, logvar = moments if moments is not None else model.vae.posterior(pixels.to(device))
        e = d.posterior.to(device, mean.dtype)
        dtype = torch.promote_types(mean.dtype, torch.float32)
        x0 = (mean + torch.exp(0.5 * logvar) * e).to(dtype) * model.vae.cfg.scale_factor    # (B, 4, h, w)
    noise = d.noise.to(device, dtype)
    if d.offset is not None:
        noise = noise + cfg.noise_offset * d.offset.to(device, dtype)
    t = d.timesteps
    x_t = q_sample(x0, noise, t, alphas_cumprod)
    with torch.set_grad_enabled(text_in_backward(cfg, embeddings) and torch.is_grad_enabled()):
        tokens = tokens.to(device)
        context = embeddings.encode(text_encoder, tokens) if embeddings else text_encoder(tokens)  # (B, 77, width)
    residuals = {}
    if controlnet is not None:
        down, mid = controlnet(x_t, t.to(device, dtype), context, hints.to(device, dtype))
        residuals = dict(down_residuals=down, mid_residual=mid)
    pred = unet(x_t, t.to(device, dtype), context, **residuals)
    target = training_target(x0, noise, t, alphas_cumprod, model.config.prediction)
    weights = None if cfg.snr_gamma is None else min_snr_weights(t, alphas_cumprod, cfg.snr_gamma,
                                                                 model.config.prediction)
    return finetune_loss(pred, target, weights, n_instance, prior_loss_weight)


def _with_tensors(net, prefix, tensors):
    """`net` as a function computing with tensors[prefix + name] in place of its parameter `name`, where given."""
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return (lambda *args: torch.func.functional_call(net, mine, args)) if mine else net


def install(model, tensors: dict, originals: dict):
    """Put each {param name: tensor} into `model` in place of that parameter, as a plain tensor attribute whose
    graph reaches what it was computed from, and leave it there (until the next install or `uninstall`): a
    gradient-checkpointed block that recomputes its forward in the backward pass then reads the same W' the forward
    read. (torch.func.functional_call puts W back when the call returns, before backward; LoRA with
    --gradient-checkpointing, train/lora.py.) originals: {param name: Parameter} filled the first time."""
    for name, t in tensors.items():
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if name not in originals:
            originals[name] = getattr(module, attr)
            delattr(module, attr)                   # no longer a registered parameter of the module ...
        setattr(module, attr, t)                    # ... but a tensor it computes with


def uninstall(model, originals: dict):
    """The parameters `install` replaced, back in place (and `originals` emptied)."""
    for name, parameter in originals.items():
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        delattr(module, attr)
        setattr(module, attr, parameter)
    originals.clear()
