"""15. ControlNet: a trainable copy of the U-Net's encoder, zero convolutions, where its residuals enter, scale and start/end."""
# %% [markdown]
# A prompt says *what* to draw; it cannot say *where*. ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional
# Control to Text-to-Image Diffusion Models") adds a second input, a **condition image** (Canny edges, a pose
# skeleton, a depth map ...), without touching the model:
#
# - a **trainable copy** of the U-Net's encoder (its input blocks and middle block: `minisd/controlnet.py` builds
#   them with `unet.encoder`, the very function the U-Net builds its own with) reads the noisy latent, the
#   timestep and the text, as the U-Net does, plus the condition image, through a small **hint encoder**;
# - each of its block outputs goes through a 1x1 **zero convolution** (weights and bias 0 at the start) and is
#   **added** to the frozen U-Net's matching skip connection, and its middle block's output to the U-Net's middle
#   block (paper Sec. 3.2, Fig. 3).
#
# The U-Net stays frozen: training (`minisd train controlnet`) updates only the copy. This page builds a fresh
# ControlNet for the tiny built-in model (a copy of its U-Net's encoder, as the paper initialises one) and looks
# at each part with numbers.

# %%
import numpy as np
import torch
from PIL import Image, ImageDraw

from minisd.config import SD15, ControlNetConfig
from minisd.controlnet import Control, ControlNet, control_image, keep
from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline

from _clock import Clock
from _figures import grid, save

torch.set_num_threads(1)            # the tiny networks' tensors are too small for threads to pay
clock = Clock()
pipe = Pipeline(load_model(tiny_model_path(), verbose=False), log=lambda *_: None)
unet = pipe.model.unet
cfg = ControlNetConfig.for_model(pipe.model.config)
net = ControlNet(cfg).eval()
# the paper's initialisation: the encoder's weights copied from the U-Net (same names: time_embed, input_blocks,
# middle_block); what the U-Net has and the copy lacks is its decoder, what the copy adds is the hint encoder and
# the zero convolutions
copied = net.load_state_dict(unet.state_dict(), strict=False)
n = lambda module: sum(p.numel() for p in module.parameters())
print(f"U-Net {n(unet) / 1e6:.2f}M parameters; ControlNet {n(net) / 1e6:.2f}M, of which hint encoder "
      f"{n(net.input_hint_block) / 1e6:.3f}M and zero convolutions "
      f"{(n(net.zero_convs) + n(net.middle_block_out)) / 1e6:.3f}M")
print(f"not copied from the U-Net: {len({k.split('.')[0] for k in copied.missing_keys})} module groups "
      f"{sorted({k.split('.')[0] for k in copied.missing_keys})}; U-Net parts the copy lacks: "
      f"{sorted({k.split('.')[0] for k in copied.unexpected_keys})}")

# %% [markdown]
# ## Zero convolutions: a fresh ControlNet changes nothing
# Every residual leaves through a zero convolution, so a fresh ControlNet outputs exactly zero whatever it reads,
# and the U-Net with it computes exactly what it computes alone. Below: the residuals' largest magnitude, the
# U-Net output with and without them, and whole generated images, compared bit for bit.
#
# Why start at zero, not at small random values: the pretrained U-Net is never disturbed by an untrained
# control, so the first steps of training cannot damage it (paper Sec. 3.1). And a zero convolution still
# learns: its output is W x + b, so the gradient of W is the input x, which is not zero. At the first step only
# the zero convolutions get a gradient (everything before them is multiplied by W = 0); once W moves, the
# gradient flows into the copy.

# %%
def edges(size=64):
    """A hand-drawn 'edge map': a white circle outline and a line, on black, as a Canny map looks."""
    image = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(image)
    d.ellipse([14, 12, 46, 44], outline="white", width=1)
    d.line([0, 54, 63, 50], fill="white", width=1)
    return image


