"""Textual Inversion (Gal et al. 2022, "An Image is Worth One Word"): teach a frozen model a new word.

    minisd train textual-inversion --data cat/ --token "<cat-toy>" --init-token toy --out runs/cat-toy \
        [--num-vectors 1] [--learnable-property object|style] [--no-scale-lr] ...

Nothing of the model trains. The new word gets n vectors v (n, width) of its own in the text encoder's input space,
started at the embedding of --init-token, and only they are optimised (eq. 2 of the paper):

    v* = argmin_v  E_{x0, c, eps, t} || eps - eps_theta(x_t, t, text(c; v)) ||^2

where the captions c name the word and text(c; v) is the text encoder with v looked up for the word's ids
(TextEncoder.forward's `extra`, the path that loads embedding files at inference). The rest is fine-tuning's step
(fit.fit: the same loss, v targets for SD2, schedules, accumulation, mixed precision, checkpoints, resume).
The word stands for n ids past CLIP's vocabulary, so every row of the token table, and every other weight, stays
bit for bit what it was.

Images: --data's folder, or a Hugging Face dataset's rows (--dataset-name; hf_dataset.py). Captions: an image's
NAME.txt / metadata.jsonl caption, or its row's (--caption-column; by default the column "text" if there is one),
if it has one (it must name the word, and so must each of a list of captions), else, per use, one
of the small prompt templates of diffusers' textual_inversion.py (from the paper's code): "a photo of a {}", ... for
--learnable-property object, "a painting in the style of {}", ... for style.

Settings follow diffusers' examples/textual_inversion/textual_inversion.py and its README's run: learning rate
5e-4 scaled by accumulation x batch x processes (--scale-lr, on here by default), AdamW with weight decay 1e-2 on the
new vectors (diffusers decays its whole embedding matrix, then puts every other row back after each step: the same
arithmetic on the new rows), no gradient clipping (the script clips nothing), random horizontal flips, 3000 steps,
constant rate, and the text encoder kept in fp32 under mixed precision. Two differences: images are resized by the
shorter side and randomly cropped as in minisd's other methods (--center-crop for centre crops), where diffusers
squashes them to a square without --center_crop; and the template is drawn from the micro-batch's (seed, k)
generator, so a resumed run sees the same prompts.

Output (--out): learned_embeds.safetensors ({token: (n, width)}, diffusers' file, which load_textual_inversion
reads) and <word>.safetensors ({"emb_params": (n, width)}, A1111's, named after the word without its brackets),
beside train_log.jsonl, args.json, result.json, checkpoints/ and samples/ (validation prompts may use the word).
"""
import os
import re
from dataclasses import dataclass

import torch

from ..embeddings import Embeddings, save_a1111, save_diffusers
from .batches import Stream
from .hf_dataset import DatasetSettings, check_source, training_examples
from .loop import atomic_write
from .fit import Training, fit, snapshot_path
from .settings import DTYPES, TrainSettings, check

PROPERTIES = ("object", "style")


@dataclass(frozen=True)
class TextualInversionConfig(DatasetSettings, TrainSettings):
    """A textual-inversion run: the shared settings with diffusers' textual_inversion.py defaults, the images of
    the concept, and the new word."""
    data: str | None = None                  # a folder of images of the concept (captions naming the word optional)
    caption_column: str | None = None        # a dataset's: "text" if it has one, else template prompts
    token: str | None = None                 # the new word ("<cat-toy>") ...
    init_token: str | None = None            # ... whose vectors start as this word's embedding ("toy")
    num_vectors: int = 1                     # ... how many vectors the word stands for
    learnable_property: str = "object"       # PROPERTIES: the template prompts of uncaptioned images
    learning_rate: float = 5e-4              # diffusers' README run (with --scale_lr)
    scale_lr: bool = True
    random_flip: bool = True
    max_grad_norm: float = 0.0               # the script clips nothing
    max_train_steps: int = 3000


config = TextualInversionConfig              # what `minisd train textual-inversion` fills from its flags

# diffusers' textual_inversion.py imagenet_templates_small / imagenet_style_templates_small
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


def templates(token, learnable_property="object"):
    """The prompts an uncaptioned image is trained with, one drawn per use."""
    return tuple(t.format(token) for t in (STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES))


def alternatives(caption):
    """The captions an example may be trained with: its caption, or each of its alternatives (a tuple)."""
    return (caption,) if isinstance(caption, str) else caption


