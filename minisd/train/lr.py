"""Learning-rate schedules: the rate the optimizer uses at step k (k = 0, 1, ..., steps - 1).

The names and formulas are diffusers' (`diffusers.optimization.get_scheduler`, itself transformers'), so
`--lr-scheduler cosine` means here what it means for train_dreambooth.py. diffusers wraps each formula in a
LambdaLR, which sets the rate to `lr * lambda(k)` before the k-th optimizer step; each function below returns
that product, computed in the same order, so the rates are the same floats. T is `steps`, W is `warmup_steps`,
and p = (k - W) / (T - W) is the progress through the decay, 0 -> 1.

Two additions: `min_ratio`, a floor at `min_ratio * lr` that the decay is rescaled onto (transformers'
`cosine_with_min_lr`, diffusers' `f_min` for linear, polynomial's `lr_end`; 0 gives diffusers exactly, which for
polynomial is its fixed end rate 1e-7), and `tiny`, the schedule the shipped tiny model was trained with, whose
warmup runs one step ahead of diffusers'.
"""
import math

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "tiny")

# The knobs each schedule reads; setting one it ignores is an error rather than a silent no-op (diffusers, for
# one, drops `--lr_num_cycles` for `cosine` and `--lr_warmup_steps` for `constant` without a word).
USES = {
    "constant": (),
    "constant_with_warmup": ("warmup_steps",),
    "linear": ("warmup_steps", "min_lr_ratio"),
    "cosine": ("warmup_steps", "cycles", "min_lr_ratio"),
    "cosine_with_restarts": ("warmup_steps", "cycles", "min_lr_ratio"),
    "polynomial": ("warmup_steps", "min_lr_ratio", "lr_power"),
    "tiny": ("warmup_steps", "cycles", "min_lr_ratio"),
}
UNSET = {"warmup_steps": 0, "cycles": None, "min_lr_ratio": 0.0, "lr_power": 1.0}
LR_END = 1e-7       # diffusers' polynomial end rate (absolute); its scripts never change it


def warmup(step, warmup_steps):
    """k / max(1, W): the first step trains at rate 0 and step W reaches the full rate (diffusers)."""
    return step / max(1, warmup_steps)


def progress(step, steps, warmup_steps):
    """p = (k - W) / max(1, T - W): 0 at the end of warmup, 1 at step T."""
    return (step - warmup_steps) / max(1, steps - warmup_steps)


def floored(decay, min_ratio):
    """Rescale a decay in [0, 1] onto [min_ratio, 1] (transformers' min_lr_rate; 0 leaves it unchanged)."""
    return max(0.0, decay * (1 - min_ratio) + min_ratio)


def constant(step, lr):
    """lr at every step."""
    return lr


def constant_with_warmup(step, lr, warmup_steps):
    """lr * k / W during warmup, then lr."""
    return lr * (warmup(step, warmup_steps) if step < warmup_steps else 1.0)


def linear(step, lr, steps, warmup_steps, min_ratio=0.0):
    """lr * (1 - p) after warmup, down to 0 at step T and 0 after it (floored: diffusers' f_min = min_ratio)."""
    if step < warmup_steps:
        return lr * warmup(step, warmup_steps)
    return lr * floored(max(0.0, (steps - step) / max(1, steps - warmup_steps)), min_ratio)


def cosine(step, lr, steps, warmup_steps, cycles=0.5, min_ratio=0.0):
    """lr * 0.5 (1 + cos(2 pi c p)) after warmup: c is the number of cosine periods, so the default c = 0.5 is
    one half-wave from lr down to 0 at step T; whole c end back at the top (use 1.5, 2.5 ... to end at 0)."""
    if step < warmup_steps:
        return lr * warmup(step, warmup_steps)
    p = progress(step, steps, warmup_steps)
    return lr * floored(0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * p)), min_ratio)


def cosine_with_restarts(step, lr, steps, warmup_steps, cycles=1, min_ratio=0.0):
    """SGDR (Loshchilov & Hutter 2017, eq. 5) with T_i = (T - W) / c: c half-waves from lr down to the floor,
    each restarting at the top: lr * 0.5 (1 + cos(pi ((c p) mod 1))); the floor once p >= 1."""
    if step < warmup_steps:
        return lr * warmup(step, warmup_steps)
    p = progress(step, steps, warmup_steps)
    if p >= 1.0:
        return lr * floored(0.0, min_ratio)
    return lr * floored(0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * p) % 1.0))), min_ratio)


