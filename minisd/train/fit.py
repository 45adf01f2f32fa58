"""A training run, the same for every method: join the job (torchrun), load the model, ask the method what it
trains (`prepare` -> Training), train through the one loop (loop.py) on the step of step.py and the batches of
batches.py, and write the run folder: the method's output (by default the whole model), train_log.jsonl,
args.json, result.json, checkpoints/ and samples/; with --save-model-steps N, snapshots of the output every N
steps (model-step000400.safetensors; --save-last-n K keeps the newest K), each listed in train_log.jsonl as
{"step", "snapshot": [paths]}; with --report-to, the same curves and validation images in TensorBoard or wandb
(report.py).

--num-train-epochs E sets the steps as diffusers does: E x ceil(micro-batches per epoch / accumulation), an epoch
being every example of the largest stream once (repeats counted; DreamBooth's instance or class images, whichever
are more, as diffusers' DreamBoothDataset), in micro-batches of the whole batch (train batch size x processes), or
with --enable-bucket the bucket batches of an epoch (batches.py).

A method (finetune.py, dreambooth.py, textual_inversion.py, lora.py) checks its settings, then calls `fit` with
a `prepare(model, resolution, device, log)` that says only what differs: where its batches come from, what
trains, what is written.

With --enable-bucket, `fit` gives every example its aspect-ratio bucket (buckets.py), prints a table of them and
writes buckets.json in the run folder; every micro-batch of a stream comes from one bucket (batches.py). When
DreamBooth's instance and class batches are in different buckets, their latents cannot be stacked: the two
halves go through the networks separately, and the loss is the same mse(instance) + w mse(class).
"""
import dataclasses
import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from weights_convert import detect, diffusers, ldm, native
from weights_convert.io import write_safetensors

from .. import distributed, lora
from ..folder_lock import folder_lock
from . import buckets, metadata, report
from ..convert import vocab_files
from ..diffusion import alphas_cumprod_from_betas, scaled_linear_betas
from ..model import load_model, locate
from ..pipeline import Pipeline
from .batches import cache_moments, micro_batches_per_epoch, take
from .loop import atomic_write, atomic_write_folder, train
from .lr import check_schedule
from .settings import DTYPES, TrainSettings, train_config
from .step import concat_draws, draw, example_generator, install, step_loss, text_in_backward, uninstall


@dataclass
class Training:
    """What a method trains, once the model is loaded (its `prepare` returns it); `fit` does the rest."""
    streams: list                          # batches.Stream: one, or DreamBooth's instance stream then class stream
    trainable: dict | None = None          # {name: Parameter} to optimise; None: trainable_parameters
    save: Callable | None = None           # save(model, weights, step, metadata) -> path of what it wrote (step: a
                                           # snapshot's name, None: the final output; metadata: the header's
                                           # {str: str}, metadata.py); None: save_model
    embeddings: object = None              # textual-inversion words (embeddings.Embeddings) captions may use
    substitute: Callable | None = None     # () -> {param name: tensor} computed with in place of the model's own
    prior_loss_weight: float = 1.0         # DreamBooth: the class examples' weight, with a class stream
    text_encoder_prefix: str = "text_encoder."   # the trainable names of the text encoder's group (--text-encoder-lr)
    controlnet: torch.nn.Module | None = None    # a ControlNet whose residuals the U-Net adds (its streams carry
                                                 # hints: batches.take); the validation images use it too
    validation_controls: Callable | None = None  # (prompt number) -> [controlnet.Control] for a validation image


