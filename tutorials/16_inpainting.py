"""16. Inpainting: a shape repainted, the rest kept bit for bit; outpainting; what strength and the mask blur do."""
# %% [markdown]
# Inpainting repaints the white part of a mask and keeps the rest of the picture. Two kinds of model do it.
#
# - **A 9-channel inpainting U-Net** (`sd-v1-5-inpainting.ckpt`, SD 2's `512-inpainting-ema`) was trained for the
#   job (as the inpainting LDM of Rombach et al. 2022, Sec. 4.5): its first convolution takes 9 channels instead
#   of 4, the noisy latent and two more inputs, the mask at latent size and the VAE latent of the picture with the
#   masked pixels set to grey. At every step it *sees* what it must keep and where, and paints something that fits.
# - **Any other model** (an ordinary SD 1.5 file, your fine-tune, the tiny model here) knows nothing of masks.
#   It can still inpaint by the blend of Avrahami et al. 2022 ("blended diffusion"): at every step, the kept
#   region of the U-Net's input is replaced by the original latent noised to the current level,
#
#       x_in = m * x + (1 - m) * (x0 + sigma * noise)        m: 1 = repaint, at latent size
#
#   so the kept region always looks like a noisy version of the original, and the U-Net denoises the masked part
#   to fit around it. This is what diffusers' StableDiffusionInpaintPipeline does for a 4-channel U-Net.
#
# `Pipeline.inpaint` picks the kind from the U-Net's input channels (`inpaint.conditioned_unet` or
# `inpaint.blended_unet`); the rest of the steps (mask, sampling, decoding, composite) are the same. The tiny
# model has 4 input channels, so this page runs the blend. First, what the 9-channel model would get, with the
# shapes of SD 1.5 at 512 x 512 (a stand-in records the U-Net's input; no weights needed):

# %%
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from minisd import inpaint
from minisd.images import to_pil
from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline
from minisd.tiny import shapes

from _clock import Clock
from _figures import grid, save

torch.set_num_threads(1)            # the tiny networks' tensors are too small for threads to pay
clock = Clock()
pipe = Pipeline(load_model(tiny_model_path(), verbose=False), log=lambda *_: None)
print("tiny U-Net input channels:", pipe.model.config.unet.in_channels,
      "- its first conv's weight:", tuple(pipe.model.unet.input_blocks[0][0].weight.shape))

seen = []
unet_9 = inpaint.conditioned_unet(lambda x, t, context: seen.append(x.shape) or x[:, :4],
                                  mask=torch.ones(1, 1, 64, 64), masked_latents=torch.zeros(1, 4, 64, 64))
unet_9(torch.zeros(2, 4, 64, 64), torch.tensor([999.0, 999.0]), None)     # the CFG batch: [cond, uncond]
print("SD 1.5 inpainting at 512 px: x (2, 4, 64, 64) + mask (1, 1, 64, 64) + masked latent (1, 4, 64, 64)"
      f" -> U-Net input {tuple(seen[0])}; its first conv's weight (320, 9, 3, 3)")

# %% [markdown]
# The mask and the masked latent are shared by every image and by both halves of the guidance batch; the U-Net
# still predicts 4 channels. An ordinary model's first conv is (320, 4, 3, 3), which is why it cannot take them,
# and why "making an inpainting model" of a fine-tune means merging it into an inpainting checkpoint
# (`minisd merge --method add-difference`), not adding a flag.
#
# ## Repainting one shape
# A purple square on green; the prompt asks for a red square on green, a combination the tiny model never saw in
# training (one of the twelve held out, tutorial 7). The mask is the square's bounding box grown by 8 px on each
# side. Why so much room: the model sees the mask at latent size, in blocks of 4 x 4 pixels (nearest-resized and
# made binary at 0.5, as diffusers does), and draws its shape wherever it likes inside them; a mask drawn tight
# around the old shape lets the new one spill over the edge, where the composite cuts it off.
#
# `mask_blur` (A1111's default is 4 px, for 512 px pictures; the tiny world is 64 px, so this page uses 2) does
# not change what the model sees. It softens the **composite**: the decoded picture is pasted into the original
# through the blurred mask, `out = original * (1 - m) + result * m`, so the seam fades over a few pixels, and
# where the blurred mask is 0 every pixel is the original's.

