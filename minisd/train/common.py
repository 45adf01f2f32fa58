"""What full fine-tuning, DreamBooth and Textual Inversion share: the run's settings, a training step on a whole SD model, and the
run folder (model file, log, samples, checkpoints). finetune.py and dreambooth.py only say where the batches come
from; `fit` does the rest through the one loop (loop.py).

One training step, as diffusers' train_dreambooth.py / train_text_to_image.py compute it:

    x0   = (mean + exp(logvar / 2) * e) * scale_factor        VAE posterior sample, e ~ N(0, I)
    eps  = n + noise_offset * o                                n ~ N(0, I) (B, 4, h, w), o ~ N(0, I) (B, 4, 1, 1)
    t    ~ U{0, ..., 999}
    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = finetune_loss(unet(x_t, t, text(c)), eps or v)      loss.py: SNR weights, prior preservation

Every example of a batch has its own random numbers: the generator of example j of micro-batch k is seeded with
(seed, k, j) (`example_generator`), and gives its template prompt (textual inversion), crop and flip, then its
four draws (e, n, o, t) in that order (`draw`). j is the example's place in the whole micro-batch (instances 0 .. G-1, then DreamBooth's class examples
G .. 2G-1, for a global batch of G), never a process's rank: so a batch split over several processes (torchrun,
below) is made of the same examples with the same noise as the batch of one process. A test can hand `fit` its own
`draws` function to put the same numbers into a reference implementation.

Several processes (torchrun; minisd/distributed.py): --train-batch-size B is per process, as in diffusers, so
micro-batch k holds G = B x W examples for W processes (and an optimizer step G x A, with A micro-batches): the
same G examples as one process with --train-batch-size G, of which rank r takes places r*B .. r*B + B - 1 of each
stream. Each process's loss is the mean over its B examples (DreamBooth: mse(its instances) + w mse(its class
examples), equal halves), so the mean of the W losses and of their gradients, which the loop takes, is the loss
and gradient of the whole batch: W processes with B each give the weights one process gives with B x W.
"""
import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from weights_convert import detect, ldm, native
from weights_convert.io import write_safetensors

from .. import distributed, lora
from ..diffusion import alphas_cumprod_from_betas, q_sample, scaled_linear_betas
from ..images import to_tensor
from ..model import load_model, locate
from ..pipeline import Pipeline
from .data import check_resolution, load_image, resize_and_crop
from .loop import TrainConfig, train
from .loss import finetune_loss, min_snr_weights, training_target
from .lr import check_schedule

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAVE_FORMATS = ("single_file", "diffusers")
# the weights' dtype, and the step's: float64 is a test tool (the parity tests run both sides without float32
# rounding, which AdamW amplifies where a gradient is near zero), not a command-line flag
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning or DreamBooth run (the `minisd train` flags, diffusers' names)."""
    out: str
    model: str | None = None                 # what `minisd generate --model` takes; None = the tiny model
    data: str | None = None                  # finetune: a folder of captioned images
    instance_dir: str | None = None          # dreambooth: the subject's images ...
    instance_prompt: str | None = None       # ... and their caption ("a photo of sks dog")
    class_prompt: str | None = None          # dreambooth with prior preservation: the class ("a photo of a dog")
    class_dir: str | None = None             # its images, generated until there are num_class_images
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    token: str | None = None                 # textual inversion: the new word ("<cat-toy>") ...
    init_token: str | None = None            # ... whose vectors start as this word's embedding ("toy")
    num_vectors: int = 1                     # ... how many vectors the word stands for
    learnable_property: str = "object"       # ... "object" or "style": the template prompts of uncaptioned images
    resolution: int | None = None            # None: the model's own size
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 400
    learning_rate: float = 5e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_cycles: float | None = None
    lr_min_ratio: float = 0.0
    seed: int = 0
    train_text_encoder: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999                # diffusers' EMAModel default
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    center_crop: bool = False                # diffusers' default is a random crop
    random_flip: bool = False
    cache_latents: bool = False
    checkpointing_steps: int = 500
    validation_prompts: tuple = ()
    validation_steps: int = 100
    device: str = "auto"
    resume: bool = False
    save_format: str = "single_file"
    scale_lr: bool = False                   # learning rate x batch per process x accumulation x processes
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    dtype: str = "float32"                   # DTYPES: "float64" for the parity tests (no --flag)


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


# ---------------------------------------------------------------------------------------------------------------
# Batches: which examples micro-batch k holds is a pure function of (seed, stream, k)


def batch_indices(n, batch_size, k, seed, stream=0):
    """Examples of micro-batch k: epochs of a fresh permutation each (sampling without replacement, as a shuffled
    DataLoader does), position p = k * batch_size + j in the endless sequence of epochs."""
    out = []
    for p in range(k * batch_size, (k + 1) * batch_size):
        epoch, i = divmod(p, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7 + stream))
        out.append(int(order[i]))
    return out


