"""The tiny built-in model's recipe: Stable Diffusion's own networks at a small config (config.TINY), trained
from scratch on shapes.

    minisd train-tiny --out runs/tiny          # reproduces minisd/assets/minisd-tiny.safetensors on 2 CPU cores

It is SD 1.5 in miniature, not a different network: the same TextEncoder (CLIP architecture, CLIP's BPE
tokenizer, 77 tokens), the same cross-attention UNet, the same KL VAE (downsampling by 4 as LDM's kl-f4: 64x64x3
images -> 16x16x4 latents; SD's factor 8 gave 8x8 latents too coarse for the world's small shapes), the same
scaled-linear noise schedule and eps-prediction. Only the widths shrink.

The recipe follows latent diffusion (Rombach et al. 2022) in three phases, all run by minisd.train.loop, and a
fourth that fine-tunes the decoder afterwards, as SD's own was (sd-vae-ft-mse):
  1. the autoencoder: L1 reconstruction + a small KL pull of q(z|x) toward N(0, I) (LDM Sec. 3, App. G);
  2. the decoder alone, longer, with the encoder frozen: sharper pictures from the same latent space;
     then every training image of a fixed bank is encoded once, and scale_factor = 1 / std(latents), the rule
     that gave SD's 0.18215 (LDM `scale_by_std`);
  3. the text encoder and U-Net jointly, on the noise-prediction loss || eps - eps_theta(x_t, t, c) ||^2 over the
     forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4 and 14), with 10% of captions
     replaced by "" so the same network also learns the unconditional model that classifier-free guidance needs
     (Ho & Salimans 2022, Alg. 1). A fixed 20% of the training images carry a caption with one attribute wrong,
     like web alt-text (`noisy_captions`): that is what makes guidance matter, as it does for SD;
  4. the decoder alone again, on a loss that weighs the image's outer ring and corners (`decoder_loss`): the
     decoder's zero-padded convolutions left a light or dark frame there. The latents do not change, so neither
     does anything trained on them (the U-Net, the tiny ControlNet).
Everything random at step i is drawn from a generator seeded with (seed, i), so an interrupted run resumes exactly.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from ..config import TINY
from ..diffusion import alphas_cumprod_from_betas, scaled_linear_betas
from ..images import to_tensor
from ..model import StableDiffusion, save_model
from ..tiny import shapes
from ..tiny.evaluate import sample_grid
from ..vae import sample_posterior
from .loop import TrainConfig, atomic_save, train
from .loss import diffusion_loss
from .report import Tracker


@dataclass(frozen=True)
class Recipe:
    """Every number of the training run; the shipped weights are Recipe() with seed 0."""
    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 2e-3
    decoder_steps: int = 1000
    kl_weight: float = 1e-4          # per latent element, against a per-pixel L1: enough to keep q(z|x) smooth
    bank_size: int = 4096            # training images encoded once for phase 2
    steps: int = 10000
    batch: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    caption_noise: float = 0.2       # fraction of bank images whose caption names one attribute wrongly
    sample_every: int = 1000
    edge_steps: int = 8000           # phase 4: the decoder again, its image edges weighed (decoder_loss)
    edge_px: int = 3                 # the outer ring that decoder_loss weighs ...
    edge_weight: float = 0.5         # ... with its own mean L1 term, this weight ...
    corner_weight: float = 3.0       # ... and the corner_px x corner_px pixels at each corner with another
    corner_px: int = 4               # 2 left one pixel on green 13-14/255 off at (2, 63) at 16x16 latents


# ---------------------------------------------------------------------------------------------------------------
# Data: pure functions of (seed, index)


def image_batch(seed, step, batch):
    """Batch `step` of the endless training stream `seed`: samples step*batch ... step*batch + batch - 1."""
    samples = [shapes.sample(seed, step * batch + j) for j in range(batch)]
    return to_tensor([s.image for s in samples]), [s.text for s in samples]


# ---------------------------------------------------------------------------------------------------------------
# Losses. Each takes the step's generator and draws everything random from it (exact resumption).


def edge_masks(size, px, corner_px):
    """Boolean (size, size) masks of the outermost px-pixel ring and of the four corner_px x corner_px corners."""
    ring = torch.ones(size, size, dtype=torch.bool)
    ring[px:size - px, px:size - px] = False
    corners = torch.zeros(size, size, dtype=torch.bool)
    for rows in (slice(0, corner_px), slice(size - corner_px, size)):
        for cols in (slice(0, corner_px), slice(size - corner_px, size)):
            corners[rows, cols] = True
    return ring, corners


def decoder_loss(recon, images, recipe):
    """L1 over the image + edge_weight * L1 over the outer ring + corner_weight * L1 over the corners, each a mean
    over its own pixels.

    Why the extra terms: the decoder's convolutions pad with zeros (as SD's do), so near the image's edge every
    layer sees part of its window empty and must learn to undo that. A plain mean L1 gives the outer 2-pixel ring
    12% of the loss and the corner pixels 0.4%, and the first recipe left a frame there: the round trip of a clean
    drawing came back 40-90/255 off the background at the corners and up to 45/255 along whole edges
    (bench/tiny_subjects.md). Weighing those pixels as much as the whole image is what removes it."""
    err = (recon - images).abs()
    ring, corners = edge_masks(images.shape[-1], recipe.edge_px, recipe.corner_px)
    return (err.mean() + recipe.edge_weight * err[..., ring].mean()
            + recipe.corner_weight * err[..., corners].mean())


def vae_loss(vae, images, generator, kl_weight):
    """L1 reconstruction of a posterior sample + kl_weight * KL(q(z|x) || N(0, I)), both per element."""
    mean, logvar = vae.posterior(images)                                     # (B, 4, H/4, W/4) each
    z = sample_posterior(mean, logvar, generator)                            # reparameterised: gradients flow
    recon = vae.decoder(vae.post_quant_conv(z))
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)                       # closed form for diagonal Gaussians
    return (recon - images).abs().mean() + kl_weight * kl.mean()


# ---------------------------------------------------------------------------------------------------------------
# The recipe


class _Progress:
    """A tqdm bar plus a JSON-lines log of the running loss (out_dir/log.jsonl)."""

    def __init__(self, phase, total, out_dir, every=50):
        self.bar = tqdm(total=total, desc=phase, dynamic_ncols=True, mininterval=2.0)
        self.phase, self.every, self.losses = phase, every, []
        self.log_path = os.path.join(out_dir, "log.jsonl")
        self.t0 = time.time()

    def __call__(self, step, loss, lr):
        self.bar.update(step + 1 - self.bar.n)
        self.losses.append(loss)
        if (step + 1) % self.every == 0:
            mean = sum(self.losses) / len(self.losses)
            self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"phase": self.phase, "step": step + 1, "loss": mean, "lr": lr,
                                    "seconds": round(time.time() - self.t0, 1)}) + "\n")
            self.losses = []

    def close(self):
        self.bar.close()


def latent_bank(vae, seed, n, chunk=256):
    """Posterior (mean, logvar) of the first n images of stream seed + 1 (training combinations only),
    unscaled, on the CPU, with their captions."""
    means, logvars, captions = [], [], []
    device = next(vae.parameters()).device
    with torch.no_grad():
        for start in range(0, n, chunk):
            samples = [shapes.sample(seed + 1, i) for i in range(start, min(n, start + chunk))]
            mean, logvar = vae.posterior(to_tensor([s.image for s in samples]).to(device))
            means.append(mean.cpu())
            logvars.append(logvar.cpu())
            captions += [s.text for s in samples]
    return torch.cat(means), torch.cat(logvars), captions


def train_autoencoder(vae, recipe, out_dir, log=print, report=None):
    """Phase 1: the whole VAE on L1 reconstruction of a posterior sample + a small KL term."""
    cfg = TrainConfig(steps=recipe.vae_steps, lr=recipe.vae_lr, lr_schedule="tiny", warmup_steps=50,
                      ema_decay=0.99, checkpoint_every=100, seed=recipe.seed)

    device = next(vae.parameters()).device

    def loss_fn(step, generator):
        images, _ = image_batch(recipe.seed, step, recipe.vae_batch)
        return vae_loss(vae, images.to(device), generator, recipe.kl_weight)

    progress = _Progress("vae", cfg.steps, out_dir)
    vae.load_state_dict(train(vae, dict(vae.named_parameters()), loss_fn, cfg, out_dir, "vae", progress, log,
                              report=report))
    progress.close()


def train_decoder(vae, recipe, out_dir, log=print, report=None, edges=False):
    """Phase 2: the decoder alone, on fresh images, to sharpen edges and colours. The encoder is frozen, so the
    latent space (and anything trained on it) stays valid: how SD's VAE was improved (sd-vae-ft-mse).

    edges=True is phase 4, the same after the U-Net is trained: recipe.edge_steps more steps on decoder_loss,
    which weighs the image's outer ring and corners (a fresh stream, seed + 3). The U-Net never sees the decoder,
    so this changes nothing but the pixels."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    vae.decoder.requires_grad_(True)                     # phase 4 comes after phase 2 froze the whole VAE
    vae.post_quant_conv.requires_grad_(True)
    trainable = {f"decoder.{k}": p for k, p in vae.decoder.named_parameters()}
    trainable.update({f"post_quant_conv.{k}": p for k, p in vae.post_quant_conv.named_parameters()})
    stream, name = (recipe.seed + 3, "edges") if edges else (recipe.seed + 2, "decoder")
    cfg = TrainConfig(steps=recipe.edge_steps if edges else recipe.decoder_steps, lr=recipe.vae_lr / 2,
                      lr_schedule="tiny", warmup_steps=50, ema_decay=0.99, checkpoint_every=100, seed=stream)

    device = next(vae.parameters()).device

    def loss_fn(step, generator):
        images = image_batch(stream, step, recipe.vae_batch)[0].to(device)
        with torch.no_grad():
            mean, logvar = vae.posterior(images)
        recon = vae.decoder(vae.post_quant_conv(sample_posterior(mean, logvar, generator)))
        return decoder_loss(recon, images, recipe) if edges else (recon - images).abs().mean()

    progress = _Progress(name, cfg.steps, out_dir)
    vae.load_state_dict(train(vae, trainable, loss_fn, cfg, out_dir, name, progress, log, report=report),
                        strict=False)
    progress.close()
    vae.eval().requires_grad_(False)


