"""A subject the tiny model has never seen, for DreamBooth and LoRA: the diamond, a square standing on a corner.

The tiny world (shapes.py) has upright squares, circles and triangles. A square turned by 45 degrees is none of
them, but it is close to one class the model knows, the square, as one particular dog is close to "dog".
DreamBooth binds it to a rare identifier, and prior preservation keeps the class it came from:

    instance prompt   "a red sks on a white background"              (the instance images: diamonds)
    class prompt      "a red square on a white background"           (the base model's own squares)

The identifier takes the shape word's place, not a place beside the class word as in SD's "a photo of sks dog":
the tiny model has only ever read one sentence pattern, "a COLOUR SHAPE on a COLOUR background", and reads it by
position. Measured (400-600 steps, lr 1e-4, prior preservation): "a sks red square ..." shifts every later word
and the colours come out wrong; "sks red square ..." (the article's place) is ignored by the frozen text encoder's
reader and the model keeps drawing squares; in the shape word's place the U-Net, which reads the shape there, learns it.

The instance images show the diamond in a few colour pairs only (INSTANCE_COMBOS), so a check on other pairs
(HELD_OUT_COMBOS) tells whether the model learned the subject or memorised the pictures. `is_diamond` is the rule
that checks it, in the spirit of shapes.judge: the largest foreground region's taper, its mean width a quarter and
three quarters of the way down its bounding box over its width half way down, is 1/2 for a diamond, sqrt(3)/2 for
a circle and 1 for a square and for a triangle (1/4 and 3/4 of its base); the threshold sits half way between the
diamond and the nearest other shape, the circle.

What the tiny VAE can draw bounds what any fine-tune can score. The first tiny model's VAE (factor 8, 8x8
latents) rounded a small diamond's corners off: one diamond per colour pair of INSTANCE_COMBOS and HELD_OUT_COMBOS,
encoded and decoded, passed is_diamond in 0/16 at 0.45 of the image side, 5/16 at 0.55, 15/16 at 0.65 and 16/16
at 0.75 and 0.85. So the instance diamonds are drawn large (INSTANCE_SCALE): with sizes from 0.55 to 0.75,
DreamBooth drew a diamond in the asked-for colours in 3/16 held-out images (tutorial 10's earlier recipe); with
0.72 to 0.85 and that model's tutorial 10 recipe, in 41/48 and 42/48 (two training seeds). The VAE shipped now has
16x16 latents (factor 4), and the same round trip passes for all four subjects in 16/16 at 0.55, 0.65, 0.75 and
0.85 (`python bench/tiny_subjects.py roundtrip`); the sizes stay, as every figure here was measured at them.

Why not a ring, or an upside-down triangle? Measured on the base model, the noise-prediction loss of the instance
images (their class captions, 16 draws): diamonds 0.055, upside-down triangles 0.119, rings 0.166, true squares
0.024. The tiny model is far from drawing a ring, and a few minutes of fine-tuning on a handful of images did not
teach it one; a diamond is a new shape within its reach, which is the DreamBooth situation (the class prior helps).

Three more subjects (SUBJECTS), each unlike the diamond and one another, test whether that recipe works beyond
the one subject it was tuned on: the ring (a shape with a hole), the cross (a plus sign: not convex) and the pair
(two discs: a shape of two parts). Each is drawn like the diamond, at the same sizes, and read by its own rule
(is_ring, is_cross, is_pair). `minisd tiny-subject --subject NAME --instance-dir DIR [--class-dir CLASS]` writes
a subject's instance folder (and the class folder) for `minisd train dreambooth`; bench/tiny_subjects.md has
the recipe below measured on each, two training seeds.

One recipe for any subject (issue 35), the same for all, from the command line alone (tutorial 10 runs it):

    minisd tiny-subject --subject ring --all-pairs --class-every 1 --instance-dir inst --class-dir class
    minisd train dreambooth --instance-dir inst --instance-prompt unused --class-prompt unused --class-dir class \
        --num-class-images 172 --train-batch-size 4 --max-train-steps 800 --learning-rate 4e-4 --use-ema \
        --cache-latents --center-crop --threads 1 --out run
    minisd generate --model run/model.safetensors --cfg 3 "a yellow sks on a black background"

Instance images in all 48 colour pairs that are not held out (ALL_INSTANCE_COMBOS, not the 8 of INSTANCE_COMBOS),
so that "sks" must mean the shape, not the shape in a few colour pairs; class images of all 156 training
combinations of the world (class_rows(every=1): 172 images with the 16 empty prompts, not 68); batch 4, 800 steps
at 4e-4, EMA; drawn at guidance 3. Measured on the 16x16-latent model (bench/tiny_subjects.md; 48 held-out images,
two training seeds, one thread, 86-102 s of CPU each): the subject in the asked-for colours in 100 / 100% of
images for the diamond, 97.9 / 100% for the ring, 97.9 / 100% for the cross, 97.9 / 95.8% for the pair; class
drift 0 but for one ring run (2 of 16); adherence on the base model's held-out prompts (192 images) 97.9-99.0%,
3.1-4.2 points above the base model's 94.8%. On the 8x8-latent model the best recipe found (this one at 2e-4,
drawn at 1.5) scored 67-98%, held back by its VAE: a clean ring or pair of discs encoded and decoded read as the
subject in the asked-for colours in 38/48 and 41/48 (its 8x8 latents turned orange into yellow around a hole or
thin parts); with 16x16 latents all four read 48/48 (`python bench/tiny_subjects.py ceiling`).
"""
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from . import shapes
from .evaluate import BATCH_SIZE, generate_each

