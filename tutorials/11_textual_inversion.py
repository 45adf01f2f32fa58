"""11. Textual Inversion: a new word for a frozen model; what trains (two vectors), the loss, a held-out check."""
# %% [markdown]
# Textual Inversion (Gal et al. 2022, "An Image is Worth One Word") teaches a model a new word from a few images
# without changing the model. The word gets vectors of its own in the text encoder's input space, the space of
# the token-embedding rows (tutorial 2), and only those vectors are trained, by the same noise-prediction loss the
# model was trained with (eq. 2 of the paper):
#
#     v* = argmin_v  E[ || eps - eps_theta(x_t, t, text("a <sun> on a red background"; v)) ||^2 ]
#
# where x_t is a training image's latent noised to step t (tutorial 4) and text(...; v) is the text encoder with
# v in the places of the word's ids. Every weight of the text encoder, U-Net and VAE stays what it was; the result
# is a file of n x width numbers (here 2 x 64) that any copy of the model can load.
#
# The tiny model knows eight colours, three shapes and the words of "a ... on a ... background". Every other word
# of CLIP's vocabulary has an untrained row in its token table. We teach it "<sun>": a yellow circle, from eight
# images on four backgrounds, and check it on the three backgrounds it was not shown.

# %%
import json
import os
import tempfile
from pathlib import Path

import torch

from _clock import Clock
from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline
from minisd.tiny import new_word, shapes

torch.set_num_threads(1)            # the tiny model's tensors are too small for threads to pay
clock = Clock()                     # the machine, and each phase's time (a summary at the end)
model = load_model(tiny_model_path(), verbose=False)
tokenizer = model.tokenizer
for word in ("<sun>", "yellow circle"):
    ids = tokenizer.encode(word)
    print(f"{word!r:16} -> {len(ids)} tokens {[tokenizer.decode([i]) for i in ids]}")

# %% [markdown]
# To CLIP's tokenizer "<sun>" is three pieces of text, none of them a word the tiny model was trained on. Trained,
# it becomes two new ids past the end of the vocabulary (49408, 49409), looked up in the learned vectors instead of
# the token table (`TextEncoder.forward(tokens, extra=vectors)`). Two, because a caption of this world has a colour
# word and a shape word: "a <sun> on a red background" then has the length and layout of "a yellow circle on a red
# background". diffusers' `--num_vectors 2` is the same idea; every vector starts as the embedding of the
# `--init-token`, here "circle".
#
# Why a yellow circle and not a new colour, say teal? Textual inversion only changes what the frozen networks are
# asked for, never what they can draw, and the tiny VAE, trained on eight colours, cannot draw teal: a teal square
# comes back from an encode and decode as one of the eight.

# %%
for name, rgb in (("teal", (0, 128, 128)), ("pink", (255, 105, 180)), ("yellow", shapes.COLOURS["yellow"])):
    back = new_word.roundtrip_colour(model.vae, rgb)
    print(f"{name:6} {rgb} -> VAE round trip {back}, nearest known colour {shapes.nearest_colour(back)}")

# %% [markdown]
# ## The training images
# Eight yellow circles of random size and place, two on each training background, each with a caption that names
# the word (NAME.txt; without captions, minisd uses diffusers' template prompts, "a photo of a {}", ...).

# %%
from _figures import grid, save
from PIL import Image

work = Path(tempfile.mkdtemp(prefix="minisd-ti-"))
new_word.write_folder(work / "data", n=8)
names = sorted(p.name for p in (work / "data").glob("*.png"))
for name in names[:4]:
    print(name, (work / "data" / name).with_suffix(".txt").read_text())
save(grid([[Image.open(work / "data" / n) for n in names]]), "11_training_images.png")

# %% [markdown]
# ## The run
# `minisd train textual-inversion` is fine-tuning's loop (fit.fit) with one trainable tensor. Its defaults are
# diffusers' textual_inversion.py: AdamW at 5e-4 times the batch (--scale-lr), weight decay 1e-2 on the new vectors,
# no gradient clipping, random flips. Here: batches of 4 for 200 steps, so the rate is 2e-3.
#
#     minisd train textual-inversion --data DIR --token "<sun>" --init-token circle --num-vectors 2 \
#         --train-batch-size 4 --max-train-steps 200 --out DIR

# %%
from minisd.train import textual_inversion

cfg = textual_inversion.config(out=str(work / "run"), data=str(work / "data"), token=new_word.TOKEN,
                               init_token=new_word.INIT_TOKEN, num_vectors=new_word.NUM_VECTORS,
                               train_batch_size=4, max_train_steps=200, device="cpu")
