"""Inpainting and outpainting: the steps around the sampling loop that Pipeline.inpaint composes.

    mask = prepare_mask(mask, image.size, invert, blur=4)     white = repaint (A1111's and diffusers' convention)
    region = crop_region(mask, 512, 512, padding=32)          "inpaint only masked" (diffusers' padding_mask_crop)
    image = fill(image, mask)                                 masked content "fill": the surroundings' colours
    ... sample ...                                            conditioned_unet (9 channels) / blended_unet (4)
    result = composite(result, original, mask)                the original pasted back outside the mask

Two kinds of model repaint a region. The official inpainting checkpoints (sd-v1-5-inpainting, SD 2's
512-inpainting-ema) were trained with 5 more input channels: the mask at latent size and the VAE latent of the
image with the masked pixels set to 0 (grey), so the U-Net sees what it must keep (`conditioned_unet`). Any
other model knows nothing of masks; at every step the kept region of its input is replaced by the original
latent noised to the current level (`blended_unet`), the "blended diffusion" of Avrahami et al. 2022, which is
what diffusers' StableDiffusionInpaintPipeline does for a 4-channel U-Net.

The model sees a binary mask (>= 0.5 is repaint, as diffusers binarizes), nearest-resized to the latent size.
The blur only softens the composite: A1111 blurs the mask and pastes the original back through it, so outside
the blurred edge every pixel is the original's, and the seam fades over a few pixels.
"""
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .diffusion import scalings, t_to_sigma

MASKED_CONTENT = ("original", "fill", "latent-noise")
A1111_MASKED_CONTENT = {"fill": "fill", "original": "original", "latent-noise": "latent noise"}


def mask_parameters(strength, mask_blur, invert_mask, masked_content, only_masked, padding):
    """The mask settings as A1111's infotext fields (images.a1111_parameters; None: left out, as A1111 does)."""
    return dict(denoising_strength=strength, mask_blur=mask_blur,
                mask_mode="Inpaint not masked" if invert_mask else None,
                masked_content=A1111_MASKED_CONTENT[masked_content],
                inpaint_area="Only masked" if only_masked else None,
                masked_area_padding=padding if only_masked else None)


# ---------------------------------------------------------------------------------------------------------------
# The mask, in pixels


def prepare_mask(mask, size, invert=False, blur_radius=0):
    """Any PIL image -> an "L" mask of `size` (resized if it differs, as A1111 does), inverted if asked, blurred.
    An all-black mask repaints nothing: an error, not a silent copy of the input."""
    if not isinstance(mask, Image.Image):
        raise TypeError(f"mask must be a PIL image, got {type(mask).__name__}")
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A")         # a transparent brush stroke on a clear layer: its alpha is the mask
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    if mask.getextrema()[1] < 128:
        raise ValueError("the mask is all black (no pixel >= 128, after --invert-mask if given): nothing to "
                         "repaint; white is repaint")
    return blur(mask, blur_radius)


