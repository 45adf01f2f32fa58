"""What the page shows beyond the A1111 API: each step's x0 estimate as it forms (see jobs.preview), and the
cross-attention map of each prompt word over the image.

The word maps are read from the U-Net's own cross-attention (unet.UNet.record_cross_attention): at every step each
cross-attention layer's softmax(Q K^T / sqrt(d)) of the conditional half, averaged over heads, is scaled to the
latent's size and summed over layers and steps. Pixel p's value for token j is how much p's queries read token j:
the map of "red" lights up where the image drew the red thing (Hertz et al. 2022, "Prompt-to-Prompt"; Tang et al.
2022, "DAAM"). The tutorial tutorials/05_unet.py computes the same maps by hand.
"""
import torch
import torch.nn.functional as F
from einops import rearrange

from ..prompts import parse_lora_tags
from ..tokenizer import BOS, EOS
from . import a1111


def _to_latent_grid(probs, height, width):
    """(H'*W', tokens) of one layer -> (tokens, height, width): the layer's grid, scaled to the latent's size."""
    scale = round((height * width / probs.shape[0]) ** 0.5)         # 1, 2, 4, 8: the U-Net's levels
    grid = rearrange(probs, "(y x) n -> n y x", y=height // scale)[None]
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0]


def attention_maps(read, pipe, callback):
    """Run `read` (one image) with the cross-attention recorded. Returns (image, parameters, words), words being
    [(token text, map (height, width) tensor)] for the prompt's tokens, in order."""
    text = parse_lora_tags(read.prompt)[0]             # what the text encoder reads
    if len(pipe.model.tokenizer.encode(text)) > 75:
        raise ValueError("the attention map reads prompts of up to 75 tokens; shorten the prompt")
    ids = pipe.model.tokenizer(text)[0].tolist()
    height, width = (s // pipe.factor for s in (read.kwargs["height"] or pipe.model.config.image_size,
                                                  read.kwargs["width"] or pipe.model.config.image_size))
    store, total = [], torch.zeros(len(ids), height, width)

    def record(i, x, denoised, sigma):
        for probs in store:             # (2B or B, H'*W', 77): the last row is the last image's conditional half
            total.add_(_to_latent_grid(probs[-1, :, :len(ids)].cpu(), height, width))
        store.clear()
        callback(i, x, denoised, sigma)

    pipe.model.unet.record_cross_attention(store)
    try:
        images, infotexts, _ = a1111.generate(read, pipe, record)
    finally:
        pipe.model.unet.record_cross_attention(None)
    end = ids.index(EOS)
    words = [(pipe.model.tokenizer.decoder[t].replace("</w>", ""), total[j]) for j, t in enumerate(ids[:end])
             if t != BOS]
    return images[0], infotexts[0], words
