"""The one training loop for everything minisd trains: the tiny model's VAE, its text encoder + U-Net, and (later)
DreamBooth and Textual Inversion fine-tuning. What differs between them is data: which parameters train, which
loss is computed on a batch, which batches come in. The loop itself — AdamW, a learning-rate schedule from
lr.py, an EMA copy of the weights, atomic checkpoints and exact resumption — is the same.

Exact resumption works because nothing random is carried from step to step: batch `i` is a pure function of
(seed, i), and so is the noise drawn at step `i` (a generator seeded with (seed, i)). A checkpoint therefore only
has to hold the weights, the optimizer state, the EMA weights and the step number.
"""
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from .lr import learning_rate


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    lr_schedule: str = "constant"      # a name in lr.SCHEDULES (diffusers' names, plus the tiny recipe's "tiny")
    warmup_steps: int = 0
    cycles: float | None = None        # cosine periods (cosine) or restarts (cosine_with_restarts); None: default
    min_lr_ratio: float = 0.0          # floor of the decay, as a fraction of lr
    lr_power: float = 1.0              # polynomial's exponent
    ema_decay: float = 0.999           # 0 disables the EMA copy
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0


class EMA:
    """Exponential moving average of parameters: theta_ema <- d * theta_ema + (1 - d) * theta.

    The decay warms up as min(d, (1 + n) / (10 + n)) (the LDM LitEma rule), so early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, params: dict, decay):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)


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


def train(module, trainable: dict, loss_fn, cfg: TrainConfig, out_dir, name, on_step=None, log=print):
    """Minimise loss_fn(step, generator) over the tensors in `trainable` ({name: nn.Parameter}).

    `module` is the nn.Module the parameters live in (set to train mode). Checkpoints go to
    out_dir/{name}.ckpt.pt (resumed from automatically when present) and the final weights, EMA ones when enabled,
    are returned as a {name: tensor} dict. `on_step(step, loss, lr)` may draw a progress bar or sample grids.
    """
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, f"{name}.ckpt.pt")
    params = list(trainable.values())
    # fused: one kernel over all tensors instead of a dozen passes each (~15% of a tiny-model step on CPU)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    ema = EMA(trainable, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = 0
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(state["params"][k])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow = {k: v.to(trainable[k].device) for k, v in state["ema"].items()}
            ema.num_updates = state["ema_updates"]
        start = state["step"]
        log(f"resumed {name} from step {start}")

    module.train()
    t0 = time.time()
    for step in range(start, cfg.steps):
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        loss = loss_fn(step, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(trainable)
        if on_step is not None:
            on_step(step, loss.item(), lr)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            atomic_save({
                "params": {k: p.detach() for k, p in trainable.items()},
                "optimizer": opt.state_dict(),
                "ema": ema.shadow if ema is not None else {},
                "ema_updates": ema.num_updates if ema is not None else 0,
                "step": step + 1,
            }, ckpt_path)
    module.eval()
    log(f"{name}: {cfg.steps - start} steps in {time.time() - t0:.0f} s")
    final = ema.shadow if ema is not None else {k: p.detach() for k, p in trainable.items()}
    return {k: v.clone() for k, v in final.items()}
