r"""LoRA training (Hu et al. 2021): teach a model something by training a small low-rank change to its weights.

    minisd train lora --data DIR --out DIR [--rank 4] [--alpha 4] [--train-text-encoder]
                      [--lora-targets default|attention] [--save-format kohya|diffusers]
    minisd train lora --instance-dir ring/ --instance-prompt "a red sks circle on a white background" --out DIR \
                      [--class-prompt "a red circle on a white background" --class-dir circles/]   (DreamBooth-LoRA)

What trains. Every layer W (out x in) that minisd.lora.targets names (default: kohya's set, every Linear and 1x1
conv inside the U-Net's transformer blocks, and with --train-text-encoder the text encoder's attention and MLP;
"attention": diffusers' to_q/to_k/to_v/to_out.0 and the text q/k/v/out) gets two factors, down (r x in) and
up (out x r), and computes with

    W' = W + (alpha / r) up down                      (Hu et al. 2021, eq. 3; alpha / r as kohya and peft scale it)

W itself never changes: only the factors are in the optimizer. They start as kohya's LoRAModule and peft do:
down ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), up = 0, so W' = W at step 0 (the base model,
exactly) and the first step's gradient reaches only up (down's, (alpha / r) up^T dL/dW', is still zero). The
rest is fine-tuning (fit.fit: the same loss, batches, schedules, checkpoints, resume, log, validation samples
drawn with the LoRA merged in); with --instance-dir it is DreamBooth's data, class images and prior preservation
(dreambooth.py) with LoRA's trainable set.

How W' enters the forward. Each micro-batch computes W' for every targeted layer from the current factors, and
the U-Net and text encoder run with W' in place of W through torch.func.functional_call: the networks' own code,
with no hooks, no wrapper modules, no patched layers. Autograd carries dL/dW' back to the factors:
dL/dup = (alpha / r) dL/dW' down^T, dL/ddown = (alpha / r) up^T dL/dW'. The text encoder's packed q/k/v projection
(in_proj_weight, q, k, v rows stacked) gets its three LoRAs as three row blocks of one delta, from minisd.lora's
layer table, as at inference. The cost, against the branch kohya and peft add to each layer
(y = W x + (alpha / r) up (down x)): W' and dL/dW' exist at full size for the targeted layers during a step
(SD1.5, default targets: 267M U-Net weights, ~1 GB each in fp32) where the branch keeps only r-wide activations,
and one (out x r)(r x in) product per layer per step (cheap next to the convolutions). What LoRA saves over full
fine-tuning is still there: no AdamW moments for the base weights, and a file of megabytes. With
--gradient-checkpointing, functional_call cannot be used: the blocks recompute their forward in the backward pass,
after functional_call has put W back, and would recompute with W; so W' is put into the model itself for the
micro-batch (train/step.py's install), where the recomputation reads it too, and taken out after training (and for
the validation images). The gradients are those of the run without checkpointing (tests/test_train_runs.py).
Under --mixed-precision the base weights stay float32 (autocast computes in the low precision); the factors are
float32 always (float64 in a float64 run, cfg.dtype: the parity tests).

The output: OUT/<name of OUT>.safetensors in kohya's / A1111's layout (lora_unet_..._to_q.lora_down.weight,
.lora_up.weight, .alpha; lora_te_... for the text encoder), what A1111's <lora:NAME:0.8>, ComfyUI, diffusers'
load_lora_weights and `minisd generate --lora` read; --save-format diffusers writes diffusers' / peft's keys
(unet....to_q.lora_A.weight, lora_B with alpha / r folded in) as OUT/pytorch_lora_weights.safetensors, the name
diffusers' load_lora_weights(OUT) looks for.
"""
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from .. import lora
from . import dreambooth
from .batches import Stream
from .hf_dataset import DatasetSettings, check_source, training_examples
from .loop import atomic_write
from .fit import Training, fit, snapshot_path
from .settings import DTYPES, check

SAVE_FORMATS = ("kohya", "diffusers")


@dataclass(frozen=True)
class LoRAConfig(DatasetSettings, dreambooth.DreamBoothConfig):
    """A LoRA run: the shared settings, fine-tuning's --data (or --dataset-name) or DreamBooth's instance (and
    class) settings, and the LoRA's own."""
    data: str | None = None                  # captioned images, as for finetune (or DreamBooth's --instance-dir)
    rank: int = 4                            # r
    alpha: float = 4.0                       # the change is scaled by alpha / r
    lora_targets: str = "default"            # minisd.lora.targets: "default" (kohya's) or "attention"
    learning_rate: float = 1e-4              # diffusers' train_text_to_image_lora.py and train_dreambooth_lora.py
    save_format: str = "kohya"               # SAVE_FORMATS


config = LoRAConfig                          # what `minisd train lora` fills from its flags (cli/train.py)