def blur(mask, radius):
    """A1111's mask blur: a Gaussian of std `radius` px with a kernel of 2 * int(2.5 radius + 0.5) + 1 taps, along
    x then y, each pass rounded to 8 bits (cv2.GaussianBlur with BORDER_REFLECT_101, which A1111 calls)."""
    if radius <= 0:
        return mask
    k = 2 * int(2.5 * radius + 0.5) + 1
    taps = np.exp(-(np.arange(k) - k // 2) ** 2 / (2 * radius ** 2))
    taps /= taps.sum()
    a = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (k // 2, k // 2)
        padded = np.pad(a, pad, mode="reflect")           # numpy's "reflect" is cv2's BORDER_REFLECT_101
        n = a.shape[axis]
        a = sum(w * padded.take(range(i, i + n), axis=axis) for i, w in enumerate(taps))
        a = np.round(a).clip(0, 255)
    return Image.fromarray(a.astype(np.uint8))


def binarize(mask):
    """The mask the model sees: (1, 1, H, W), 1 = repaint where the mask is >= 0.5 (diffusers' mask processor)."""
    a = np.asarray(mask, dtype=np.float32) / 255
    return torch.from_numpy((a >= 0.5).astype(np.float32))[None, None]


def crop_region(mask, width, height, padding):
    """A1111's "inpaint only masked" box, as diffusers' get_crop_region computes it: (x1, y1, x2, y2), the mask's
    bounding box plus `padding` pixels, grown to the aspect ratio of the `width` x `height` it will be inpainted at
    and moved inside the image."""
    a = np.asarray(mask) > 0
    rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
    h, w = a.shape
    x1, y1 = max(cols[0] - padding, 0), max(rows[0] - padding, 0)
    x2, y2 = min(cols[-1] + 1 + padding, w), min(rows[-1] + 1 + padding, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return int(x1), int(y1), int(x2), int(y2)


def _grow(lo, hi, by, size):
    """[lo, hi) widened by `by` (half each side), shifted back inside [0, size), cut to size if still too wide."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


# ---------------------------------------------------------------------------------------------------------------
# Pixels: what the masked area starts as, the canvas of an outpainting, and the final composite


def fill(image, mask):
    """A1111's masked content "fill": the masked area painted with blurred colours of what surrounds it. The kept
    pixels, blurred at radii from 256 down to 0 px, are laid over each other coarse to fine, so every masked pixel
    takes the colour of its nearest kept neighbourhood (PIL's premultiplied "RGBa" keeps the transparent masked
    pixels from darkening the blur)."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def parse_extend(text, multiple=8):
    """"left=128,right=128" -> {"left": 128, "right": 128, "top": 0, "bottom": 0}; each a multiple of `multiple`."""
    sides = dict.fromkeys(("left", "right", "top", "bottom"), 0)
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        side, _, value = part.partition("=")
        side = side.strip().lower()
        if side not in sides or not value.strip().isdigit():
            raise ValueError(f"--extend takes side=pixels pairs of left, right, top, bottom (e.g. left=128,"
                             f"right=128), got {part!r}")
        sides[side] = int(value)
    bad = {s: v for s, v in sides.items() if v % multiple}
    if bad or not any(sides.values()):
        raise ValueError(f"--extend needs at least one side, each a multiple of {multiple} pixels, got {text!r}")
    return sides


def extend(image, left=0, right=0, top=0, bottom=0):
    """Outpainting's canvas: the image with the given pixels added on each side, the new area filled with the edge
    colours (each edge pixel repeated outwards), and its mask (white = the new area)."""
    a = np.asarray(image.convert("RGB"))
    canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    mask[top:top + a.shape[0], left:left + a.shape[1]] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)


def paste_back(result, original, mask, region=None, overlay=True):
    """The inpainted image at the original's size: an only-masked crop resized back into its `region` of the
    original, then (overlay) the original composited over it outside the mask."""
    if region is not None:
        x1, y1, x2, y2 = region
        full = original.copy()
        full.paste(result.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        result = full
    return composite(result, original, mask) if overlay else result


def composite(result, original, mask):
    """A1111's overlay (`apply_overlay`): the original pasted over the result through the inverted (blurred) mask,
    out = original (1 - m) + result m with m = mask / 255, rounded: outside the mask every pixel is the original's."""
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255
    out = np.asarray(original, dtype=np.float64) * (1 - m) + np.asarray(result, dtype=np.float64) * m
    return Image.fromarray(np.round(out).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# The U-Net, seen through the mask: unet_call wrappers for Pipeline._sample, (x, t, context) -> model output


def conditioned_unet(unet, mask, masked_latents):
    """A 9-channel inpainting U-Net: its input is [x (4), mask at latent size (1), VAE latent of the masked image
    (4)], in the order diffusers' StableDiffusionInpaintPipeline (and LDM's hybrid conditioning) concatenates
    them. mask and masked_latents: (1, ., h, w), shared by every image and both halves of the CFG batch."""
    def call(x, t, context):
        b = x.shape[0]
        return unet(torch.cat([x, mask.expand(b, -1, -1, -1), masked_latents.expand(b, -1, -1, -1)], dim=1),
                    t, context)
    return call


def blended_unet(unet, mask, x0, noise, sigma_start, sigmas_train, interpolation):
    """Any other U-Net: where the mask is 0, its input is the original latent x0 noised to the current level with
    the run's own starting noise, x0 + sigma * noise (diffusers re-noises the kept region with `add_noise` after
    every step). The U-Net gets x scaled by c_in = 1 / sqrt(sigma^2 + 1), so the kept part is scaled the same; sigma
    is read back from the timestep t the denoiser computed from it (exact for every sampler, also between the
    plan's sigmas). The first step, at sigma_start, is left as it is, as diffusers does: below strength 1 the kept
    region starts as x0 + sigma_start * noise anyway, and at strength 1 diffusers starts from pure noise
    everywhere. The sampler's own x keeps its values in the kept region, which nothing reads but this blend;
    Pipeline.inpaint puts x0 there after the last step.

    mask: (1, 1, h, w), 1 = repaint; x0, noise: (1 or B, 4, h, w)."""
    # "nearest" rounds t to a training step; log-linear is then the closest inverse
    interpolation = "linear" if interpolation == "linear" else "log"

    def call(x, t, context):
        sigma = t_to_sigma(t[:1].cpu(), sigmas_train, interpolation).item()
        if sigma >= sigma_start * (1 - 1e-5):       # t is float32: sigma comes back within ~1e-7 of itself
            return unet(x, t, context)
        kept = (x0 + sigma * noise) * scalings(sigma, "eps")[2]                 # (B, 4, h, w)
        kept = kept.repeat(x.shape[0] // kept.shape[0], 1, 1, 1)               # the CFG batch: [x, x]
        return unet(mask * x + (1 - mask) * kept, t, context)
    return call
