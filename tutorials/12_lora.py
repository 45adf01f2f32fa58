"""12. LoRA: a low-rank change to the weights; training one (DreamBooth-LoRA on the diamond), its files and its cost."""
# %% [markdown]
# Fine-tuning (tutorial 10's DreamBooth) changes every weight of the U-Net and writes a whole new model. LoRA
# (Hu et al. 2021, "Low-Rank Adaptation") keeps every weight W (out x in) and learns a change to it of low rank r:
#
#     W' = W + (alpha / r) up down          up: (out x r), down: (r x in), r << min(out, in)
#
# Only `up` and `down` train. A rank-r change of a 320 x 320 attention projection has 2 * 320 * r numbers instead
# of 102,400; the paper's bet, and experience since, is that what fine-tuning changes has low rank anyway. `alpha`
# is a fixed scale (kohya's and peft's alpha / r), so that the learning rate need not change with r.
#
# Training starts from down random (kaiming-uniform, as kohya and peft do) and up = 0: W' = W exactly, so step 0
# is the base model, and the first steps grow `up` from zero. At inference the change is added into the weights
# (minisd/lora.py): a LoRA costs nothing per step, and `--lora FILE:0.8` scales it.
#
# Which layers? kohya's default, which minisd follows: every Linear and 1x1 conv inside the U-Net's transformer
# blocks (proj_in, q, k, v, out, the feed-forward, proj_out) and, with `--train-text-encoder`, the text encoder's
# attention and MLP. On the tiny model:

# %%
import math
import re

import torch

from _clock import Clock
from minisd import lora
from minisd.model import load_model, tiny_model_path

torch.set_num_threads(1)            # the tiny model's tensors are too small for threads to pay
clock = Clock()                     # the machine, and each phase's time (a summary at the end)
model = load_model(tiny_model_path(), verbose=False)       # the tiny built-in model (64 px, the shapes world)
targets = lora.targets(model.config, "default")


def kind(layer):
    """The layer's name inside its block: attn1.to_q, ff.net.2, self_attn.q_proj, ..."""
    net = "U-Net" if layer.param.startswith("unet.") else "text"
    return net + "  " + re.sub(r"^.*(transformer_blocks|attentions|layers)\.\d+\.", "", layer.diffusers)


kinds = {}
for layer in targets.values():
    kinds[kind(layer)] = kinds.get(kind(layer), 0) + 1
print(f"{len(targets)} target layers:")
for net in ("U-Net", "text"):
    print(f"  {net:<5}", ", ".join(f"{n} x {k.split()[-1]}" for k, n in kinds.items() if k.startswith(net)))
name, layer = next(iter(targets.items()))
print(f"e.g. {name}: W {layer.shape} is {layer.param}")
base_numbers = sum(p.numel() for p in model.unet.parameters()) + sum(p.numel() for p in model.text_encoder.parameters())
for rank in (1, 4, 8, 16):
    numbers = sum(rank * (layer.shape[0] + layer.shape[1]) for layer in targets.values())
    print(f"rank {rank:>2}: {numbers:>7,} numbers to train, {numbers / base_numbers:.1%} of the U-Net + text encoder")

# %% [markdown]
# On Stable Diffusion 1.5 the same rule picks 192 U-Net layers with 267M weights; at rank 4 their LoRA has 1.7M
# numbers, 0.2% of the U-Net (`lora.targets(SD15)` builds the table from the config alone, on the meta device):

# %%
from minisd.config import SD15

sd15 = lora.targets(SD15, "default")
unet15 = [layer for layer in sd15.values() if layer.param.startswith("unet.")]
print(f"SD 1.5: {len(unet15)} U-Net layers, {sum(math.prod(l.shape) for l in unet15) / 1e6:.0f}M weights; rank 4: "
      f"{sum(4 * (l.shape[0] + l.shape[1]) for l in unet15) / 1e6:.2f}M numbers, "
      f"{sum(4 * (l.shape[0] + l.shape[1]) for l in unet15) * 4 / 1e6:.1f} MB in float32")

# %% [markdown]
# ## How minisd trains it
#
# `minisd train lora` (minisd/train/lora.py) is fine-tuning's loop with another set of trainable tensors. Each step
# it computes W' = W + (alpha / r) up down for every targeted layer and runs the U-Net with W' in place of W through
# `torch.func.functional_call`: the network's own code, no hooks or wrapper layers. Autograd takes the gradient
# back through the product to `up` and `down`; W is never in the optimizer and never changes. The untrained LoRA
# is the base model, to the bit:

