"""The one training loop for everything minisd trains: the tiny model's VAE, its text encoder + U-Net, full
fine-tuning and DreamBooth (finetune.py, dreambooth.py). What differs between them is data: which parameters
train, which loss is computed on a batch, which batches come in. The loop itself — AdamW, a learning-rate schedule
from lr.py, gradient accumulation, mixed precision, an EMA copy of the weights, atomic checkpoints and exact
resumption — is the same.

Exact resumption works because nothing random is carried from step to step: micro-batch `k` is a pure function
of (seed, k), and so is the noise drawn for it (a generator seeded with (seed, k)). With gradient accumulation
A, optimizer step i is made of micro-batches i*A ... i*A + A - 1; with A = 1, k is the step. A checkpoint
therefore only has to hold the weights, the optimizer state, the loss scaler, the EMA weights and the step number.

Arithmetic, as diffusers' training scripts do it under accelerate: each micro-batch's loss is divided by A before
backward (so A micro-batches of B give the gradient of one batch of A*B), the summed gradient is clipped once, and
the learning-rate schedule counts optimizer steps, not micro-batches.

Data-parallel (`data_parallel=True`, several processes started by torchrun; distributed.py): each process runs
loss_fn on its share of micro-batch k and, once per optimizer step, after the last micro-batch, the gradients of
exactly the `trainable` tensors are averaged over the processes (flattened into buckets, one all-reduce each);
then every process unscales, clips and steps on the same averaged gradient, so the weights stay equal without
ever being sent. This is what torch's DistributedDataParallel computes, written out: DDP would overlap the
all-reduce with the backward pass (it starts on a bucket as soon as its gradients are ready) and needs
`no_sync()` to skip the all-reduces of the first A - 1 micro-batches; here the all-reduce waits for the backward
to end. The cost is that wait, once per optimizer step: a ring all-reduce sends 2 (W - 1) / W x the trainable
bytes over each link, 3.4 GB of fp32 gradients for the SD U-Net, i.e. some tens of ms over NVLink and about half
a second over a 100 Gb/s network between machines (estimates from the link speeds, not measured here;
bench/ddp_scaling.py measures it), paid once per A micro-batches with gradient accumulation. What it buys: the
module is not wrapped, so state-dict names, checkpoints and the EMA are those of one process, and LoRA or Textual
Inversion synchronise their few tensors and nothing else. Rank 0 alone writes the checkpoint and the log; every
process resumes from the same checkpoint file (so --out must be on a file system every machine sees).
"""
import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .. import distributed
from .lr import learning_rate

OPTIMIZERS = ("adamw_fused", "adamw", "adamw_8bit")
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainConfig:
    steps: int                         # optimizer steps
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"      # a name in lr.SCHEDULES (diffusers' names, plus the tiny recipe's "tiny")
    warmup_steps: int = 0
    cycles: float | None = None        # cosine periods (cosine) or restarts (cosine_with_restarts); None: default
    min_lr_ratio: float = 0.0          # floor of the decay, as a fraction of lr
    lr_power: float = 1.0              # polynomial's exponent
    ema_decay: float = 0.999           # 0 disables the EMA copy
    ema_warmup: str = "ldm"            # how the decay warms up: "ldm" (LitEma) or "diffusers" (EMAModel); see EMA
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    grad_accum: int = 1                # micro-batches per optimizer step
    # "adamw_fused": torch's one-kernel AdamW (the tiny recipe and minisd train; ~15% of a tiny-model step on CPU);
    # "adamw": torch.optim.AdamW with its defaults, what diffusers' scripts build (the same update, one operation
    # at a time); "adamw_8bit": bitsandbytes' AdamW8bit (CUDA only, optional)
    optimizer: str = "adamw_fused"
    mixed_precision: str = "no"        # "no", "fp16" (autocast + a loss scaler) or "bf16" (autocast)
    lr_scales: tuple = ()              # ((name prefix, factor), ...): parameter groups at lr * factor
    until: int | None = None           # stop after this many steps of the `steps`-step schedule, with a checkpoint
                                       # there (a run's early checkpoints, e.g. bench/tiny_fid_curve.py); None: all


class EMA:
    """Exponential moving average of parameters: theta_ema <- d * theta_ema + (1 - d) * theta.

    The decay warms up, so early averages are not dominated by the starting weights. At the n-th update (n = 1, 2, ..):
      warmup="ldm"        d = min(decay, (1 + n) / (10 + n))            LDM's LitEma (the tiny recipe)
      warmup="diffusers"  d = 0 at n = 1, then min(decay, n / (9 + n))  diffusers' EMAModel with its defaults
                          (step = n - 1; 0 while step <= 0, else (1 + step) / (10 + step)), what diffusers'
                          train_text_to_image.py --use_ema runs: the first update copies the weights.
    """

    def __init__(self, params: dict, decay, warmup="ldm"):
        if warmup not in ("ldm", "diffusers"):
            raise ValueError(f"unknown EMA warmup {warmup!r}; expected 'ldm' or 'diffusers'")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        # in at least float32 (a float64 run keeps its precision)
        self.shadow = {k: p.detach().clone().to(torch.promote_types(p.dtype, torch.float32))
                       for k, p in params.items()}

    def current_decay(self):
        n = self.num_updates
        if self.warmup == "diffusers":
            return 0.0 if n <= 1 else min(self.decay, n / (9 + n))
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, params: dict):
        self.num_updates += 1
        d = self.current_decay()
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().to(self.shadow[k].dtype), 1 - d)


