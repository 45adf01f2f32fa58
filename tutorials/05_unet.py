"""5. The U-Net: tensor shapes down and up, where cross-attention sits, and the cross-attention map of one word."""
# %% [markdown]
# The U-Net (`minisd/unet.py`) is the only part of Stable Diffusion that runs at every sampling step:
#
#     eps_theta(x_t, t, context):  (B, 4, h, w) noisy latent, (B,) timestep, (B, 77, width) text  ->  (B, 4, h, w)
#
# It is DDPM's U-Net (Ho et al. 2020, App. B; Dhariwal & Nichol 2021): ResBlocks that add a timestep embedding,
# downsampling to a bottleneck and back up with skip connections, plus a *spatial transformer* at several
# resolutions whose cross-attention reads the text (Rombach et al. 2022, Sec. 3.3, eq. 3). We walk through it by
# calling its blocks in order, exactly as `UNet.forward` does, and print the shape after each block.

# %%
import torch

from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline
from minisd.unet import ResBlock, SpatialTransformer, timestep_embedding

pipe = Pipeline(load_model(tiny_model_path(), verbose=False))     # the tiny built-in model, on the CPU in fp32
unet = pipe.model.unet


def describe(block):
    names = {ResBlock: "ResBlock", SpatialTransformer: "Transformer(self+CROSS-attn)"}
    return " + ".join(names.get(type(layer), type(layer).__name__) for layer in block)


def walk(unet, x, t, context, show=print):
    """UNet.forward, one block at a time, showing each block's output shape."""
    emb = unet.time_embed(timestep_embedding(t, unet.cfg.model_channels))        # (B, 4 * model_channels)
    show(f"{'x':<17} {tuple(x.shape)!s:<20} timestep embedding {tuple(emb.shape)}")
    h, skips = x, []
    for i, block in enumerate(unet.input_blocks):
        h = block(h, emb, context)
        skips.append(h)                                                          # kept for the up path
        show(f"input_blocks[{i}]".ljust(17), f"{tuple(h.shape)!s:<20}", describe(block))
    h = unet.middle_block(h, emb, context)
    show("middle_block".ljust(17), f"{tuple(h.shape)!s:<20}", describe(unet.middle_block))
    for i, block in enumerate(unet.output_blocks):
        h = torch.cat([h, skips.pop()], dim=1)                                  # skip connection: concat channels
        h = block(h, emb, context, upsample_size=skips[-1].shape[-2:] if skips else None)
        show(f"output_blocks[{i}]".ljust(17), f"{tuple(h.shape)!s:<20}", "concat skip, " + describe(block))
    out = unet.out(h)
    show("out".ljust(17), f"{tuple(out.shape)!s:<20}", "GroupNorm + SiLU + Conv2d")
    return out


x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
t = torch.tensor([500.0])
context, _ = pipe.encode_prompts("a red circle on a blue background")          # (1, 77, 64)
with torch.no_grad():
    walked = walk(unet, x, t, context)
    print("max |walk - unet(x, t, context)| =", (walked - unet(x, t, context)).abs().max().item())

# %% [markdown]
# The tiny model has 3 levels (16x16, 8x8, 4x4 latents) and one ResBlock per level. SD 1.5 has 4 levels and two
# ResBlocks per level; the same walk on SD 1.5's configuration, built on the meta device (shapes only: no weights,
# no memory, no arithmetic), shows the real shapes for a 512 x 512 image:

# %%
from minisd.config import SD15
from minisd.unet import UNet

with torch.device("meta"):
    sd15_unet = UNet(SD15.unet)
    walk(sd15_unet, torch.zeros(1, 4, 64, 64), torch.zeros(1), torch.zeros(1, 77, 768))
print(f"{sum(p.numel() for p in sd15_unet.parameters()) / 1e6:.0f}M parameters "
      f"(tiny: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M)")