# %%
from minisd.train import lora as train_lora

cfg = train_lora.config(out="unused", rank=4, alpha=4.0, train_text_encoder=True)
start = train_lora.initial_factors(model.config, cfg, torch.Generator().manual_seed(0))
merged = train_lora.merged_weights(model, start)
assert all(torch.equal(w, model.get_parameter(name)) for name, w in merged.items())
f = start[name]
print(f"{len(start)} layers; {name}: down {tuple(f.down.shape)} in "
      f"[{f.down.min():.3f}, {f.down.max():.3f}] (1/sqrt(in) = {1 / math.sqrt(f.down.shape[1]):.3f}), "
      f"up {tuple(f.up.shape)} all zero: W' == W for all {len(merged)} weights")

# %% [markdown]
# ## DreamBooth-LoRA: the diamond
#
# The subject is tutorial 10's: the diamond (minisd/tiny/subject.py), a square standing on a corner, which the tiny
# world never drew. Eight instance images show it in eight colour pairs, each captioned "a {colour} sks on a
# {background} background". Prior preservation (Ruiz et al. 2023, eq. 2) needs class images: as in tutorial 10,
# the base model's own pictures, here of every third combination of its world (tutorial 10 draws every one), and 16
# for the empty prompt, each captioned (a caption beside an image overrides `--class-prompt`).

# %%
import os
import tempfile

from minisd.pipeline import Pipeline
from minisd.tiny import subject

work = tempfile.mkdtemp(prefix="minisd-lora-")
subject.write_instance_folder(f"{work}/diamond")
pipe = Pipeline(model)
with clock("class images"):
    n_class = subject.write_class_folder(pipe, f"{work}/class")
print(sorted(os.listdir(f"{work}/diamond"))[:4], "...", n_class, "class images")

# %% [markdown]
# The run: rank 8, alpha 8, the text encoder's layers too, two instance and two class images per step, AdamW at
# 1e-3 (the tiny model was trained at 1e-3 with batches of 32; diffusers' LoRA default of 1e-4 is for SD's far
# larger layers and batches). The same as
#
#     minisd train lora --instance-dir diamond/ --instance-prompt "a red sks on a white background" \
#         --class-prompt "a red square on a white background" --class-dir class/ --num-class-images 68 \
#         --rank 8 --alpha 8 --train-text-encoder --train-batch-size 2 --learning-rate 1e-3 \
#         --max-train-steps 1200 --center-crop --out diamond-lora
#
# (the prompts are only used for images without a caption file; every image here has one).

# %%
STEPS = 1200
cfg = train_lora.config(out=f"{work}/diamond-lora", instance_dir=f"{work}/diamond", instance_prompt="unused",
                        class_prompt="unused", class_dir=f"{work}/class", num_class_images=n_class, rank=8,
                        alpha=8.0, train_text_encoder=True, train_batch_size=2, learning_rate=1e-3, center_crop=True,
                        max_train_steps=STEPS, device="cpu", checkpointing_steps=STEPS)
with clock("train"):
    path = train_lora.run(cfg, log=lambda *_: None)
size = os.path.getsize(path)
print(f"{STEPS} steps; wrote {os.path.basename(path)}: {size / 1e3:.0f} kB "
      f"(the whole tiny model: {os.path.getsize(tiny_model_path()) / 1e6:.1f} MB)")

# %% [markdown]
# ## The file
#
# The default layout is kohya's, what A1111, ComfyUI and diffusers' `load_lora_weights` read: per layer, diffusers'
# module name with "_" for ".", `lora_down.weight` (down), `lora_up.weight` (up) and `alpha`; `lora_unet_...` for
# the U-Net, `lora_te_...` (transformers' CLIP names) for the text encoder. `--save-format diffusers` writes the
# same factors under diffusers' / peft's keys (`unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`, lora_B
# with alpha / r folded in) as `pytorch_lora_weights.safetensors`.

# %%
from weights_convert.io import SafetensorsFile

f = SafetensorsFile(path)
keys = list(f.keys())
for key in keys[:3] + [k for k in keys if k.startswith("lora_te_")][:3]:
    print(f"{key:<80} {tuple(f[key].shape)}")
print(f"... {len(keys)} tensors; metadata: {dict(list(f.metadata.items())[:3])}")

