"""Pictures to the pixels BLIP and BLIP-2 see: what transformers' BlipImageProcessor does with PIL (its `Pil`
backend, the processor the models were released with; BLIP-2's Blip2Processor uses the same class), read from
the folder's preprocessor_config.json:

1. RGB; a picture with transparency is laid on white first (transformers' convert_to_rgb);
2. resize to size["height"] x size["width"] with PIL bicubic, ignoring the aspect ratio (BLIP trained on
   squashed squares: Li et al. 2022 resize to 384x384);
3. times rescale_factor (1/255) in float64, then float32;
4. (x - image_mean) / image_std per channel, OpenAI CLIP's mean and std, in float32.

transformers 5's default BlipImageProcessor is a torchvision port whose tensor bicubic resize differs from PIL's
by a few levels per pixel; the PIL path is the one the weights were trained against (BLIP's own code resizes PIL
images with torchvision.transforms.Resize, which calls PIL).
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessor:
    height: int = 384
    width: int = 384
    resample: int = Image.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @classmethod
    def from_json(cls, d: dict):
        """From a preprocessor_config.json dict (the keys BlipImageProcessor writes)."""
        size = d.get("size", {"height": 384, "width": 384})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not (isinstance(size, dict) and {"height", "width"} <= set(size)):
            raise ValueError(f"preprocessor_config.json: size {size!r} is not {{'height': H, 'width': W}}")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ValueError(f"preprocessor_config.json: {flag} false is not supported")
        return cls(int(size["height"]), int(size["width"]), int(d.get("resample", Image.BICUBIC)),
                   float(d.get("rescale_factor", 1 / 255)), tuple(d.get("image_mean", CLIP_MEAN)),
                   tuple(d.get("image_std", CLIP_STD)))

    def __call__(self, images) -> torch.Tensor:
        """PIL images -> float32 pixels (N, 3, height, width)."""
        return torch.from_numpy(np.stack([self.one(image) for image in images]))

    def one(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image).resize((self.width, self.height), resample=self.resample)
        x = (np.asarray(image, dtype=np.float64) * self.rescale_factor).astype(np.float32)     # (H, W, 3)
        x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")