@dataclass
class Stream:
    """One source of examples (the finetune folder; DreamBooth's instance or class folder), with its
    posterior moments when latents are cached."""
    examples: list
    stream: int
    cache: tuple = None              # (mean, logvar), each (N, 4, h, w), when --cache-latents


def pick_caption(caption, generator):
    """An example's caption; a tuple holds alternatives (textual inversion's template prompts), one drawn per use
    from the example's generator."""
    if isinstance(caption, str):
        return caption
    if generator is None:
        raise ValueError("template prompts need a generator per example")
    return caption[int(torch.randint(len(caption), (1,), generator=generator))]


def take(source: Stream, k, cfg: FinetuneConfig, resolution, generators=None, world=1, rank=0):
    """(pixels or None, moments or None, captions) of this process's share of micro-batch k from `source`;
    generators: one per example of the share (template prompts, crops and flips), or None for centre crops
    without flips and fixed captions."""
    b = cfg.train_batch_size
    idx = batch_indices(len(source.examples), b * world, k, cfg.seed, source.stream)[rank * b:(rank + 1) * b]
    if generators is None:
        if not cfg.center_crop or cfg.random_flip:
            raise ValueError("random crops and flips need a generator per example")
        generators = [None] * len(idx)
    captions = [pick_caption(source.examples[i].caption, g) for i, g in zip(idx, generators)]
    if source.cache is not None:
        return None, (source.cache[0][idx], source.cache[1][idx]), captions
    images = [resize_and_crop(load_image(source.examples[i].path), resolution, cfg.center_crop, cfg.random_flip, g)
              for i, g in zip(idx, generators)]
    return to_tensor(images), None, captions


@torch.no_grad()
def cache_moments(vae, examples, resolution, device, chunk=8):
    """Posterior (mean, logvar) of every example, centre-cropped, encoded once (--cache-latents)."""
    means, logvars = [], []
    for start in range(0, len(examples), chunk):
        images = [resize_and_crop(load_image(e.path), resolution) for e in examples[start:start + chunk]]
        mean, logvar = vae.posterior(to_tensor(images).to(device, vae.quant_conv.weight.dtype))
        at_least_fp32 = torch.promote_types(mean.dtype, torch.float32)
        means.append(mean.to(at_least_fp32))
        logvars.append(logvar.to(at_least_fp32))
    return torch.cat(means), torch.cat(logvars)


# ---------------------------------------------------------------------------------------------------------------
# The step


def text_in_backward(cfg: FinetuneConfig):
    """Whether gradients go through the text encoder: it trains, or textual inversion trains vectors at its input."""
    return cfg.train_text_encoder or cfg.token is not None