# %%
BLUR, MARGIN, STEPS, CFG = 2, 8, 20, 7.5


def repaint_case(colour, shape, background, index, size=64):
    """A picture of the shape in another colour (its placement drawn as the training pictures' are), and a mask
    of its bounding box grown by MARGIN px."""
    rng = np.random.default_rng([16, index])
    others = [c for c in shapes.COLOURS if c not in (colour, background)]
    old = others[rng.integers(len(others))]                        # the colour the shape has now
    scale, (cx, cy) = shapes.placement(rng, size=size)
    picture = shapes.draw(old, shape, background, size, scale, (cx, cy))
    half = scale * size / 2 + MARGIN
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((cx * size - half, cy * size - half, cx * size + half, cy * size + half), 255)
    return picture, mask


picture = shapes.draw("purple", "square", "green", scale=0.5, center=(0.45, 0.55))
mask = Image.new("L", picture.size, 0)
ImageDraw.Draw(mask).rectangle((12.8 - MARGIN, 19.2 - MARGIN, 44.8 + MARGIN, 51.2 + MARGIN), 255)
prompt = shapes.caption("red", "square", "green")
previews = []                                                      # the denoiser's x0 estimate at each step
run = pipe.inpaint(prompt, picture, mask, steps=STEPS, cfg=CFG, seed=0, mask_blur=BLUR,
                   callback=lambda i, x, denoised, sigma: previews.append(denoised))
result, result_latents = run.images[0], run.latents
decoded = pipe.inpaint(prompt, picture, mask, steps=STEPS, cfg=CFG, seed=0, mask_blur=BLUR,
                       composite=False).images[0]                  # the same run, before the composite
print("judge reads:", shapes.judge(result))

a, out, raw = (np.asarray(im, dtype=np.int16) for im in (picture, result, decoded))
soft = np.asarray(inpaint.prepare_mask(mask, picture.size, blur_radius=BLUR))     # the blurred mask, 0..255
kept = soft == 0
assert np.array_equal(out[kept], a[kept])                          # outside the blurred mask: the original, exactly
reach = int(2.5 * BLUR + 0.5)                                      # the blur kernel's half width (inpaint.blur)
near = Image.new("L", picture.size, 0)
ImageDraw.Draw(near).rectangle((12.8 - MARGIN - reach, 19.2 - MARGIN - reach, 44.8 + MARGIN + reach,
                                51.2 + MARGIN + reach), 255)
assert kept[np.asarray(near) == 0].all()                           # which is all of the picture farther than that
assert np.abs(out - a)[np.asarray(mask) > 0].max() > 100           # and inside it, something new
print(f"{kept.mean():.0%} of the pixels are outside the blurred mask: all equal to the original's, bit for bit")
print(f"without the composite, the decoded picture differs there by up to {np.abs(raw - a)[kept].max()} / 255")
save(grid([[picture, mask.convert("RGB"), Image.fromarray(soft).convert("RGB"), decoded, result,
            Image.fromarray((np.abs(out - a).max(-1) > 0).astype(np.uint8) * 255)]],
          labels=["picture", "mask", f"blur {BLUR}", "decoded", "composite", "changed"], scale=3),
     "16_repaint.png")