IDENTIFIER = "sks"          # DreamBooth's usual rare token (a single CLIP token the tiny model never saw in training)
CLASS = "square"

# Eight instance images: every colour appears as foreground and as background, never as these exact pairs below.
INSTANCE_COMBOS = (
    ("red", "white"), ("blue", "yellow"), ("green", "black"), ("yellow", "purple"),
    ("purple", "orange"), ("orange", "blue"), ("white", "green"), ("black", "red"),
)
# Held-out pairs for the check: each colour again as foreground and background, none of them an instance pair.
DIAMOND_TAPER = (0.5 + 3 ** 0.5 / 2) / 2     # between the diamond (1/2) and the circle (0.866)
INSTANCE_SCALE = (0.72, 0.85) # the diamonds' diagonal, a fraction of the side (see the VAE's bound above)
HELD_OUT_COMBOS = (
    ("red", "blue"), ("blue", "white"), ("green", "yellow"), ("yellow", "black"),
    ("purple", "green"), ("orange", "white"), ("white", "red"), ("black", "orange"),
)

# Every ordered colour pair but the held-out ones (48): the instance images of the recipe for any subject
# (module docstring), which shows each colour on five to seven backgrounds and under as many foregrounds, not once.
ALL_INSTANCE_COMBOS = tuple((c, b) for c in shapes.COLOURS for b in shapes.COLOURS
                            if c != b and (c, b) not in HELD_OUT_COMBOS)


def instance_prompt(colour, background):
    return f"a {colour} {IDENTIFIER} on a {background} background"


def class_prompt(colour, background):
    return shapes.caption(colour, CLASS, background)


def _drawn(paint, colour, background, size, scale, center, supersample):
    """shapes.draw's way of drawing: paint(draw, fill, hole, cx, cy, half) on a canvas `supersample` times larger
    (half: half the shape's extent, `scale` of the side; hole: the background colour), box-filtered down."""
    big = size * supersample
    img = Image.new("RGB", (big, big), shapes.COLOURS[background])
    paint(ImageDraw.Draw(img), shapes.COLOURS[colour], shapes.COLOURS[background],
          center[0] * big, center[1] * big, scale * big / 2)
    return img.resize((size, size), Image.BOX)


