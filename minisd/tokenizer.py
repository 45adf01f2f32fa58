r"""CLIP's tokenizer: byte-level BPE (Sennrich et al. 2016; Radford et al. 2019 & 2021).

A prompt becomes 77 token ids in four steps, in this file's order:

1. clean: repair the text with ftfy, `html.unescape` twice, collapse whitespace runs to one space, strip,
   lowercase (CLIP's basic_clean + whitespace_clean, as in OpenAI CLIP and open_clip);
2. pre-tokenise: CLIP's regex splits the text into words, single digits and punctuation runs;
3. BPE: each pre-token, as UTF-8 bytes mapped to printable characters, is merged pair by pair in the order the
   merges were learned; the last symbol of a word carries the end-of-word marker `</w>`;
4. frame: <|startoftext|> + ids + <|endoftext|>, truncated to 77 with <|endoftext|> kept last, padded to 77.

Why clean first, and with ftfy: the text encoders were trained on captions cleaned this way, so the ids they
know are those of the cleaned text. ftfy's `fix_text` repairs mojibake ("cafÃ©" -> "café"), straightens curly
quotes (’ -> '), expands ligatures (ﬁ -> fi), narrows full-width characters (Ａ -> A), removes control characters
and terminal escapes, unescapes HTML entities when the text holds no "<", and NFC-normalises. Each of these
changes the bytes BPE sees, hence the ids ("cafÃ©" is 4 tokens, "café" 1), so it must run before
pre-tokenisation; HTML unescaping follows it as in CLIP (web captions were often escaped twice).

Differences from the references, all deliberate and tested in tests/test_tokenizer.py:

- open_clip (SD2) renamed the specials <start_of_text> / <end_of_text>, so a typed "<|endoftext|>" is text to
  it; and U+0345 (see the regex note). On every other tested input minisd gives open_clip's ids.
- transformers' CLIPTokenizer (what diffusers runs for SD1). In transformers 5 it is only the `tokenizers`-backed
  (formerly "fast") class; its normalizer is NFC, \s+ -> " ", lowercase: no ftfy and no HTML unescaping. (The
  slow class of transformers 4, which SD1's original code used, ran ftfy.fix_text when ftfy was installed.)
  So it differs from CLIP's algorithm (and so from minisd) on: text ftfy repairs (among it control characters
  such as U+001C..U+001F, which ftfy removes; fed CLIP's cleaned text it agrees), HTML entities ("&amp;"
  stays), word-final capital sigma (its per-character lowercasing gives σ where str.lower() gives ς),
  special-token strings in another case ("<|ENDOFTEXT|>": it matches specials before lowercasing), and "'ſ"
  (see below). For SD 2, diffusers' tokenizer folders set pad_token "!", which transformers then treats as a
  special token: each typed "!" becomes the pad id 0 ("night!!" -> 0, 0), where SD 2's own tokenizer (open_clip's,
  and minisd's) merges it ("!!" is 748); so an SD 2 prompt with "!" gets the original's image, not diffusers'
  (tests/test_sd2_pad.py).
- The pre-tokeniser regex. CLIP's pattern, for the third-party `regex` package, is
      <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
  with IGNORECASE. The stdlib `re` has no \p{...} classes, so `_unicode_classes` spells \p{L} (letters) and
  \p{N} (numbers) out as explicit code point ranges read from `unicodedata`; \s is the stdlib's (after
  cleaning the only whitespace left is " "). Differences: (1) the Unicode version: Python 3.11's unicodedata
  knows Unicode 14, the `regex` package a newer one, so characters assigned since are punctuation here;
  (2) IGNORECASE applies to the contractions only, as (?i:'s|'t|...): after lowercasing it still matters there
  ("'ſ", long s, matches 's as in CLIP), while on the classes it made `regex` drop U+0345 COMBINING GREEK
  YPOGEGRAMMENI (it case-folds to the letter ι, so it is in neither [\p{L}] nor its complement); here, as in
  transformers, U+0345 is a symbol. It is the only code point so affected (checked over all of Unicode).
"""
import gzip
import html
import itertools
import json
import os
import re
import unicodedata
from functools import lru_cache

import ftfy
import torch

