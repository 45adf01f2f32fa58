"""A procedural captioned dataset of coloured shapes, and a judge that reads an image back into a caption.

The tiny built-in model is trained on these images: one circle, square or triangle in one colour on a uniform
background of another colour, captioned "a {colour} {shape} on a {colour} background". Everything is a pure
function of (seed, index), so a training stream can be resumed exactly from its step count, and a test can ask
for the same images again.

The judge is deliberately not learned: it measures whether a generated image says what its prompt asked for,
with rules simple enough to check by eye (border pixels -> background colour; the largest connected region of
pixels far from it -> foreground; how much of its bounding box the foreground fills -> shape).
"""
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Plain RGB values for the colour names (the CSS / X11 ones a user would expect).
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")

# Combinations never shown in training, so adherence can be measured on prompts the model has not seen.
# Every colour still appears as a foreground and as a background, and every shape appears, in training.
HELD_OUT = (
    ("red", "square", "green"),
    ("green", "triangle", "white"),
    ("blue", "circle", "yellow"),
    ("yellow", "square", "purple"),
    ("purple", "circle", "orange"),
    ("orange", "triangle", "blue"),
    ("white", "circle", "black"),
    ("black", "square", "red"),
    ("red", "triangle", "white"),
    ("blue", "square", "orange"),
    ("green", "circle", "purple"),
    ("yellow", "triangle", "black"),
)


def caption(colour, shape, background):
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text):
    """(colour, shape, background) of a caption written by `caption` (its inverse)."""
    words = text.split()
    return words[1], words[2], words[5]


def all_combinations(held_out=None):
    """Every (colour, shape, background) with colour != background; `held_out` True/False keeps only that part."""
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b]
    if held_out is None:
        return combos
    return [x for x in combos if (x in HELD_OUT) == held_out]


@dataclass(frozen=True)
class Sample:
    image: Image.Image      # RGB, size x size or (width, height)
    colour: str
    shape: str
    background: str

    @property
    def text(self):
        return caption(self.colour, self.shape, self.background)


def _width_height(size):
    """(width, height) of a size given as one side (a square) or as (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    if width < 1 or height < 1:
        raise ValueError(f"an image size must be positive, got {width}x{height}")
    return width, height


def draw(colour, shape, background, size=64, scale=0.6, center=(0.5, 0.5), supersample=4):
    """Render one shape on a picture of `size` pixels: one side (a square) or (width, height).

    `scale` is the shape's extent as a fraction of the picture's shorter side, so a circle stays round in a
    landscape or portrait picture; `center` is in [0, 1]^2, as fractions of the width and the height. Drawn
    `supersample` times larger and box-filtered down, so edges are anti-aliased like a photo's.
    """
    width, height = _width_height(size)
    big_w, big_h = width * supersample, height * supersample
    img = Image.new("RGB", (big_w, big_h), COLOURS[background])
    d = ImageDraw.Draw(img)
    half = scale * min(big_w, big_h) / 2
    cx, cy = center[0] * big_w, center[1] * big_h
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":  # upright isosceles, filling its bounding box's base and apex
        d.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img.resize((width, height), Image.BOX)


def placement(rng, low=0.45, high=0.75, size=64):
    """(scale, center) of a shape on a picture of `size` (one side or (width, height)): its extent uniform in
    [low, high] of the shorter side, its centre uniform where it keeps 0.04 of each side from every edge.
    `rng` is a numpy Generator."""
    width, height = _width_height(size)
    scale = rng.uniform(low, high)
    short = min(width, height)
    margin = np.array([scale / 2 * short / width, scale / 2 * short / height]) + 0.04    # (x, y)
    return scale, tuple(rng.uniform(margin, 1 - margin))


def sample(seed, index, size=64, held_out=False):
    """The `index`-th sample of the stream `seed`: a pure function, so streams resume exactly. `size`: one side
    (a square picture) or (width, height).

    held_out=False draws only training combinations, held_out=True only the held-out ones.
    """
    rng = np.random.default_rng([seed, index])
    combos = all_combinations(held_out=held_out)
    colour, shape, background = combos[rng.integers(len(combos))]
    scale, center = placement(rng, size=size)
    return Sample(draw(colour, shape, background, size, scale, center), colour, shape, background)


def stream(seed, start=0, size=64, held_out=False):
    """An endless iterator of samples from index `start` on."""
    index = start
    while True:
        yield sample(seed, index, size, held_out)
        index += 1


def mislabel(colour, shape, background, rng):
    """A wrong caption for an image of (colour, shape, background): one attribute, chosen at random, replaced by
    another value, keeping foreground != background and staying among the training combinations.

    The shipped model is trained with some captions wrong, the way web alt-text is (see tiny.Recipe.caption_noise).
    `rng` is a numpy Generator."""
    truth = (colour, shape, background)
    options = [c for c in all_combinations(held_out=False) if sum(a != b for a, b in zip(c, truth)) == 1]
    attribute = rng.integers(3)
    options = [c for c in options if c[attribute] != truth[attribute]]
    return options[rng.integers(len(options))]


def write_image_folder(folder, n, seed=0, size=64, held_out=False):
    """Write n samples as PNGs plus a metadata.jsonl of {"file_name", "text"} rows (the fine-tuning layout)."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        s = sample(seed, i, size, held_out)
        name = f"{i:05d}.png"
        s.image.save(os.path.join(folder, name))
        rows.append(json.dumps({"file_name": name, "text": s.text}))
    tmp = os.path.join(folder, "metadata.jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(tmp, os.path.join(folder, "metadata.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# The judge


def nearest_colour(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    names = list(COLOURS)
    dists = [np.linalg.norm(rgb - np.array(COLOURS[n])) for n in names]
    return names[int(np.argmin(dists))]


MIN_COLOUR_DISTANCE = min(np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b]))
                          for a in COLOURS for b in COLOURS if a != b)

