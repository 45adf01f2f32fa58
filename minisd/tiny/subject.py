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

What the tiny VAE can draw bounds what any fine-tune can score: its latents are 8x8, and a small diamond comes
back from an encode and decode with rounded corners. Measured on the shipped VAE, one diamond per colour pair of
INSTANCE_COMBOS and HELD_OUT_COMBOS: the round trip passes is_diamond in 0/16 at 0.45 of the image side, 5/16 at
0.55, 15/16 at 0.65 and 16/16 at 0.75 and 0.85. So the instance diamonds are drawn large (INSTANCE_SCALE): with
sizes from 0.55 to 0.75, DreamBooth drew a diamond in the asked-for colours in 3/16 held-out images (tutorial 10's
earlier recipe); with 0.72 to 0.85 and tutorial 10's recipe, in 41/48 and 42/48 (two training seeds).

Why not a ring, or an upside-down triangle? Measured on the base model, the noise-prediction loss of the instance
images (their class captions, 16 draws): diamonds 0.055, upside-down triangles 0.119, rings 0.166, true squares
0.024. The tiny model is far from drawing a ring, and a few minutes of fine-tuning on a handful of images did not
teach it one; a diamond is a new shape within its reach, which is the DreamBooth situation (the class prior helps).
"""
import os

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


def instance_prompt(colour, background):
    return f"a {colour} {IDENTIFIER} on a {background} background"


def class_prompt(colour, background):
    return shapes.caption(colour, CLASS, background)


def draw_diamond(colour, background, size=64, scale=0.6, center=(0.5, 0.5), supersample=4):
    """A diamond: shapes.draw's square turned by 45 degrees (corners up, down, left, right), its diagonal `scale`
    of the image side, anti-aliased the same way."""
    big = size * supersample
    img = Image.new("RGB", (big, big), shapes.COLOURS[background])
    half = scale * big / 2
    cx, cy = center[0] * big, center[1] * big
    ImageDraw.Draw(img).polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)],
                                fill=shapes.COLOURS[colour])
    return img.resize((size, size), Image.BOX)


def write_instance_folder(folder, combos=INSTANCE_COMBOS, seed=0, size=64):
    """One diamond per colour pair, at a random size and place (a pure function of seed), each with its caption in a
    same-name .txt file (the A1111/kohya convention minisd train reads)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (colour, background) in enumerate(combos):
        scale, center = shapes.placement(rng, *INSTANCE_SCALE)
        name = os.path.join(folder, f"diamond-{i:02d}")
        draw_diamond(colour, background, size, scale, center).save(name + ".png")
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


def shows_subject(image, colour, background):
    """True when the image is a diamond in the asked-for colours."""
    return is_diamond(image) == (colour, background, True)


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
    combos = shapes.all_combinations(held_out=False)[::every]
    # (file name, caption, seed); the empty captions are the unconditional prompt
    rows = ([(f"class-{i:05d}", shapes.caption(*combo), i) for i, combo in enumerate(combos)]
            + [(f"uncond-{i:05d}", "", 1000 + i) for i in range(uncond)])
    images = generate_each(pipe, [caption for _, caption, _ in rows], [seed for _, _, seed in rows], batch_size)
    for (name, caption, _), image in zip(rows, images):
        image.save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w") as f:
            f.write(caption)
    return len(rows)


def subject_score(pipe, seeds=(0, 1, 2), combos=HELD_OUT_COMBOS, cfg=7.5, batch_size=BATCH_SIZE):
    """(fraction, images): the identifier's prompt in colour pairs no instance image had, at guidance scale cfg;
    how often it is a diamond in the asked-for colours."""
    pairs = [(c, b, s) for c, b in combos for s in seeds]
    images = generate_each(pipe, [instance_prompt(c, b) for c, b, _ in pairs], [s for _, _, s in pairs], batch_size,
                           cfg=cfg)
    return sum(shows_subject(im, c, b) for im, (c, b, _) in zip(images, pairs)) / len(images), images


def drift(pipe, seeds=(0, 1), combos=HELD_OUT_COMBOS, cfg=7.5, batch_size=BATCH_SIZE):
    """How often the plain class prompt ("a red square on a blue background") now draws a diamond: the class word
    taking on the subject, the drift prior preservation is there to stop."""
    pairs = [(c, b, s) for c, b in combos for s in seeds]
    images = generate_each(pipe, [class_prompt(c, b) for c, b, _ in pairs], [s for _, _, s in pairs], batch_size,
                           cfg=cfg)
    return sum(is_diamond(image)[2] for image in images) / len(images)
