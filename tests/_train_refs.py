"""A reference fine-tuning / DreamBooth step built from diffusers' and torch's own parts, for the parity tests.

diffusers' examples/ (train_dreambooth.py, train_text_to_image.py) are not in its wheel, so the step is written
out here the way those scripts compute it, from the pieces that do ship:

    networks        StableDiffusionPipeline.from_single_file on the same official-layout file minisd trains:
                    UNet2DConditionModel, AutoencoderKL, transformers' CLIPTextModel (SD2: the 23-layer tower
                    diffusers converts OpenCLIP into, i.e. the penultimate layer + final_layer_norm), CLIPTokenizer
    forward process DDPMScheduler.add_noise, DDPMScheduler.get_velocity (v targets)
    Min-SNR         diffusers.training_utils.compute_snr, weights as train_text_to_image.py builds them
    optimizer       torch.optim.AdamW with its defaults (what the scripts build; on the CPU that is the
                    single-tensor, non-fused implementation), diffusers.optimization.get_scheduler,
                    torch.nn.utils.clip_grad_norm_ (accelerator.clip_grad_norm_), loss / accumulation before
                    backward (accelerator.backward)
    DreamBooth      instance examples first, class examples second in one batch;
                    mse(instance) + prior_loss_weight * mse(class)

With --snr-gamma and prior preservation, diffusers' script is broken (diffusers issue 5791): it computes the
weights for the whole batch but multiplies only the instance half's per-sample losses by them (a shape error for
batch > 1, a silently wrong average for batch 1) and leaves the class half unweighted. The reference here weights
every sample of both halves, which is what Min-SNR means.

The batch (pixels and captions), the VAE posterior noise, the noise, the offset noise and the timesteps are
inputs: the test puts the same numbers into minisd.
"""
import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoints import SMALL_SD1, diffusers_from_single_file, write_diffusers_config, write_ldm_checkpoint
from minisd.train import finetune
from minisd.train.batches import Stream, take
from minisd.train.settings import DTYPES
from minisd.train.step import Draws
from minisd.train.data import find_examples
from weights_convert import detect


def _weighted_mse(pred, target, weights):
    dtype = torch.promote_types(pred.dtype, torch.float32)       # the scripts' .float(); float64 stays float64
    if weights is None:
        return F.mse_loss(pred.to(dtype), target.to(dtype), reduction="mean")
    loss = F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


def reference_training(pipe, batches, draws, steps, lr=1e-3, accumulation=1, train_text_encoder=False,
                       snr_gamma=None, noise_offset=0.0, prior_loss_weight=None, n_instance=None,
                       lr_scheduler="constant", warmup=0, max_grad_norm=1.0, weight_decay=1e-2, lora=False,
                       text_encoder_lr=None, betas=(0.9, 0.999), eps=1e-8, power=1.0):
    """Train pipe.unet (and pipe.text_encoder) for `steps` optimizer steps; returns the loss of each step (the
    mean over its micro-batches). batches[k] = (pixels (B, 3, H, W) in [-1, 1], captions), draws[k] = minisd's
    Draws for micro-batch k. prior_loss_weight not None: DreamBooth with the first n_instance examples
    instances. lora: the networks carry peft adapters (add_lora) and only those train, as in diffusers'
    train_dreambooth_lora.py (the parameters with requires_grad after add_adapter). text_encoder_lr: the text
    encoder's parameters in a second group at that rate, as train_dreambooth_lora_sdxl.py builds it (the U-Net's
    at lr, the optimizer's default); LambdaLR scales each group's own rate. The networks' dtype (float32,
    or float64 for the float64 parity tests) is the step's: pixels and draws are cast to it."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    dtype = unet.dtype
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if dtype == torch.float64:
        # DDPMScheduler computes its schedule in float32 whatever the model's dtype; a float64 reference computes
        # the same formula (scaled_linear) in float64, or float32 rounding of abar_t would be left in x_t
        c = scheduler.config
        assert c.beta_schedule == "scaled_linear", c.beta_schedule
        scheduler.betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps,
                                         dtype=torch.float64) ** 2
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    vae.requires_grad_(False)
    if not lora:
        text_encoder.requires_grad_(train_text_encoder)
        unet.requires_grad_(True)
    unet.train()
    if train_text_encoder:
        text_encoder.train()
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for p in text_encoder.parameters() if p.requires_grad] if train_text_encoder else []
    params = unet_params + text_params
    groups = ([{"params": unet_params, "lr": lr}, {"params": text_params, "lr": text_encoder_lr}]
              if text_encoder_lr is not None else params)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    lr_sched = get_scheduler(lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                             power=power)
    prediction = scheduler.config.prediction_type
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(accumulation):
            k = step * accumulation + micro
            pixels, captions = batches[k]
            d = draws[k]
            with torch.no_grad():
                dist = vae.encode(pixels.to(dtype)).latent_dist
                latents = (dist.mean + dist.std * d.posterior.to(dtype)) * vae.config.scaling_factor
            noise = d.noise.to(dtype, copy=True)
            if noise_offset:
                noise += noise_offset * d.offset.to(dtype)           # train_text_to_image.py
            t = d.timesteps
            noisy = scheduler.add_noise(latents, noise, t)
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            with torch.set_grad_enabled(train_text_encoder):
                hidden = text_encoder(ids)[0]
            pred = unet(noisy, t, hidden).sample
            target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, t)
            weights = None
            if snr_gamma is not None:
                snr = compute_snr(scheduler, t)
                weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
                weights = weights / snr if prediction == "epsilon" else weights / (snr + 1)
            if prior_loss_weight is None:
                loss = _weighted_mse(pred, target, weights)
            else:
                n = n_instance
                w = (None, None) if weights is None else (weights[:n], weights[n:])
                loss = (_weighted_mse(pred[:n], target[:n], w[0])
                        + prior_loss_weight * _weighted_mse(pred[n:], target[n:], w[1]))
            (loss / accumulation).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad()
        losses.append(total / accumulation)
    return losses


def minisd_named(pipe, folder):
    """The reference pipeline's weights under minisd's names: save_pretrained, then minisd's own reader of
    diffusers folders (a lossless rename, tested in test_weights_convert.py)."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    ckpt = detect.read(str(folder), verbose=False)
    return {k: ckpt.state[k] for k in ckpt.state if not k.startswith("extra.")}


