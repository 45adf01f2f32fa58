"""How the tiny world's feature network (minisd/metrics/tiny_features.py) is trained: on labelled shapes images.

    minisd train-tiny-features --out runs/tiny-features    # reproduces the shipped weights

draws the images (uniform over all 168 combinations, the 12 held out from the tiny model included), trains the
network on them (cross-entropy summed over the three heads, AdamW with warmup + cosine, through
minisd.train.train), measures the accuracy of each head on held-out samples, and writes the weights plus
report.json. Deterministic from the seed for a given torch build and thread count (--threads; the shipped file
used 1).
"""
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..images import to_tensor
from ..metrics.tiny_features import FILENAME, FeaturesConfig, TinyFeatures, save
from ..tiny import shapes
from .loop import TrainConfig, train

COLOURS = tuple(shapes.COLOURS)          # class index -> name, for the colour and background heads
SHAPES = shapes.SHAPES


@dataclass(frozen=True)
class Recipe:
    """Every number of the training run; the shipped weights are Recipe() (seed 0)."""
    seed: int = 0
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    eval_samples: int = 2000        # held-out samples for the accuracy of each head (another stream: seed + 1)


# ---- data: a pure function of (seed, index), like the tiny model's --------------------------------------------

HELD_OUT_FRACTION = len(shapes.HELD_OUT) / len(shapes.all_combinations())


def world_sample(seed, index):
    """A sample uniform over all 168 combinations (shapes.sample draws from the 156 training ones or the 12 held-out
    ones; choosing between them in proportion makes the mixture uniform), with shapes.sample's geometry."""
    held_out = np.random.default_rng([seed, index, 1]).random() < HELD_OUT_FRACTION
    return shapes.sample(seed, index, held_out=held_out)


def labelled_batch(seed, start, n):
    samples = [world_sample(seed, i) for i in range(start, start + n)]
    labels = torch.tensor([[COLOURS.index(s.colour), SHAPES.index(s.shape), COLOURS.index(s.background)]
                           for s in samples])                       # (n, 3)
    return to_tensor([s.image for s in samples]), labels


def loss(model, x, labels):
    """Cross-entropy of each head, summed."""
    return sum(F.cross_entropy(logits, labels[:, i]) for i, logits in enumerate(model.heads(model(x))))


@torch.no_grad()
def accuracy(model, seed, n, batch=500):
    """Fraction right per head, and all three at once, on samples start..n of the stream `seed`."""
    model.eval()
    right = torch.zeros(4)
    for start in range(0, n, batch):
        x, labels = labelled_batch(seed, start, min(batch, n - start))
        predicted = torch.stack([logits.argmax(dim=1) for logits in model.heads(model(x))], dim=1)
        hits = predicted == labels
        right += torch.cat([hits.sum(dim=0), hits.all(dim=1).sum()[None]]).float()
    return dict(zip(("colour", "shape", "background", "all"), (right / n).tolist()))


# ---- training --------------------------------------------------------------------------------------------------------

def train_features(out_dir, recipe=Recipe(), log=print):
    """Train into out_dir (resuming its checkpoint), write out_dir/minisd-tiny-features.safetensors and report.json.
    Returns (path, report)."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(recipe.seed)                                  # the initial weights
    model = TinyFeatures(FeaturesConfig(), colours=len(COLOURS), shapes=len(SHAPES))
    cfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, lr_schedule="cosine", warmup_steps=recipe.warmup_steps,
                      ema_decay=0.0, checkpoint_every=200, seed=recipe.seed)

    def loss_fn(step, generator):                                   # batch `step` of the stream `seed`
        x, labels = labelled_batch(recipe.seed, step * recipe.batch, recipe.batch)
        return loss(model, x, labels)

    t0 = time.time()
    weights = train(model, dict(model.named_parameters()), loss_fn, cfg, out_dir, "tiny_features",
                    on_step=_progress(log), log=log)
    seconds = time.time() - t0
    model.load_state_dict(weights)
    model.eval().requires_grad_(False)
    acc = accuracy(model, recipe.seed + 1, recipe.eval_samples)
    report = {"recipe": asdict(recipe), "config": asdict(model.cfg), "train_seconds": round(seconds, 1),
              "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
              "held_out_accuracy": {k: round(v, 4) for k, v in acc.items()}}
    path = os.path.join(out_dir, FILENAME)
    save(model, path + ".tmp", report)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB); held-out accuracy {report['held_out_accuracy']}")
    return path, report


def _progress(log, every=100):
    losses = []

    def on_step(step, loss, lr):
        losses.append(loss)
        if (step + 1) % every == 0:
            log(f"step {step + 1}: loss {sum(losses) / len(losses):.4f} lr {lr:.2e}")
            losses.clear()
    return on_step