# Fill ratio of the bounding box for each ideal shape: square 1, circle pi/4 = 0.785, triangle 1/2.
# The thresholds sit halfway between those values.
SQUARE_MIN_FILL = (1.0 + np.pi / 4) / 2
CIRCLE_MIN_FILL = (np.pi / 4 + 0.5) / 2


def largest_region(mask):
    """The largest 4-connected region of a boolean (H, W) mask, by flood fill."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, region = [start], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def foreground_pixels(image):
    """(pixels as (H, W, 3) floats, the background's RGB, mask of every pixel read as foreground): the judge's
    reading before it keeps the largest region (a subject of two parts, subject.py, needs the rest)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)                       # (H, W, 3)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    background_rgb = np.median(border, axis=0)
    # A pixel belongs to the foreground when it is nearer to some other colour than to the background: farther
    # than half the smallest distance between two of our colours (yellow and orange, 90 apart).
    dist = np.linalg.norm(a - background_rgb, axis=-1)
    # Every pixel counts, the outer ring too: the 8x8-latent model's decoder left a 1-px rim there that this judge
    # had to skip (else it stretched the bounding box to the whole image); the recipe's phase 4 trains it away
    # (minisd/train/tiny.py), and test_tiny checks the ring of the held-out images (edge_deviation).
    return a, background_rgb, dist > MIN_COLOUR_DISTANCE / 2


def read_foreground(image):
    """(colour, foreground mask, background) as the judge reads them: colour is None when no foreground is found."""
    a, background_rgb, fg = foreground_pixels(image)
    # The shape is one connected region; specks elsewhere (a decoder's artefacts near the edges) are not part of it
    # and would stretch its bounding box.
    fg = largest_region(fg)
    background = nearest_colour(background_rgb)
    if fg.sum() < 0.01 * fg.size:
        return None, fg, background
    return nearest_colour(np.median(a[fg], axis=0)), fg, background


def edge_deviation(image, background_rgb=None):
    """Largest |channel - background| (0-255) over the background pixels of the outermost two-pixel ring: every
    ring pixel but those within 2 px of the shape the judge reads (the world's shapes keep 2.5 px from the edge, so
    normally none). background_rgb: the colour to compare with (default: the judge's reading, the median of the
    outermost ring). A frame a decoder leaves at the image's edge shows here; the drawn images give 0."""
    a, read_rgb, fg = foreground_pixels(image)
    if background_rgb is None:
        background_rgb = read_rgb
    ring = np.zeros(a.shape[:2], bool)
    ring[:2] = ring[-2:] = True
    ring[:, :2] = ring[:, -2:] = True
    near = largest_region(fg)                           # the shape, as read_foreground reads it
    for _ in range(2):                                  # grow the shape by 2 px (4-neighbours)
        near = near | np.roll(near, 1, 0) | np.roll(near, -1, 0) | np.roll(near, 1, 1) | np.roll(near, -1, 1)
    keep = ring & ~near
    return float(np.abs(a[keep] - background_rgb).max()) if keep.any() else 0.0


def judge(image):
    """Read (colour, shape, background) off an image; shape is None when no foreground is found."""
    colour, fg, background = read_foreground(image)
    if colour is None:
        return None, None, background
    ys, xs = np.nonzero(fg)
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = fg.sum() / box_area
    shape = "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"
    return colour, shape, background


def agrees(image, colour, shape, background):
    """True when the judge reads exactly the asked-for colour, shape and background."""
    return judge(image) == (colour, shape, background)