def atomic_save(obj, path):
    """torch.save to a fresh temporary file in the same folder, then rename over `path`: a reader (or a crash)
    sees the old file or the new one, never half of one, and two writers never share a temporary name."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def param_groups(trainable: dict, cfg: TrainConfig):
    """One optimizer group per learning-rate factor: a parameter takes the factor of the first prefix in
    cfg.lr_scales its name starts with, else 1. Returns [(factor, [params]), ...] in first-seen order."""
    groups = {}
    for name, p in trainable.items():
        factor = next((f for prefix, f in cfg.lr_scales if name.startswith(prefix)), 1.0)
        groups.setdefault(factor, []).append(p)
    return list(groups.items())


def make_optimizer(groups, cfg: TrainConfig):
    """AdamW over the parameter groups (dicts with "params"); the loop sets each group's rate every step."""
    kw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if cfg.optimizer == "adamw_fused":
        return torch.optim.AdamW(groups, fused=True, **kw)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("8-bit AdamW needs bitsandbytes (pip install minisd[adam8bit]), CUDA only") from None
        return bnb.optim.AdamW8bit(groups, **kw)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def check_config(cfg: TrainConfig, device):
    """One-line errors for settings the loop cannot run, before anything starts."""
    if cfg.grad_accum < 1:
        raise ValueError(f"gradient accumulation steps must be >= 1, got {cfg.grad_accum}")
    if cfg.mixed_precision not in PRECISIONS:
        raise ValueError(f"unknown mixed precision {cfg.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.optimizer == "adamw_8bit" and torch.device(device).type != "cuda":
        raise ValueError("8-bit AdamW (bitsandbytes) runs on CUDA only")
    if cfg.checkpoint_every < 1:
        raise ValueError(f"checkpointing steps must be >= 1, got {cfg.checkpoint_every}")


def _truncate_log(path, steps):
    """Keep the lines of a JSON-lines log whose "step" is <= steps (what a resumed run has not redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= steps]
    with open(path, "w") as f:
        f.writelines(kept)


def train(module, trainable: dict, loss_fn, cfg: TrainConfig, out_dir, name, on_step=None, log=print,
          log_path=None, data_parallel=False):
    """Minimise loss_fn(k, generator) over the tensors in `trainable` ({name: nn.Parameter}); k counts
    micro-batches (k = step with no gradient accumulation) and the generator is seeded with (seed, k).

    `module` is the nn.Module the parameters live in (set to train mode). Checkpoints go to
    out_dir/{name}.ckpt.pt (resumed from automatically when present) and the final weights, EMA ones when enabled,
    are returned as a {name: tensor} dict. `on_step(step, loss, lr)` may draw a progress bar or sample grids;
    `loss` is the mean over the step's micro-batches and `lr` the rate the step used. log_path: a JSON-lines file
    that gets {"step", "loss", "lr", "seconds"} after each optimizer step (step counts from 1).

    data_parallel: loss_fn(k, generator) computes this process's share of micro-batch k (equal shares), gradients
    and the logged loss are averaged over the processes, and only rank 0 writes files and calls on_step and log
    (module docstring). With one process it changes nothing.
    """
    device = next(iter(trainable.values())).device
    check_config(cfg, device)
    parallel = data_parallel and distributed.world_size() > 1
    main = not parallel or distributed.is_main()
    if not main:
        on_step, log, log_path = None, lambda *_: None, None
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, f"{name}.ckpt.pt")
    params = list(trainable.values())
    if parallel:
        distributed.broadcast_(params, device)        # rank 0's initial values everywhere (before the EMA copies)
    groups = param_groups(trainable, cfg)
    opt = make_optimizer([{"params": ps} for _, ps in groups], cfg)
    # fp16 gradients underflow: scale the loss up, unscale before clipping, skip steps that overflowed
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    autocast = PRECISIONS[cfg.mixed_precision]
    ema = EMA(trainable, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    start = 0
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(state["params"][k])
        opt.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.shadow = {k: v.to(trainable[k].device) for k, v in state["ema"].items()}
            ema.num_updates = state["ema_updates"]
        start = state["step"]
        log(f"resumed {name} from step {start}")
    if parallel:
        first, last = distributed.agree(start, device)
        if first != last:
            raise ValueError(f"the processes of this job resume from different steps ({first} to {last}) in "
                             f"{out_dir}: --out must be a folder every machine sees")
    if log_path is not None:
        _truncate_log(log_path, start)

    module.train()
    t0 = time.time()
    end = cfg.steps if cfg.until is None else min(cfg.until, cfg.steps)
    for step in range(start, end):
        lr = learning_rate(step, cfg)
        for group, (factor, _) in zip(opt.param_groups, groups):
            group["lr"] = lr * factor
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            k = step * cfg.grad_accum + micro
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
            with torch.autocast(device.type, autocast) if autocast else nullcontext():
                loss = loss_fn(k, generator)
            scaled = loss / cfg.grad_accum if cfg.grad_accum > 1 else loss
            scaler.scale(scaled).backward()
            total += loss.item()
        if parallel:
            distributed.average_gradients(params)     # once per optimizer step, before unscaling and clipping
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema.update(trainable)
        mean_loss = total / cfg.grad_accum
        if parallel:
            mean_loss = distributed.mean(mean_loss, device)
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": mean_loss, "lr": lr,
                                    "seconds": round(time.time() - t0, 3)}) + "\n")
        if on_step is not None:
            on_step(step, mean_loss, lr)
        if main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == end):
            atomic_save({
                "params": {k: p.detach() for k, p in trainable.items()},
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.shadow if ema is not None else {},
                "ema_updates": ema.num_updates if ema is not None else 0,
                "step": step + 1,
            }, ckpt_path)
    module.eval()
    log(f"{name}: {max(end - start, 0)} steps in {time.time() - t0:.0f} s")
    final = ema.shadow if ema is not None else {k: p.detach() for k, p in trainable.items()}
    return {k: v.clone() for k, v in final.items()}