# %% [markdown]
# ## Did it learn the diamond?
#
# The check of tutorial 10: the prompts of the held-out colour pairs (no instance image had them), three seeds
# each, judged by `subject.is_diamond`, which reads the foreground and background colours and whether the shape
# tapers like a diamond. The score is the fraction where all three are right (`shows_subject`); beside it, the
# fraction that is a diamond at all, in whatever colours.

# %%
SEEDS = (0, 1, 2)


def check(pipe):
    pairs = [(c, b, seed) for c, b in subject.HELD_OUT_COMBOS for seed in SEEDS]
    images = pipe.generate([subject.instance_prompt(c, b) for c, b, _ in pairs],     # one image per (prompt, seed),
                           seed=[seed for _, _, seed in pairs]).images               # all 24 in one batch
    reads = [(subject.is_diamond(image), (c, b)) for image, (c, b, _) in zip(images, pairs)]
    score = sum(read == (c, b, True) for read, (c, b) in reads) / len(reads)
    diamonds = sum(read[2] for read, _ in reads) / len(reads)
    return score, diamonds, images


with clock("evaluate, base and LoRA"):
    pipe.set_loras([])
    base = check(pipe)
    pipe.set_loras([(path, 1.0)])
    trained = check(pipe)
print(f"base model:  score {base[0]:.0%}, diamonds {base[1]:.0%}")
print(f"with LoRA:   score {trained[0]:.0%}, diamonds {trained[1]:.0%}")
print(f"({len(subject.HELD_OUT_COMBOS)} colour pairs x {len(SEEDS)} seeds)")
assert base[1] == 0 and trained[1] >= 2 / 24, f"the LoRA no longer teaches the diamond's shape: {base}, {trained}"

# %%
from PIL import Image

from _figures import grid, save

instances = [Image.open(f"{work}/diamond/diamond-{i:02d}.png") for i in range(len(subject.INSTANCE_COMBOS))]
save(grid([instances], labels=[f"{c[:3]}/{b[:3]}" for c, b in subject.INSTANCE_COMBOS]),
     "12_diamond_instances.png")
# the check's own images, seed s of pair i at i * len(SEEDS) + s
rows = [images[seed::len(SEEDS)] for images, seed in ((base[2], 0), (trained[2], 0), (trained[2], 1))]
pipe.set_loras([])
save(grid(rows, labels=[f"{c[:3]}/{b[:3]}" for c, b in subject.HELD_OUT_COMBOS],
          row_labels=["base", "LoRA, seed 0", "LoRA, seed 1"], label_width=84), "12_diamond_lora.png")

# %% [markdown]
# The first figure is the training set; the second, the held-out prompts (foreground/background above each
# column) without and with the LoRA.

# %% [markdown]
# ## What it cost, and what DreamBooth gets
#
# The LoRA file is about 0.6 MB; the tiny model is 10.5 MB, and DreamBooth's output, the whole model in the
# official layout in float32, about 21 MB. On SD 1.5 the same ratio is a few MB against 2 to 4 GB.
#
# Full DreamBooth, with tutorial 10's recipe (batches of 4 instance and 4 class images, 800 steps at 4e-4, the
# weights' moving average, and 16 unconditional class images that keep the guidance's other branch in place), draws
# the diamond in the asked-for colours in 100% of the held-out images at guidance 3 and at this page's 7.5
# (tutorial 10, six seeds), after 800 steps on batches twice this page's (105.6 s of CPU on the AVX-512 EPYC that
# rendered both pages), in a file of about 21 MB. This LoRA, from 8 instance images and 68 class images (tutorial
# 10's folders hold 48 and 172) with batches of 2 and no average, scores what is printed above (92% at 7.5 when this
# page was built) in the training time its clock line prints, in 0.6 MB.
#
# Using the file:
#
#     minisd generate "a red sks on a blue background" --lora diamond-lora/diamond-lora.safetensors:0.8
#     minisd generate "a red sks on a blue background <lora:diamond-lora:0.8>" --lora-dir diamond-lora
#     minisd merge-lora --model tiny.safetensors --lora diamond-lora/diamond-lora.safetensors:0.8 --out merged.safetensors
#
# `0.8` scales the change: W + 0.8 (alpha / r) up down.

# %% [markdown]
# ## Where the time went
# Each phase of this page, timed as it ran, on the machine named below (wall time, and this process's CPU time,
# which a busy machine does not inflate):

# %%
clock.summary()
