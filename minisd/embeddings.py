"""Textual Inversion (Gal et al. 2022): new words for the text encoder, as vectors in its token-embedding space.

An embedding file holds n vectors of the text encoder's width (768 for SD1, 1024 for SD2) learned for one new
word. In a prompt the word stands for those n vectors: they replace the token-embedding lookup at n positions,
and everything after (positions, transformer, final norm) is the text encoder as usual. A multi-vector embedding
takes n of the 75 token places of a chunk, as in A1111 and diffusers.

The files (read by `read`, written by `save_diffusers` / `save_a1111`):

    diffusers    {token: (n, dim)} in learned_embeds.safetensors / .bin; the old sd-concepts-library files
                 hold a 1-D (dim,) vector. The token is the key: "<cat-toy>"
    A1111 .pt    {"string_to_token": {"*": 265}, "string_to_param": {"*": (n, dim)}, "name": "cat-toy",
                 "step": ..., "sd_checkpoint": ..., ...}: read with torch's restricted unpickler
                 (weights_convert/io.py), which runs no code from the file
    A1111/kohya  {"emb_params": (n, dim)} .safetensors

Which word: A1111 names an embedding after its file (`--embeddings-dir`: cat-toy.pt is "cat-toy"); a file given
on its own (`--embedding FILE`) is named as diffusers' load_textual_inversion names it: the diffusers key, the
A1111 .pt's "name", and the file's stem for emb_params and bare-tensor files.

How the word is found in a prompt: the prompt text is cut at each occurrence of the word (case-insensitive, not
inside a longer word), the text around it tokenized as usual and the word itself becomes n ids past the end of
CLIP's vocabulary (49408, 49409, ...), which `encode` looks up in the embeddings instead of the token table.
That is diffusers' tokenization (an added token splits the text; the multi-vector "<cat-toy>" becomes
"<cat-toy> <cat-toy>_1 ...") and A1111's for words typed apart from their neighbours. A word whose vectors would
straddle the end of a 75-token chunk starts the next chunk, as in A1111 (`spans`, prompts.chunk_tokens); diffusers
has no chunks and truncates at 77.
"""
import os
import re

import torch

from weights_convert.io import SafetensorsFile, unpickle_ckpt, write_safetensors

EXTENSIONS = (".safetensors", ".pt", ".bin")


class EmbeddingError(ValueError):
    """An embedding file that cannot be read or does not fit the model."""


def read(path):
    """(token or None, vectors (n, dim) float32) of an embedding file; token None when the file names none."""
    path = str(path)
    if not os.path.isfile(path):
        raise EmbeddingError(f"{path}: no such embedding file")
    if path.endswith(".safetensors"):
        data = SafetensorsFile(path)
        data = {k: data[k] for k in data}
    else:
        data = unpickle_ckpt(path)
    if isinstance(data, torch.Tensor):                                  # a bare tensor (diffusers accepts it too)
        token, vectors = None, data
    elif isinstance(data, dict) and "string_to_param" in data:          # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: an A1111 embedding should hold one term in string_to_param, holds "
                                 f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        token, vectors = data.get("name"), next(iter(params.values()))
    elif isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l, clip_g); minisd runs SD 1.x / 2.x")
    elif isinstance(data, dict) and len(data) == 1:                     # diffusers {token: vectors}, kohya emb_params
        token, vectors = next(iter(data.items()))
        token = None if token == "emb_params" else token
    else:
        keys = list(data)[:4] if isinstance(data, dict) else type(data).__name__
        raise EmbeddingError(f"{path}: not a textual-inversion embedding (expected {{token: vectors}}, "
                             f"emb_params or string_to_param; found {keys})")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise EmbeddingError(f"{path}: the embedding is not a (n, dim) or (dim,) float tensor "
                             f"({getattr(vectors, 'shape', type(vectors).__name__)})")
    if not isinstance(token, (str, type(None))):
        token = None
    return token, vectors.detach().reshape(-1, vectors.shape[-1]).float()


def save_diffusers(path, token, vectors, metadata=None):
    """diffusers' learned_embeds.safetensors: {token: (n, dim)}; `metadata`: header entries (train/metadata.py)."""
    write_safetensors(str(path), {token: vectors.detach().float().cpu().contiguous()}, metadata)