g = torch.Generator().manual_seed(0)
x = torch.randn(1, 4, 16, 16, generator=g)                        # a noisy latent of a 64 px image
t = torch.tensor([500.0])
context, _ = pipe.encode_prompts("a red circle on a blue background")
hint = control_image(edges(), 64, 64)                             # (1, 3, 64, 64) in [0, 1]
with torch.no_grad():
    down, mid = net(x, t, context, hint)
    alone = unet(x, t, context)
    added = unet(x, t, context, down_residuals=down, mid_residual=mid)
print(f"{len(down)} down residuals + 1 middle; largest |residual|: {max(r.abs().max() for r in [*down, mid]):.1f}")
print("U-Net output with the fresh ControlNet's residuals == without them, bit for bit:", torch.equal(alone, added))
plain = pipe.generate("a red circle on a blue background", steps=20, seed=0).images[0]
with_fresh = pipe.generate("a red circle on a blue background", steps=20, seed=0,
                           controls=[Control(net, edges(), scale=1.0)]).images[0]
print("generated image with a fresh ControlNet == without, bit for bit:",
      np.array_equal(np.asarray(plain), np.asarray(with_fresh)))

# the first training step's gradients: on the zero convolutions only
with torch.enable_grad():
    net.zero_grad()
    d, m = net(x, t, context, hint)
    sum((r * torch.randn(r.shape, generator=g)).sum() for r in [*d, m]).backward()    # any loss of the residuals
grad = lambda params: sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
print(f"|gradient| summed: zero convolutions {grad([*net.zero_convs.parameters(), *net.middle_block_out.parameters()]):.2f}, "
      f"the copied encoder {grad([*net.input_blocks.parameters(), *net.middle_block.parameters()]):.2f}, "
      f"the hint encoder {grad(net.input_hint_block.parameters()):.2f}")
net.zero_grad(set_to_none=True)

# %% [markdown]
# ## Where the residuals enter the U-Net
# The U-Net keeps the output of each of its input blocks for the way up (tutorial 5): those are its skip
# connections. The ControlNet's residual *i* is added to skip *i* before the decoder concatenates it, and the
# middle residual to the middle block's output (`UNet.forward`'s `down_residuals` / `mid_residual`; diffusers'
# `down_block_additional_residuals`). Skips are used in reverse order, so the first (full-resolution) residual
# reaches the last output block. The tiny model has 6 input blocks:

# %%
for i, r in enumerate(down):
    print(f"residual {i:>2} {tuple(r.shape)!s:<16} added to input_blocks[{i}]'s output, read by "
          f"output_blocks[{len(down) - 1 - i}]")
print(f"middle      {tuple(mid.shape)!s:<16} added to middle_block's output")

# %% [markdown]
# SD 1.5 has 12 input blocks (4 levels, 2 ResBlocks and a downsampler each, and the first conv): 12 skip
# residuals plus the middle one. Its ControlNet built on the meta device (shapes only, no weights, no
# arithmetic), for a 512 x 512 image:

# %%
sd15_cfg = ControlNetConfig.for_model(SD15)
with torch.device("meta"):
    sd15_net = ControlNet(sd15_cfg)
    sd15_down, sd15_mid = sd15_net(torch.zeros(2, 4, 64, 64), torch.zeros(2), torch.zeros(2, 77, 768),
                                   torch.zeros(2, 3, 512, 512))
for i, r in enumerate(sd15_down):
    print(f"residual {i:>2} {tuple(r.shape)}")
print(f"middle      {tuple(sd15_mid.shape)}")
print(f"SD 1.5 ControlNet: {n(sd15_net) / 1e6:.0f}M parameters (the U-Net: 860M), "
      f"{n(sd15_net) * 4 / 1e9:.2f} GB in fp32 (control_v11p_sd15_canny.pth is fp32, 1.45 GB)")

# %% [markdown]
# The batch of 2 is classifier-free guidance's [unconditional, conditional] pair: the ControlNet runs on both
# halves (unless guess mode), so with CFG a ControlNet step costs about one more U-Net encoder pass, run on the
# same batch as the U-Net. `bench/RESULTS.md` measures that on SD 1.5's configuration against diffusers.
#
# ## The hint encoder
# The condition image is in pixels (512 x 512 for SD 1.5), the latents are 8x smaller. The hint encoder is 8
# small convolutions with SiLU between them, three of stride 2 (cldm's `input_hint_block`, diffusers'
# `ControlNetConditioningEmbedding`): pixels to 320 channels at latent size. Its output is **added** to the
# copy's first block's output (the feature map after its first conv), a per-position bias, and its last conv
# starts at zero too. The image is read in [0, 1], not [-1, 1], and in RGB (a Canny map is white on black):