# %% [markdown]
# "decoded" is what diffusers returns; "composite" is what A1111 (and minisd, unless `composite=False`) returns;
# "changed" is white where the composite differs from the picture at all. The composite is needed even though the
# blend kept the original latent outside the mask: the VAE does not give back the exact pixels it encoded
# (tutorial 3), and its decoder spreads each latent over neighbouring pixels, so without the composite the whole
# picture would change a little. It is also why only-masked crops, below, can be pasted back.
#
# What the denoiser predicted at a few of the steps (`denoised`), blended with the original latent as
# `Pipeline.inpaint` blends after the last step, and decoded. Only the masked part of `denoised` means anything:
# outside the mask the sampler's own x is never shown to the U-Net (the blend replaces it), so its estimate there
# drifts, and the final blend throws it away. At high noise the estimate is a blurred average of what could be
# there, and it wanders; the red settles only in the last steps, at low noise. The kept ring, one to three latents wide
# here, is the original's at every step.

# %%
latent_mask = F.interpolate(inpaint.binarize(inpaint.prepare_mask(mask, picture.size, blur_radius=BLUR)),
                            size=previews[0].shape[-2:])           # (1, 1, 16, 16), nearest, as the blend's
x0 = result_latents * (1 - latent_mask)                            # the final latent is x0 outside the mask
at = [0, 2, 5, 10, STEPS - 1]
save(grid([[to_pil(pipe.decode(latent_mask * previews[i] + x0))[0] for i in at] + [result]],
          labels=[f"step {i + 1}" for i in at] + ["result"], scale=3), "16_denoised.png")

# %% [markdown]
# ## Measured on held-out prompts
# One picture says little. Each of the twelve held-out combinations (colour, shape, background), as the prompt,
# on a picture of the same shape and background in another colour, placed as the training pictures are, four
# images each (`batch=4`, one seed): 48 images. An image is right when `shapes.judge` reads back exactly the asked
# colour, shape and background; the issue asks for the asked colour in at least 80% of them. A 95% interval on a
# rate measured from n images (Wilson's score interval) says how far the true rate could be: 48 is enough to tell
# 80% from 95%, not 85% from 90%.

# %%
def wilson(k, n, z=1.96):
    """The 95% score interval of a binomial rate k / n (Wilson 1927)."""
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def measure(per_case, **settings):
    """(images, judgements) over the held-out combinations, per_case images each, at the page's settings."""
    images, readings = [], []
    for index, combo in enumerate(shapes.HELD_OUT):
        picture, mask = repaint_case(*combo, index)
        run = {"steps": STEPS, "cfg": CFG, "mask_blur": BLUR, **settings}
        for image in pipe.inpaint(shapes.caption(*combo), picture, mask, seed=index, batch=per_case, **run).images:
            images.append(image)
            readings.append((combo, shapes.judge(image)))
    return images, readings


def report(name, readings):
    n = len(readings)
    colour = sum(want[0] == got[0] for want, got in readings)
    exact = sum(want == got for want, got in readings)
    low, high = wilson(colour, n)
    print(f"{name:16} asked colour {colour:2}/{n} = {colour / n:4.0%} ({low:.0%}-{high:.0%})   "
          f"colour, shape and background {exact:2}/{n} = {exact / n:4.0%}")
    return colour / n, exact / n


with clock("48 repaints"):
    images, readings = measure(per_case=4)
colour_rate, exact_rate = report(f"strength 1, blur {BLUR}", readings)
assert colour_rate >= 0.8
save(grid([images[i:i + 12] for i in range(0, 48, 12)], scale=1), "16_held_out.png")

# %% [markdown]
# Each row holds three cases, four images each, in the order of `shapes.HELD_OUT`. Of the four images the judge reads
# wrong, three are read in another colour than the one asked, one in the asked colour with another shape or background.
# While writing this page, on the earlier tiny model (8x8 latents), the margin around the old shape was measured too
# (at blur 4, 48 images each): 4 px gave 41/48 exactly right, 8 px 43/48, 12 px 46/48,
# and the colour 47/48 each time; at 4 px the misses were new shapes cut off by the mask's edge, which the bigger
# margins avoid.
#
# ## Strength
# As in img2img (tutorial 8), strength < 1 starts the masked region from the original picture noised to a lower
# level, and runs only the last `int(steps * strength)` steps. Low strength keeps the old colour: the blend does
# not care, it only keeps the outside. The first two images of each case at two lower strengths (24 each), then
# the same 24 at strength 1, read off the run above:

