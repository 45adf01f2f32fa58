"""Prompt parsing, chunking and emphasis, against A1111's documented behaviour and diffusers' token ids.

Reference values:
- the examples in the docstring of `parse_prompt_attention`, modules/prompt_parser.py of
  AUTOMATIC1111/stable-diffusion-webui (expected outputs copied verbatim; weights compare exactly because
  minisd multiplies in the same order, as each bracket closes);
- chunk layouts worked out by hand from A1111's modules/sd_hijack_clip.py `tokenize_line` (75-token chunks,
  comma backtrack 20, BREAK) and sd_emphasis.py `EmphasisOriginal` (scale, then restore the mean);
- token ids of transformers' CLIPTokenizer as diffusers' pipeline calls it (padding="max_length",
  max_length=77, truncation=True), built offline from open_clip's copy of CLIP's merges file.
"""
import gzip
import importlib.util
import os

import pytest
import torch

from minisd.prompts import (BREAK, BREAK_ID, COMMA_ID, apply_emphasis, chunk_tokens, pad_chunks, parse_emphasis,
                            prompt_pair_tokens, prompt_tokens, tokenize_weighted)
from minisd.tokenizer import BOS, EOS, Tokenizer

PAD = EOS


# --- parse_emphasis --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # A1111 prompt_parser.parse_prompt_attention docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parse_emphasis_matches_a1111_docstring(text, expected):
    assert parse_emphasis(text) == expected


def test_parse_emphasis_other_rules():
    assert parse_emphasis("[a]") == [("a", 1 / 1.1)]
    assert parse_emphasis("(a: 1.5 )") == [("a", 1.5)]                 # spaces around the weight are allowed
    assert parse_emphasis("a:1.2) b)") == [("a:1.2) b)", 1.0)]        # nothing open: plain text
    assert parse_emphasis("x \\\\ y") == [("x \\ y", 1.0)]              # escaped backslash
    assert parse_emphasis("") == [("", 1.0)]
    assert parse_emphasis("((a)") == [("a", 1.1 * 1.1)]                 # unclosed outer bracket still counts


def test_break_keyword():
    assert parse_emphasis("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    assert parse_emphasis("aBREAK b") == [("aBREAK b", 1.0)]            # only a word of its own
    # minisd keeps a BREAK inside brackets a BREAK (A1111 would multiply its marker and emit the word)
    assert parse_emphasis("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]


def test_bad_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="emphasis weight '1.2.3'"):
        parse_emphasis("(a:1.2.3)")


# --- chunk_tokens ----------------------------------------------------------------------------------------

def _row(ids, pad=PAD):
    return [BOS, *ids, EOS] + [pad] * (75 - len(ids))


def test_short_prompt_is_one_framed_chunk():
    ids, weights = chunk_tokens([5, 6, 7], [1.0, 1.1, 1.0], pad_id=0)
    assert ids.dtype == torch.long and weights.dtype == torch.float32
    assert ids.tolist() == [_row([5, 6, 7], pad=0)]
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.1, 1.0, 1.0]) and (weights[0, 5:] == 1).all()


def test_empty_prompt_is_bos_eos_padding():
    ids, weights = chunk_tokens([], [], pad_id=PAD)
    assert ids.tolist() == [_row([])] and (weights == 1).all()


def test_exactly_75_tokens_fit_one_chunk_76_need_two():
    assert chunk_tokens(list(range(1, 76)), [1.0] * 75, PAD)[0].tolist() == [_row(list(range(1, 76)))]
    ids, _ = chunk_tokens(list(range(1, 77)), [1.0] * 76, PAD)
    assert ids.tolist() == [_row(list(range(1, 76))), _row([76])]


def test_comma_backtrack_moves_the_last_phrase_to_the_next_chunk():
    # 60 words, a comma, 14 words fill the chunk; the 76th token is not a comma and the comma is
    # 75 - 60 = 15 <= 20 tokens back: the 14 words after it move on, the first chunk is padded.
    stream = list(range(1000, 1060)) + [COMMA_ID] + list(range(2000, 2015))
    ids, _ = chunk_tokens(stream, [1.0] * len(stream), PAD)
    assert ids.tolist() == [_row(list(range(1000, 1060)) + [COMMA_ID]), _row(list(range(2000, 2015)))]
    # with backtrack off, or a comma further back than 20 tokens, the chunk is cut at 75
    plain = [_row(stream[:75]), _row(stream[75:])]
    assert chunk_tokens(stream, [1.0] * len(stream), PAD, backtrack=0)[0].tolist() == plain
    far = list(range(1000, 1050)) + [COMMA_ID] + list(range(2000, 2025))
    assert chunk_tokens(far, [1.0] * len(far), PAD)[0].tolist() == [_row(far[:75]), _row(far[75:])]


def test_break_closes_the_chunk():
    ids, _ = chunk_tokens([5, BREAK_ID, 6], [1.0, 1.0, 1.2], PAD)
    assert ids.tolist() == [_row([5]), _row([6])]
    ids, _ = chunk_tokens([BREAK_ID, 6], [1.0, 1.0], PAD)               # as A1111: an empty first chunk
    assert ids.tolist() == [_row([]), _row([6])]
    assert chunk_tokens([5, BREAK_ID], [1.0, 1.0], PAD)[0].tolist() == [_row([5])]


