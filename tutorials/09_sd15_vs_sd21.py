"""9. SD 1.5 vs SD 2.1: what differs (text encoder, heads, v-prediction, sizes); running the real weights on a GPU."""
# %% [markdown]
# Everything in tutorials 1-8 ran on the tiny model, which is SD 1.5's architecture at a small size. The real
# models use the same classes with the numbers in `minisd/config.py`: `SD15`, `SD21_BASE` (512 px, predicts eps)
# and `SD21_V` (768 px, predicts v). No weights are needed to compare them: built on the meta device, a network
# has its parameters' shapes and nothing else.

# %%
import torch

from minisd.config import SD15, SD21_BASE, SD21_V
from minisd.model import build_on_meta


def millions(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


models = {c.name: build_on_meta(c) for c in (SD15, SD21_BASE, SD21_V)}
print(f"{'':<10} {'text enc.':>10} {'U-Net':>8} {'VAE':>7} {'total':>8}   fp16 weights")
for name, m in models.items():
    total = millions(m)
    print(f"{name:<10} {millions(m.text_encoder):>9.1f}M {millions(m.unet):>7.1f}M {millions(m.vae):>6.1f}M "
          f"{total:>7.1f}M   {total * 1e6 * 2 / 2 ** 30:.2f} GiB (2 bytes per parameter)")

# %% [markdown]
# ## What differs, read off the configs

# %%
rows = [
    ("text encoder", lambda c: "OpenAI CLIP ViT-L/14" if c.text.width == 768 else "OpenCLIP ViT-H/14"),
    ("text width x layers", lambda c: f"{c.text.width} x {c.text.layers} (of {c.text.source_layers})"),
    ("activation", lambda c: c.text.activation),
    ("padding token", lambda c: c.text.pad_id),
    ("U-Net context_dim", lambda c: c.unet.context_dim),
    ("U-Net heads", lambda c: f"{c.unet.num_heads} per layer" if c.unet.num_head_channels < 0
                              else f"width {c.unet.num_head_channels} each"),
    ("proj_in/proj_out", lambda c: "Linear" if c.unet.use_linear_in_transformer else "1x1 Conv2d"),
    ("prediction", lambda c: c.prediction),
    ("image size", lambda c: f"{c.image_size} px"),
    ("latent size", lambda c: f"{c.unet.in_channels} x {c.image_size // 8} x {c.image_size // 8}"),
]
configs = (SD15, SD21_BASE, SD21_V)
print(f"{'':<20}" + "".join(f"{c.name:<22}" for c in configs))
for label, get in rows:
    print(f"{label:<20}" + "".join(f"{str(get(c)):<22}" for c in configs))

# %% [markdown]
# - **Text encoder** (tutorials 1-2): SD 2 swapped OpenAI's CLIP for the larger OpenCLIP ViT-H/14, trained on
#   LAION-2B, and conditions on its penultimate layer; its tokenizer pads with 0 instead of `<|endoftext|>`.
#   Prompts and their embeddings do not transfer between the two families. 0 is the token "!": diffusers'
#   SD 2 tokenizer, told "!" is its padding, turns each "!" typed in a prompt into 0 ("night!!" -> 0, 0),
#   where SD 2's own tokenizer (open_clip's, which minisd follows) merges it ("!!" is 748): with "!" in an
#   SD 2 prompt, minisd draws the original code's (and A1111's) image from a seed, not diffusers'.
# - **Attention heads**: SD 1 uses 8 heads at every resolution, so a head's width grows with the channels; SD 2
#   fixes the head width at 64, so the head count grows. Same parameters, different attention:

# %%
from minisd.unet import SpatialTransformer

for name in ("sd15", "sd21"):
    levels = {}
    for module in models[name].unet.modules():
        if isinstance(module, SpatialTransformer):
            attn = module.transformer_blocks[0].attn2
            channels = module.norm.num_channels
            levels[channels] = f"{attn.heads} heads x {channels // attn.heads}"
    print(f"{name}: " + ", ".join(f"{c} channels: {h}" for c, h in sorted(levels.items())))

# %% [markdown]
# - **v-prediction** (Salimans & Ho 2022): SD 2.1-768's U-Net predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0
#   instead of eps. Only the denoiser's scalings change (Karras et al. eq. 7, `diffusion.scalings`):
#   D = c_skip x + c_out F(c_in x). For eps, c_skip = 1 and c_out = -sigma: at high noise a small error in eps
#   becomes a large error in D. For v, c_skip and c_out both shrink at high noise, so the network's output stays
#   well scaled at every sigma. Loading a v-model as eps (or the reverse) gives noise-like images, which is why
#   minisd reads the prediction type from a config beside the file.

# %%
from minisd import diffusion

print(f"{'sigma':>7} | {'eps: c_skip':>11} {'c_out':>8} | {'v: c_skip':>9} {'c_out':>8} | {'c_in':>6}")
for sigma in (0.03, 0.5, 1.0, 4.0, 14.6):
    e_skip, e_out, c_in = diffusion.scalings(sigma, "eps")
    v_skip, v_out, _ = diffusion.scalings(sigma, "v")
    print(f"{sigma:>7} | {e_skip:>11.3f} {e_out:>8.3f} | {v_skip:>9.3f} {v_out:>8.3f} | {c_in:>6.3f}")

# %% [markdown]
# - **Sizes**: SD 2.1-768 was trained at 768 x 768, a 96 x 96 latent. Its highest-resolution self-attention
#   sees 9216 tokens instead of 4096, and the attention score matrix grows with the square: (9216 / 4096)^2 = 5.1
#   times the entries per head. Generating far from a model's own size (e.g. SD 2.1-768 at 512) gives worse images.
#
# ## Running the real weights
# The same commands as for the tiny model, with `--model`. A name downloads the official single file once (to
# `$MINISD_CACHE`, default `~/.cache/minisd`) and checks its SHA-256; a path loads a file you have. On a CUDA GPU
# minisd runs fp16 with the VAE decode in fp32.
#
#     pip install -e .        # with a CUDA build of torch for a GPU
#     minisd generate "a castle at dusk, oil painting" --model sd15 --seed 1 --out castle.png
#     minisd generate "a castle at dusk, oil painting" --model sd21-base --seed 1          # 512 px, eps
#     minisd generate "a castle at dusk, oil painting" --model sd21 --seed 1               # 768 px, v
#     minisd generate "a fox" --model v1-5-pruned-emaonly.safetensors --sampler "Euler a" --steps 30 --cfg 7
#     minisd img2img "a watercolour fox" --init-image fox.png --strength 0.6 --model sd15
#
# `sd15` is `v1-5-pruned-emaonly.safetensors` (4,265,146,304 bytes), `sd21` is `v2-1_768-ema-pruned.safetensors`,
# `sd21-base` is `v2-1_512-ema-pruned.safetensors` (`minisd/download.py`). `--attention-slice` and `--vae-tile`
# trade speed for memory on small GPUs; `--device cpu` works, slowly.
#
# ## Expected time and memory
# Measured by `tutorials/measure_gpu.py` (random weights at each configuration: time and memory depend on the
# shapes, not the values), one image with minisd's defaults, loading excluded. These numbers are stored in
# `09_gpu_measurements.json` and printed here as measured; they will differ with other GPUs, torch versions and
# later versions of minisd.

# %%
import json
from pathlib import Path

import _figures

measured = json.loads((Path(_figures.__file__).parent / "09_gpu_measurements.json").read_text())
print(f"{measured['device']}, torch {measured['torch']}, {measured['date']}")
print(measured["setup"])
print(f"{'model':<10} {'size':>5} {'steps':>5} {'s / image':>9} {'peak GPU memory':>16} {'of which weights':>17}")
for r in measured["runs"]:
    print(f"{r['model']:<10} {r['size']:>5} {r['steps']:>5} {r['seconds_per_image']:>9.2f} "
          f"{r['peak_gib']:>12.2f} GiB {r['weights_gib']:>13.2f} GiB")

# %% [markdown]
# Peak memory is what torch's allocator held at most: the weights plus activations. `nvidia-smi` shows more, as
# it also counts the CUDA context and the allocator's cache. The fp16 sizes in the first table are arithmetic
# (2 bytes per parameter); the measured "weights" are a little larger because the VAE stays in fp32.
# Loading a checkpoint from disk is measured separately in `bench/RESULTS.md` (on a CPU machine).
#
# This is the end of the sequence. The code for everything shown lives in `minisd/`, one idea per file, in the
# order these tutorials followed: `tokenizer.py`, `clip.py`, `vae.py`, `diffusion.py`, `unet.py`, `samplers.py`,
# `pipeline.py`.
