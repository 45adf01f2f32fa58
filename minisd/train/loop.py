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

What a run does when something goes wrong (a cluster's run is stopped, a step diverges, the disk fills):
  - SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption; torchrun passes SIGTERM on to its
    workers), or SIGINT (Ctrl-C; a second Ctrl-C stops at once): the step under way finishes, a checkpoint is written, and `Stopped` is raised, which the command
    line turns into one line naming --resume and an exit status of 128 + the signal's number. Under torchrun the
    processes agree on the stop once per step (one small all-reduce), so all of them stop after the same step,
    whichever got the signal. Resumed, the run continues as if never stopped (the module's first paragraph).
  - A loss that is not finite stops the run before the optimizer uses it (`NonFiniteLoss`, naming the step and
    the last checkpoint, which is whole); under fp16 the loss scaler's own skipped steps (an overflow in the
    scaled gradients) are normal, and only logged ("skipped": true).
  - A checkpoint that cannot be written (disk full) is one line (`WriteFailed`); the temporary file is removed
    and the previous checkpoint is untouched (atomic_write).
"""
import glob
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from weights_convert.io import temp_file_beside, umask

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
    lr_scales: tuple = ()              # ((name prefix, factor[, label]), ...): parameter groups at lr * factor;
                                       # a label logs the group's rate as "lr/<label>"
    until: int | None = None           # stop after this many steps of the `steps`-step schedule, with a checkpoint
                                       # there (a run's early checkpoints, e.g. bench/tiny_fid_curve.py); None: all
    snapshot_every: int = 0            # call train's `snapshot` every this many steps (0: never)
    keep_checkpoints: int = 1          # checkpoints kept: the latest, NAME.ckpt.pt, and K - 1 older, NAME-stepS.ckpt.pt


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


class WriteFailed(ValueError):
    """A file could not be written (a full disk, no permission); the previous file of that name is untouched."""


class NonFiniteLoss(ValueError):
    """A step's loss was inf or NaN: the run stopped before the optimizer used it."""


class Stopped(Exception):
    """The run stopped on a signal (SIGTERM, SIGUSR1, SIGINT) after a whole step and a checkpoint."""

    def __init__(self, signum, step, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; the checkpoint {checkpoint} "
                         f"is written")      # how to continue depends on the command (cli/train.py)


def atomic_write(path, write):
    """write(tmp) into a fresh temporary file in the same folder, then rename it over `path`: a reader (or a crash)
    sees the old file or the new one, never half of one, and two writers never share a temporary name. A failed
    write (OSError: disk full, ...) removes the temporary file and raises WriteFailed: `path` is as it was."""
    fd, tmp = temp_file_beside(path, prefix="tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise WriteFailed(f"could not write {path}: {e.strerror or e}; the previous file is unchanged") from None
        raise


def atomic_write_folder(path, write):
    """atomic_write for a folder (a diffusers model folder): write(tmp) into a fresh temporary folder beside `path`,
    then put it in `path`'s place. A failed write (OSError) removes the temporary folder and raises WriteFailed:
    the previous folder is whole. A folder cannot be renamed over a non-empty one, so the previous one is first
    moved aside (into .NAME.old.XXXX beside it, deleted once the new one is in place): a crash between the two
    renames leaves it there, whole, and `path` absent, never half a model."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.new.")
    os.chmod(tmp, 0o777 & ~umask())                   # mkdtemp's 0700 is for secrets; a model folder is not
    try:
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteFailed(f"could not write {path}: {e.strerror or e}; the previous folder is unchanged") from None
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old.")
        os.replace(path, os.path.join(old, name))
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def stop_signals(signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
    """While open, SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) set box[0] to the signal's number instead of ending the
    process (only in the main thread, where Python can install handlers); the previous handlers are put back
    after. A second Ctrl-C is the user insisting: KeyboardInterrupt at once, the last checkpoint as it was."""
    box = [0]
    if threading.current_thread() is not threading.main_thread():
        yield box
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and box[0] == signal.SIGINT:
            raise KeyboardInterrupt
        box[0] = signum
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield box
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def keep_newest_checkpoints(ckpt_path, step, keep):
    """Before `ckpt_path` (the checkpoint of step `step`) is replaced: keep it as NAME-stepSSSSSS.ckpt.pt (a hard
    link, or a copy where links are not possible) when `keep` > 1, and delete this run's older ones beyond
    keep - 1 (only files of that name pattern in the checkpoint folder)."""
    stem = ckpt_path[:-len(".ckpt.pt")]
    if keep > 1 and os.path.exists(ckpt_path):
        older = f"{stem}-step{step:06d}.ckpt.pt"
        if os.path.exists(older):
            os.remove(older)
        try:
            os.link(ckpt_path, older)
        except OSError:
            shutil.copyfile(ckpt_path, older)
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"-step(\d+)\.ckpt\.pt$")
    found = sorted((int(m.group(1)), f) for f in glob.glob(glob.escape(stem) + "-step*.ckpt.pt")
                   if (m := pattern.match(os.path.basename(f))))
    for _, f in found[:max(0, len(found) - (keep - 1))]:
        os.remove(f)


def param_groups(trainable: dict, cfg: TrainConfig):
    """One optimizer group per learning-rate factor: a parameter takes the factor of the first prefix in
    cfg.lr_scales its name starts with, else 1. Returns [(factor, [params]), ...] in first-seen order."""
    groups = {}
    for name, p in trainable.items():
        factor = next((f for prefix, f, *_ in cfg.lr_scales if name.startswith(prefix)), 1.0)
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
    if cfg.keep_checkpoints < 1:
        raise ValueError(f"the checkpoints kept must be >= 1, got {cfg.keep_checkpoints}")


def _truncate_log(path, steps):
    """Keep the lines of a JSON-lines log whose "step" is <= steps (what a resumed run has not redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= steps]
    with open(path, "w") as f:
        f.writelines(kept)