# %%
first_two = [r for i, r in enumerate(readings) if i % 4 < 2]
with clock("strengths 0.4, 0.7"):
    rows = {}
    for strength in (0.4, 0.7):
        strength_images, strength_readings = measure(per_case=2, strength=strength)
        rows[strength] = report(f"strength {strength}", strength_readings)
        old = sum(got[0] not in (want[0], want[2]) for want, got in strength_readings)
        print(f"{'':16} another colour (the old shape's, or none) in {old}/24")
report("strength 1", first_two)
assert rows[0.4][0] < rows[0.7][0]

# %% [markdown]
# At 0.4 only int(20 * 0.4) = 8 steps run, from a noise level where the old colour is still most of the signal, and none
# of the 24 images gets the asked colour. Strength 1 is right for changing a colour; lower strengths are for changing a
# picture's details while keeping its colours and layout (a face's expression, a texture).
#
# ## Mask blur
# The same 24 cases at blur 0 (a hard seam) and at 8 px. The blur fades *both* ways: outside the mask it
# lets the new picture reach out (up to 2.5 blur radii), and inside the mask it lets the original show through;
# at 8 px on a 64 px picture, the old shape's colour mixes into the edges of the new one.

# %%
first_image = {BLUR: images[0]}
with clock("blur 0, 8"):
    for blur in (0, 8):
        blur_images, blur_readings = measure(per_case=2, mask_blur=blur)
        report(f"blur {blur}", blur_readings)
        first_image[blur] = blur_images[0]
report(f"blur {BLUR}", first_two)
save(grid([[first_image[b] for b in sorted(first_image)]], labels=[f"blur {b}" for b in sorted(first_image)],
          scale=3), "16_blur.png")

# %% [markdown]
# The judge reads the shape and its colour, not the seam, so blur 0 and 2 score about the same; the difference is
# at the edge of the mask, hard at 0 and faded at 2 (the figure: the same case, first image). At 8 px the blur is
# as wide as the margin: the blurred mask is grey over the old shape's edge, the old colour shows through there (the
# darker band), and more readings go wrong. So the blur must stay well inside the margin between the mask's edge
# and what it replaces. (A blur also rounds the mask's corners, which can flip a corner of the latent mask, so the
# images at 8 px are not the same draws as those at 0 and 2.)

# %% [markdown]
# ## Only masked
# On a big picture with a small masked area, A1111's "Inpaint area: Only masked" (diffusers' `padding_mask_crop`)
# crops the mask's bounding box plus `padding` pixels, grown to the model's aspect ratio, inpaints that crop at the
# model's own size, and pastes it back: the model works at the size it was trained at, with all its pixels on the
# part that matters, and everything outside the box is left as it is (a small face in a big photo gets 512 px of
# SD's attention instead of a few dozen). Here a 128 x 128 picture with a small square: the crop around it is
# enlarged to the tiny model's 64 x 64; without only-masked, the whole picture is inpainted at 128 x 128, a size
# the tiny model never saw in training.

# %%
PADDING = 4                                                        # A1111's 32, for 512 px pictures
big = shapes.draw("purple", "square", "green", size=128, scale=0.15, center=(0.3, 0.35))
big_mask = Image.new("L", big.size, 0)
half = 0.15 * 128 / 2 + MARGIN                                     # the square's half side + the margin
ImageDraw.Draw(big_mask).rectangle((0.3 * 128 - half, 0.35 * 128 - half, 0.3 * 128 + half, 0.35 * 128 + half), 255)
region = inpaint.crop_region(inpaint.prepare_mask(big_mask, big.size, blur_radius=BLUR), 64, 64, padding=PADDING)
print("the crop inpainted at 64 x 64:", region)
with clock("only masked, whole"):
    only = pipe.inpaint(prompt, big, big_mask, steps=STEPS, cfg=CFG, seed=0, mask_blur=BLUR, only_masked=True,
                        padding=PADDING).images[0]
    whole = pipe.inpaint(prompt, big, big_mask, steps=STEPS, cfg=CFG, seed=0, mask_blur=BLUR).images[0]