# %%
with torch.device("meta"):
    h = torch.zeros(1, 3, 512, 512)
    for i, layer in enumerate(sd15_net.input_hint_block):
        h = layer(h)
        if isinstance(layer, torch.nn.Conv2d):
            print(f"input_hint_block.{i:<2} conv {layer.in_channels:>3} -> {layer.out_channels:<3} stride "
                  f"{layer.stride[0]}  -> {tuple(h.shape)}")
print(f"tiny: {tuple(hint.shape)} -> {tuple(net.input_hint_block(hint).shape)} (channels: the tiny U-Net's 32); "
      f"the hint encoder is {n(sd15_net.input_hint_block) / 1e6:.2f}M of SD 1.5's ControlNet")

# %% [markdown]
# ## Scale, start and end, measured
# `Control(net, image, scale, start, end)` (`--control-scale`, `--control-start`, `--control-end`; A1111's
# Weight, Guidance Start and End) multiplies every residual by `scale`, and applies the ControlNet only on the
# steps whose fraction of the run lies in [start, end] (`controlnet.keep`, diffusers' `controlnet_keep`): on the
# other steps the network is not run at all. To see them act, the fresh network's zero convolutions are given
# small random weights below, as a stand-in for training (a trained one: the last section). First the
# arithmetic: residuals scale linearly, and which of 10 steps run the network:

# %%
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for conv in [*net.zero_convs, net.middle_block_out]:
        conv[0].weight.copy_(torch.randn(conv[0].weight.shape, generator=gen) * 0.05)
    full, _ = net(x, t, context, hint, scale=1.0)
    half, _ = net(x, t, context, hint, scale=0.5)
print("largest |residual(scale 0.5) - residual(scale 1) / 2|:",
      f"{max(float((a - b / 2).abs().max()) for a, b in zip(half, full)):.1e}")
for start, end in [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.2, 0.8)]:
    print(f"start {start}, end {end}: steps run", "".join("x" if k else "." for k in keep(10, start, end)))

# %% [markdown]
# Then whole images: the same prompt and seed with the (random) control at several scales and step ranges,
# and how far each moves the picture from the uncontrolled one (mean absolute pixel difference, in [0, 1]), with
# a count of the ControlNet's calls in each run (one per step it runs on: the CFG pair is one batch).

# %%
calls = []
forward = net.forward
net.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)      # count the network's calls
prompt, steps = "a red circle on a blue background", 20
base = np.asarray(pipe.generate(prompt, steps=steps, seed=0).images[0], dtype=np.float32) / 255
settings = [(0.25, 0.0, 1.0), (0.5, 0.0, 1.0), (1.0, 0.0, 1.0), (2.0, 0.0, 1.0),
            (2.0, 0.0, 0.3), (2.0, 0.3, 1.0), (2.0, 0.7, 1.0)]
images, moved = [], {}
with clock("scale and start/end images"):
    for scale, start, end in settings:
        calls.clear()
        image = pipe.generate(prompt, steps=steps, seed=0, controls=[Control(net, edges(), scale, start, end)]).images[0]
        images.append(image)
        moved[scale, start, end] = np.abs(np.asarray(image, dtype=np.float32) / 255 - base).mean()
        assert len(calls) == sum(keep(steps, start, end))               # not run at all outside [start, end]
        print(f"scale {scale:<4} start {start} end {end}: {len(calls):>2} ControlNet calls, "
              f"mean |image - uncontrolled| = {moved[scale, start, end]:.3f}")
