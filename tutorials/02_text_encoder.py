"""2. The text encoder: the causal mask, the 77 x width context, CLIP skip and SD2's penultimate layer."""
# %% [markdown]
# The 77 ids of tutorial 1 go through CLIP's text transformer (`minisd/clip.py`): a token embedding plus a learned
# position embedding, a stack of pre-LayerNorm transformer blocks with a *causal* mask, and a final LayerNorm.
# CLIP itself was trained to summarise a caption in the output at `<|endoftext|>`; Stable Diffusion instead keeps
# all 77 output vectors, the *context* that every cross-attention layer of the U-Net reads.
#
# We use the tiny built-in model's text encoder (width 64, 2 layers, 4 heads), which is SD 1.5's architecture at
# a small size; SD 1.5's is width 768, 12 layers, 12 heads.

# %%
import torch

from minisd.clip import TextEncoder
from minisd.config import SD1_TEXT, SD2_TEXT, TextConfig
from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline

pipe = Pipeline(load_model(tiny_model_path(), verbose=False))     # the tiny built-in model, on the CPU in fp32
encoder, tokenizer = pipe.model.text_encoder, pipe.model.tokenizer
print(encoder.cfg)

tokens = tokenizer("a red circle on a blue background")          # (1, 77)
with torch.no_grad():
    context = encoder(tokens)
print("tokens", tuple(tokens.shape), "-> context", tuple(context.shape))
for name, cfg in (("SD 1.5", SD1_TEXT), ("SD 2.x", SD2_TEXT)):
    print(f"{name}: context (1, {cfg.context_length}, {cfg.width})")

# %% [markdown]
# ## The causal mask
# In each attention layer token i may only look at tokens 0..i (`attention_math(..., causal=True)` fills the upper
# triangle of the score matrix with -inf before the softmax). The map below is the first layer's attention,
# averaged over heads, computed step by step from the layer's own weights: everything above the diagonal is zero.

# %%
import torch.nn.functional as F
from einops import rearrange

block = encoder.transformer.resblocks[0]
with torch.no_grad():
    x = encoder.token_embedding(tokens) + encoder.positional_embedding             # (1, 77, width)
    q, k, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    q, k = (rearrange(t, "b n (h d) -> b h n d", h=block.attn.heads) for t in (q, k))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5                           # (1, heads, 77, 77)
    future = torch.ones(77, 77, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1).mean(1)[0]      # (77, 77)
print("largest weight above the diagonal:", weights[future].max().item())

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _figures import save

n = 12
labels = [tokenizer.decoder[i].replace("</w>", "") for i in tokens[0, :n].tolist()]
fig, ax = plt.subplots(figsize=(5, 4.5))
ax.imshow(weights[:n, :n], cmap="viridis")
ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
ax.set_yticks(range(n), labels, fontsize=7)
ax.set_xlabel("attends to (key)")
ax.set_ylabel("token (query)")
ax.set_title("layer 1 attention, first 12 of 77 tokens", fontsize=9)
save(fig, "02_causal_attention.png")

# %% [markdown]
# A consequence you can check: changing a word changes the outputs at that position and after it, never before.
# "red" is token 2 (after `<|startoftext|>` and "a").

# %%
with torch.no_grad():
    a = encoder(tokenizer("a red circle on a blue background"))[0]
    b = encoder(tokenizer("a green circle on a blue background"))[0]
change = (a - b).abs().amax(-1)                                     # (77,) largest change per position
print("max |change| per position, 0..9:", [round(c, 3) for c in change[:10].tolist()])
assert change[:2].max() == 0 and change[2:].min() > 0

# %% [markdown]
# So the *padding* positions after `<|endoftext|>` are not blanks: each has attended to the whole prompt, and the
# U-Net reads them too. That is why SD1 and SD2 must each get the padding token they were trained with.
#
# ## CLIP skip
# `encoder(tokens, clip_skip=k)` stops k - 1 layers early and applies the final LayerNorm there (A1111's "CLIP
# skip"; 2 is common with anime SD1 fine-tunes, which were trained that way). Written out for the tiny model:

# %%
with torch.no_grad():
    x = encoder.token_embedding(tokens) + encoder.positional_embedding
    for block in encoder.transformer.resblocks[:-1]:                   # all but the last layer
        x = block(x)
    by_hand = encoder.ln_final(x)
    skip2 = encoder(tokens, clip_skip=2)
print("max |by hand - clip_skip=2|:", (by_hand - skip2).abs().max().item())
print("max |clip_skip=2 - clip_skip=1|:", (skip2 - context).abs().max().item())
assert torch.allclose(by_hand, skip2, atol=1e-6)

# %% [markdown]
# ## SD 2's penultimate layer
# SD 2.x conditions on OpenCLIP ViT-H/14 with `layer="penultimate"`: the output of layer 23 of 24, then the final
# LayerNorm, i.e. CLIP skip 2 built in. Layer 24 is never used, so minisd does not build it: `SD2_TEXT` has
# `layers=23` (computed) and `source_layers=24` (in the checkpoint), and the converter drops the 24th layer's
# weights. Building SD 2's encoder on the meta device (shapes only, no memory) shows what that saves:

# %%
def millions(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


with torch.device("meta"):
    sd1_text = TextEncoder(SD1_TEXT)
    sd2_text = TextEncoder(SD2_TEXT)
print(f"SD1 text encoder: {SD1_TEXT.layers} layers, width {SD1_TEXT.width}, {millions(sd1_text):.1f}M parameters")
print(f"SD2 text encoder: {SD2_TEXT.layers} of {SD2_TEXT.source_layers} layers, width {SD2_TEXT.width}, "
      f"{millions(sd2_text):.1f}M parameters (one more layer: "
      f"+{millions(sd2_text.transformer.resblocks[0]):.1f}M, never used)")

# %% [markdown]
# That "penultimate layer + ln_final" equals "a model one layer shorter" is easy to check with small random
# weights in SD 2's style (gelu, padding 0): a 4-layer encoder at `clip_skip=2` and a 3-layer one given the same
# first three layers agree exactly.

# %%
torch.manual_seed(0)
small = dict(width=32, heads=2, activation="gelu", pad_id=0, source_layers=4)
full = TextEncoder(TextConfig(layers=4, **small)).eval()
short = TextEncoder(TextConfig(layers=3, **small)).eval()
short.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("transformer.resblocks.3.")})
ids = torch.randint(0, 49408, (2, 77))
with torch.no_grad():
    diff = (full(ids, clip_skip=2) - short(ids)).abs().max().item()
print("max |4 layers at clip_skip=2 - 3 layers|:", diff)
assert diff == 0

# %% [markdown]
# Next: tutorial 3, the autoencoder whose latent space the U-Net works in.
