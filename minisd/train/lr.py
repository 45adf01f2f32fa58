"""Learning-rate schedules: the rate each optimizer step uses."""
import math


def learning_rate(step, cfg):
    """Linear warmup to cfg.lr, then cfg.cycles cosine decays to cfg.min_lr_ratio * cfg.lr, each restarting at
    the top (SGDR, Loshchilov & Hutter 2017, eq. 5, with T_i = (steps - warmup) / cycles)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)      # 0 -> 1 over training
    cycle_progress = (progress * cfg.cycles) % 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * cycle_progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)