x1, y1, x2, y2 = region
print("judge reads the crop (only masked):", shapes.judge(only.crop(region)),
      "  the same crop (whole picture):", shapes.judge(whole.crop(region)))
outside = np.ones((128, 128), bool)
outside[y1:y2, x1:x2] = False
assert np.array_equal(np.asarray(only)[outside], np.asarray(big)[outside])
save(grid([[big, big_mask.convert("RGB"), only, whole]], labels=["picture", "mask", "only masked", "whole"],
          scale=2), "16_only_masked.png")

# %% [markdown]
# Inpainted in its 64 px crop, the square comes out as asked; the whole picture at 128 px gives the tiny model a
# square of a few latents at a size it was not trained at, and here it draws a red square too (the judge reads both
# crops the same), larger and filling the mask to its edges. Outside the crop box, only-masked
# leaves every pixel as it was (asserted above), before the composite even runs.

# %% [markdown]
# ## Outpainting
# Outpainting is inpainting on a bigger canvas: `inpaint.extend` adds pixels on the chosen sides (a multiple of
# 8, so they are whole latents), and the new area is the mask. What the new area starts as matters little at
# strength 1 here, since it starts from pure noise; with `masked_content="fill"` (what `minisd outpaint` does) it
# is painted with the blurred colours around it, which is what it starts from at lower strengths. The 64 px
# picture becomes 128 x 64 (`minisd outpaint PROMPT --init-image in.png --extend left=32,right=32`). First row: the
# canvas and its fill; then three seeds with the picture's own caption as the prompt, and three with a prompt
# that says only what the new area should show.

# %%
small = shapes.draw("yellow", "circle", "blue", scale=0.6)
canvas, new_area = inpaint.extend(small, left=32, right=32)
centre = np.asarray(inpaint.prepare_mask(new_area, canvas.size, blur_radius=BLUR)) == 0
blue = np.array(shapes.COLOURS["blue"])
rows = [[canvas, inpaint.fill(canvas, new_area)]]
with clock("outpaint"):
    for prompt in (shapes.caption("yellow", "circle", "blue"), "a blue background"):
        wide = pipe.inpaint(prompt, canvas, new_area, steps=STEPS, cfg=CFG, seed=[0, 1, 2], mask_blur=BLUR,
                            masked_content="fill").images
        rows.append(wide)
        for seed, image in enumerate(wide):
            a = np.asarray(image, dtype=np.float64)
            assert np.array_equal(a[centre], np.asarray(canvas)[centre])   # the original picture, untouched
            extra = (np.linalg.norm(a - blue, axis=-1) > shapes.MIN_COLOUR_DISTANCE / 2)[np.asarray(new_area) > 0]
            print(f"{prompt!r:40} seed {seed}: {small.size} -> {image.size}, judge reads {shapes.judge(image)}, "
                  f"{extra.mean():3.0%} of the new area not background")
save(grid(rows, row_labels=["canvas, fill", "the caption", "background"], label_width=84, scale=2),
     "16_outpaint.png")

# %% [markdown]
# With the picture's caption, the model can also draw a shape in the new area (seed 1, 22% of it): guidance pulls every
# masked latent toward "a yellow circle", and nothing tells the model that the circle is already there. A prompt that
# describes only what the new area should show does not help the tiny model: "a blue background" names no shape, and
# every caption it was trained on names one; with it, 35% to 57% of the new area comes out orange or yellow, not
# background. For SD, whose captions do include scenery alone, the usual advice holds: an outpainting prompt describes
# the scenery to add, not the subject that is already there.
#
# ## Where the time went
# Each phase, timed as it ran (wall time, and this process's CPU time, which a busy machine does not inflate).
# Every inpainted image costs what a text-to-image one does (the blend is one extra multiply-add per step), plus
# the VAE encoding of the picture.

# %%
clock.summary()