# ---------------------------------------------------------------------------------------------------------------
# The harness the parity tests share: data folders, fixed draws, and one run of each side on the same inputs

RES = 16            # pixels; the small configs' VAE downsamples by 2: 8x8 latents
BATCH = 2
STEPS = 3
LR = 1e-4
LOSS_TOL = 1e-5
PARAM_TOL = 1e-5
UPDATE_TOL = 2e-3
# both sides in float64 (cfg.dtype; the reference's torch_dtype and float64 schedule, reference_training): rounding
# ~1e-16, which Adam's per-element normalisation amplifies to ~1e-12 (measured): the loss, every trained tensor and
# every update within 1e-9 (tests/test_lora_train.py's docstring says why tighter than the 1e-5)
F64_TOL = 1e-9


def image_folder(path, n, seed, captions=None):
    """n random-pixel images (24x20: resized and centre-cropped to RES), captioned by NAME.txt when given."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.random.default_rng([seed, i]).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(a).save(path / f"{i:02d}.png")
        if captions:
            (path / f"{i:02d}.txt").write_text(captions[i % len(captions)])
    return path


def fixed_draws(n, batch, latent_channels=4, seed=0, latent_size=RES // 2):
    """Draws for n micro-batches, fixed by the test; the first sample of each batch gets a small t (high SNR:
    Min-SNR-5 weights it by ~0.1) and the rest spread over the schedule."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        shape = (batch, latent_channels, latent_size, latent_size)
        t = torch.randint(100, 1000, (batch,), generator=g)
        t[0] = int(torch.randint(5, 40, (1,), generator=g))
        out.append(Draws(posterior=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g),
                                offset=torch.randn(batch, latent_channels, 1, 1, generator=g), timesteps=t))
    return out


CAPTIONS = ["a red circle on a blue square", "two green triangles", "a photo of a yellow star"]


def comparable(name, t):
    """The part of a trained tensor whose gradient is not zero in exact arithmetic. The attention key bias is the
    one exception here: it adds q . b_k to every score of a query, and softmax ignores a constant added to all of
    a row, so its gradient is float noise on both sides, which Adam still turns into ~lr-sized steps."""
    if name.endswith("attn.in_proj_bias"):
        q, _, v = t.chunk(3)
        return torch.cat([q, v])
    return t


