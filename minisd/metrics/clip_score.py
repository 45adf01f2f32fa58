r"""CLIP score (Hessel et al. 2021, "CLIPScore"), as torchmetrics' CLIPScore computes it:

    score = max( mean_i 100 cos(E_I(image_i), E_T(caption_i)), 0 )

with OpenAI CLIP ViT-L/14 (torchmetrics' default model). Note torchmetrics clamps the *mean* at 0, and scales by
100; the paper clamps each pair and scales by 2.5.

E_I is the image tower (clip_image.py). E_T is CLIP's text tower, which is SD1's text encoder (minisd/clip.py,
config.SD1_TEXT): its final-LayerNorm output at the <|endoftext|> token (the first one: argmax of the ids, since
49407 is the largest id and padding, also 49407, comes after it), times `text_projection`. The causal mask makes
that output independent of what follows the EOS, so transformers' padding to the longest caption and minisd's
padding to 77 give the same embedding. Captions over 75 tokens differ: minisd truncates and keeps EOS last
(OpenAI's clip.tokenize(truncate=True)); torchmetrics cuts the ids at 77, dropping the EOS, and pools wherever
transformers' rule then lands.

Preprocessing is transformers' CLIPImageProcessor in its PIL form (and OpenAI's): resize the shortest side to
224 with PIL bicubic (antialiased) on the uint8 image, centre-crop 224x224 with the offset rounded down, x/255,
normalise with CLIP's mean and std. transformers >= 5 runs torchvision's uint8 bicubic by default, which
differs from PIL's by up to 2/255 on about 1% of the pixels of a downscaled image; images already 224 px on
the short side take no resize and agree exactly. (OpenAI's CenterCrop rounds the offset to nearest: one pixel
apart from transformers when the margin is odd.)
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from minisd.clip import TextEncoder
from minisd.config import SD1_TEXT, TextConfig
from minisd.tokenizer import Tokenizer
from weights_convert import text as text_weights

from . import clip_image
from .clip_image import VIT_L_14, ImageEncoder, VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI's, over their training images
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIP(nn.Module):
    """The two towers and the text projection (open_clip's orientation: (width, embed_dim), x @ P)."""

    def __init__(self, vision: VisionConfig = VIT_L_14, text: TextConfig = SD1_TEXT):
        super().__init__()
        self.visual = ImageEncoder(vision)
        self.text = TextEncoder(text)
        self.text_projection = nn.Parameter(torch.randn(text.width, vision.embed_dim) * text.width ** -0.5)

    def encode_image(self, pixels):                                    # (N, 3, 224, 224) -> (N, embed_dim)
        return self.visual(pixels)

    def encode_text(self, tokens):                                     # (N, 77) -> (N, embed_dim)
        x = self.text(tokens)                                          # final LayerNorm output (N, 77, width)
        eos = tokens.argmax(dim=-1)                                    # first <|endoftext|> (the largest id)
        return x[torch.arange(x.shape[0]), eos] @ self.text_projection


def load_clip(weights, vision: VisionConfig = VIT_L_14, text: TextConfig = SD1_TEXT) -> CLIP:
    """A CLIP from a state dict or file in transformers' CLIPModel layout (`vision_model.*`, `text_model.*`,
    `visual_projection.weight`, `text_projection.weight`) or open_clip's (`visual.*`, text keys at top level,
    `text_projection`). .safetensors, or a pickled state dict (loaded with weights_only=True)."""
    sd = _read(weights) if isinstance(weights, (str, Path)) else weights
    model = CLIP(vision, text)
    if "visual_projection.weight" in sd:                               # transformers
        image_sd = clip_image.from_transformers(sd, vision)
        text_sd, _ = text_weights.from_transformers({k: v for k, v in sd.items() if k.startswith("text_model.")},
                                                    text)
        projection = sd["text_projection.weight"].T                    # Linear (embed_dim, width) -> (width, ...)
    elif "visual.conv1.weight" in sd:                                  # open_clip
        image_sd = clip_image.from_open_clip(sd, vision)
        text_sd, _ = text_weights.from_open_clip({k: v for k, v in sd.items() if not k.startswith("visual.")}, text)
        projection = sd["text_projection"]
    else:
        raise ValueError("not a CLIP state dict: neither transformers' 'visual_projection.weight' nor open_clip's "
                         "'visual.conv1.weight' is in it")
    model.visual.load_state_dict(image_sd)
    model.text.load_state_dict(text_sd)
    with torch.no_grad():
        model.text_projection.copy_(projection)
    return model.eval().requires_grad_(False)


def _read(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CLIP weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def preprocess(images, size=224):
    """PIL images or uint8 RGB tensors (N, 3, H, W) / list of (3, H, W) -> (N, 3, size, size) float32."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    out = []
    for image in images:
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected uint8 RGB images (3, H, W), got {image.dtype} {tuple(image.shape)}")
            image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
        image = image.convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        if short != size:   # shortest side to `size`, the other rounded down (transformers' resize rule)
            long = int(size * long / short)
            image = image.resize((size, long) if w <= h else (long, size), resample=Image.BICUBIC)
        w, h = image.size
        top, left = (h - size) // 2, (w - size) // 2
        x = np.asarray(image, dtype=np.float32)[top:top + size, left:left + size] / 255
        out.append(torch.from_numpy(x).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@torch.no_grad()
def clip_scores(images, captions, model: CLIP, tokenizer: Tokenizer = None, batch_size=32, device="cpu"):
    """100 cos(E_I, E_T) for each (image, caption) pair, unclamped: (N,) float32."""
    if isinstance(captions, str):
        captions = [captions]
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    tokenizer = tokenizer or Tokenizer()
    scores = []
    for start in range(0, len(captions), batch_size):
        pixels = preprocess(images[start:start + batch_size], model.visual.cfg.image_size).to(device)
        tokens = tokenizer(list(captions[start:start + batch_size])).to(device)
        image_emb = model.encode_image(pixels)
        text_emb = model.encode_text(tokens)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        scores.append((100 * (image_emb * text_emb).sum(dim=-1)).cpu())
    return torch.cat(scores)


def clip_score(images, captions, model: CLIP, tokenizer: Tokenizer = None, batch_size=32, device="cpu"):
    """torchmetrics' CLIPScore: the mean of the pair scores, clamped at 0. A Python float."""
    return max(float(clip_scores(images, captions, model, tokenizer, batch_size, device).mean()), 0.0)