BOS = 49406                 # <|startoftext|>
EOS = 49407                 # <|endoftext|>
CONTEXT_LENGTH = 77         # 75 prompt tokens + BOS + EOS
NUM_MERGES = 49408 - 2 * 256 - 2   # vocab = 256 bytes, 256 bytes + </w>, the merges, BOS, EOS
DEFAULT_MERGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@lru_cache()
def bytes_to_unicode():
    """Map each of the 256 byte values to a printable character, so BPE works on strings without whitespace
    or control characters in its symbols (GPT-2's table): printable Latin-1 bytes map to themselves, the
    other 68 bytes to code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@lru_cache()
def _unicode_classes():
    """Regex character-class bodies for \\p{L} (letters) and \\p{N} (numbers): every code point whose Unicode
    general category starts with "L" / "N", as \\U ranges. One pass over all code points (~0.3 s), done once."""
    classes, start = {"L": [], "N": []}, 0
    majors = (unicodedata.category(chr(cp))[0] for cp in range(0x110000))
    for major, run in itertools.groupby(majors):
        end = start + sum(1 for _ in run) - 1
        if major in classes:
            classes[major].append(f"\\U{start:08x}-\\U{end:08x}")
        start = end + 1
    return "".join(classes["L"]), "".join(classes["N"])


@lru_cache()
def _pattern():
    letters, numbers = _unicode_classes()
    return re.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|(?i:'s|'t|'re|'ve|'m|'ll|'d)"
        rf"|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+")


def merge_pairs(symbols, bpe_ranks):
    """BPE's merge loop (Sennrich et al. 2016): while some adjacent pair has a rank, merge every occurrence of the
    lowest-ranked one, left to right. Shared by CLIP's tokenizer and GPT-2's (caption/gpt2_tokenizer.py)."""
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: bpe_ranks.get(pair, float("inf")))
        if best not in bpe_ranks:
            break
        merged, i = [], 0
        while i < len(symbols):  # merge every occurrence of `best`, left to right
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def clean(text):
    """Text normalisation before pre-tokenisation: CLIP's basic_clean + whitespace_clean + lower."""
    text = ftfy.fix_text(text)                         # repair first: mojibake, quotes, widths, ... then NFC
    text = html.unescape(html.unescape(text))          # CLIP unescapes twice: web captions were double-escaped
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer. `pad_id` is 49407 (<|endoftext|>) for SD1 and 0 ("!") for SD2 (open_clip)."""

    def __init__(self, merges_path=None, pad_id=EOS, context_length=CONTEXT_LENGTH):
        merges_path = merges_path or DEFAULT_MERGES
        opener = gzip.open if str(merges_path).endswith(".gz") else open
        with opener(merges_path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        # skip the "#version: 0.2" header; the .gz file holds more candidate merges than CLIP used
        merges = [tuple(line.split()) for line in lines if line and "#version" not in line][:NUM_MERGES]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{merges_path}: expected {NUM_MERGES} merges of two symbols each, "
                             f"got {len(merges)} (is this CLIP's merges file?)")
        byte_chars = list(bytes_to_unicode().values())
        vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), *SPECIAL_TOKENS]
        self.encoder = {token: i for i, token in enumerate(vocab)}          # BPE symbol -> id
        self.decoder = vocab                                                # id -> BPE symbol
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}   # lower rank = merged earlier
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {t: [t] for t in SPECIAL_TOKENS}                       # specials are never split
        if not 0 <= pad_id < len(vocab):
            raise ValueError(f"pad_id {pad_id} is not a token id (0..{len(vocab) - 1})")
        self.pad_id = pad_id
        self.context_length = context_length

    @classmethod
    def from_diffusers(cls, folder):
        """Read a diffusers/transformers `tokenizer/` folder: merges.txt, vocab.json, and the pad token from
        special_tokens_map.json or tokenizer_config.json ("<|endoftext|>" for SD1, "!" for SD2)."""
        paths = {name: os.path.join(folder, name) for name in
                 ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")}
        for name in ("vocab.json", "merges.txt"):
            if not os.path.isfile(paths[name]):
                raise FileNotFoundError(f"{folder} has no {name}; expected a CLIP tokenizer folder")
        pad_token = "<|endoftext|>"
        for name in ("tokenizer_config.json", "special_tokens_map.json"):   # the latter wins, as in transformers
            if os.path.isfile(paths[name]):
                with open(paths[name], encoding="utf-8") as f:
                    pad = json.load(f).get("pad_token")
                if pad is not None:
                    pad_token = pad["content"] if isinstance(pad, dict) else pad
        tokenizer = cls(paths["merges.txt"])
        with open(paths["vocab.json"], encoding="utf-8") as f:
            vocab = json.load(f)
        if vocab != tokenizer.encoder:
            bad = next((t for t in vocab if tokenizer.encoder.get(t) != vocab[t]), None)
            raise ValueError(f"{paths['vocab.json']} does not match the vocabulary its merges.txt implies "
                             f"(first difference: {bad!r}); not a CLIP tokenizer?")
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in {paths['vocab.json']}")
        tokenizer.pad_id = vocab[pad_token]
        return tokenizer

    def bpe(self, word):
        """One pre-token (byte characters) -> its BPE symbols, merging the lowest-ranked adjacent pair first."""
        if word in self.cache:
            return self.cache[word]
        symbols = merge_pairs([*word[:-1], word[-1] + "</w>"], self.bpe_ranks)
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        """text -> token ids, without <|startoftext|>, <|endoftext|> or padding."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        ids = []
        for piece in _pattern().findall(clean(text)):
            word = piece if piece in SPECIAL_TOKENS else "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(word))
        return ids

    def __call__(self, texts, encode=None):
        """str or list of str -> LongTensor (B, 77): BOS, ids, EOS, then pad_id; too long -> truncated, EOS last.
        `encode` replaces self.encode (one that also knows textual-inversion words: embeddings.py)."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("expected a string or a list of strings")
        n = self.context_length
        tokens = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS, *(encode or self.encode)(text)][:n - 1] + [EOS]
            tokens[row, :len(ids)] = torch.tensor(ids)
        return tokens

    def decode(self, ids):
        """Token ids -> text. Ids from `encode` decode as they are; a row from `__call__` (starting with
        <|startoftext|>) decodes up to its first <|endoftext|>, since padding follows. Words come back
        lowercased and separated by spaces: "a photo, 4k" -> "a photo , 4 k" (which encodes to the same ids)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == BOS:
            ids = ids[1:ids.index(EOS)] if EOS in ids else ids[1:]
        out = bytearray()
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.decoder):
                raise ValueError(f"{i!r} is not a token id (0..{len(self.decoder) - 1})")
            symbol = self.decoder[i]
            if symbol in SPECIAL_TOKENS:
                out += symbol.encode("utf-8")
                continue
            end_of_word = symbol.endswith("</w>")
            out += bytes(self.byte_decoder[c] for c in symbol.removesuffix("</w>"))
            if end_of_word:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()