def noisy_captions(captions, fraction, seed):
    """Replace `fraction` of the captions (a fixed, seeded choice) by shapes.mislabel's wrong ones.

    Why: with every caption right, the conditional model alone already draws the prompt, and classifier-free
    guidance has nothing left to fix. SD's web captions are often wrong, and guidance is what makes SD follow the
    prompt anyway: sampling eps_u + w (eps_c - eps_u) draws from p(x|c) p(c|x)^(w-1) (Ho & Salimans 2022,
    Sec. 3.2), and an image that contradicts c has a low p(c|x). The tiny model keeps that property of SD."""
    rng = np.random.default_rng([seed, 3])
    out = list(captions)
    for i in np.flatnonzero(rng.random(len(captions)) < fraction):
        out[i] = shapes.caption(*shapes.mislabel(*shapes.parse_caption(captions[i]), rng))
    return out


def make_bank(model, recipe, out_dir):
    """Encode the phase-3 training images once (cached in out_dir/bank.pt); scale_factor = 1 / std(latents)."""
    path = os.path.join(out_dir, "bank.pt")
    made_by = torch.tensor([recipe.seed, recipe.bank_size, round(recipe.caption_noise * 1e6)])
    if os.path.exists(path):
        bank = torch.load(path, map_location="cpu", weights_only=True)
        if "made_by" in bank and torch.equal(bank["made_by"], made_by):
            return bank                                  # else made by another recipe: make it again
    mean, logvar, captions = latent_bank(model.vae, recipe.seed, recipe.bank_size)
    captions = noisy_captions(captions, recipe.caption_noise, recipe.seed)
    unique = [""] + sorted(set(captions))                # row 0: the empty prompt of caption dropout
    bank = {"mean": mean, "logvar": logvar, "caption": torch.tensor([unique.index(c) for c in captions]),
            "tokens": model.tokenizer(unique),           # (len(unique), 77)
            "scale_factor": torch.tensor(1 / mean.std().item()), "made_by": made_by}
    atomic_save(bank, path)
    return bank