with clock("train"):
    path = textual_inversion.run(cfg, log=lambda *_: None)
losses = [e["loss"] for e in map(json.loads, open(work / "run" / "train_log.jsonl")) if "loss" in e]
print(f"{len(losses)} steps; mean loss of the first 20 steps {sum(losses[:20]) / 20:.4f}, "
      f"of the last 20 {sum(losses[-20:]) / 20:.4f}")
print("written:", sorted(p.name for p in (work / "run").iterdir()))

# %% [markdown]
# The loss falls little: most of it is the noise the U-Net cannot predict at high t whatever the prompt says, and
# the word only has to account for the part that depends on the caption. The output folder holds the vectors twice:
# `learned_embeds.safetensors` ({"<sun>": (2, 64)}, diffusers' format) and `sun.safetensors` ({"emb_params": ...},
# A1111's, named after its file). Nothing else is written: the model is read from its file and never changed
# (tests/test_textual_inversion.py checks every tensor of the trained model against a fresh load, bit for bit).

# %%
from minisd import embeddings

token, vectors = embeddings.read(path)
print(f"{token} {tuple(vectors.shape)}: {os.path.getsize(path)} bytes; the model it works with: "
      f"{os.path.getsize(tiny_model_path()) / 1e6:.1f} MB")

# %% [markdown]
# ## Did it learn the word?
# Sixteen images per background the training images never had (purple, orange, white), each judged by the rules of
# `shapes.judge`: the foreground's median colour nearest to yellow, the shape a circle, the background the one
# asked for. For comparison, the same prompts with the vectors as they started (both "circle").

# %%
pipe = Pipeline(model)
circle = model.text_encoder.token_embedding.weight[tokenizer.encode(new_word.INIT_TOKEN)[0]].detach()
pipe.embeddings.add(new_word.TOKEN, circle.expand(new_word.NUM_VECTORS, -1))
with clock("evaluate, before and after"):
    start_score, start_results = new_word.score(pipe, per_background=16)
    pipe.embeddings = embeddings.Embeddings(model.config.text)
    pipe.load_embeddings([path])
    score, results = new_word.score(pipe, per_background=16)
print(f"held-out backgrounds, before training: {start_score:.0%} right; after: {score:.0%} right")
wrong = [(bg, read) for _, bg, read in results if read != ("yellow", "circle", bg)]
print("misread:", wrong)
assert score >= 0.8

# %%
rows, labels = [], []
for bg in new_word.HELD_OUT_BACKGROUNDS:
    for name, res in (("start", start_results), ("trained", results)):
        rows.append([image for image, b, _ in res if b == bg][:8])
        labels.append(f"{name}: {bg}")
save(grid(rows, row_labels=labels, label_width=104), "11_held_out.png")

# %% [markdown]
# The first eight images of each background, before and after (the judge's misreads are listed above).
#
# ## Where the vectors ended
# Cosine similarity between each learned vector and the token-table rows of the words the tiny model knows, and to
# "circle", where both started, and "yellow", the word a person would use.

# %%
known = list(shapes.COLOURS) + list(shapes.SHAPES) + ["a", "on", "background"]
table = model.text_encoder.token_embedding.weight.detach()
rows_known = torch.stack([table[tokenizer.encode(w)[0]] for w in known])
similarity = torch.nn.functional.cosine_similarity(vectors[:, None], rows_known[None], dim=-1)   # (2, words)
for i, sims in enumerate(similarity):
    top = sims.argsort(descending=True)[:3]
    print(f"vector {i}: " + ", ".join(f"{known[j]} {sims[j]:.2f}" for j in top)
          + f"   (circle {sims[known.index('circle')]:.2f}, yellow {sims[known.index('yellow')]:.2f})")

# %% [markdown]
# The learned vectors need not become the words a person would write: the optimisation finds *some* input that makes
# the frozen model draw the images, and nothing asks it to be near a word the model knows (Gal et al. make the same
# observation about their learned embeddings).
#
# To use the word elsewhere: `minisd generate "a <sun> on a purple background" --embedding
# DIR/learned_embeds.safetensors`, or put `sun.safetensors` in an A1111 embeddings folder and write "sun".

# %% [markdown]
# ## Where the time went
# Each phase of this page, timed as it ran, on the machine named below (wall time, and this process's CPU time,
# which a busy machine does not inflate):

# %%
clock.summary()
