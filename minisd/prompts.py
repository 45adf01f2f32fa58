"""From prompt text to the token chunks the text encoder sees, AUTOMATIC1111-style.

A1111's web UI (modules/prompt_parser.py, modules/sd_hijack_clip.py, modules/sd_emphasis.py) added three
things to Stable Diffusion's prompts that users now take for granted; minisd does them the same way:

1. Emphasis. `(word)` multiplies the attention weight of its tokens by 1.1, `[word]` divides it by 1.1,
   `(word:1.3)` sets the multiplier to 1.3; brackets nest and multiply. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are
   literal characters. `parse_emphasis` turns the text into (text, weight) runs.
2. Long prompts. CLIP reads 77 tokens (75 + <|startoftext|> + <|endoftext|>). Instead of truncating, the
   tokens are cut into chunks of 75, each framed as its own 77-token sequence and encoded separately; the
   encoder outputs are concatenated along the token axis, so the U-Net cross-attends to n * 77 tokens
   (`chunk_tokens`). `BREAK` (upper case, a word of its own) ends a chunk early.
3. The weights are applied to the encoder *output*: each token's vector is scaled by its weight and the chunk
   is rescaled to keep its mean (`apply_emphasis`).

Putting it together (what the pipeline does):

    ids, weights = prompt_tokens(tokenizer, prompt)                 # (n, 77), (n, 77)
    z = apply_emphasis(text_encoder(ids), weights)                 # (n, 77, width)
    context = z.reshape(1, -1, z.shape[-1])                        # (1, n * 77, width)

The positive and negative prompts must give the same number of chunks to be batched together for
classifier-free guidance; `prompt_pair_tokens` pads the shorter one with empty chunks.

A prompt of at most 75 tokens with no brackets gives exactly the ids of diffusers' pipeline: BOS, tokens, EOS,
padding. diffusers silently truncates anything longer to 77; minisd chunks it instead, as A1111 does.
"""
import re

import torch

from .tokenizer import BOS, EOS

CHUNK_LEN = 75               # prompt tokens per chunk; with BOS and EOS a chunk is CLIP's 77
COMMA_ID = 267               # ",</w>" in CLIP's vocabulary
BACKTRACK = 20               # A1111's default "comma padding backtrack"
BREAK = ("BREAK", -1.0)      # the run parse_emphasis returns for the BREAK keyword (A1111's marker)
BREAK_ID = -1                # the same marker in a token stream

# One lexical unit of a prompt, tried in this order. A colon-number directly before ")" is a weight;
# any other colon is plain text.
_UNIT = re.compile(r"""
      \\[()\[\]\\]                # an escaped bracket or backslash: that character, literally
    | \\                          # any other backslash: dropped (as in A1111)
    | [(\[]                       # open a round or square bracket
    | :\s*([+-]?[.\d]+)\s*\)      # ":1.3)": close a round bracket with an explicit weight
    | [)\]]                       # close a bracket
    | [^\\()\[\]:]+               # plain text
    | :                           # a colon that is not part of a weight
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into runs of (text, weight), A1111's `parse_prompt_attention`.

    Weights are products of the multipliers of the brackets around the text, applied as each bracket closes;
    unclosed brackets act as if closed at the end, unmatched closing brackets are plain text. Neighbouring
    runs with equal weights are merged. `BREAK` gives the run BREAK = ("BREAK", -1.0).

    One deliberate difference: A1111 also multiplies its BREAK marker by the brackets around it, which turns
    a BREAK inside brackets into the word "break"; minisd keeps it a BREAK.
    """
    runs = []                    # [text, weight] lists, mutable while brackets are open
    open_round, open_square = [], []   # index into runs where each open bracket started

    def multiply_from(start, factor):
        for run in runs[start:]:
            if run[0] is not BREAK:
                run[1] *= factor

    for match in _UNIT.finditer(text):
        unit, weight = match.group(0), match.group(1)
        if unit.startswith("\\"):
            runs.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(runs))
        elif unit == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"bad emphasis weight {weight!r} in prompt {text!r}") from None
            multiply_from(open_round.pop(), factor)
        elif unit == ")" and open_round:
            multiply_from(open_round.pop(), 1.1)
        elif unit == "]" and open_square:
            multiply_from(open_square.pop(), 1 / 1.1)
        else:                    # plain text, or a bracket / weight with nothing to close
            for i, piece in enumerate(_BREAK_WORD.split(unit)):
                if i > 0:
                    runs.append([BREAK, None])
                runs.append([piece, 1.0])
    for start in open_round:
        multiply_from(start, 1.1)
    for start in open_square:
        multiply_from(start, 1 / 1.1)

    merged = []
    for piece, weight in runs:
        if piece is BREAK:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def tokenize_weighted(text: str, encode, emphasis: bool = True) -> tuple[list[int], list[float]]:
    """Prompt -> (token ids, one weight per token), BREAK as BREAK_ID. Each run is encoded on its own, as in
    A1111 (so "(a)b" gives the tokens of "a" and "b", not of "ab"). With emphasis=False the text is encoded
    whole, brackets and BREAK included (A1111's "Emphasis: None")."""
    runs = parse_emphasis(text) if emphasis else [(text, 1.0)]
    ids, weights = [], []
    for piece, weight in runs:
        if (piece, weight) == BREAK:
            ids.append(BREAK_ID)
            weights.append(1.0)
            continue
        tokens = encode(piece)
        ids += tokens
        weights += [weight] * len(tokens)
    return ids, weights