def initial_factors(config, cfg: LoRAConfig, generator):
    """{kohya name: lora.Factors} at their starting values (module docstring): down kaiming-uniform (a = sqrt(5)),
    up zero, for the U-Net's targets and, with --train-text-encoder, the text encoder's; in the layer table's
    order, each down drawn from `generator` in turn. A 1x1 conv's factors are 4-D (r, in, 1, 1), (out, r, 1, 1)."""
    out = {}
    for name, layer in lora.targets(config, cfg.lora_targets).items():
        if layer.param.startswith("text_encoder.") and not cfg.train_text_encoder:
            continue
        out_features, in_features, *kernel = layer.shape
        down = torch.empty(cfg.rank, in_features, *kernel)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)    # fan_in = in * kh * kw
        up = torch.zeros(out_features, cfg.rank, *[1] * len(kernel))
        out[name] = lora.Factors(down, up, cfg.alpha)
    return out


def merged_weights(model, factors):
    """{param name: W + (alpha / r) up down} for the parameters `factors` ({kohya name: Factors}) change,
    differentiable in the factors: lora.merged, the merge inference uses, with the factors being trained."""
    training = lora.LoRA(path="", name="training", layers=factors)
    return dict(lora.merged(model.config, model.get_parameter, [(training, 1.0, 1.0)]))


def check_lora(cfg: LoRAConfig):
    """One-line errors for the LoRA's own settings and which data is used, before any model is loaded."""
    check(cfg, SAVE_FORMATS)
    if cfg.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {cfg.rank}")
    if not cfg.alpha > 0:
        raise ValueError(f"--alpha must be > 0, got {cfg.alpha}")
    if cfg.lora_targets not in ("default", "attention"):
        raise ValueError(f"unknown --lora-targets {cfg.lora_targets!r}; choose default or attention")
    check_source(cfg, "train lora", others=[("--instance-dir", cfg.instance_dir)])
    if cfg.instance_dir:
        dreambooth.check_instances(cfg)
    elif (cfg.instance_prompt or cfg.class_prompt or cfg.class_dir or cfg.reg_data_dir
          or cfg.with_prior_preservation):
        raise ValueError("--instance-prompt, --class-prompt, --class-dir, --reg-data-dir and "
                         "--with-prior-preservation go with --instance-dir")


def run(cfg: LoRAConfig, draws=None, log=print):
    """Train a LoRA on cfg.data (or DreamBooth-LoRA on cfg.instance_dir) into cfg.out; returns the file's path."""
    check_lora(cfg)

    def prepare(model, resolution, device, log):
        if cfg.instance_dir:
            streams = dreambooth.instance_streams(cfg, model, resolution, device, log)
        else:
            streams = [Stream(training_examples(cfg, resolution, log=log), stream=0, root=cfg.data)]
            log(f"LoRA on {len(streams[0].examples)} images of {cfg.dataset_name or cfg.data} at {resolution} px")
        start = initial_factors(model.config, cfg, torch.Generator().manual_seed(cfg.seed))
        params = {}              # "{kohya name}.down" / ".up" -> the Parameter AdamW trains
        for name, f in start.items():        # drawn in float32 whatever cfg.dtype: the same start in a float64 run
            params[f"{name}.down"] = nn.Parameter(f.down.to(device, DTYPES[cfg.dtype]))
            params[f"{name}.up"] = nn.Parameter(f.up.to(device, DTYPES[cfg.dtype]))
        factors = {name: lora.Factors(params[f"{name}.down"], params[f"{name}.up"], cfg.alpha) for name in start}
        log(f"LoRA rank {cfg.rank}, alpha {cfg.alpha:g} on {len(factors)} layers ({cfg.lora_targets} targets): "
            f"{sum(p.numel() for p in params.values()):,} trainable numbers")

        def save(model, weights, step=None, meta=None):
            """The LoRA file; a snapshot (step given) is written from `weights` alone, the final one also puts
            them into the factors (the final validation images use them: EMA values with --use-ema)."""
            if step is None:
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(weights[name])
            final = {name: lora.Factors(weights[f"{name}.down"].detach().cpu(), weights[f"{name}.up"].detach().cpu(),
                                        f.alpha) for name, f in factors.items()}
            return write(final, model.config, cfg, step, meta)

        return Training(streams, trainable=params, save=save, substitute=lambda: merged_weights(model, factors),
                        prior_loss_weight=cfg.prior_loss_weight, text_encoder_prefix="lora_te_")

    return fit(cfg, "lora", prepare, draws, log)


def write(factors, config, cfg: LoRAConfig, step=None, meta=None):
    """The LoRA file of the run (module docstring), written to a temporary name and renamed into place; a
    snapshot's name ends in -step000400 (step given). `meta`: the run's metadata (metadata.py) for its header,
    with kohya's network keys added."""
    if cfg.save_format == "diffusers":
        path = os.path.join(cfg.out, "pytorch_lora_weights.safetensors")
    else:
        path = os.path.join(cfg.out, (os.path.basename(os.path.normpath(cfg.out)) or "lora") + ".safetensors")
    if step is not None:
        path = snapshot_path(path, step)
    # kohya's ss_ metadata (the run's, metadata.py, and the network's): what A1111's and ComfyUI's LoRA browsers show
    header = {**(meta or {}), "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
              "ss_network_alpha": f"{cfg.alpha:g}",
              "ss_training_comment": f"minisd train lora ({cfg.lora_targets} targets)"}
    if cfg.save_format == "diffusers":
        atomic_write(path, lambda tmp: lora.save_diffusers(tmp, factors, config, metadata=header))
    else:
        atomic_write(path, lambda tmp: lora.save_kohya(tmp, factors, header))
    return path