def draw_diamond(colour, background, size=64, scale=0.6, center=(0.5, 0.5), supersample=4):
    """A diamond: shapes.draw's square turned by 45 degrees (corners up, down, left, right), its diagonal `scale`
    of the image side, anti-aliased the same way."""
    def paint(d, fill, hole, cx, cy, half):
        d.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    return _drawn(paint, colour, background, size, scale, center, supersample)


def write_instance_folder(folder, combos=INSTANCE_COMBOS, seed=0, size=64, subject="diamond", scale=None):
    """One picture of the subject (a SUBJECTS name) per colour pair, at a random size and place (a pure function of
    seed), each with its caption in a same-name .txt file (the A1111/kohya convention minisd train reads).
    scale: (low, high), the sizes drawn from (default: the subject's own)."""
    s = SUBJECTS[subject]
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (colour, background) in enumerate(combos):
        scale_i, center = shapes.placement(rng, *(scale or s.scale))
        name = os.path.join(folder, f"{subject}-{i:02d}")
        s.draw(colour, background, size, scale_i, center).save(name + ".png")
        with open(name + ".txt", "w") as f:
            f.write(instance_prompt(colour, background))


def is_diamond(image):
    """(colour, background, diamond?) read off an image with shapes.judge's foreground: a diamond's taper (module
    docstring) is below DIAMOND_TAPER."""
    colour, fg, background = shapes.read_foreground(image)
    if colour is None:
        return None, background, False
    ys, _ = np.nonzero(fg)
    top, height = ys.min(), ys.max() - ys.min() + 1
    width = lambda f: fg[top + min(int(f * height), height - 1)].sum()          # foreground pixels in that row
    taper = (width(0.25) + width(0.75)) / 2 / max(width(0.5), 1)
    return colour, background, bool(taper < DIAMOND_TAPER)


# ---------------------------------------------------------------------------------------------------------------
# Three more subjects, each unlike the world's shapes, the diamond and one another: a shape with a hole (the ring),
# a shape with notches, not convex (the cross), a shape of two parts (the pair). Each is drawn like the diamond,
# large (the VAE's bound, module docstring), and read by its own rule on shapes.judge's foreground.

RING_HOLE = 0.5             # the ring's hole: its diameter over the ring's
CROSS_ARM = 1 / 3           # the cross's arms: their width over the cross's extent
PAIR_DOT = 0.4              # each of the pair's two discs: its diameter over the pair's width (gap: 0.2 of it)
# A hole is background enclosed by the foreground; the ring's is RING_HOLE^2 = 1/4 of the disc it cuts; a rule
# reads a hole from half that, 1/8 (the world's shapes have none)
HOLE_MIN = RING_HOLE ** 2 / 2
# Solidity, the foreground's area over its convex hull's: 1 for every convex shape (circle, square, triangle,
# diamond); for the cross 5/9 over 7/9 = 5/7 (arms a third of the extent: the hull cuts each corner's square in
# half). The threshold sits half way.
CROSS_SOLIDITY = (5 / 7 + 1) / 2
PAIR_BALANCE = 0.5          # the second region's area over the largest's: 1 for the pair, specks for one shape


def draw_ring(colour, background, size=64, scale=0.6, center=(0.5, 0.5), supersample=4):
    """A ring: a disc `scale` of the side across with a round hole RING_HOLE of its diameter."""
    def paint(d, fill, hole, cx, cy, half):
        d.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        r = half * RING_HOLE
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=hole)
    return _drawn(paint, colour, background, size, scale, center, supersample)


def draw_cross(colour, background, size=64, scale=0.6, center=(0.5, 0.5), supersample=4):
    """A plus sign `scale` of the side across, its two arms CROSS_ARM of that wide."""
    def paint(d, fill, hole, cx, cy, half):
        arm = half * CROSS_ARM
        d.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        d.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    return _drawn(paint, colour, background, size, scale, center, supersample)


def draw_pair(colour, background, size=64, scale=0.6, center=(0.5, 0.5), supersample=4):
    """Two discs side by side, `scale` of the side from the left one's edge to the right one's, each PAIR_DOT of
    that across (the gap between them: 1 - 2 PAIR_DOT of it)."""
    def paint(d, fill, hole, cx, cy, half):
        r = half * PAIR_DOT
        for x in (cx - half + r, cx + half - r):
            d.ellipse((x - r, cy - r, x + r, cy + r), fill=fill)
    return _drawn(paint, colour, background, size, scale, center, supersample)


