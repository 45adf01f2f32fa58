"""The tiny model's canny ControlNet (`minisd train-tiny-controlnet`): the recipe of
minisd/assets/minisd-tiny-canny.safetensors, run through `minisd train controlnet` itself.

    minisd train-tiny-controlnet --out DIR            (DIR/data, DIR/run, DIR/minisd-tiny-canny.safetensors,
                                                       DIR/report.json)

1. data: Recipe.images pictures of the shapes world (tiny/canny.py: one shape at a random place and size, its
   Canny edges as NAME.cond.png, its caption), written to DIR/data;
2. train: minisd.train.run(ControlNetConfig(...)) on the tiny model from its U-Net's encoder (the zero
   convolutions start at zero), centre crops (the pictures are the model's 64 px) with cached latents, into
   DIR/run (--resume: a stopped run continues);
3. ship: the trained ControlNet in float16, ControlNet 1.1 layout, as DIR/minisd-tiny-canny.safetensors;
4. score: tiny/canny.score on Recipe.eval_maps held-out edge maps (another seed), drawn at guidance scale
   Recipe.eval_cfg: IoU of the drawn shape with the edge map's filled region, and the asked colours, written to
   DIR/report.json.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

from weights_convert import controlnet as files
from ..controlnet import load_controlnet
from ..model import TINY_WEIGHTS, load_model
from ..tiny import canny
from . import run
from .controlnet import ControlNetConfig


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    images: int = 2000              # training pictures
    steps: int = 12000
    batch: int = 8
    lr: float = 5e-4
    lr_scheduler: str = "cosine"    # to 0 at the last step: the decay, not more constant-rate steps, sharpens it
    caption_dropout: float = 0.5    # the paper's Sec. 3.3: half the captions empty, so the edges must say where
    snr_gamma: float = 5.0          # Min-SNR: the noisy steps, where the layout is decided, weigh more
    eval_seed: int = 1000           # held-out edge maps: another stream
    eval_maps: int = 48
    eval_cfg: float = 2.0           # guidance scale of the score: chosen on another held-out stream (the card)


def train_tiny_controlnet(out, recipe=Recipe(), device="cpu", log=print):
    """Run the recipe (module docstring) into `out`; returns the report (a dict)."""
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, f"{recipe.images - 1:05d}.txt")):
        log(f"writing {recipe.images} pictures with their edge maps to {data}")
        canny.write_canny_folder(data, recipe.images, recipe.seed)
    t0 = time.time()
    result = run(ControlNetConfig(
        out=os.path.join(out, "run"), data=data, model=str(TINY_WEIGHTS), max_train_steps=recipe.steps,
        train_batch_size=recipe.batch, learning_rate=recipe.lr, lr_scheduler=recipe.lr_scheduler, seed=recipe.seed,
        center_crop=True, cache_latents=True, caption_dropout_rate=recipe.caption_dropout, snr_gamma=recipe.snr_gamma,
        checkpointing_steps=200, device=device, resume=True), log=log)
    seconds = time.time() - t0
    model = load_model(str(TINY_WEIGHTS), verbose=False)
    net = load_controlnet(result.model, model.config)
    path = os.path.join(out, "minisd-tiny-canny.safetensors")
    state = {k: v.to(torch.float16) for k, v in net.state_dict().items()}
    files.write(state, net.cfg, path, "1.1")                      # written atomically
    scores = canny.score(load_controlnet(path, model.config), recipe.eval_seed, recipe.eval_maps,
                         cfg=recipe.eval_cfg, device=device)
    report = {"recipe": dataclasses.asdict(recipe), "train_seconds": round(seconds, 1), "file": path,
              "bytes": os.path.getsize(path), **scores}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"IoU >= 0.8 on {scores['iou_pass']:.0%} of {recipe.eval_maps} held-out edge maps (mean IoU "
        f"{scores['mean_iou']:.3f}); colours right on {scores['colours_right']:.0%}; wrote {path}")
    return report