def chunk_tokens(token_ids, weights, pad_id: int, chunk_len: int = CHUNK_LEN, backtrack: int = BACKTRACK,
                 comma_id: int = COMMA_ID, words=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a weighted token stream into chunks of `chunk_len` tokens, each framed as BOS + chunk + EOS +
    padding. Returns ids LongTensor (n, chunk_len + 2) and weights FloatTensor (n, chunk_len + 2); BOS, EOS
    and padding get weight 1.0. An empty prompt is one chunk: BOS, EOS, padding.

    Comma backtrack (A1111 sd_hijack_clip.tokenize_line, setting "comma padding backtrack", default 20): when
    a chunk is full and the next token is not a comma, the tokens after the chunk's last comma move to the
    next chunk if there are at most `backtrack` of them, so a phrase is not cut in half; the chunk is padded
    instead. backtrack=0 turns this off. BREAK_ID in the stream closes the chunk (even an empty one).

    words: {id: n} of the textual-inversion words in the stream (Embeddings.spans): the id of a word's first
    vector and how many it has. A word that would straddle the end of a chunk starts the next one instead, the
    chunk padded, as A1111 does (tokenize_line: "if len(chunk.tokens) + emb_len > self.chunk_length").
    """
    token_ids, weights = list(token_ids), list(weights)
    if len(token_ids) != len(weights):
        raise ValueError(f"{len(token_ids)} token ids but {len(weights)} weights")
    chunks = []                  # (ids, weights) of at most chunk_len tokens each
    ids, ws = [], []
    last_comma = -1              # position of the last comma in the current chunk

    def close_chunk():
        nonlocal ids, ws, last_comma
        chunks.append((ids, ws))
        ids, ws, last_comma = [], [], -1

    for token, weight in zip(token_ids, weights):
        if token == BREAK_ID:
            close_chunk()
            continue
        if token == comma_id:
            last_comma = len(ids)
        elif backtrack and len(ids) == chunk_len and last_comma != -1 and len(ids) - last_comma <= backtrack:
            split = last_comma + 1
            carried = ids[split:], ws[split:]
            ids, ws = ids[:split], ws[:split]
            close_chunk()
            ids, ws = carried
        if len(ids) == chunk_len:
            close_chunk()
        n = (words or {}).get(token, 0)
        if ids and n <= chunk_len and len(ids) + n > chunk_len:
            close_chunk()
        ids.append(token)
        ws.append(weight)
    if ids or not chunks:
        close_chunk()

    n, width = len(chunks), chunk_len + 2
    out_ids = torch.full((n, width), pad_id, dtype=torch.long)
    out_weights = torch.ones(n, width)
    for row, (ids, ws) in enumerate(chunks):
        out_ids[row, :len(ids) + 2] = torch.tensor([BOS, *ids, EOS], dtype=torch.long)
        out_weights[row, 1:len(ws) + 1] = torch.tensor(ws, dtype=torch.float32)
    return out_ids, out_weights


def pad_chunks(ids: torch.Tensor, weights: torch.Tensor, n_chunks: int, pad_id: int):
    """Append empty chunks (BOS, EOS, padding; weights 1) until there are `n_chunks` of them."""
    missing = n_chunks - ids.shape[0]
    if missing < 0:
        raise ValueError(f"cannot pad {ids.shape[0]} chunks down to {n_chunks}")
    empty_ids, empty_weights = chunk_tokens([], [], pad_id, chunk_len=ids.shape[1] - 2)
    return (torch.cat([ids, empty_ids.expand(missing, -1)]),
            torch.cat([weights, empty_weights.expand(missing, -1)]))


def prompt_tokens(tokenizer, text: str, emphasis: bool = True, backtrack: int = BACKTRACK, encode=None, words=None):
    """Prompt -> (ids (n, 77), weights (n, 77)) with minisd's Tokenizer (its encode and pad_id). `encode`
    replaces tokenizer.encode (the pipeline's, which also knows textual-inversion words: embeddings.py) and
    `words` says where those words' ids start (chunk_tokens)."""
    ids, weights = tokenize_weighted(text, encode or tokenizer.encode, emphasis)
    return chunk_tokens(ids, weights, tokenizer.pad_id, backtrack=backtrack, words=words)


def prompt_pair_tokens(tokenizer, prompt: str, negative_prompt: str, emphasis: bool = True,
                       backtrack: int = BACKTRACK, encode=None, words=None):
    """Positive and negative prompt as chunks, the shorter padded with empty chunks to the other's count.

    A1111 instead encodes the two separately with different lengths (or, with its "pad prompt/negative prompt"
    option, pads with encoded empty prompts as here); padding lets one U-Net call take both."""
    cond = prompt_tokens(tokenizer, prompt, emphasis, backtrack, encode, words)
    uncond = prompt_tokens(tokenizer, negative_prompt, emphasis, backtrack, encode, words)
    n = max(cond[0].shape[0], uncond[0].shape[0])
    return (*pad_chunks(*cond, n, tokenizer.pad_id), *pad_chunks(*uncond, n, tokenizer.pad_id))


# A1111's extra-network tag for LoRAs: <lora:NAME>, <lora:NAME:MULT>, <lora:NAME:TEXT_MULT:UNET_MULT>
_LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*){0,2})>")