def holes(region):
    """The pixels outside `region` (a boolean (H, W) mask) that no 4-connected path outside it joins to the image's
    border: the holes it encloses."""
    h, w = region.shape
    outside = np.zeros_like(region)
    stack = [(y, x) for y in range(h) for x in (0, w - 1)] + [(y, x) for y in (0, h - 1) for x in range(w)]
    stack = [p for p in stack if not region[p]]
    for p in stack:
        outside[p] = True
    while stack:
        y, x = stack.pop()
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < h and 0 <= nx < w and not region[ny, nx] and not outside[ny, nx]:
                outside[ny, nx] = True
                stack.append((ny, nx))
    return ~region & ~outside


def hull_area(region):
    """The area of the convex hull of a region's pixels (each a unit square): Andrew's monotone chain on their
    corners, then the shoelace formula."""
    ys, xs = np.nonzero(region)
    corners = {(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist()) for dx in (0, 1) for dy in (0, 1)}
    points = sorted(corners)
    if len(points) < 3:
        return 0.0

    def half(points):
        chain = []
        for p in points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]
    hull = half(points) + half(points[::-1])
    x, y = np.array(hull, dtype=np.float64).T
    return abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def hole_fraction(region):
    """How much of the region with its holes filled is hole."""
    hole = holes(region).sum()
    return hole / max(region.sum() + hole, 1)


def is_ring(image):
    """(colour, background, ring?): the largest foreground region encloses a hole of at least HOLE_MIN of its
    filled area, and filled it reads round (shapes.judge's fill of its bounding box, circle's range)."""
    colour, fg, background = shapes.read_foreground(image)
    if colour is None:
        return None, background, False
    filled = fg | holes(fg)
    ys, xs = np.nonzero(filled)
    fill = filled.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    round_ = shapes.CIRCLE_MIN_FILL <= fill < shapes.SQUARE_MIN_FILL
    return colour, background, bool(hole_fraction(fg) >= HOLE_MIN and round_)


def is_cross(image):
    """(colour, background, cross?): the largest foreground region has no hole and is not convex (solidity below
    CROSS_SOLIDITY)."""
    colour, fg, background = shapes.read_foreground(image)
    if colour is None:
        return None, background, False
    solidity = fg.sum() / max(hull_area(fg), 1)
    return colour, background, bool(hole_fraction(fg) < HOLE_MIN and solidity < CROSS_SOLIDITY)


def is_pair(image):
    """(colour, background, pair?): besides the largest foreground region, a second one at least PAIR_BALANCE of
    its area (and 1% of the image, like any shape the judge reads)."""
    colour, first, background = shapes.read_foreground(image)
    if colour is None:
        return None, background, False
    second = shapes.largest_region(shapes.foreground_pixels(image)[2] & ~first)
    two = second.sum() >= max(PAIR_BALANCE * first.sum(), 0.01 * first.size)
    return colour, background, bool(two)


@dataclass(frozen=True)
class Subject:
    """One subject: its drawing, its rule, the world's shape its class prompt names, and its instance sizes."""
    draw: Callable              # (colour, background, size, scale, center) -> PIL image
    judge: Callable             # image -> (colour, background, is it the subject?)
    cls: str                    # the class word of prior preservation and of the drift check
    scale: tuple = INSTANCE_SCALE


SUBJECTS = {
    "diamond": Subject(draw_diamond, is_diamond, "square"),
    "ring": Subject(draw_ring, is_ring, "circle"),
    "cross": Subject(draw_cross, is_cross, "square"),
    "pair": Subject(draw_pair, is_pair, "circle"),
}


def shows_subject(image, colour, background, subject="diamond"):
    """True when the image is the subject in the asked-for colours."""
    return SUBJECTS[subject].judge(image) == (colour, background, True)