def prepare(tmp_path, ckpt, method, accumulation, options, res=RES, latent_size=RES // 2):
    """(cfg, streams, draws, injected) of a parity run: the data folders, minisd's settings and streams, fixed
    draws and the `draws` function that hands them to minisd. res: pixels; latent_size: res / the VAE's factor."""
    prior = options.get("class_prompt") is not None
    n_micro = STEPS * accumulation
    total = BATCH * (2 if prior else 1)
    draws = fixed_draws(n_micro, total, latent_size=latent_size)
    common_opts = dict(out=str(tmp_path / "out"), model=str(ckpt), resolution=res, train_batch_size=BATCH,
                       max_train_steps=STEPS, learning_rate=LR, center_crop=True, device="cpu",
                       checkpointing_steps=100, gradient_accumulation_steps=accumulation)
    if method is finetune:
        data = image_folder(tmp_path / "data", 3, seed=1, captions=CAPTIONS)
        cfg = finetune.FinetuneConfig(data=str(data), **common_opts, **options)
        streams = [Stream(find_examples(str(data), res, log=lambda *_: None), 0)]
    else:
        data = image_folder(tmp_path / "instance", 3, seed=2)
        cfg = method.config(instance_dir=str(data), instance_prompt="a photo of sks shape", **common_opts,
                                **options)
        streams = [Stream(find_examples(str(data), res, cfg.instance_prompt, log=lambda *_: None), 0)]
        if prior:
            image_folder(tmp_path / "class", cfg.num_class_images, seed=3)
            streams.append(Stream(find_examples(cfg.class_dir, res, cfg.class_prompt, log=lambda *_: None), 1))

    def injected(k, places, shape):            # one process: the places of the whole micro-batch, in order
        assert list(places) == list(range(total)) and shape == tuple(draws[k].noise.shape), (places, shape)
        return draws[k]
    return cfg, streams, draws, injected


def reference_batches(cfg, streams, n_micro):
    """What minisd's micro-batches 0 .. n_micro - 1 hold (its own choice of examples, centre crops)."""
    batches = []
    for k in range(n_micro):
        parts = [take(s, k, cfg, cfg.resolution, None) for s in streams]
        batches.append((torch.cat([p[0] for p in parts]), [c for p in parts for c in p[2]]))
    return batches


def run_pair(tmp_path, model, method, accumulation=1, reference_overrides=None, **options):
    """Train with minisd and with the reference from the same file and draws; returns the measured errors.
    reference_overrides: arguments of reference_training to change (to show that a difference is caught)."""
    ckpt, config = model
    cfg, streams, draws, injected = prepare(tmp_path, ckpt, method, accumulation, options)
    prior = options.get("class_prompt") is not None       # FinetuneConfig has no class_prompt
    n_micro = STEPS * accumulation
    out = method.run(cfg, draws=injected, log=lambda *_: None)
    with open(tmp_path / "out" / "train_log.jsonl") as f:
        ours_losses = [e["loss"] for e in map(json.loads, f) if "loss" in e]
    ours = {k: comparable(k, v) for k, v in detect.read(out, verbose=False).state.items()}

    batches = reference_batches(cfg, streams, n_micro)
    pipe = diffusers_from_single_file(ckpt, config, torch_dtype=DTYPES[cfg.dtype])
    reference = dict(lr=cfg.unet_lr or LR, accumulation=accumulation, train_text_encoder=cfg.train_text_encoder,
                     snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset,
                     prior_loss_weight=cfg.prior_loss_weight if prior else None, n_instance=BATCH,
                     lr_scheduler=cfg.lr_scheduler, warmup=cfg.lr_warmup_steps, text_encoder_lr=cfg.text_encoder_lr,
                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, power=cfg.lr_power,
                     weight_decay=cfg.adam_weight_decay, max_grad_norm=cfg.max_grad_norm)
    theirs_losses = reference_training(pipe, batches, draws, STEPS, **{**reference, **(reference_overrides or {})})
    theirs = {k: comparable(k, v) for k, v in minisd_named(pipe, tmp_path / "reference").items()}
    start = {k: comparable(k, v) for k, v in detect.read(str(ckpt), verbose=False).state.items()}

    trained = [k for k in theirs if k.startswith("unet.") or (cfg.train_text_encoder and k.startswith("text_"))]
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(ours_losses, theirs_losses))
    param_err = max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in trained)
    update_err = max(((ours[k] - theirs[k]).norm() / (theirs[k] - start[k]).norm()).item() for k in trained)
    moved = (sum((theirs[k] - start[k]).norm() ** 2 for k in trained) / sum(start[k].norm() ** 2 for k in trained)) ** 0.5
    worst = max(trained, key=lambda k: ((ours[k] - theirs[k]).norm() / theirs[k].norm()).item())
    frozen = [k for k in theirs if k not in trained]
    frozen_err = max((ours[k] - start[k]).abs().max().item() for k in frozen)
    print(f"[parity] losses {ours_losses} vs {theirs_losses}: rel err {loss_err:.2e}; trained params rel err "
          f"{param_err:.2e}, update rel err {update_err:.2e} (worst {worst}), relative move of all trained "
          f"weights {moved:.2e} ({len(trained)} tensors); frozen max change {frozen_err}")
    assert len(ours_losses) == STEPS

    assert moved > 1e-4, "the weights hardly moved: the parameter comparison would be meaningless"
    assert frozen_err == 0, "a frozen weight changed"
    return dict(loss=loss_err, param=param_err, update=update_err, ours=ours, theirs=theirs, trained=trained)


