"""The tiny world's ControlNet: shapes (shapes.py) conditioned on their Canny edges (annotators/canny.py).

Data: `write_canny_folder` writes pictures of one shape at a random place and size (extent 0.3 to 0.75 of the
side), each with its Canny edge map (NAME.cond.png, thresholds 100 / 200 as ControlNet's canny annotator) and its
caption (NAME.txt), the layout `minisd train controlnet --data` reads. Its recipe: `minisd train-tiny-controlnet`
(train/tiny_controlnet.py), which writes minisd-tiny-canny.safetensors, shipped in minisd/assets/ (its card:
TINY_CANNY_CARD.md) and named `--controlnet tiny-canny`.

Score (`score`): on held-out edge maps (another seed's placements), draw the caption's shape with the ControlNet
and read the picture with the shapes judge: the drawn shape's mask (shapes.read_foreground) against the edge map's
filled region (every pixel not reachable from the border without crossing an edge), IoU; and whether the judge reads
the asked colour and background.
"""
import os

import numpy as np
from PIL import Image

from ..annotators.canny import canny
from . import shapes

SCALES = (0.3, 0.75)                 # the shape's extent, as a fraction of the picture's side


def canny_sample(seed, index, size=64, held_out=False):
    """(shapes.Sample, its Canny edge map): a pure function of (seed, index), as shapes.sample."""
    rng = np.random.default_rng([seed, index, 1])
    combos = shapes.all_combinations(held_out=held_out)
    colour, shape, background = combos[rng.integers(len(combos))]
    scale, center = shapes.placement(rng, *SCALES, size=size)
    image = shapes.draw(colour, shape, background, size, scale, center)
    return shapes.Sample(image, colour, shape, background), canny(image)


def write_canny_folder(folder, n, seed=0, size=64):
    """n pictures NAME.png with NAME.cond.png (edges) and NAME.txt (caption): `minisd train controlnet`'s data."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        s, edges = canny_sample(seed, i, size)
        s.image.save(os.path.join(folder, f"{i:05d}.png"))
        edges.save(os.path.join(folder, f"{i:05d}.cond.png"))
        with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
            f.write(s.text)


def _grow(mask):
    """mask dilated by one pixel, 4-connected."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def filled_region(edges):
    """The pixels of an edge map (PIL, white edges) that the outside cannot reach without crossing an edge: the
    edges and what they enclose. The edges are first thickened by one pixel, so that a one-pixel gap (Canny
    loses the apex of a sharp corner) does not open the outline, and the region shrunk by one pixel after; then a
    4-connected flood fill from the border over the other pixels."""
    wall = _grow(np.asarray(edges.convert("L")) > 127)
    outside = np.zeros_like(wall)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = ~wall[0], ~wall[-1], ~wall[:, 0], ~wall[:, -1]
    while True:
        grown = _grow(outside) & ~wall
        if (grown == outside).all():
            return ~_grow(outside)
        outside = grown


def iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def judge_pair(image, edges, colour, background):
    """(IoU of the drawn shape's mask with the edge map's filled region, whether the judge reads the asked colour
    and background)."""
    found, mask, bg = shapes.read_foreground(image)
    return iou(mask, filled_region(edges)), found == colour and bg == background


def score(net, seed=1000, n=48, steps=20, cfg=7.5, device="cpu", log=print):
    """Draw each of n held-out edge maps' captions (stream `seed`) with the ControlNet `net` on the tiny model, and
    without it (the baseline), seed i for map i, `steps` steps at guidance scale `cfg`; returns the fraction with
    IoU >= 0.8, the mean IoU and the fraction with the asked colours right, for both."""
    from ..controlnet import Control
    from ..pipeline import Pipeline
    pipe = Pipeline.load(None, device=device, dtype="fp32", log=lambda *_: None)
    out = {}
    for name, controlled in (("", True), ("baseline_", False)):
        ious, right = [], []
        for i in range(n):
            s, edges = canny_sample(seed, i)
            controls = [Control(net, edges)] if controlled else []
            image = pipe.generate(s.text, seed=i, steps=steps, cfg=cfg, controls=controls).images[0]
            v, ok = judge_pair(image, edges, s.colour, s.background)
            ious.append(v)
            right.append(ok)
        out.update({f"{name}iou_pass": float(np.mean(np.array(ious) >= 0.8)), f"{name}mean_iou": float(np.mean(ious)),
                    f"{name}colours_right": float(np.mean(right))})
    return out