def polynomial(step, lr, steps, warmup_steps, power=1.0, lr_end=LR_END):
    """(lr - lr_end) (1 - p)^power + lr_end after warmup, lr_end after step T (BERT's decay; power 1 is linear).
    diffusers divides this by lr inside its lambda, as LambdaLR multiplies by lr again; so do we, for the same
    floats."""
    if step < warmup_steps:
        return lr * warmup(step, warmup_steps)
    if step > steps:
        return lr * (lr_end / lr)
    remaining = 1 - (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (((lr - lr_end) * remaining**power + lr_end) / lr)


def tiny(step, lr, steps, warmup_steps, cycles=1, min_ratio=0.0):
    """The shipped tiny model's schedule: cosine_with_restarts with a floor, but its warmup counts the step being
    taken, lr * (k + 1) / W, so the first step already moves (lr / W) and step W - 1 reaches lr; diffusers'
    warmup, lr * k / W, spends step 0 at rate 0 and reaches lr at step W. Kept bit for bit so the recipe
    reproduces the released weights."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = progress(step, steps, warmup_steps)
    wave = 0.5 * (1 + math.cos(math.pi * ((p * cycles) % 1.0)))
    return lr * (min_ratio + (1 - min_ratio) * wave)


def check_schedule(cfg):
    """Raise a one-line ValueError for a schedule `cfg` (a TrainConfig) cannot describe, before training starts."""
    name = cfg.lr_schedule
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    for knob, unset in UNSET.items():
        if getattr(cfg, knob) != unset and knob not in USES[name]:
            raise ValueError(f"the {name} schedule does not use {knob} (got {getattr(cfg, knob)}); "
                             f"it uses {', '.join(USES[name]) or 'only lr'}")
    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.cycles is not None:
        if name == "cosine" and not cfg.cycles > 0:
            raise ValueError(f"cycles must be > 0 for cosine (0.5 is one half-wave), got {cfg.cycles}")
        if name != "cosine" and not (cfg.cycles >= 1 and float(cfg.cycles).is_integer()):
            raise ValueError(f"cycles must be a whole number >= 1 for {name} (1 = no restart), got {cfg.cycles}")
    if not 0.0 <= cfg.min_lr_ratio < 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1), got {cfg.min_lr_ratio}")
    if name == "polynomial" and not cfg.lr > polynomial_end(cfg):
        raise ValueError(f"polynomial decays to {polynomial_end(cfg)}, which must be below lr ({cfg.lr})")


def polynomial_end(cfg):
    """The rate the polynomial schedule ends at: min_lr_ratio * lr, or diffusers' 1e-7 when no floor is set."""
    return cfg.min_lr_ratio * cfg.lr if cfg.min_lr_ratio > 0 else LR_END


def learning_rate(step, cfg):
    """The rate for optimizer step `step` (0-based) under cfg.lr_schedule; cfg is a TrainConfig."""
    check_schedule(cfg)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    name, lr, steps, w = cfg.lr_schedule, cfg.lr, cfg.steps, cfg.warmup_steps
    if name == "constant":
        return constant(step, lr)
    if name == "constant_with_warmup":
        return constant_with_warmup(step, lr, w)
    if name == "linear":
        return linear(step, lr, steps, w, cfg.min_lr_ratio)
    if name == "cosine":
        return cosine(step, lr, steps, w, 0.5 if cfg.cycles is None else cfg.cycles, cfg.min_lr_ratio)
    if name == "polynomial":
        return polynomial(step, lr, steps, w, cfg.lr_power, polynomial_end(cfg))
    cycles = 1 if cfg.cycles is None else int(cfg.cycles)
    if name == "cosine_with_restarts":
        return cosine_with_restarts(step, lr, steps, w, cycles, cfg.min_lr_ratio)
    return tiny(step, lr, steps, w, cycles, cfg.min_lr_ratio)
