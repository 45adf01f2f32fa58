r"""GPT-2's tokenizer (Radford et al. 2019), which OPT (Zhang et al. 2022) and so BLIP-2's language model use:
byte-level BPE read from a transformers folder's vocab.json + merges.txt (or, in a folder transformers 5 saved,
its tokenizer.json).

Text becomes ids in three steps, the way transformers' GPT2Tokenizer (the `tokenizers` library) does it:

1. added tokens: the special strings ("</s>", "<pad>", BLIP-2's "<image>", ...) are cut out of the text first and
   become their ids whole, longest match first;
2. pre-tokenise the rest with GPT-2's regex, which keeps a leading space with the word after it
   ("a photo" -> "a", " photo"), so no end-of-word marker is needed (CLIP's tokenizer.py has `</w>` instead);
3. BPE on each pre-token's UTF-8 bytes, mapped to printable characters (the space is "Ġ", the newline "Ċ").

Unlike CLIP's there is no cleaning: no lowercasing, no ftfy, whitespace kept as it is. OPT prepends "</s>" (id 2)
as its beginning-of-sequence token (tokenizer_config.json's `add_bos_token`); BLIP-2 writes it after the 32 image
positions (blip2.py). Decoding maps ids back to bytes, leaving out the special tokens (transformers'
`skip_special_tokens=True`, what BLIP-2's examples decode with) and ids that name no token, and reads the bytes as
UTF-8 with U+FFFD for invalid sequences (transformers' errors="replace").

The regex's \p{L} and \p{N} are spelled out from Python's `unicodedata` (tokenizer.py's `_unicode_classes`), and
\s is Unicode's White_Space set as the `tokenizers` regex engine (Oniguruma) reads it, not Python's (which also
counts U+001C..U+001F); characters assigned in Unicode versions newer than Python's may split differently.
"""
import json
import re
from functools import lru_cache
from pathlib import Path

from ..tokenizer import _unicode_classes, bytes_to_unicode, merge_pairs

# Unicode White_Space (Oniguruma's \s): tab..carriage return, space, NEL, NBSP, and the other space separators
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
IMAGE_TOKEN = "<image>"     # Blip2Processor's image placeholder: always a special token


