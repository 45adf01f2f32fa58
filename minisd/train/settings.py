"""The settings every training method shares (the `minisd train` flags, diffusers' names), their checks, and the
loop's settings they give. Each method's own config adds its fields to TrainSettings and sets its own defaults:
finetune.FinetuneConfig, dreambooth.DreamBoothConfig, textual_inversion.TextualInversionConfig, lora.LoRAConfig."""
import dataclasses
import typing
from dataclasses import dataclass

import torch

from .. import distributed
from . import buckets, captions, report
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
    num_validation_images: int = 1           # per prompt, seeds seed, seed + 1, ... (diffusers' flag)
    device: str = "auto"
    resume: bool = False
    save_format: str = "single_file"
    scale_lr: bool = False                   # learning rate x batch per process x accumulation x processes
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0              # 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_power: float = 1.0                    # the polynomial schedule's exponent
    unet_lr: float | None = None             # kohya's two rates (None: learning_rate): the U-Net's (or its LoRA's) ...
    text_encoder_lr: float | None = None     # ... and the text encoder's, as a second parameter group
    num_train_epochs: int | None = None      # instead of max_train_steps: steps from the data's size (diffusers)
    report_to: str = "none"                  # report.TRACKERS: live curves beside train_log.jsonl
    tracker_project_name: str | None = None  # None: the method's name
    save_model_steps: int | None = None      # a snapshot of the output (OUT/model-step000400.safetensors) every N
    save_last_n: int | None = None           # ... keeping the newest N of them (None: all)
    checkpoints_total_limit: int | None = None   # resumable checkpoints kept (None: the latest only)
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
    check_types(cfg)
    if not cfg.out:
        raise ValueError("the run needs --out DIR (its folder)")
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "validation_steps", "num_validation_images", "num_train_epochs", "save_model_steps", "save_last_n",
                 "checkpoints_total_limit"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.save_last_n is not None and cfg.save_model_steps is None:
        raise ValueError("--save-last-n keeps the newest snapshots of --save-model-steps N: give that too")
    report.check(cfg.report_to)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("adam_weight_decay", "max_grad_norm"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.adam_epsilon > 0:
        raise ValueError(f"--adam-epsilon must be > 0, got {cfg.adam_epsilon}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"--learning-rate must be > 0, got {cfg.learning_rate}")
    if cfg.unet_lr is not None and not cfg.unet_lr > 0:
        raise ValueError(f"--unet-lr must be > 0, got {cfg.unet_lr}")
    if cfg.text_encoder_lr is not None:
        if not cfg.train_text_encoder:
            raise ValueError("--text-encoder-lr is the rate of the text encoder, which trains only with "
                             "--train-text-encoder")
        if not cfg.text_encoder_lr >= 0:
            raise ValueError(f"--text-encoder-lr must be >= 0, got {cfg.text_encoder_lr}")
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


def check_types(cfg):
    """Each field of the config of the type it is declared with (an int is a fine float; a bool is not an int): a
    config built in Python (minisd.train.run) gets the checks argparse's `type=` gives the command line."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        declared = typing.get_args(field.type) or (field.type,)          # `int | None` -> (int, NoneType)
        allowed = declared + ((int,) if float in declared else ())
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in declared):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in declared)
            raise ValueError(f"{type(cfg).__name__}.{field.name} must be {names}, got {value!r}")


def folder_options(cfg: TrainSettings):
    """The keyword arguments of data.find_examples that the settings give."""
    return dict(caption_extension=cfg.caption_extension, skip_bad_images=cfg.skip_bad_images)


def train_config(cfg: TrainSettings, text_encoder_prefix="text_encoder."):
    """The loop's settings for this run; --scale-lr multiplies the rate by the examples of an optimizer step
    (batch per process x accumulation x processes), as diffusers' --scale_lr does.

    Two learning rates (kohya's --unet-lr and --text-encoder-lr, each --learning-rate unless given): the loop's
    rate is the U-Net's, and the text encoder's parameters (names starting with `text_encoder_prefix`) form a
    group at lr x text_encoder_lr / unet_lr, so each group follows the schedule from its own rate, as LambdaLR
    does with two groups; its rate is logged as lr/text_encoder."""
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * distributed.world_size() if cfg.scale_lr else 1
    unet_lr = cfg.learning_rate if cfg.unet_lr is None else cfg.unet_lr
    text_lr = unet_lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr
    return TrainConfig(
        steps=cfg.max_train_steps, lr=unet_lr * scale, weight_decay=cfg.adam_weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2), adam_eps=cfg.adam_epsilon, lr_power=cfg.lr_power,
        lr_schedule=cfg.lr_scheduler, warmup_steps=cfg.lr_warmup_steps, cycles=cfg.lr_cycles,
        min_lr_ratio=cfg.lr_min_ratio, ema_decay=cfg.ema_decay if cfg.use_ema else 0.0, ema_warmup="diffusers",
        grad_clip=cfg.max_grad_norm, checkpoint_every=cfg.checkpointing_steps, seed=cfg.seed,
        grad_accum=cfg.gradient_accumulation_steps,
        lr_scales=((text_encoder_prefix, text_lr / unet_lr, "text_encoder"),) if cfg.train_text_encoder else (),
        snapshot_every=cfg.save_model_steps or 0, keep_checkpoints=cfg.checkpoints_total_limit or 1,
        # torch's AdamW, in its one-kernel ("fused") form: the same update as the for-loop form diffusers' scripts
        # get on the CPU (the parity tests compare the two, 1e-5), in one pass over the weights and Adam's moments
        # instead of about ten; over SD1.5's U-Net on the CPU, 0.7-1.1 s against the for-loop's 4.2-5.4 s (4-8x) with
        # either AVX-512 or AVX2 kernels (bench/adamw.py, bench/RESULTS.md)
        optimizer="adamw_8bit" if cfg.use_8bit_adam else "adamw_fused", mixed_precision=cfg.mixed_precision)
