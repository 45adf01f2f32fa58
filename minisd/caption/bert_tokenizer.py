"""BERT's WordPiece tokenizer (Devlin et al. 2019; Wu et al. 2016), as transformers' BertTokenizer runs it with
BLIP's settings (lowercase, accents stripped), reading the folder's vocab.txt (one token per line, the line
number is its id) and the tokens added after it ([DEC] for BLIP).

Encoding, in two stages:
1. basic: drop NUL, U+FFFD and control characters, turn whitespace into spaces, put spaces around CJK ideographs
   (they are words on their own), lowercase, strip accents (NFD, then drop combining marks), split on spaces
   and around every punctuation character;
2. WordPiece, per word: take the longest prefix in the vocabulary, then the longest "##"-prefixed continuation,
   and so on; a word that cannot be covered this way (or is over 100 characters) is one [UNK].

Decoding (skip_special_tokens=True, as BLIP's captions are decoded): drop special tokens and ids the tokenizer
does not know, put a space before each token but the first, none before a "##" piece (its "##" dropped), and
clean up as the `tokenizers` WordPiece decoder does, token by token: no space before a token that is ".", "?",
"!" or "," or starts with "n't", "'m", "'s", "'ve" or "'re". (transformers 5 decodes through that library;
its rules run per token, so e.g. "don ' t" keeps its spaces.)
"""
import json
import unicodedata
from pathlib import Path

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))   # tokenizers' list


class BertTokenizer:
    def __init__(self, vocab: list, added: dict = None, specials=(), lowercase=True, strip_accents=None,
                 max_chars_per_word=100):
        """vocab: tokens in id order; added: token -> id beyond it; specials: tokens that decoding skips."""
        self.id_to_token = dict(enumerate(vocab)) | {i: t for t, i in (added or {}).items()}
        self.vocab = {t: i for i, t in self.id_to_token.items()}
        self.special_ids = {self.vocab[t] for t in specials if t in self.vocab}
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents   # BERT's rule
        self.max_chars_per_word = max_chars_per_word
        for t in ("[UNK]", "[CLS]", "[SEP]"):
            if t not in self.vocab:
                raise ValueError(f"the vocabulary has no {t} token")

    @classmethod
    def from_folder(cls, folder):
        """vocab.txt, plus added tokens and settings from tokenizer.json / tokenizer_config.json /
        added_tokens.json / special_tokens_map.json where the folder has them."""
        folder = Path(folder)
        path = folder / "vocab.txt"
        fast = _json(folder / "tokenizer.json")
        if path.is_file():
            vocab = path.read_text(encoding="utf-8").split("\n")
            if vocab and vocab[-1] == "":
                vocab.pop()
        elif isinstance((fast.get("model") or {}).get("vocab"), dict):   # transformers 5 saves only this
            by_id = {i: t for t, i in fast["model"]["vocab"].items()}
            vocab = [by_id[i] for i in range(len(by_id))]
        else:
            raise ValueError(f"{folder}: no vocab.txt or tokenizer.json (the BERT tokenizer's vocabulary)")
        config = _json(folder / "tokenizer_config.json")
        added, specials = {}, set(BERT_SPECIALS)
        for t in fast.get("added_tokens", []):
            added[t["content"]] = t["id"]
            if t.get("special"):
                specials.add(t["content"])
        for i, t in (config.get("added_tokens_decoder") or {}).items():
            added[t["content"]] = int(i)
            if t.get("special"):
                specials.add(t["content"])
        added |= _json(folder / "added_tokens.json")
        for source in (config, _json(folder / "special_tokens_map.json")):
            for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
                if source.get(key):
                    specials.add(_content(source[key]))
            for key in ("additional_special_tokens", "extra_special_tokens"):
                specials.update(_content(t) for t in source.get(key) or [])
        added = {t: i for t, i in added.items() if i >= len(vocab) or vocab[i] != t}
        return cls(vocab, added, specials, lowercase=config.get("do_lower_case", True),
                   strip_accents=config.get("strip_accents"))

    def encode(self, text: str) -> list:
        """Text -> ids, without [CLS] and [SEP]."""
        unk = self.vocab["[UNK]"]
        return [self.vocab.get(piece, unk) for word in self.basic(text) for piece in self.wordpiece(word)]

    def basic(self, text: str) -> list:
        text = "".join(" " if _is_whitespace(c) else c for c in text
                       if not (ord(c) in (0, 0xFFFD) or _is_control(c)))
        text = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in text)
        words = []
        for word in text.split():
            if self.lowercase:
                word = word.lower()
            if self.strip_accents:
                word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            piece = ""
            for c in word:                                 # punctuation characters are words of their own
                if _is_punctuation(c):
                    words += [piece, c] if piece else [c]
                    piece = ""
                else:
                    piece += c
            if piece:
                words.append(piece)
        return words

    def wordpiece(self, word: str) -> list:
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):        # longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def decode(self, ids) -> str:
        tokens = [self.id_to_token[i] for i in ids if i in self.id_to_token and i not in self.special_ids]
        pieces = []
        for n, token in enumerate(tokens):
            if n > 0:
                token = token[2:] if token.startswith("##") else " " + token
            for before, after in CLEAN_UP:                 # per token, as the tokenizers library does
                token = token.replace(before, after)
            pieces.append(token)
        return "".join(pieces)


def _json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token):
    return token["content"] if isinstance(token, dict) else token


def _is_whitespace(c):
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_control(c):
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c):
    cp = ord(c)   # all non-letter/number ASCII counts ("^", "$", "`" are not Unicode punctuation)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(c).startswith("P")


def _is_cjk(cp):
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))