def train_text_and_unet(model, bank, recipe, cfg: TrainConfig, out_dir, name="unet", log=print, report=None):
    """Phase 3: text encoder + U-Net jointly on the noise-prediction loss, with caption dropout. Starts from the
    weights the model holds and leaves the EMA weights in it."""
    config = model.config
    device = next(model.parameters()).device
    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas(config.beta_start, config.beta_end,
                                                                   config.num_timesteps)).float()
    model.text_encoder.requires_grad_(True)
    model.unet.requires_grad_(True)
    trainable = {f"text_encoder.{k}": p for k, p in model.text_encoder.named_parameters()}
    trainable.update({f"unet.{k}": p for k, p in model.unet.named_parameters()})

    def loss_fn(step, generator):
        i = torch.randint(0, len(bank["mean"]), (recipe.batch,), generator=generator)
        x0 = sample_posterior(bank["mean"][i], bank["logvar"][i], generator) * config.vae.scale_factor
        keep = torch.rand(recipe.batch, generator=generator) >= recipe.caption_dropout
        tokens = bank["tokens"][torch.where(keep, bank["caption"][i], 0)]
        return diffusion_loss(model, x0.to(device), tokens, generator, alphas_cumprod)

    progress = _Progress(name, cfg.steps, out_dir)
    grid_scores = {}

    def on_step(step, loss, lr):
        progress(step, loss, lr)
        if (step + 1) % recipe.sample_every == 0:
            grid = os.path.join(out_dir, "samples", f"{name}-{step + 1:05d}.png")
            grid_scores[step + 1] = sample_grid(model, grid)
            progress.bar.write(f"step {step + 1}: sample grid judged {grid_scores[step + 1]:.0%} correct")
            # the Pipeline put the U-Net in channels_last on CUDA; the optimizer state is in the training layout
            model.unet.to(memory_format=torch.contiguous_format)
            model.train()

    weights = train(model, trainable, loss_fn, cfg, out_dir, name, on_step=on_step, log=log, report=report)
    progress.close()
    model.load_state_dict(weights, strict=False)          # the EMA weights of the text encoder and U-Net
    model.eval().requires_grad_(False)
    return grid_scores


