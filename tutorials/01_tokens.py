"""1. Tokens: how CLIP's BPE turns a prompt into 77 ids; why 77; SD1 vs SD2 padding; prompts past 75 tokens."""
# %% [markdown]
# Stable Diffusion never sees your prompt's letters. It sees 77 integers, made by the tokenizer of CLIP
# (Radford et al. 2021), a byte-level byte-pair encoding (BPE; Sennrich et al. 2016, as in GPT-2). This tutorial
# follows one prompt through `minisd/tokenizer.py` in the order that file is written: clean, pre-tokenise, BPE,
# frame to 77.

# %%
from minisd.prompts import prompt_tokens
from minisd.tokenizer import BOS, CONTEXT_LENGTH, EOS, Tokenizer, _pattern, clean

tokenizer = Tokenizer()                 # SD1's: pads with <|endoftext|>
prompt = "A photo of a Red circle on a  blue background, 4K!! stablediffusion-style"

# %% [markdown]
# ## Step 1 and 2: clean, then split into words
# `clean` repairs mis-decoded text with ftfy (as CLIP and open_clip do), unescapes HTML, lowercases and collapses
# whitespace; CLIP's regex then cuts the text into words, single digits and runs of punctuation. Note that "4k"
# becomes two pieces: digits are always split off one by one.

# %%
text = clean(prompt)
words = _pattern().findall(text)
print(repr(text))
print(words)

# %% [markdown]
# ## Step 3: byte-pair merges, one at a time
# Each word is spelled as bytes (here all ASCII, so one character each), and the last symbol gets the end-of-word
# marker `</w>`. Then the pair of neighbouring symbols that was merged *earliest* when CLIP's vocabulary was
# learned (the lowest rank in `tokenizer.bpe_ranks`) is merged, again and again, until no known pair is left.
# The loop below prints every merge; it is the same rule as `Tokenizer.bpe`, and the last line checks that it
# arrives at the same symbols.

# %%
def bpe_trace(word):
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = list(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: tokenizer.bpe_ranks.get(pair, float("inf")))
        if best not in tokenizer.bpe_ranks:
            break
        i = pairs.index(best)
        symbols = symbols[:i] + [best[0] + best[1]] + symbols[i + 2:]   # (the real loop merges every occurrence)
        print(f"rank {tokenizer.bpe_ranks[best]:>5}: {' '.join(symbols)}")
    return symbols


symbols = bpe_trace("stablediffusion")
assert symbols == tokenizer.bpe("stablediffusion")
print("ids:", [tokenizer.encoder[s] for s in symbols])

# %% [markdown]
# Common words are one token ("background" is id 5994); rare words are a few sub-word pieces. Every byte is in the
# vocabulary on its own, so no text is ever "unknown". The vocabulary has 49408 entries: 256 bytes, the same 256
# with `</w>`, 48894 merges, and the two special tokens.

# %%
ids = tokenizer.encode(prompt)
print(len(tokenizer.decoder), "tokens in the vocabulary")
print(f"{len(ids)} tokens:")
for i in ids:
    print(f"  {i:>5}  {tokenizer.decoder[i]}")

# %% [markdown]
# ## Step 4: frame to 77
# The text encoder reads a fixed-length sequence: `<|startoftext|>` (49406), the ids, `<|endoftext|>` (49407),
# then padding up to 77. 77 is not special to Stable Diffusion: it is the `context_length` CLIP was trained with
# (its learned position embedding has 77 rows), so 75 prompt tokens fit between the two specials.
#
# SD 1.x uses OpenAI's CLIP, whose tokenizer pads with `<|endoftext|>`; SD 2.x uses OpenCLIP, which pads with 0
# (the token "!"). The ids differ only after the first `<|endoftext|>`, but the text encoder does read the padding
# (tutorial 2 shows that its outputs there are not zero), so a model must be fed the padding it was trained with.

# %%
sd1 = Tokenizer()                 # pad_id = 49407 = <|endoftext|>
sd2 = Tokenizer(pad_id=0)         # what minisd builds for SD 2.x (config.SD2_TEXT.pad_id = 0)
row1, row2 = sd1(prompt)[0], sd2(prompt)[0]
n = len(ids) + 2
print("context length:", CONTEXT_LENGTH, "| BOS", BOS, "| EOS", EOS)
print("SD1:", row1[:n + 3].tolist(), "...", row1[-2:].tolist())
print("SD2:", row2[:n + 3].tolist(), "...", row2[-2:].tolist())
print("positions where they differ:", (row1 != row2).nonzero().flatten()[[0, -1]].tolist())

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _figures import save

fig, axes = plt.subplots(2, 1, figsize=(10, 1.6))
for ax, row, name in zip(axes, (row1, row2), ("SD1", "SD2")):
    kind = [0 if i == BOS else 1 if j < n - 1 else 2 if j == n - 1 else 3 for j, i in enumerate(row.tolist())]
    ax.imshow([kind], cmap=matplotlib.colors.ListedColormap(["tab:green", "tab:blue", "tab:red", "0.85"]),
              aspect="auto", vmin=0, vmax=3)
    ax.set_yticks([0], [f"{name} (pad {row[-1].item()})"])
    ax.set_xticks([0, n - 1, 76])
axes[0].set_xticks([])
axes[0].set_title("the 77 slots: BOS (green), prompt (blue), EOS (red), padding (grey)", fontsize=9)
save(fig, "01_slots.png")

# %% [markdown]
# ## Past 75 tokens
# The tokenizer itself truncates: a row is cut to 77 with `<|endoftext|>` kept last, so everything after the 75th
# token is silently dropped. diffusers does the same. A1111, and minisd's pipeline (`prompts.py`), instead cut
# the token stream into chunks of 75, frame *each* as its own 77-token sequence, encode them separately, and
# concatenate the encoder outputs, so the U-Net cross-attends to 154, 231, ... tokens. A chunk boundary prefers to
# fall after a comma ("comma backtrack"), so a phrase is not split in half.

# %%
long_prompt = ", ".join(f"a {c} circle on a {b} background" for c, b in
                        [("red", "blue"), ("green", "white"), ("yellow", "black"), ("purple", "orange")] * 3)
long_ids = tokenizer.encode(long_prompt)
print(len(long_ids), "prompt tokens")
truncated = tokenizer(long_prompt)[0]
print("truncated row ends with:", tokenizer.decode(truncated[-8:].tolist()), "| last id", truncated[-1].item())
print("words lost:", tokenizer.decode(long_ids[75:]))
chunks, weights = prompt_tokens(tokenizer, long_prompt)
print("chunked:", tuple(chunks.shape))
for row in chunks:
    print(f"  {(row != EOS).sum().item() - 1:>2} tokens: ...{tokenizer.decode(row.tolist())[-40:]}")

# %% [markdown]
# Next: tutorial 2 runs these 77 ids through the text encoder.