net.forward = forward
by_scale = [moved[s, 0.0, 1.0] for s in (0.25, 0.5, 1.0, 2.0)]
assert by_scale == sorted(by_scale)                                     # further with the scale
assert moved[2.0, 0.0, 0.3] > 1.5 * moved[2.0, 0.7, 1.0]                # the same 6 calls: early moves it more
save(grid([[Image.fromarray((base * 255).astype(np.uint8)), edges(), *images]],
          labels=["none", "hint", *[f"{s:g} {a:g}-{b:g}" for s, a, b in settings]], scale=2), "15_scale_start_end.png")

# %% [markdown]
# The picture moves further with the scale, and more when the control acts early than late (the same 6 calls
# in the first or in the last 30% of the steps, at scale 2: about twice as far, more than 1.5 times asserted
# above; at scale 1 this random network moves the tiny model's picture too little to tell them apart): the layout
# of a diffusion sample is settled in the first, high-noise steps, and the last steps only refine details. That
# is why `--control-end 0.5` to `0.8` is a common setting: the control fixes the composition and lets the model
# finish the details its own way; `--control-start` above 0 lets the prompt set the layout first.
#
# ## A trained ControlNet: the tiny canny one, measured
# `minisd/assets/minisd-tiny-canny.safetensors` (`--controlnet tiny-canny`; its card: `TINY_CANNY_CARD.md`) is a
# ControlNet for the tiny model trained by `minisd train controlnet` on the Canny edges of shapes pictures
# (`minisd/tiny/canny.py`). Its score: the drawn shape's mask against the region the edge map encloses,
# intersection over union (IoU), on held-out edge maps, each drawn with its caption at one seed. Below: 12 maps,
# at several scales and step ranges, the mean IoU and how many reach IoU >= 0.8 (scale 0 is the model alone).

# %%
from minisd.controlnet import load_controlnet
from minisd.controls import resolve
from minisd.tiny import canny as tiny_canny

trained = load_controlnet(resolve("tiny-canny"), pipe.model.config)
maps = [tiny_canny.canny_sample(1000, i) for i in range(12)]          # the card's held-out stream
measured, shown = {}, []
with clock("the trained ControlNet, 12 maps x 8 settings"):
    for scale, start, end in [(0.0, 0.0, 1.0), (0.5, 0.0, 1.0), (1.0, 0.0, 1.0), (1.5, 0.0, 1.0),
                              (1.0, 0.0, 0.3), (1.0, 0.0, 0.6), (1.0, 0.4, 1.0), (1.0, 0.7, 1.0)]:
        ious, row = [], []
        for i, (sample, edge_map) in enumerate(maps):
            controls = [Control(trained, edge_map, scale, start, end)] if scale else []
            image = pipe.generate(sample.text, seed=i, steps=20, controls=controls).images[0]
            ious.append(tiny_canny.judge_pair(image, edge_map, sample.colour, sample.background)[0])
            row.append(image)
        measured[scale, start, end] = np.mean(ious)
        shown.append(row[:4])
        print(f"scale {scale:<4} start {start} end {end}: mean IoU {np.mean(ious):.2f}, "
              f"IoU >= 0.8 on {sum(v >= 0.8 for v in ious):>2} of {len(ious)}")
assert measured[1.0, 0.0, 1.0] > measured[0.0, 0.0, 1.0]                 # the edges are followed
assert measured[1.0, 0.0, 0.3] > measured[1.0, 0.7, 1.0]                 # the early steps set the layout
columns = [edge_map for _, edge_map in maps[:4]]
save(grid([columns] + shown[:3] + [shown[4], shown[7]], labels=[m[0].text[:14] for m in maps[:4]],
          row_labels=["edges", "none", "x0.5", "x1", "0-0.3", "0.7-1"], label_width=44, scale=2),
     "15_trained.png")

# %% [markdown]
# With the ControlNet, the shapes land where the edges are; without it, where the model likes; scale 0.5 gets
# most of the way and 1.5 no further than 1. Acting only on the first 30% of the steps gives about two thirds of
# the gain in IoU, far more than the last 30% do (asserted above): the early steps set the layout, as with the
# random network above. This trained ControlNet keeps working after them, though: the first 60% of the steps alone
# fall a little short of all of them, and the last 60% come as close: a shape's outline is still drawn to the
# edges in the middle and late steps.
#
# ## Where the time went

# %%
clock.summary()