@lru_cache()
def _pattern():
    """GPT-2's pre-tokeniser: 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    letters, numbers, ws = *_unicode_classes(), WHITE_SPACE
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{ws}{letters}{numbers}]+"
                      rf"|[{ws}]+(?![^{ws}])|[{ws}]+")


class GPT2Tokenizer:
    """vocab (token -> id), merges (pairs in rank order), added tokens (content -> id, beyond or inside the vocab)
    and which of them are special. `bos_id` is prepended by `__call__` when not None."""

    def __init__(self, vocab: dict, merges: list, added: dict, special: set, bos_id=None):
        self.encoder = dict(vocab)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in self.encoder]
        if missing:
            raise ValueError(f"vocab.json lacks the byte symbol {missing[0]!r}: not a byte-level BPE vocabulary")
        for a, b in merges:
            if a + b not in self.encoder:
                raise ValueError(f"merges.txt merges {a!r} {b!r}, but {a + b!r} is not in vocab.json")
        self.bpe_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.added = dict(added)
        self.special = set(special)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.decoder.update({i: t for t, i in self.added.items()})
        self.bos_id = bos_id
        # longest first, so "</s>" is not cut as "<" + ...; leftmost match wins as in `tokenizers`
        contents = sorted(self.added, key=len, reverse=True)
        self.added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.cache = {}

    @classmethod
    def from_folder(cls, folder):
        """A transformers tokenizer folder: vocab.json + merges.txt (or, where only transformers 5 wrote it,
        tokenizer.json), and the special tokens from tokenizer_config.json / special_tokens_map.json /
        added_tokens.json / tokenizer.json."""
        folder = Path(folder)
        tokenizer_json = _read_json(folder / "tokenizer.json", default={})
        added, flagged = {}, set()      # added tokens (content -> id); those marked special
        for token in tokenizer_json.get("added_tokens") or []:
            added[token["content"]] = int(token["id"])
            if token.get("special", False):
                flagged.add(token["content"])
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        elif (tokenizer_json.get("model") or {}).get("type") == "BPE":
            vocab = tokenizer_json["model"]["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tokenizer_json["model"]["merges"]]
        else:
            raise ValueError(f"{folder} has neither vocab.json + merges.txt nor a BPE tokenizer.json; expected a "
                             f"GPT-2 / OPT tokenizer folder")
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise ValueError(f"{folder}: merge {' '.join(bad)!r} is not a pair of symbols")

        config = _read_json(folder / "tokenizer_config.json", default={})
        named = {}      # bos_token, eos_token, ... -> content; special_tokens_map.json wins, as in transformers
        for source in (config, _read_json(folder / "special_tokens_map.json", default={})):
            for key, value in source.items():
                if key.endswith("_token") and isinstance(value, (str, dict)):
                    named[key] = _content(value)
                elif key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                    named.update({f"{key}.{n}": _content(v) for n, v in enumerate(value)})
        for token, i in _read_json(folder / "added_tokens.json", default={}).items():
            added[token] = int(i)
        for i, token in (config.get("added_tokens_decoder") or {}).items():
            added[token["content"]] = int(i)
            if token.get("special", False):
                flagged.add(token["content"])
        special = set(named.values()) | flagged | {IMAGE_TOKEN}
        for content in special - {IMAGE_TOKEN}:
            if content in vocab:
                added.setdefault(content, vocab[content])
            elif content not in added:
                raise ValueError(f"{folder}: special token {content!r} is in neither the vocabulary nor the added "
                                 f"tokens")
        if IMAGE_TOKEN not in added:    # Blip2Processor adds it, with the next free id, when the folder has none
            added[IMAGE_TOKEN] = vocab.get(IMAGE_TOKEN, 1 + max([*vocab.values(), *added.values()]))
        add_bos = config.get("add_bos_token")
        if add_bos is None:         # no flag: what the folder's tokenizer.json post-processor does, if any
            add_bos = _post_processor_adds_bos(tokenizer_json)
        bos = named.get("bos_token")
        return cls(vocab, merges, added, special, bos_id=added[bos] if add_bos and bos else None)

    def bpe(self, word):
        """One pre-token (byte characters) -> its BPE symbols."""
        if word not in self.cache:
            self.cache[word] = merge_pairs(list(word), self.bpe_ranks)
        return self.cache[word]

    def encode(self, text):
        """text -> ids, without the bos token."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        ids, start = [], 0
        pieces = self.added_pattern.finditer(text) if self.added_pattern else ()
        for match in [*pieces, None]:
            end = match.start() if match else len(text)
            for word in _pattern().findall(text[start:end]):
                chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.encoder[symbol] for symbol in self.bpe(chars))
            if match:
                ids.append(self.added[match.group()])
                start = match.end()
        return ids

    def __call__(self, text):
        """text -> ids as the model reads them: the bos token (OPT's </s>) first."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def decode(self, ids, skip_special_tokens=True):
        """ids -> text. Ids that name no token are left out, as `tokenizers` does."""
        out = bytearray()
        for i in ids:
            token = self.decoder.get(int(i))
            if token is None or (skip_special_tokens and token in self.special):
                continue
            if all(c in self.byte_decoder for c in token):
                out += bytes(self.byte_decoder[c] for c in token)
            else:   # an added token with characters outside the byte alphabet: its own UTF-8
                out += token.encode("utf-8")
        return out.decode("utf-8", errors="replace")


def _read_json(path, default=None):
    """A JSON file of the folder; `default` when it is absent (None: it must be there)."""
    from weights_convert.folders import read_config
    if default is not None and not path.is_file():
        return default
    return read_config(path.parent, path.name)


def _content(token):
    """A special token as tokenizer configs write it: a string or an AddedToken dict."""
    return token["content"] if isinstance(token, dict) else token


def _post_processor_adds_bos(tokenizer_json):
    """Does tokenizer.json's post-processor (a TemplateProcessing) put a special token before the text?"""
    processor = tokenizer_json.get("post_processor") or {}
    single = processor.get("single") or []
    return processor.get("type") == "TemplateProcessing" and bool(single) and "SpecialToken" in single[0]