# %% [markdown]
# ## Where the text comes in
# Every "Transformer" above is a `SpatialTransformer`: it treats the h x w feature map as h*w tokens and runs
# self-attention among them, then **cross-attention** (`attn2`) with queries from the image and keys and values
# from the 77 text vectors, then a feed-forward layer. That is the *only* place the prompt enters the U-Net.
# SD 1.5 has 16 of them (none at its lowest resolution, 8x8). The tiny model has none at its highest, 16x16, where
# 256 tokens would double its training time (SDXL drops them there too). The tiny model's:

# %%
for name, module in unet.named_modules():
    if isinstance(module, SpatialTransformer):
        print(f"{name:<22} channels {module.norm.num_channels:>3}, heads {module.transformer_blocks[0].attn2.heads}")

# %% [markdown]
# ## The cross-attention map of one word
# Each cross-attention layer computes softmax(Q K^T / sqrt(d)): for every latent pixel, a distribution over the
# 77 text tokens. Reading one token's column and reshaping it to h x w shows *where* the image looks at that
# word (Hertz et al. 2022, "Prompt-to-Prompt"; Tang et al. 2022, "DAAM"). `unet.record_cross_attention(store)`
# makes every cross-attention layer append those probabilities (averaged over its heads) to a list at each call, and
# `None` turns it off again: an explicit switch, off by default, that `minisd serve`'s word maps use too. We average
# over layers (each upsampled to 64 x 64) and the 20 steps, and keep the conditional half of the
# classifier-free-guidance batch.

# %%
import torch.nn.functional as F
from einops import rearrange

prompt = "a red circle on a blue background"
store = []
unet.record_cross_attention(store)
result = pipe.generate(prompt, seed=0, steps=20)
unet.record_cross_attention(None)
maps = torch.zeros(77, 64, 64)
for probs in store:                                                    # (2, h*w, 77): CFG's [uncond, cond]
    side = int(probs.shape[1] ** 0.5)
    per_token = rearrange(probs[-1:], "b (y x) n -> b n y x", y=side)               # (1, 77, side, side)
    maps.add_(F.interpolate(per_token.float(), size=(64, 64), mode="bilinear", align_corners=False)[0])
print(f"{len(store)} maps recorded: {len(store) // 20} cross-attention layers x 20 steps")
maps /= maps.sum(0, keepdim=True)                                      # per pixel: a distribution over tokens

tokens = pipe.model.tokenizer(prompt)[0].tolist()
words = {pipe.model.tokenizer.decoder[i].replace("</w>", ""): position for position, i in enumerate(tokens[:8])}
end = tokens.index(49407)                                              # the first <|endoftext|>
print("share of attention per token:", {w: round(maps[p].mean().item(), 3) for w, p in words.items()})
print(f"share on <|endoftext|> and the padding after it: {maps[end:].mean(dim=(1, 2)).sum().item():.3f}")

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _figures import save

shown = ["red", "circle", "blue", "background"]
fig, axes = plt.subplots(1, 1 + len(shown), figsize=(2.2 * (1 + len(shown)), 2.5))
axes[0].imshow(result.images[0])
axes[0].set_title("seed 0", fontsize=9)
for ax, word in zip(axes[1:], shown):
    ax.imshow(result.images[0])
    ax.imshow(maps[words[word]], cmap="jet", alpha=0.6)
    ax.set_title(f'"{word}"', fontsize=9)
for ax in axes:
    ax.axis("off")
save(fig, "05_cross_attention.png")

# %% [markdown]
# (These maps come from a 1.7M-parameter U-Net trained for under an hour on a CPU; how word-specific they are
# depends on those weights, and the shares printed above show how much attention goes to the words at all. Much
# of it can land on `<|endoftext|>` and the padding, whose vectors summarise the whole prompt (tutorial 2). In
# SD 1.5, maps like these are what Prompt-to-Prompt edits.)
#
# Next: tutorial 6 calls this network in a loop.