def step_loss(model, pixels, moments, tokens, d: Draws, alphas_cumprod, cfg: FinetuneConfig, n_instance,
              embeddings=None, replaced=None):
    """The loss of one micro-batch (module docstring). pixels (B, 3, H, W) in [-1, 1], or moments = the cached
    (mean, logvar); tokens (B, 77); the first n_instance examples are instances, the rest class examples.
    embeddings: the textual-inversion words whose ids (past the vocabulary) `tokens` may hold.
    replaced: {param name: tensor} the U-Net and text encoder compute with in place of their own parameters
    (torch.func.functional_call; LoRA's W + (alpha / r) up down, train/lora.py).

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
    with torch.set_grad_enabled(text_in_backward(cfg) and torch.is_grad_enabled()):
        tokens = tokens.to(device)
        context = embeddings.encode(text_encoder, tokens) if embeddings else text_encoder(tokens)  # (B, 77, width)
    pred = unet(x_t, t.to(device, dtype), context)
    target = training_target(x0, noise, t, alphas_cumprod, model.config.prediction)
    weights = None if cfg.snr_gamma is None else min_snr_weights(t, alphas_cumprod, cfg.snr_gamma,
                                                                 model.config.prediction)
    return finetune_loss(pred, target, weights, n_instance, cfg.prior_loss_weight)


def _with_tensors(net, prefix, tensors):
    """`net` as a function computing with tensors[prefix + name] in place of its parameter `name`, where given."""
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return (lambda *args: torch.func.functional_call(net, mine, args)) if mine else net


# ---------------------------------------------------------------------------------------------------------------
# Setting up, checking, writing


def check(cfg: FinetuneConfig, save_formats=SAVE_FORMATS):
    """One-line errors for settings that cannot run, before any model is loaded."""
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "validation_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr_scheduler not in SCHEDULERS:
        raise ValueError(f"unknown --lr-scheduler {cfg.lr_scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    check_schedule(train_config(cfg))
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"unknown --mixed-precision {cfg.mixed_precision!r}; choose no, fp16 or bf16")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.dtype != "float32" and cfg.mixed_precision != "no":
        raise ValueError(f"--mixed-precision {cfg.mixed_precision} trains float32 weights, not {cfg.dtype}")
    if cfg.save_format not in save_formats:
        raise ValueError(f"unknown --save-format {cfg.save_format!r}; choose one of {', '.join(save_formats)}")
    if cfg.snr_gamma is not None and not cfg.snr_gamma > 0:
        raise ValueError(f"--snr-gamma must be > 0, got {cfg.snr_gamma}")
    if cfg.noise_offset < 0:
        raise ValueError(f"--noise-offset must be >= 0, got {cfg.noise_offset}")
    if cfg.cache_latents and (cfg.random_flip or not cfg.center_crop):
        raise ValueError("--cache-latents encodes each image once, so it needs --center-crop and no --random-flip")
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.use_8bit_adam and not cuda:
        raise ValueError("--use-8bit-adam (bitsandbytes' AdamW8bit) runs on CUDA only")
    if cfg.use_ema and not 0 < cfg.ema_decay < 1:
        raise ValueError(f"the EMA decay must be in (0, 1), got {cfg.ema_decay}")


def train_config(cfg: FinetuneConfig):
    """The loop's settings for this run; --scale-lr multiplies the rate by the examples of an optimizer step
    (batch per process x accumulation x processes), as diffusers' --scale_lr does."""
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * distributed.world_size() if cfg.scale_lr else 1
    return TrainConfig(
        steps=cfg.max_train_steps, lr=cfg.learning_rate * scale, weight_decay=cfg.adam_weight_decay,
        lr_schedule=cfg.lr_scheduler, warmup_steps=cfg.lr_warmup_steps, cycles=cfg.lr_cycles,
        min_lr_ratio=cfg.lr_min_ratio, ema_decay=cfg.ema_decay if cfg.use_ema else 0.0, ema_warmup="diffusers",
        grad_clip=cfg.max_grad_norm, checkpoint_every=cfg.checkpointing_steps, seed=cfg.seed,
        grad_accum=cfg.gradient_accumulation_steps,
        # torch's AdamW, in its one-kernel ("fused") form: the same update as the for-loop form diffusers' scripts
        # get on the CPU (the parity tests compare the two, 1e-5), in one pass over the weights and Adam's moments
        # instead of about ten; over SD1.5's U-Net on the CPU, 0.7-1.1 s against the for-loop's 4.2-5.4 s (4-8x) with
        # either AVX-512 or AVX2 kernels (bench/adamw.py, bench/RESULTS.md)
        optimizer="adamw_8bit" if cfg.use_8bit_adam else "adamw_fused", mixed_precision=cfg.mixed_precision)


def load(cfg: FinetuneConfig, device, log=print):
    """(model on `device` in cfg.dtype (float32 unless a test asks for float64), path of its file)."""
    path, _ = locate(cfg.model, log)
    model = load_model(path, dtype=DTYPES[cfg.dtype], device=device, verbose=False, log=log)
    return model, path