def test_weights_follow_their_tokens_across_chunks():
    _, weights = chunk_tokens(list(range(1, 81)), [float(i) for i in range(1, 81)], PAD)
    assert weights[1, 1:6].tolist() == [76.0, 77.0, 78.0, 79.0, 80.0]
    assert weights[0, 0] == 1 and weights[0, 76] == 1 and weights[1, 6] == 1


def test_pad_chunks_adds_empty_chunks():
    ids, weights = pad_chunks(*chunk_tokens([5], [1.3], 0), n_chunks=3, pad_id=0)
    assert ids.tolist() == [_row([5], 0), _row([], 0), _row([], 0)]
    assert weights.shape == (3, 77) and weights[0, 1] == pytest.approx(1.3) and (weights[1:] == 1).all()


# --- with the real tokenizer and diffusers' ids ----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizers():
    """transformers' CLIPTokenizer for SD1 (pads with <|endoftext|>) and SD2 (pads with "!"), built from
    open_clip's merges file and the GPT-2 byte table in transformers, as in the hub's tokenizer folders."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with gzip.open(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab)}
    merges = [tuple(m.split()) for m in merges]
    return {pad: CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)
            for pad in ("<|endoftext|>", "!")}


PLAIN_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "A RED circle, on a blue background; 4k, highly detailed.",
    " ".join(["word"] * 75),                       # exactly 75 tokens: still one chunk
]
# Not for SD2: its hub tokenizer registers its pad token "!" as a special token, so transformers turns each
# "!" of a prompt into id 0, where open_clip (SD2's own tokenizer) and minisd give the BPE ids ("!!" -> 748).
SD1_ONLY = ["4k, highly detailed!!"]


@pytest.mark.parametrize("pad, prompt", [("<|endoftext|>", p) for p in PLAIN_PROMPTS + SD1_ONLY]
                         + [("!", p) for p in PLAIN_PROMPTS])
def test_plain_prompt_gives_diffusers_ids(prompt, pad, tokenizer, hf_tokenizers):
    hf = hf_tokenizers[pad]
    expected = hf(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    tokenizer.pad_id = hf.pad_token_id
    try:
        ids, weights = prompt_tokens(tokenizer, prompt)
    finally:
        tokenizer.pad_id = EOS
    assert ids.tolist() == [expected]
    assert (weights == 1).all()


def test_long_prompt_is_chunked_where_diffusers_truncates(tokenizer, hf_tokenizers):
    prompt = " ".join(f"word{i % 10}" for i in range(60))      # 120 tokens
    stream = tokenizer.encode(prompt)
    assert len(stream) == 120
    truncated = hf_tokenizers["<|endoftext|>"](prompt, padding="max_length", max_length=77, truncation=True)
    ids, _ = prompt_tokens(tokenizer, prompt)
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == truncated.input_ids                   # the first chunk is what diffusers keeps
    assert ids[1].tolist() == _row(stream[75:])


def test_comma_token_id(tokenizer):
    assert tokenizer.encode(",") == [COMMA_ID]


def test_emphasis_pieces_are_encoded_separately(tokenizer):
    ids, weights = tokenize_weighted("a (red:1.5) circle BREAK [blue]", tokenizer.encode)
    assert ids == [*tokenizer.encode("a"), *tokenizer.encode("red"), *tokenizer.encode("circle"), BREAK_ID,
                   *tokenizer.encode("blue")]
    assert weights == pytest.approx([1.0, 1.5, 1.0, 1.0, 1 / 1.1])
    raw_ids, _ = tokenize_weighted("a (red:1.5)", tokenizer.encode, emphasis=False)
    assert raw_ids == tokenizer.encode("a (red:1.5)")               # brackets kept as text


def test_prompt_pair_pads_the_shorter_prompt(tokenizer):
    long = " ".join(["cat"] * 100)
    c_ids, c_w, u_ids, u_w = prompt_pair_tokens(tokenizer, long, "blurry")
    assert c_ids.shape == u_ids.shape == c_w.shape == u_w.shape == (2, 77)
    assert u_ids[0].tolist() == _row(tokenizer.encode("blurry")) and u_ids[1].tolist() == _row([])
    u_ids, _, c_ids, _ = prompt_pair_tokens(tokenizer, "blurry", long)   # works the other way round too
    assert u_ids.shape == c_ids.shape == (2, 77)


# --- apply_emphasis --------------------------------------------------------------------------------------

def test_apply_emphasis_scales_tokens_and_restores_each_chunk_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=g) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    weights[1, 10:12] = 0.8
    out = apply_emphasis(z, weights)
    # by hand, per chunk: scale row by row, then multiply the chunk by mean(before) / mean(after);
    # fp32 rounding of a few hundred products and sums stays far below 1e-5 (values are O(1))
    for c in range(2):
        scaled = z[c] * weights[c][:, None]
        expected = scaled * (z[c].mean() / scaled.mean())
        assert (out[c] - expected).abs().max() < 1e-5
        assert abs(out[c].mean() - z[c].mean()) < 1e-5
    assert not torch.allclose(out[0], z[0] * weights[0][:, None], atol=1e-3)   # the rescaling did something
    ratio = out[0, 3] / out[0, 4] / (z[0, 3] / z[0, 4])             # emphasised token vs a neighbour
    assert (ratio - 1.5).abs().max() < 1e-4


def test_apply_emphasis_without_weights_is_the_identity():
    z = torch.randn(1, 77, 8)
    assert torch.equal(apply_emphasis(z, torch.ones(1, 77)), z)


def test_apply_emphasis_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="do not match"):
        apply_emphasis(torch.zeros(1, 77, 8), torch.ones(2, 77))