def fit(cfg: TrainSettings, method, prepare, draws=None, log=print):
    """Train what `prepare(model, resolution, device, log)` (a Training) says on cfg.model, write the run folder
    cfg.out, and return the path of the file written. `draws(k, places, latent_shape)` replaces the draws of the
    examples at `places`, their places j in micro-batch k (step.py) (tests).

    The Training: `trainable` {name: Parameter} (default: trainable_parameters, the U-Net and maybe the text
    encoder) and `save(model, weights)`, which writes the result and returns its path (default: save_model, the
    whole model in the official layout); `weights` are the final values of the trainable tensors, EMA ones with
    --use-ema. `embeddings`: textual-inversion words that captions and validation prompts may use.
    `substitute()`, when given, returns {param name: tensor} that the training forward and the validation images
    use in place of the model's own parameters (LoRA: W + (alpha / r) up down from the trainable factors).

    Under torchrun each process joins the job (distributed.setup), trains on its share of every batch
    (batches.py) and rank 0 alone writes files; the others return the same path once it is written. Rank 0 holds
    the run folder's lock (folder_lock.py) throughout: a second run into the same --out is refused."""
    device = distributed.setup(cfg.device)         # under torchrun: this process's device, the job joined
    with folder_lock(cfg.out, "training run") if distributed.is_main() else nullcontext():
        return _fit(cfg, method, prepare, device, draws, log)


