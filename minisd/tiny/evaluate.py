"""Measuring the tiny model: how often its images show what the prompt asked for, read by shapes.judge.

    adherence(pipe, eval_combinations(held_out=False))    # fraction judged exactly right
    sample_grid(model, "grid.png")                        # the sample grids the recipe draws while it trains
"""
import torch
from PIL import Image

from ..pipeline import Pipeline
from . import shapes


GRID_PROMPTS = [shapes.caption(*c) for c in [
    ("red", "circle", "blue"), ("yellow", "square", "black"), ("white", "triangle", "green"),
    ("orange", "circle", "purple"), ("blue", "triangle", "yellow"), ("black", "circle", "white"),
    ("red", "square", "green"), ("blue", "circle", "yellow")]]          # the last two are held out


def eval_combinations(held_out):
    """A fixed prompt list. Train: every 6th training combination (26, covering all colours, shapes and
    backgrounds); held out: all 12 held-out combinations."""
    combos = shapes.all_combinations(held_out=held_out)
    return combos if held_out else combos[::6]


def judged(pipe, combos, seeds=(0,), cfg=7.5, steps=20, sampler="dpmpp_2m"):
    """[(asked-for (colour, shape, background), what shapes.judge reads)]: one image per (combination, seed)."""
    return [(combo, shapes.judge(pipe.generate(shapes.caption(*combo), steps=steps, cfg=cfg, sampler=sampler,
                                               seed=seed).images[0]))
            for combo in combos for seed in seeds]


def adherence(pipe, combos, seeds=(0,), cfg=7.5, steps=20, sampler="dpmpp_2m"):
    """Fraction of images the judge reads exactly as their prompt."""
    rows = judged(pipe, combos, seeds, cfg, steps, sampler)
    return sum(want == got for want, got in rows) / len(rows)


def image_grid(images, columns):
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "gray")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


def sample_grid(model, path, seeds=(0, 1)):
    """One row per seed, one column per GRID_PROMPTS entry (default sampler, 20 steps, cfg 7.5)."""
    pipe = Pipeline(model, next(model.parameters()).device, torch.float32, log=lambda *_: None)
    images, hits = [], 0
    for seed in seeds:
        for prompt in GRID_PROMPTS:
            image = pipe.generate(prompt, seed=seed).images[0]
            images.append(image)
            hits += shapes.agrees(image, *shapes.parse_caption(prompt))
    image_grid(images, len(GRID_PROMPTS)).save(path)
    return hits / len(images)
