"""Hires fix (A1111's txt2img "Hires. fix"): generate at the size the model was trained at, upscale, then img2img
at the larger size, so the composition comes from the size the model knows and the detail from the second pass.

    images = pipe.generate("a castle at dusk", seed=1, hires=Hires(scale=2, strength=0.6, upscaler="latent"))
    minisd generate "a castle at dusk" --seed 1 --hr-scale 2 --hr-denoising-strength 0.6 --hr-upscaler latent

The second pass, as A1111's StableDiffusionProcessingTxt2Img.sample_hr_pass does it:
  upscale        "latent": the first pass's latents, torch's bilinear interpolation without antialiasing (A1111's
                 "Latent"); "latent-nearest": nearest (A1111's "Latent (nearest)"); "lanczos": the decoded image,
                 PIL Lanczos, encoded again by the VAE (A1111's "Lanczos").
  noise          fresh, from the same seeds at the new size (A1111 builds a new ImageRNG from the same seeds and
                 subseeds): a generator seeded with the image's seed draws it (for "lanczos" after the VAE posterior
                 sample, the order of minisd's img2img), bent toward the variation seed's if there is one.
  steps          exactly `steps` steps (0: the first pass's), the last ones of a schedule of
                 int(steps / min(strength, 0.999)) steps: A1111's setup_img2img_steps, which the hires pass always
                 calls with a step count. (minisd's img2img, like A1111's img2img tab by default and diffusers, runs
                 int(steps * strength) of `steps` instead.)
The sampler, schedule, CFG and prompts are the first pass's.
"""
from dataclasses import dataclass

import torch.nn.functional as F
from PIL import Image

# the --hr-upscaler choices and A1111's names for them (as its PNG parameters write "Hires upscaler")
UPSCALERS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}
# A1111's shared.latent_upscale_modes for those two
LATENT_MODES = {"latent": "bilinear", "latent-nearest": "nearest"}


@dataclass(frozen=True)
class Hires:
    scale: float = 2.0          # output size = int(first pass size * scale), as A1111's hr_upscale_to_x / _y
    strength: float = 0.7       # the second pass's denoising strength (A1111's default)
    upscaler: str = "latent"    # a key of UPSCALERS
    steps: int = 0              # the second pass's steps; 0: the first pass's (A1111's "Hires steps")

    def check(self):
        if self.upscaler not in UPSCALERS:
            raise ValueError(f"hires upscaler must be one of {', '.join(UPSCALERS)}, got {self.upscaler!r}")
        if not self.scale > 0:
            raise ValueError(f"hires scale must be > 0, got {self.scale}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"hires denoising strength must be in (0, 1], got {self.strength}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"hires steps must be >= 0 (0: the first pass's), got {self.steps!r}")

    def size(self, width, height, multiple):
        """The second pass's (width, height)."""
        size = int(width * self.scale), int(height * self.scale)
        if any(v < multiple or v % multiple for v in size):
            raise ValueError(f"hires scale {self.scale:g} makes {width}x{height} into {size[0]}x{size[1]}: both "
                             f"sides must be positive multiples of {multiple}")
        return size

    def schedule(self, first_steps):
        """(the schedule's step count, the steps run): A1111's setup_img2img_steps(p, steps) with steps given."""
        steps = self.steps or first_steps
        return int(steps / min(self.strength, 0.999)), steps

    def parameters(self, first_steps):
        """The PNG parameters A1111 writes for it."""
        return {"denoising_strength": self.strength, "Hires upscale": f"{self.scale:g}",
                "Hires steps": self.steps or first_steps, "Hires upscaler": UPSCALERS[self.upscaler]}


def upscale_latents(latents, size, upscaler):
    """(B, 4, h, w) -> (B, 4, H, W), as A1111's torch.nn.functional.interpolate call (antialias off)."""
    return F.interpolate(latents, size=size, mode=LATENT_MODES[upscaler], antialias=False)


def upscale_images(images, width, height):
    """PIL images -> PIL images at width x height: A1111's resize_image(0, ..., upscaler_name="Lanczos")."""
    return [im.resize((width, height), Image.LANCZOS) for im in images]