def assert_equal(errors):
    assert errors["loss"] <= LOSS_TOL, errors["loss"]
    assert errors["param"] <= PARAM_TOL, errors["param"]
    assert errors["update"] <= UPDATE_TOL, errors["update"]


def assert_equal_in_float64(errors):
    assert errors["loss"] <= F64_TOL, errors["loss"]
    assert errors["param"] <= F64_TOL, errors["param"]
    assert errors["update"] <= F64_TOL, errors["update"]


# SMALL_SD1 at 64 channels: at its own 32, LDM's 32-group GroupNorms hold one channel each, which makes the
# gradients of every bias added before one (and of the timestep-embedding layers) exactly zero in exact arithmetic,
# i.e. float noise that Adam then scales up to ~lr-sized steps in either implementation
SD1 = dataclasses.replace(SMALL_SD1, name="train-sd1", unet=dataclasses.replace(SMALL_SD1.unet, model_channels=64))



def model_files(tmp_path_factory, cfg, seed):
    d = tmp_path_factory.mktemp(cfg.name)
    write_ldm_checkpoint(d / "model.safetensors", cfg, seed=seed, parameterization=cfg.prediction)
    write_diffusers_config(d / "config", cfg)
    return d / "model.safetensors", d / "config"


# ---------------------------------------------------------------------------------------------------------------
# LoRA: peft adapters on the reference networks, started from minisd's initial factors


def peft_modules(pipe, config):
    """{minisd kohya name: peft LoRA layer} of the reference U-Net and text encoder (after add_lora)."""
    from minisd import lora
    names = lora.aliases(config)
    out = {}
    for part, prefix in (("unet", "unet."), ("text_encoder", "text_encoder.text_model.")):
        for name, module in getattr(pipe, part).named_modules():
            if hasattr(module, "lora_A"):      # transformers >= 5.6 drops CLIPTextModel's `text_model.`
                out[names[prefix + name.removeprefix("text_model.")]] = module
    return out


def add_lora(pipe, config, factors, rank, alpha, train_text_encoder):
    """peft LoraConfig(r, lora_alpha, target_modules = the layers of `factors`) added to pipe.unet (and
    pipe.text_encoder) with add_adapter, as diffusers' LoRA scripts do; then each lora_A set to minisd's initial
    down factor (lora_B starts at zero on both sides). Returns peft_modules."""
    from peft import LoraConfig, inject_adapter_in_model
    from minisd import lora
    table = lora.layers(config)
    for part, prefix in (("unet", "unet."), ("text_encoder", "text_encoder.text_model.")):
        if part == "text_encoder" and not train_text_encoder:
            continue
        # exact module names: peft matches a target equal to the whole name or to a "."-separated tail of it
        modules = [table[k].diffusers.removeprefix(prefix) for k in factors if table[k].diffusers.startswith(prefix)]
        config_ = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=modules)
        if part == "unet":
            pipe.unet.add_adapter(config_)
        else:       # what diffusers' text_encoder.add_adapter does, without transformers' peft version pin
            inject_adapter_in_model(config_, pipe.text_encoder, adapter_name="default")
    modules = peft_modules(pipe, config)
    assert set(modules) == set(factors), set(modules) ^ set(factors)
    parts = ("unet", "text_encoder") if train_text_encoder else ("unet",)
    assert all(("lora_" in n) == p.requires_grad for part in parts
               for n, p in getattr(pipe, part).named_parameters())       # only the adapters train
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_A["default"].weight.copy_(factors[name].down.reshape(m.lora_A["default"].weight.shape))
            assert not m.lora_B["default"].weight.any()
    return modules
