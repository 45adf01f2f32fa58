"""A subject the tiny model has never seen, for DreamBooth and LoRA: the ring.

The tiny world (shapes.py) has filled circles, squares and triangles. A ring, a circle with a round hole of the
background's colour in its middle, is none of them, but it is close to one class the model knows, the circle, as
a particular dog is close to "dog". DreamBooth binds it to a rare identifier inside that class's prompt:

    instance prompt   "a red sks circle on a white background"       (the instance images: rings)
    class prompt      "a red circle on a white background"           (the base model's own circles)

The instance images show the ring in a few colour pairs only (INSTANCE_COMBOS), so a check on other pairs
(HELD_OUT_COMBOS) tells whether the model learned the subject or memorised the pictures. `is_ring` is the rule that
checks it, in the spirit of shapes.judge: the largest foreground region, and whether it encloses a hole of the
background's colour around its centre.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

from . import shapes

IDENTIFIER = "sks"          # DreamBooth's usual rare token (a single CLIP token the tiny model never saw in training)
CLASS = "circle"

# Eight instance images: every colour appears as foreground and as background, never as these exact pairs below.
INSTANCE_COMBOS = (
    ("red", "white"), ("blue", "yellow"), ("green", "black"), ("yellow", "purple"),
    ("purple", "orange"), ("orange", "blue"), ("white", "green"), ("black", "red"),
)
# Held-out pairs for the check: each colour again as foreground and background, none of them an instance pair.
HELD_OUT_COMBOS = (
    ("red", "blue"), ("blue", "white"), ("green", "yellow"), ("yellow", "black"),
    ("purple", "green"), ("orange", "white"), ("white", "red"), ("black", "orange"),
)
HOLE = 0.5                  # the hole's diameter as a fraction of the ring's


def instance_prompt(colour, background):
    return f"a {colour} {IDENTIFIER} {CLASS} on a {background} background"


def class_prompt(colour, background):
    return shapes.caption(colour, CLASS, background)


def draw_ring(colour, background, size=64, scale=0.6, center=(0.5, 0.5), supersample=4):
    """A ring: shapes.draw's circle with a concentric hole HOLE times its diameter, anti-aliased the same way."""
    big = size * supersample
    img = Image.new("RGB", (big, big), shapes.COLOURS[background])
    d = ImageDraw.Draw(img)
    cx, cy = center[0] * big, center[1] * big
    for radius, fill in ((scale * big / 2, colour), (HOLE * scale * big / 2, background)):
        d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=shapes.COLOURS[fill])
    return img.resize((size, size), Image.BOX)


def write_instance_folder(folder, combos=INSTANCE_COMBOS, seed=0, size=64):
    """One ring per colour pair, at a random size and place (a pure function of seed), each with its caption in a
    same-name .txt file (the A1111/kohya convention minisd train reads)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (colour, background) in enumerate(combos):
        scale = rng.uniform(0.55, 0.75)
        margin = scale / 2 + 0.04
        center = tuple(rng.uniform(margin, 1 - margin, size=2))
        name = os.path.join(folder, f"ring-{i:02d}")
        draw_ring(colour, background, size, scale, center).save(name + ".png")
        with open(name + ".txt", "w") as f:
            f.write(instance_prompt(colour, background))


def is_ring(image):
    """(colour, background, ring?) read off an image: the judge's foreground region is a ring when the pixels at
    the centre of its bounding box are background and cannot reach the image's border without crossing it."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    background_rgb = np.median(border, axis=0)
    fg = np.linalg.norm(a - background_rgb, axis=-1) > shapes.MIN_COLOUR_DISTANCE / 2
    fg[0] = fg[-1] = fg[:, 0] = fg[:, -1] = False             # as in shapes.judge
    fg = shapes.largest_region(fg)
    background = shapes.nearest_colour(background_rgb)
    if fg.sum() < 0.01 * fg.size:
        return None, background, False
    colour = shapes.nearest_colour(np.median(a[fg], axis=0))
    ys, xs = np.nonzero(fg)
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    if fg[cy - 1:cy + 2, cx - 1:cx + 2].any():                # the middle is filled: no hole
        return colour, background, False
    outside = shapes.largest_region(~fg)                      # the background around the shape (the biggest part)
    return colour, background, not outside[cy, cx]


def shows_subject(image, colour, background):
    """True when the image is a ring in the asked-for colours."""
    return is_ring(image) == (colour, background, True)
