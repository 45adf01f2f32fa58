"""A word the tiny model has never seen, to be learned by Textual Inversion (tutorial 11, tests).

The tiny model's captions use eight colour words, three shape words and "a ... on a ... background"; every other
word of CLIP's vocabulary has an untrained row in its token table. "<sun>" is a yellow circle: a concept of parts
the model can draw, under a name it does not know. It takes two vectors, one in each of the places the colour and
the shape words take in a caption ("a <sun> on a red background" tokenizes to as many ids as "a yellow circle on a
red background"), and is trained on a few images over four backgrounds, then judged on the other three.

Why not a new colour (teal, pink)? The tiny VAE cannot draw one: it was trained on eight colours and decodes others
to one of them (`roundtrip_colour`: a teal square comes back blue), and textual inversion changes only what the
frozen U-Net and decoder are asked for, never what they can draw.
"""
import os

import numpy as np
import torch
from PIL import Image

from ..images import to_tensor
from . import shapes

TOKEN = "<sun>"
INIT_TOKEN = "circle"          # diffusers' rule: every vector starts as this word's embedding
NUM_VECTORS = 2
COLOUR, SHAPE = "yellow", "circle"
TRAIN_BACKGROUNDS = ("red", "blue", "black", "green")
HELD_OUT_BACKGROUNDS = ("purple", "orange", "white")


def caption(background, word=TOKEN):
    return f"a {word} on a {background} background"


def write_folder(folder, n=8, seed=0, size=64):
    """n images of the concept (sizes and places drawn as shapes.sample draws them) on the training
    backgrounds in turn, each with its NAME.txt caption naming the word."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        background = TRAIN_BACKGROUNDS[i % len(TRAIN_BACKGROUNDS)]
        scale, center = shapes.placement(rng)
        shapes.draw(COLOUR, SHAPE, background, size, scale, center).save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w") as f:
            f.write(caption(background))


def score(pipe, backgrounds=HELD_OUT_BACKGROUNDS, per_background=8, seed=0, steps=20):
    """Generate `per_background` images of "a <sun> on a {background} background" per background (one batch
    each, starting at `seed`) and judge them (shapes.judge: the foreground's median colour nearest to yellow, the
    shape a circle, the background the one asked for). Returns (fraction right, [(image, background, read)])."""
    results = []
    for background in backgrounds:
        images = pipe.generate(caption(background), seed=seed, steps=steps, batch=per_background).images
        results += [(image, background, shapes.judge(image)) for image in images]
    right = sum(read == (COLOUR, SHAPE, background) for _, background, read in results)
    return right / len(results), results


@torch.no_grad()
def roundtrip_colour(vae, rgb, background="white"):
    """The median colour of a square of colour `rgb` after the VAE's encode and decode: what the decoder draws."""
    x = to_tensor([_draw_rgb(rgb, background)])
    y = vae.decode(vae.encode(x))[0].permute(1, 2, 0)                               # (64, 64, 3) in [-1, 1]
    return tuple(int(v) for v in np.median(((y[24:40, 24:40] + 1) * 127.5).clamp(0, 255).reshape(-1, 3).numpy(),
                                           axis=0).round())


def _draw_rgb(rgb, background):
    image = shapes.draw("black", "square", background)
    pixels = np.asarray(image).copy()
    pixels[(pixels == 0).all(axis=-1)] = rgb          # the square, in a colour shapes.COLOURS does not have
    return Image.fromarray(pixels)