def set_frozen_dtype(model, cfg: FinetuneConfig):
    """Under mixed precision the frozen networks are stored in the low precision (as diffusers' scripts do); the
    trained ones stay fp32 (autocast computes in the low precision, AdamW updates fp32 weights), and so does the
    text encoder when textual inversion trains at its input (diffusers' textual_inversion.py). Without mixed
    precision everything stays in cfg.dtype."""
    dtype = {"no": DTYPES[cfg.dtype], "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    model.vae.to(dtype)
    if not text_in_backward(cfg):
        model.text_encoder.to(dtype)


def trainable_parameters(model, cfg: FinetuneConfig):
    """{name: parameter} of what trains: the U-Net, and the text encoder with --train-text-encoder."""
    model.requires_grad_(False)
    parts = ["unet"] + (["text_encoder"] if cfg.train_text_encoder else [])
    out = {}
    for part in parts:
        module = getattr(model, part)
        module.requires_grad_(True)
        out.update({f"{part}.{k}": p for k, p in module.named_parameters()})
    return out


def write_model(model, source, cfg: FinetuneConfig, path):
    """The whole model in the official single-file layout (or a diffusers folder): the source file's tensors,
    those not trained included (and the ones minisd does not use, e.g. schedule buffers), in float32 (float64
    for a float64 run: cfg.dtype), with the trained ones replaced by `model`'s."""
    ckpt = detect.read(source, prediction=model.config.prediction, verbose=False)
    trained = model.state_dict()
    tensors = {}
    for name in list(ckpt.state):
        t = ckpt.state.pop(name)
        if name in trained:
            t = trained[name].detach().cpu()
        tensors[name] = t.to(DTYPES[cfg.dtype]) if t.is_floating_point() and not name.startswith("extra.") else t
    if cfg.save_format == "diffusers":
        from weights_convert import diffusers
        from ..convert import vocab_files
        model_tensors = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
        diffusers.write_diffusers(model_tensors, model.config, path, vocab_files(model.tokenizer))
        return
    out = ldm.to_ldm(tensors, model.config)
    tmp = str(path) + ".tmp"
    write_safetensors(tmp, out, {"minisd_config": native.config_to_json(model.config)})
    os.replace(tmp, path)


class Progress:
    """A tqdm bar with step, loss and lr; `validate(step)` after each step."""

    def __init__(self, total, validate, disable=False):
        self.bar = tqdm(total=total, desc="train", dynamic_ncols=True, mininterval=1.0, disable=disable)
        self.validate = validate

    def __call__(self, step, loss, lr):
        self.bar.update(step + 1 - self.bar.n)
        self.bar.set_postfix(step=step + 1, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.validate(step + 1)

    def close(self):
        self.bar.close()


def validation_images(model, cfg: FinetuneConfig, resolution, step, out, device, embeddings=None, substitute=None):
    """One image per --validation-prompt into out/samples/ (seed = --seed), with the textual-inversion words of
    `embeddings`; returns their paths. substitute(): {param name: tensor} to draw them with in place of the model's
    own parameters (put back after)."""
    folder = os.path.join(out, "samples")
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        originals = lora.swap(model, ((k, v.detach()) for k, v in substitute().items())) if substitute else {}
    try:
        pipe = Pipeline(model, device, DTYPES[cfg.dtype], log=lambda *_: None)
        if embeddings is not None:
            pipe.embeddings = embeddings
        paths = []
        for i, prompt in enumerate(cfg.validation_prompts):
            image = pipe.generate(prompt, seed=cfg.seed, width=resolution, height=resolution).images[0]
            paths.append(os.path.join(folder, f"step-{step:06d}-{i}.png"))
            image.save(paths[-1])
    finally:
        lora.restore(model, originals)
    model.unet.to(memory_format=torch.contiguous_format)      # the pipeline may have changed the layouts
    model.vae.to(memory_format=torch.contiguous_format)
    set_frozen_dtype(model, cfg)
    return paths


def fit(cfg: FinetuneConfig, method, streams, model, source, device, draws=None, log=print, trainable=None,
        save=None, embeddings=None, substitute=None):
    """Train `model` on batches from `streams` (one, or DreamBooth's instance and class streams), write the run
    folder, and return the path of the file written. `draws(k, places, latent_shape)` replaces the draws of the
    examples at `places`, their places j in micro-batch k (module docstring) (tests).

    What trains and what is written are the method's: `trainable(model, cfg)` gives the {name: Parameter} to
    optimise (default: trainable_parameters, the U-Net and maybe the text encoder) and `save(model, weights, cfg)`
    writes the result and returns its path (default: save_model, the whole model in the official layout).
    `weights` are the final values of the trainable tensors, EMA ones with --use-ema. `embeddings`: textual-inversion
    words (embeddings.Embeddings) that captions and validation prompts may use. `substitute()`, when given,
    returns {param name: tensor} that the training forward and the validation images use in place of the model's
    own parameters (LoRA: W + (alpha / r) up down, computed from the trainable factors; train/lora.py).

    Under torchrun (distributed.setup joined the job) each process trains on its share of every batch and rank 0
    alone writes files; the others return the same path once it is written."""
    resolution = cfg.resolution or model.config.image_size
    factor = 2 ** (len(model.config.vae.ch_mult) - 1)
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    ckpt_file = os.path.join(ckpt_dir, f"{method}.ckpt.pt")
    if os.path.exists(ckpt_file) and not cfg.resume:
        raise ValueError(f"{cfg.out} already holds a checkpoint ({ckpt_file}); pass --resume to continue it or "
                         f"choose another --out")
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    log = distributed.main_only(log)
    log_path = os.path.join(cfg.out, "train_log.jsonl")
    if main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "args.json"), "w") as f:
            json.dump({"method": method, "processes": world, **dataclasses.asdict(cfg)}, f, indent=1)
        if not cfg.resume and os.path.exists(log_path):
            os.remove(log_path)
    if cfg.resume and not os.path.exists(ckpt_file):
        log(f"no checkpoint in {ckpt_dir}: starting from step 0")
    if world > 1:
        b, a = cfg.train_batch_size, cfg.gradient_accumulation_steps
        log(f"{world} processes x batch {b} x {a} accumulation = {b * a * world} examples per optimizer step"
            + (f"; --scale-lr: learning rate {train_config(cfg).lr:g}" if cfg.scale_lr else ""))

    mc = model.config
    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas(mc.beta_start, mc.beta_end, mc.num_timesteps))
    if cfg.cache_latents:
        for s in streams:
            s.cache = cache_moments(model.vae, s.examples, resolution, device)
    set_frozen_dtype(model, cfg)
    model.unet.gradient_checkpointing = cfg.gradient_checkpointing
    model.text_encoder.gradient_checkpointing = cfg.gradient_checkpointing and text_in_backward(cfg)
    trainable = (trainable or trainable_parameters)(model, cfg)
    n_instance = cfg.train_batch_size if len(streams) > 1 else None
    b, whole = cfg.train_batch_size, cfg.train_batch_size * world      # per process; the whole micro-batch
    # places of this process's examples in micro-batch k: its share of each stream's part (instances, class)
    places = [[part * whole + rank * b + i for i in range(b)] for part in range(len(streams))]

    def loss_fn(k, _generator):                 # the loop's (seed, k) generator: each example has its own here
        generators = {j: example_generator(cfg.seed, k, j) for js in places for j in js}
        parts = [take(s, k, cfg, resolution, [generators[j] for j in js], world, rank)
                 for s, js in zip(streams, places)]                             # instances first, then class
        captions = [c for _, _, cs in parts for c in cs]
        if parts[0][1] is not None:
            pixels, moments = None, tuple(torch.cat([p[1][i] for p in parts]).to(device) for i in (0, 1))
        else:
            pixels, moments = torch.cat([p[0] for p in parts]), None
        mine = [j for js in places for j in js]
        shape = (len(mine), mc.unet.in_channels, resolution // factor, resolution // factor)
        if draws is not None:
            d = draws(k, mine, shape)
        else:
            d = concat_draws([draw(generators[j], (1, *shape[1:]), mc.num_timesteps, cfg.noise_offset)
                              for j in mine])
        encode = (lambda text: embeddings.tokenize(text, model.tokenizer.encode)) if embeddings else None
        return step_loss(model, pixels, moments, model.tokenizer(captions, encode), d, alphas_cumprod, cfg,
                         n_instance, embeddings, substitute() if substitute else None)

    def validate(step):
        if cfg.validation_prompts and step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
            paths = validation_images(model, cfg, resolution, step, cfg.out, device, embeddings, substitute)
            model.train()
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "validation": paths}) + "\n")

    progress = Progress(cfg.max_train_steps, validate, disable=not main)
    t0 = time.time()
    try:
        weights = train(model, trainable, loss_fn, train_config(cfg), ckpt_dir, method, on_step=progress,
                        log=progress.bar.write, log_path=log_path, data_parallel=True)
    finally:
        progress.close()                        # an error message then starts on a line of its own
    model.requires_grad_(False).eval()
    path = None
    if main:
        path = (save or functools.partial(save_model, source=source))(model, weights, cfg)
        result = {"method": method, "steps": cfg.max_train_steps, "seconds": round(time.time() - t0, 1),
                  "model": path, "last_loss": _last_loss(log_path), "processes": world}
        if cfg.validation_prompts:
            result["validation"] = validation_images(model, cfg, resolution, cfg.max_train_steps, cfg.out, device,
                                                     embeddings, substitute)
        with open(os.path.join(cfg.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {path}")
    if world > 1:
        box = [path]
        distributed.broadcast_object(box)       # the others wait for the file, and learn its name
        path = box[0]
    return path


def save_model(model, weights, cfg: FinetuneConfig, source):
    """Full fine-tuning's output: the trained weights (EMA ones with --use-ema) put into the model, and the whole
    model written as OUT/model.safetensors (or the diffusers folder OUT/model)."""
    model.load_state_dict(weights, strict=False)
    path = os.path.join(cfg.out, "model.safetensors" if cfg.save_format == "single_file" else "model")
    write_model(model, source, cfg, path)
    return path


def _last_loss(log_path):
    loss = None
    with open(log_path) as f:
        for line in f:
            entry = json.loads(line)
            loss = entry.get("loss", loss)
    return loss

