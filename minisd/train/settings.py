"""The settings every training method shares (the `minisd train` flags, diffusers' names), their checks, and the
loop's settings they give. Each method's own config adds its fields to TrainSettings and sets its own defaults:
finetune.FinetuneConfig, dreambooth.DreamBoothConfig, textual_inversion.TextualInversionConfig, lora.LoRAConfig."""
from dataclasses import dataclass

import torch

from .. import distributed
from . import buckets, captions
from .data import check_caption_extension, check_resolution
from .loop import TrainConfig
from .lr import check_schedule

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAVE_FORMATS = ("single_file", "diffusers")
# the weights' dtype, and the step's: float64 is a test tool (the parity tests run both sides without float32
# rounding, which AdamW amplifies where a gradient is near zero), not a command-line flag
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainSettings:
    """What every run sets, whatever it trains: the model, the batches, the optimizer and schedule, the run folder."""
    out: str
    model: str | None = None                 # what `minisd generate --model` takes; None = the tiny model
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
    # the data folders (data.py) and kohya-ss/sd-scripts' options, with kohya's names and defaults
    caption_extension: str = ".txt"          # NAME.txt beside NAME.png (kohya's default is .caption)
    skip_bad_images: bool = False            # an image that cannot be decoded: a counted note, not an error
    enable_bucket: bool = False              # aspect-ratio buckets (buckets.py)
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_dropout_rate: float = 0.0        # caption tricks (captions.py)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_tag_dropout_rate: float = 0.0


def check(cfg: TrainSettings, save_formats=SAVE_FORMATS):
    """One-line errors for settings that cannot run, before any model is loaded (each method adds its own)."""
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
    check_caption_extension(cfg.caption_extension)
    captions.check(cfg)
    if cfg.enable_bucket and cfg.resolution is not None:      # else checked once the model's size is known
        buckets.check(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)


def folder_options(cfg: TrainSettings):
    """The keyword arguments of data.find_examples that the settings give."""
    return dict(caption_extension=cfg.caption_extension, skip_bad_images=cfg.skip_bad_images)


def train_config(cfg: TrainSettings):
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