def _fit(cfg: TrainSettings, method, prepare, device, draws, log):
    log = distributed.main_only(log)
    model, source = load(cfg, device, log)
    resolution = cfg.resolution or model.config.image_size
    job = prepare(model, resolution, device, log)
    streams, embeddings, substitute = job.streams, job.embeddings, job.substitute
    if cfg.enable_bucket:
        for s in streams:
            s.buckets = buckets.assign(s.examples, resolution, cfg.min_bucket_reso, cfg.max_bucket_reso,
                                       cfg.bucket_reso_steps, cfg.bucket_no_upscale)
            log(f"buckets of {s.root or s.role} ({len(s.examples)} images):")
            for line in buckets.table(s.examples, s.buckets):
                log("  " + line)
    if cfg.num_train_epochs is not None:
        cfg = epochs_to_steps(cfg, streams, log)

    factor = 2 ** (len(model.config.vae.ch_mult) - 1)
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    ckpt_file = os.path.join(ckpt_dir, f"{method}.ckpt.pt")
    if os.path.exists(ckpt_file) and not cfg.resume:
        raise ValueError(f"{cfg.out} already holds a checkpoint ({ckpt_file}); pass --resume to continue it or "
                         f"choose another --out")
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    log_path = os.path.join(cfg.out, "train_log.jsonl")
    args = {"method": method, "processes": world, **dataclasses.asdict(cfg)}
    header = metadata.run_metadata(cfg, method, args, source, model.config, streams, resolution)
    if main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "args.json"), "w") as f:
            json.dump(args, f, indent=1)
        if not cfg.resume and os.path.exists(log_path):
            os.remove(log_path)
        if cfg.enable_bucket:
            buckets.write_json(os.path.join(cfg.out, "buckets.json"),
                               [(s.role, s.root or "", s.examples, s.buckets) for s in streams])
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
            s.cache = cache_moments(model.vae, s, resolution, device)
    set_frozen_dtype(model, cfg, embeddings)
    model.unet.gradient_checkpointing = cfg.gradient_checkpointing
    model.text_encoder.gradient_checkpointing = cfg.gradient_checkpointing and text_in_backward(cfg, embeddings)
    if job.trainable is None:
        trainable = trainable_parameters(model, cfg)
    else:
        trainable = job.trainable
        model.requires_grad_(False)
    n_instance = cfg.train_batch_size if len(streams) > 1 else None
    b, whole = cfg.train_batch_size, cfg.train_batch_size * world      # per process; the whole micro-batch
    # places of this process's examples in micro-batch k: its share of each stream's part (instances, class)
    places = [[part * whole + rank * b + i for i in range(b)] for part in range(len(streams))]

    # LoRA with gradient checkpointing: W' = W + (alpha / r) up down stays in the model from one micro-batch's forward
    # to the next, so that the backward's recomputation sees it too (step.install); taken out for the validation
    # images and at the end
    installed = {}

    def loss_fn(k, _generator):                 # the loop's (seed, k) generator: each example has its own here
        if substitute is not None and cfg.gradient_checkpointing:
            install(model, substitute(), installed)
        generators = {j: example_generator(cfg.seed, k, j) for js in places for j in js}
        parts = [take(s, k, cfg, resolution, [generators[j] for j in js], world, rank)
                 for s, js in zip(streams, places)]                             # instances first, then class
        if len({latent_size(p) for p in parts}) == 1:
            return parts_loss(k, parts, places, generators, n_instance)
        # DreamBooth with the instance and class batches in different buckets: their latents cannot be stacked,
        # so each half goes through the networks on its own; the loss is the same mse(inst) + w mse(class)
        return (parts_loss(k, parts[:1], places[:1], generators, None)
                + job.prior_loss_weight * parts_loss(k, parts[1:], places[1:], generators, None))

    def latent_size(part):
        pixels, moments = part[:2]
        return tuple(moments[0].shape[-2:]) if moments is not None else (pixels.shape[-2] // factor,
                                                                         pixels.shape[-1] // factor)

    def parts_loss(k, parts, places, generators, n_instance):
        """The loss of the examples of `parts` (take's outputs, all of one size) at `places` in micro-batch k."""
        captions = [c for p in parts for c in p[2]]
        hints = torch.cat([p[3] for p in parts]) if job.controlnet is not None else None
        if parts[0][1] is not None:
            pixels, moments = None, tuple(torch.cat([p[1][i] for p in parts]).to(device) for i in (0, 1))
        else:
            pixels, moments = torch.cat([p[0] for p in parts]), None
        mine = [j for js in places for j in js]
        shape = (len(mine), mc.unet.in_channels, *latent_size(parts[0]))
        if draws is not None:
            d = draws(k, mine, shape)
        else:
            d = concat_draws([draw(generators[j], (1, *shape[1:]), mc.num_timesteps, cfg.noise_offset)
                              for j in mine])
        encode = (lambda text: embeddings.tokenize(text, model.tokenizer.encode)) if embeddings else None
        replaced = substitute() if substitute is not None and not installed else None
        return step_loss(model, pixels, moments, model.tokenizer(captions, encode), d, alphas_cumprod, cfg,
                         n_instance, job.prior_loss_weight, embeddings, replaced, job.controlnet, hints)

    tracker = report.Tracker(cfg.report_to if main else "none", cfg.out, cfg.tracker_project_name or method, args)
    captions = [p for p in cfg.validation_prompts for _ in range(cfg.num_validation_images)]    # of the images
    save = job.save or (lambda model, weights, step, meta: save_model(model, weights, cfg, source, step, meta))

    def validate(step):
        if cfg.validation_prompts and step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
            uninstall(model, installed)
            paths = validation_images(model, cfg, resolution, step, cfg.out, device, embeddings, substitute,
                                      job.validation_controls)
            model.train()
            log_entry(log_path, {"step": step, "validation": paths})
            tracker.images(step, captions, paths)

    def snapshot(step, weights):
        paths = save(model, weights, step, metadata.for_file(header, step))
        log_entry(log_path, {"step": step, "snapshot": paths if isinstance(paths, list) else [paths]})
        if cfg.save_last_n is not None:
            remove_old_snapshots(log_path, cfg.save_last_n)

    progress = Progress(cfg.max_train_steps, validate, disable=not main)
    t0 = time.time()
    try:
        try:
            weights = train(model, trainable, loss_fn, train_config(cfg, job.text_encoder_prefix), ckpt_dir, method,
                            on_step=progress, log=progress.bar.write, log_path=log_path, data_parallel=True,
                            report=tracker.log, snapshot=snapshot)
        finally:
            uninstall(model, installed)
        model.requires_grad_(False).eval()
        path = None
        if main:
            path = save(model, weights, None, metadata.for_file(header, cfg.max_train_steps))
            result = {"method": method, "steps": cfg.max_train_steps, "seconds": round(time.time() - t0, 1),
                      "model": path, "last_loss": _last_loss(log_path), "processes": world}
            if cfg.validation_prompts:
                result["validation"] = validation_images(model, cfg, resolution, cfg.max_train_steps, cfg.out,
                                                         device, embeddings, substitute, job.validation_controls)
                tracker.images(cfg.max_train_steps, captions, result["validation"])
            with open(os.path.join(cfg.out, "result.json"), "w") as f:
                json.dump(result, f, indent=1)
            log(f"wrote {path}")
    finally:
        progress.close()                        # an error message then starts on a line of its own
        tracker.close()
    if world > 1:
        box = [path]
        distributed.broadcast_object(box)       # the others wait for the file, and learn its name
        path = box[0]
    return path


def epochs_to_steps(cfg: TrainSettings, streams, log=print):
    """cfg with max_train_steps from --num-train-epochs (module docstring), and a line saying so."""
    world = distributed.world_size()
    per_epoch = max(micro_batches_per_epoch(s, cfg.train_batch_size * world) for s in streams)
    updates = -(-per_epoch // cfg.gradient_accumulation_steps)
    steps = cfg.num_train_epochs * updates
    log(f"--num-train-epochs {cfg.num_train_epochs}: {per_epoch} micro-batches of {cfg.train_batch_size * world} "
        f"per epoch, {updates} optimizer steps each: {steps} steps (--max-train-steps is not used)")
    cfg = dataclasses.replace(cfg, max_train_steps=steps)
    check_schedule(train_config(cfg))              # the warmup, now that the steps are known
    return cfg


def log_entry(log_path, entry):
    with open(log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def remove_old_snapshots(log_path, keep):
    """Delete the snapshots this run wrote (the "snapshot" entries of its log) but the newest `keep`."""
    with open(log_path) as f:
        entries = [e for e in map(json.loads, f) if "snapshot" in e]
    for e in entries[:max(0, len(entries) - keep)]:
        for path in e["snapshot"]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def snapshot_path(path, step):
    """OUT/model.safetensors -> OUT/model-step000400.safetensors (a folder: OUT/model-step000400)."""
    stem, ext = os.path.splitext(path) if path.endswith(".safetensors") else (path, "")
    return f"{stem}-step{step:06d}{ext}"


def load(cfg: TrainSettings, device, log=print):
    """(model on `device` in cfg.dtype (float32 unless a test asks for float64), path of its file)."""
    path, _ = locate(cfg.model, log)
    model = load_model(path, dtype=DTYPES[cfg.dtype], device=device, verbose=False, log=log)
    return model, path


def set_frozen_dtype(model, cfg: TrainSettings, embeddings=None):
    """Under mixed precision the frozen networks are stored in the low precision (as diffusers' scripts do); the
    trained ones stay fp32 (autocast computes in the low precision, AdamW updates fp32 weights), and so does the
    text encoder when textual inversion trains at its input (the words of `embeddings`; diffusers'
    textual_inversion.py). Without mixed precision everything stays in cfg.dtype."""
    dtype = {"no": DTYPES[cfg.dtype], "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    model.vae.to(dtype)
    if not text_in_backward(cfg, embeddings):
        model.text_encoder.to(dtype)


def trainable_parameters(model, cfg: TrainSettings):
    """{name: parameter} of what trains: the U-Net, and the text encoder with --train-text-encoder."""
    model.requires_grad_(False)
    parts = ["unet"] + (["text_encoder"] if cfg.train_text_encoder else [])
    out = {}
    for part in parts:
        module = getattr(model, part)
        module.requires_grad_(True)
        out.update({f"{part}.{k}": p for k, p in module.named_parameters()})
    return out


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


def validation_images(model, cfg: TrainSettings, resolution, step, out, device, embeddings=None, substitute=None,
                      controls=None):
    """--num-validation-images images per --validation-prompt into out/samples/ (seeds --seed, --seed + 1, ...),
    with the textual-inversion words of `embeddings`; returns their paths. substitute(): {param name: tensor} to
    draw them with in place of the model's own parameters (put back after). controls(i): the ControlNets
    (controlnet.Control) of prompt i's images."""
    folder = os.path.join(out, "samples")
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        originals = lora.swap(model, ((k, v.detach()) for k, v in substitute().items())) if substitute else {}
    try:
        pipe = Pipeline(model, device, DTYPES[cfg.dtype], log=lambda *_: None)
        if embeddings is not None:
            pipe.embeddings = embeddings
        paths = []
        n = cfg.num_validation_images
        for i, prompt in enumerate(cfg.validation_prompts):
            images = pipe.generate(prompt, seed=[cfg.seed + j for j in range(n)], width=resolution,
                                   height=resolution, controls=controls(i) if controls else ()).images
            for j, image in enumerate(images):
                paths.append(os.path.join(folder, f"step-{step:06d}-{i}" + (f"-{j}" if n > 1 else "") + ".png"))
                image.save(paths[-1])
    finally:
        lora.restore(model, originals)
    model.unet.to(memory_format=torch.contiguous_format)      # the pipeline may have changed the layouts
    model.vae.to(memory_format=torch.contiguous_format)
    set_frozen_dtype(model, cfg, embeddings)
    return paths


def save_model(model, weights, cfg: TrainSettings, source, step=None, meta=None):
    """Full fine-tuning's output: the trained weights (EMA ones with --use-ema) put into the model, and the whole
    model written as OUT/model.safetensors (or the diffusers folder OUT/model). A snapshot (step given) writes
    OUT/model-step000400.safetensors with the weights as they are at that step, and leaves the model alone.
    `meta`: the run's metadata (metadata.py) for the single file's header."""
    path = os.path.join(cfg.out, "model.safetensors" if cfg.save_format == "single_file" else "model")
    if step is not None:
        path = snapshot_path(path, step)
        write_model(model, source, cfg, path, weights, meta)
        return path
    model.load_state_dict(weights, strict=False)
    write_model(model, source, cfg, path, meta=meta)
    return path


def write_model(model, source, cfg: TrainSettings, path, weights=None, meta=None):
    """The whole model in the official single-file layout (or a diffusers folder): the source file's tensors,
    those not trained included (and the ones minisd does not use, e.g. schedule buffers), in float32 (float64
    for a float64 run: cfg.dtype), with the trained ones replaced by `model`'s (and those by `weights`, when
    given: {model's parameter name: tensor}). A failed write (disk full) leaves no partial file or folder and is one
    line (loop.WriteFailed); the previous file or folder stays whole. `meta` ({str: str}, metadata.py) goes into the
    single file's header; a diffusers folder has no place for it."""
    ckpt = detect.read(source, prediction=model.config.prediction, verbose=False)
    trained = {**model.state_dict(), **(weights or {})}
    tensors = {}
    for name in list(ckpt.state):
        t = ckpt.state.pop(name)
        if name in trained:
            t = trained[name].detach().cpu()
        tensors[name] = t.to(DTYPES[cfg.dtype]) if t.is_floating_point() and not name.startswith("extra.") else t
    if cfg.save_format == "diffusers":
        model_tensors = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
        atomic_write_folder(str(path), lambda tmp: diffusers.write_diffusers(model_tensors, model.config, tmp,
                                                                             vocab_files(model.tokenizer)))
        return
    out = ldm.to_ldm(tensors, model.config)
    header = {**(meta or {}), "minisd_config": native.config_to_json(model.config)}
    atomic_write(str(path), lambda tmp: write_safetensors(tmp, out, header))


def _last_loss(log_path):
    loss = None
    with open(log_path) as f:
        for line in f:
            entry = json.loads(line)
            loss = entry.get("loss", loss)
    return loss