def parse_lora_tags(text: str):
    """A1111's `<lora:NAME:MULT>` (modules/extra_networks.py): the tags are cut out of the prompt and returned as
    [(NAME, text-encoder multiplier, U-Net multiplier)]; MULT defaults to 1, the U-Net's to the text encoder's."""
    tags = []
    for m in _LORA_TAG.finditer(text):
        args = [a.strip() for a in m.group(2).split(":")[1:]]
        try:
            te = float(args[0]) if args and args[0] else 1.0
            unet = float(args[1]) if len(args) > 1 and args[1] else te
        except ValueError:
            raise ValueError(f"bad multiplier in {m.group(0)!r}: expected <lora:NAME:NUMBER>") from None
        tags.append((m.group(1).strip(), te, unet))
    return _LORA_TAG.sub("", text), tags


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's encoder output by its weight, then restore each chunk's mean (A1111's "Original"
    emphasis, sd_emphasis.EmphasisOriginal):

        z' = z * w;   z'' = z' * mean(z) / mean(z')

    z (n, 77, width), weights (n, 77). A1111 encodes a prompt chunk by chunk, so the means are taken per
    chunk. A1111's own comment: restoring the mean "is likely not correct, but it seems to work well to
    prevent artifacts". With all weights 1 (no brackets) z is returned unchanged.
    """
    if z.shape[:-1] != weights.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match encoder output {tuple(z.shape)}")
    if bool((weights == 1).all()):
        return z
    original_mean = z.mean(dim=(-2, -1), keepdim=True)
    z = z * weights[..., None].to(z.dtype)
    return z * (original_mean / z.mean(dim=(-2, -1), keepdim=True))