def save_a1111(path, vectors, metadata=None):
    """A1111's (and kohya's) .safetensors: {"emb_params": (n, dim)}; A1111 names it after the file's stem."""
    write_safetensors(str(path), {"emb_params": vectors.detach().float().cpu().contiguous()}, metadata)


def files_in(folder):
    """The embedding files of a folder and its subfolders, as A1111 scans its embeddings/ folder."""
    if not os.path.isdir(folder):
        raise EmbeddingError(f"{folder}: no such embeddings folder")
    return sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                  if f.endswith(EXTENSIONS))


class Embeddings:
    """The embeddings loaded for one text encoder: token -> vectors, and the ids past the vocabulary they get."""

    def __init__(self, text_config):
        self.width, self.vocab_size = text_config.width, text_config.vocab_size
        self.vectors = {}            # token (lower case) -> (n, width)
        self.first_id = {}           # token -> id of its first vector: vocab_size, vocab_size + n0, ...
        self.files = {}              # token -> (the word as it was named, its file) for words read from a file
        self._pattern = None

    def __bool__(self):
        return bool(self.vectors)

    def add(self, token, vectors, source=""):
        if vectors.shape[-1] != self.width:
            family = {768: " (an SD1 embedding)", 1024: " (an SD2 embedding)"}.get(vectors.shape[-1], "")
            raise EmbeddingError(f"{source or token}: embedding of width {vectors.shape[-1]}{family}, but this "
                                 f"model's text encoder is {self.width} wide")
        key = token.lower()           # CLIP lowercases prompts; diffusers' added tokens match after lowercasing too
        if key in self.vectors:
            raise EmbeddingError(f"{source or token}: an embedding named {token!r} is loaded already")
        self.first_id[key] = self.vocab_size + sum(len(v) for v in self.vectors.values())
        self.vectors[key] = vectors
        self._pattern = None

    def load(self, path, token=None):
        """Add the embedding in `path`, named `token`, else as the file names it, else after the file's stem."""
        found, vectors = read(path)
        token = token or found or os.path.splitext(os.path.basename(str(path)))[0]
        self.add(token, vectors, source=str(path))
        self.files[token.lower()] = (token, str(path))
        return token

    def load_folder(self, folder):
        """A1111's convention: every file in `folder`, each named after its stem."""
        return [self.load(path, os.path.splitext(os.path.basename(path))[0]) for path in files_in(folder)]

    def tokenize(self, text, encode):
        """Token ids of `text` with `encode` (the tokenizer's), each loaded word replaced by its n ids past the
        vocabulary. Longer names are tried first, so "<cat-toy-2>" is not read as "<cat-toy>"."""
        if not self.vectors:
            return encode(text)
        ids, start = [], 0
        for m in self._words().finditer(text):
            token = m.group(0).lower()
            ids += encode(text[start:m.start()])
            ids += range(self.first_id[token], self.first_id[token] + len(self.vectors[token]))
            start = m.end()
        return ids + encode(text[start:])

    def used(self, *texts):
        """The loaded words that `texts` use, in order of first use, each once (lower case)."""
        if not self.vectors:
            return []
        return list(dict.fromkeys(m.group(0).lower() for text in texts for m in self._words().finditer(text)))

    def _words(self):
        if self._pattern is None:
            # a word that starts (ends) with a letter or digit must not continue a longer word there
            self._pattern = re.compile("|".join(
                (r"(?<!\w)" if t[0].isalnum() else "") + re.escape(t) + (r"(?!\w)" if t[-1].isalnum() else "")
                for t in sorted(self.vectors, key=len, reverse=True)), re.IGNORECASE)
        return self._pattern

    def spans(self):
        """{id of a word's first vector: its number of vectors}: what a prompt chunk keeps together."""
        return {self.first_id[t]: len(v) for t, v in self.vectors.items()}

    def table(self):
        """All vectors, in id order: row k is id vocab_size + k."""
        return torch.cat(list(self.vectors.values())) if self.vectors else None

    def encode(self, text_encoder, ids, clip_skip=1):
        """text_encoder(ids), with ids >= vocab_size looked up in the embeddings (TextEncoder.forward's `extra`)."""
        if not self.vectors or int(ids.max()) < self.vocab_size:
            return text_encoder(ids, clip_skip)
        return text_encoder(ids, clip_skip, extra=self.table())