def check_words(cfg: TextualInversionConfig, tokenizer):
    """One-line errors for a word that cannot be learned; returns the id of the init token."""
    token, init = cfg.token, cfg.init_token
    if not token or not token.strip():
        raise ValueError("textual-inversion needs --token, the new word (e.g. \"<cat-toy>\")")
    if re.search(r"\s", token):
        raise ValueError(f"--token {token!r} must be one word, without spaces")
    ids = tokenizer.encode(token)
    if len(ids) == 1:
        raise ValueError(f"--token {token!r} is already a word of CLIP's vocabulary (token {ids[0]}); choose a new "
                         f"one, e.g. \"<{token.strip('<>')}>\"")
    if cfg.num_vectors < 1:
        raise ValueError(f"--num-vectors must be >= 1, got {cfg.num_vectors}")
    if cfg.learnable_property not in PROPERTIES:
        raise ValueError(f"unknown --learnable-property {cfg.learnable_property!r}; choose object or style")
    if not init:
        raise ValueError("textual-inversion needs --init-token, a word whose embedding starts the new one "
                         "(e.g. toy)")
    init_ids = tokenizer.encode(init)
    if len(init_ids) != 1:
        pieces = ", ".join(tokenizer.decode([i]).strip() for i in init_ids)
        raise ValueError(f"--init-token {init!r} is {len(init_ids)} CLIP tokens ({pieces}), not one; choose a "
                         f"single-token word")
    return init_ids[0]


def file_stem(token):
    """A1111 names an embedding after its file: "<cat-toy>" -> cat-toy.safetensors."""
    stem = re.sub(r"[^\w\-.]+", "", token).strip(".") or "embedding"
    return stem if stem != "learned_embeds" else "learned_embeds-a1111"      # never over diffusers' file


def save(vectors, token, out, step=None, meta=None):
    """learned_embeds.safetensors (diffusers) and <word>.safetensors (A1111) in `out`, each written to a temporary
    name first; returns the path of the first. A snapshot (step given): learned_embeds-step000400.safetensors and
    <word>-step000400.safetensors, and both paths are returned. `meta`: the run's metadata (metadata.py) for both
    headers."""
    paths = [os.path.join(out, "learned_embeds.safetensors"), os.path.join(out, file_stem(token) + ".safetensors")]
    if step is not None:
        paths = [snapshot_path(p, step) for p in paths]
    atomic_write(paths[0], lambda tmp: save_diffusers(tmp, token, vectors, meta))
    atomic_write(paths[1], lambda tmp: save_a1111(tmp, vectors, meta))
    return paths[0] if step is None else paths


def run(cfg: TextualInversionConfig, draws=None, log=print):
    """Textual inversion on cfg.data into cfg.out; returns the path of learned_embeds.safetensors."""
    check(cfg)
    check_source(cfg, "textual-inversion")
    if cfg.train_text_encoder:
        raise ValueError("--train-text-encoder does not apply to textual-inversion: only the new vectors train")
    if cfg.unet_lr is not None:
        raise ValueError("--unet-lr does not apply to textual-inversion: only the new vectors train "
                         "(--learning-rate is their rate)")

    def prepare(model, resolution, device, log):
        init_id = check_words(cfg, model.tokenizer)
        examples = training_examples(cfg, resolution, templates(cfg.token, cfg.learnable_property), log=log)
        unnamed = [e for e in examples if not all(cfg.token.lower() in c.lower() for c in alternatives(e.caption))]
        if unnamed:
            raise ValueError(f"the caption of {unnamed[0].path} does not name {cfg.token!r} ({len(unnamed)} such); "
                             f"put the word in every caption, or remove the captions to train with template prompts")

        # the new word's vectors: its own Parameter, every vector starting as the init token's row (as diffusers does)
        with torch.no_grad():
            row = model.text_encoder.token_embedding.weight[init_id]
            start = row.to(DTYPES[cfg.dtype]).repeat(cfg.num_vectors, 1)
        vectors = torch.nn.Parameter(start.to(device))
        words = Embeddings(model.config.text)
        words.add(cfg.token, vectors)
        name = f"embeddings.{cfg.token}"

        def write(model, weights, step=None, meta=None):
            if step is not None:                # a snapshot: the vectors as they are at that step
                return save(weights[name].detach(), cfg.token, cfg.out, step, meta)
            with torch.no_grad():
                vectors.copy_(weights[name])    # the EMA values with --use-ema: the final samples use them too
            return save(vectors, cfg.token, cfg.out, meta=meta)

        log(f"textual inversion of {cfg.token!r} ({cfg.num_vectors} vector{'s' * (cfg.num_vectors > 1)} from "
            f"{cfg.init_token!r}) on {len(examples)} images of {cfg.dataset_name or cfg.data} at {resolution} px")
        return Training([Stream(examples, stream=0, root=cfg.data)], trainable={name: vectors}, save=write,
                        embeddings=words)

    return fit(cfg, "textual_inversion", prepare, draws, log)