def class_rows(every=3, uncond=16):
    """[(file name, caption, seed)] of write_class_folder's images: every `every`-th training combination of the
    world, then `uncond` empty captions (the unconditional prompt)."""
    combos = shapes.all_combinations(held_out=False)[::every]
    return ([(f"class-{i:05d}", shapes.caption(*combo), i) for i, combo in enumerate(combos)]
            + [(f"uncond-{i:05d}", "", 1000 + i) for i in range(uncond)])


def write_class_folder(pipe, folder, every=3, uncond=16, batch_size=BATCH_SIZE):
    """Class images for prior preservation, drawn by the model itself before training: the base model's picture
    of every `every`-th training combination of its world (all shapes, 52 images), each with its caption beside
    it, and `uncond` of its pictures for the empty prompt, with empty captions; returns how many. `minisd train
    dreambooth` counts the images already in --class-dir and reads their captions, so a folder made like this is
    used as it is.

    Why the whole world, when DreamBooth's class images are of the class alone ("a photo of a dog")? Measured
    (400-800 steps, lr 1e-4): with the base model's squares only, in the instance colour pairs, the held-out
    adherence of tutorial 10 fell from 88% to 62-71%; with the world's combinations it held (92%). SD has seen
    billions of images and a few hundred steps on one subject move little of it; the tiny model has seen one small
    world, and every weight the fine-tuning moves is one of the few it draws that world with.

    Why empty prompts? Classifier-free guidance computes uncond + cfg (cond - uncond), and the unconditional
    prediction comes from the same network, which the tiny model learned from its 10% of empty captions
    (tiny.Recipe.caption_dropout). DreamBooth's batches never hold an empty prompt, so nothing keeps that branch
    where it was, and guidance multiplies whatever it moved. Measured with a recipe like tutorial 10's (1000 steps,
    batch 4, lr 2e-4, EMA, diamonds 0.65-0.8 of the side), without these 16 images against with them: adherence on the held-out prompts at cfg
    3 / 5 / 7.5 fell to 75% / 67% / 58% against 100% / 100% / 96%, and the subject score at cfg 3 was 14/24
    against 20/24. (kohya's scripts have --caption_dropout_rate for the same branch; here its pictures are the
    base model's own, so it is kept, not retrained.)"""
    os.makedirs(folder, exist_ok=True)
    rows = class_rows(every, uncond)
    images = generate_each(pipe, [caption for _, caption, _ in rows], [seed for _, _, seed in rows], batch_size)
    for (name, caption, _), image in zip(rows, images):
        image.save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w") as f:
            f.write(caption)
    return len(rows)


def subject_score(pipe, seeds=(0, 1, 2), combos=HELD_OUT_COMBOS, cfg=7.5, batch_size=BATCH_SIZE,
                  subject="diamond"):
    """(fraction, images): the identifier's prompt in colour pairs no instance image had, at guidance scale cfg;
    how often it is the subject in the asked-for colours."""
    pairs = [(c, b, s) for c, b in combos for s in seeds]
    images = generate_each(pipe, [instance_prompt(c, b) for c, b, _ in pairs], [s for _, _, s in pairs], batch_size,
                           cfg=cfg)
    return sum(shows_subject(im, c, b, subject) for im, (c, b, _) in zip(images, pairs)) / len(images), images


def drift(pipe, seeds=(0, 1), combos=HELD_OUT_COMBOS, cfg=7.5, batch_size=BATCH_SIZE, subject="diamond"):
    """How often the plain class prompt ("a red square on a blue background" for the diamond) now draws the
    subject: the class word taking on the subject, the drift prior preservation is there to stop."""
    s = SUBJECTS[subject]
    pairs = [(c, b, seed) for c, b in combos for seed in seeds]
    images = generate_each(pipe, [shapes.caption(c, s.cls, b) for c, b, _ in pairs], [x for _, _, x in pairs],
                           batch_size, cfg=cfg)
    return sum(s.judge(image)[2] for image in images) / len(images)