def phase_report(tracker, phase, first_step):
    """A phase's log entries for the recipe's one tracker run: `vae/loss`, `vae/lr`, ... at the recipe's step
    (the phases one after another: the decoder's step 1 is vae_steps + 1), so a tracker's steps only grow."""
    def report(entry):
        tracker.log({"step": first_step + entry["step"],
                     **{f"{phase}/{k}": v for k, v in entry.items() if k != "step"}})
    return report


def train_tiny(out_dir, recipe=Recipe(), device="cpu", log=print, report_to="none"):
    """Run the four phases into out_dir (resuming whatever is there) and write out_dir/minisd-tiny.safetensors
    (fp16, EMA weights) plus out_dir/report.json. Returns the path of the weights. The shipped weights were trained
    on the CPU; on a GPU every random draw is the same (they come from CPU generators) but the arithmetic differs.
    report_to: report.TRACKERS, the phases' curves as one run ("tiny") in TensorBoard (out_dir/logs/) or wandb."""
    tracker = Tracker(report_to, out_dir, "tiny", {"recipe": asdict(recipe)})
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    times = {"start": time.time()}
    torch.manual_seed(recipe.seed)                       # the initial weights (overwritten on resume)
    model = StableDiffusion(TINY).to(device)

    try:
        train_autoencoder(model.vae, recipe, out_dir, log, phase_report(tracker, "vae", 0))
        times["vae"] = time.time()
        train_decoder(model.vae, recipe, out_dir, log, phase_report(tracker, "decoder", recipe.vae_steps))
        times["decoder"] = time.time()
        bank = make_bank(model, recipe, out_dir)
        config = replace(TINY, vae=replace(TINY.vae, scale_factor=round(bank["scale_factor"].item(), 5)))
        model.config, model.vae.cfg = config, config.vae
        log(f"latent std {1 / bank['scale_factor'].item():.4f} -> scale_factor {config.vae.scale_factor}")
        times["bank"] = time.time()
        cfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, lr_schedule="tiny", warmup_steps=100,
                          ema_decay=recipe.ema_decay, checkpoint_every=100, seed=recipe.seed + 1)
        grid_scores = train_text_and_unet(model, bank, recipe, cfg, out_dir, "unet", log,
                                          phase_report(tracker, "unet", recipe.vae_steps + recipe.decoder_steps))
        times["unet"] = time.time()
        train_decoder(model.vae, recipe, out_dir, log,
                      phase_report(tracker, "edges", recipe.vae_steps + recipe.decoder_steps + recipe.steps),
                      edges=True)
        times["edges"] = time.time()
    finally:
        tracker.close()

    path = os.path.join(out_dir, "minisd-tiny.safetensors")
    save_model(copy.deepcopy(model).cpu().half(), path + ".tmp.safetensors")
    os.replace(path + ".tmp.safetensors", path)
    wall = time.time() - times["start"]
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) after {wall:.0f} s")
    phases = list(times)
    report = {"recipe": asdict(recipe), "config": asdict(config), "seconds": round(wall),
              "seconds_by_phase": {b: round(times[b] - times[a]) for a, b in zip(phases, phases[1:])},
              "grid_scores": grid_scores}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return path