def train(module, trainable: dict, loss_fn, cfg: TrainConfig, out_dir, name, on_step=None, log=print,
          log_path=None, data_parallel=False, report=None, snapshot=None):
    """Minimise loss_fn(k, generator) over the tensors in `trainable` ({name: nn.Parameter}); k counts
    micro-batches (k = step with no gradient accumulation) and the generator is seeded with (seed, k).

    `module` is the nn.Module the parameters live in (set to train mode). Checkpoints go to
    out_dir/{name}.ckpt.pt (resumed from automatically when present) and the final weights, EMA ones when enabled,
    are returned as a {name: tensor} dict. `on_step(step, loss, lr)` may draw a progress bar or sample grids;
    `loss` is the mean over the step's micro-batches and `lr` the rate the step used. log_path: a JSON-lines file
    that gets {"step", "loss", "lr", "seconds"} after each optimizer step (step counts from 1), with "lr/<label>"
    for each labelled group of cfg.lr_scales and "skipped": true for a step fp16's loss scaler skipped;
    report(entry) gets the same dict (a tracker: train/report.py). snapshot(step, weights) is called every
    cfg.snapshot_every steps with the weights a run would end with there (EMA ones when enabled; not to be
    modified).

    data_parallel: loss_fn(k, generator) computes this process's share of micro-batch k (equal shares), gradients
    and the logged loss are averaged over the processes, and only rank 0 writes files and calls on_step, log,
    report and snapshot (module docstring). With one process it changes nothing.

    Raises Stopped after a SIGTERM / SIGUSR1, NonFiniteLoss, WriteFailed (module docstring).
    """
    device = next(iter(trainable.values())).device
    check_config(cfg, device)
    parallel = data_parallel and distributed.world_size() > 1
    main = not parallel or distributed.is_main()
    if not main:
        on_step, log, log_path, report, snapshot = None, lambda *_: None, None, None, None
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
    start, saved = 0, None                            # saved: the step of the checkpoint on disk
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
        start = saved = state["step"]
        log(f"resumed {name} from step {start}")
    if parallel:
        first, last = distributed.agree(start, device)
        if first != last:
            raise ValueError(f"the processes of this job resume from different steps ({first} to {last}) in "
                             f"{out_dir}: --out must be a folder every machine sees")
    if log_path is not None:
        _truncate_log(log_path, start)

    def current():
        return ema.shadow if ema is not None else {k: p.detach() for k, p in trainable.items()}

    def save_checkpoint(step):
        nonlocal saved
        if main:
            state = {"params": {k: p.detach() for k, p in trainable.items()}, "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "ema": ema.shadow if ema is not None else {},
                     "ema_updates": ema.num_updates if ema is not None else 0, "step": step}
            if saved is not None:
                keep_newest_checkpoints(ckpt_path, saved, cfg.keep_checkpoints)
            atomic_save(state, ckpt_path)
            log(f"checkpoint of step {step} written: {ckpt_path}")
        saved = step

    module.train()
    t0 = time.time()
    end = cfg.steps if cfg.until is None else min(cfg.until, cfg.steps)
    with stop_signals() as stop:
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
            mean_loss = total / cfg.grad_accum
            if parallel:
                mean_loss = distributed.mean(mean_loss, device)
                distributed.average_gradients(params)     # once per optimizer step, before unscaling and clipping
            if not math.isfinite(mean_loss) and not scaler.is_enabled():      # every process has the same mean
                where = (f"the last checkpoint, {ckpt_path}, is of step {saved}" if saved is not None
                         else "no checkpoint was written yet")
                raise NonFiniteLoss(f"the loss of step {step + 1} is {mean_loss}: training stopped before the "
                                    f"optimizer used it; {where}")
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(opt)
            scaler.update()
            # the scaler halves its scale exactly when it skipped the step (inf or NaN in the scaled gradients)
            skipped = scale is not None and scaler.get_scale() < scale
            if ema is not None:                           # as diffusers: skipped steps too
                ema.update(trainable)
            entry = {"step": step + 1, "loss": mean_loss, "lr": lr}
            entry.update({f"lr/{label[0]}": lr * factor for _, factor, *label in cfg.lr_scales if label})
            entry["seconds"] = round(time.time() - t0, 3)
            if skipped:
                entry["skipped"] = True
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if report is not None:
                report(entry)
            if on_step is not None:
                on_step(step, mean_loss, lr)
            if snapshot is not None and cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
                snapshot(step + 1, current())
            signum = stop[0]
            if parallel:                                  # all stop after the same step, whichever got the signal
                signum = distributed.agree(signum, device)[1]
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end or signum:
                save_checkpoint(step + 1)
            if signum and step + 1 < end:
                if parallel:
                    distributed.barrier()                 # no process leaves before rank 0 has written the checkpoint
                raise Stopped(signum, step + 1, ckpt_path)
    module.eval()
    log(f"{name}: {max(end - start, 0)} steps in {time.time() - t0:.0f} s")
    return {k: v.clone() for k, v in current().items()}
