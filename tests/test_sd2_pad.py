"""SD 2 prompts with "!": minisd gives the original's image (open_clip's ids), which is not diffusers' image.

SD 2's tokenizer pads with id 0, the bare "!". open_clip (what the SD 2 weights were trained with, what the original
code and A1111 run, and what minisd follows) treats a typed "!" as any other character, so BPE merges it: "night!!"
is [930, 748]. diffusers' SD 2 tokenizer folders give transformers' CLIPTokenizer pad_token "!", which makes "!" a
special token: the text is cut at each "!" and each becomes 0, so "night!!" is [930, 0, 0]. Every other token and
every padding position agree (test_tokenizer.py pins the rule on the whole corpus). Here, on an SD 2 file (the
small SD 2 configuration of checkpoints.py: the real tokenizer and the real text path, small widths):

- the ids, the context and the image of a "!!" prompt are those of open_clip's ids run through the reference
  networks, and differ from diffusers' for exactly that reason (its networks fed open_clip's ids agree with
  minisd);
- the other places SD 2's pad token could leak (long-prompt chunks, emphasis weights, textual-inversion words, the
  negative prompt and its empty chunks) give open_clip's / A1111's ids, with 0 only where A1111 pads.

Tolerances: contexts 1e-4 x their std (fp32, as tests/test_clip.py); images 2/255 max abs (as test_pipeline.py).
"""
import copy

import numpy as np
import pytest
import torch

from checkpoints import (SMALL_SD2, diffusers_from_single_file, reference_text, write_diffusers_config,
                         write_ldm_checkpoint)
from minisd.embeddings import Embeddings
from minisd.pipeline import Pipeline
from minisd.prompts import prompt_pair_tokens, prompt_tokens
from minisd.tokenizer import BOS, EOS, Tokenizer

CONTEXT_TOL = 1e-4           # x the context's std: fp32 (tests/test_clip.py)
IMAGE_TOL = 2 / 255          # max abs pixel difference in [0, 1] (tests/test_pipeline.py)
BANG = "a photo at night!!"
PLAIN = "a photo at night"

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


@pytest.fixture(scope="module")
def oc():
    import open_clip
    return open_clip.tokenizer.SimpleTokenizer(context_length=77)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """minisd and diffusers loading one SD 2 (v) file, and open_clip's text tower holding its text weights."""
    from safetensors.torch import load_file
    d = tmp_path_factory.mktemp("sd2_bang")
    ckpt = d / "model.safetensors"
    write_ldm_checkpoint(ckpt, SMALL_SD2, seed=2, parameterization=SMALL_SD2.prediction)
    write_diffusers_config(d / "config", SMALL_SD2)
    ours = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=lambda *_: None)
    ref = diffusers_from_single_file(ckpt, d / "config")
    ref.set_progress_bar_config(disable=True)
    tower = reference_text(SMALL_SD2, device="cpu")
    prefix = "cond_stage_model.model."
    text = {k[len(prefix):]: v for k, v in load_file(str(ckpt)).items() if k.startswith(prefix)}
    missing, unexpected = tower.load_state_dict(text, strict=False)
    assert not unexpected and all(k.startswith("visual.") for k in missing)
    return ours, ref, tower.eval()


@torch.no_grad()
def open_clip_context(tower, ids):
    """LDM's FrozenOpenCLIPEmbedder(layer="penultimate"): every block but the last, then ln_final."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


def diffusers_ids(ref, text):
    return ref.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_close(ours, theirs, what):
    err, std = (ours - theirs).abs().max().item(), theirs.std().item()
    print(f"[{what}] max abs err {err:.3e}, context std {std:.4f}")
    assert err <= CONTEXT_TOL * std, f"{what}: max abs error {err:.3e} > {CONTEXT_TOL} x std {std:.4f}"
    return std


def test_bang_prompt_gets_open_clip_ids_and_diffusers_differs_only_at_the_bangs(sd2, oc):
    """If minisd tokenized like diffusers (pad token "!" special), the first assertion would fail at position 5."""
    ours, ref, _ = sd2
    mine, _ = prompt_tokens(ours.model.tokenizer, BANG)                 # what the pipeline encodes
    assert mine.tolist() == oc([BANG]).tolist()
    assert mine[0, :8].tolist() == [BOS, 320, 1125, 536, 930, 748, EOS, 0] and (mine[0, 7:] == 0).all()
    theirs = diffusers_ids(ref, BANG)
    assert theirs[0, :9].tolist() == [BOS, 320, 1125, 536, 930, 0, 0, EOS, 0] and (theirs[0, 8:] == 0).all()
    # without the "!!" the three agree: the padding (0) is the same, only the typed "!" differs
    plain = prompt_tokens(ours.model.tokenizer, PLAIN)[0]
    assert plain.tolist() == oc([PLAIN]).tolist() == diffusers_ids(ref, PLAIN).tolist()


@torch.no_grad()
def test_bang_context_is_open_clips_not_diffusers_and_the_ids_are_why(sd2, oc):
    ours, ref, tower = sd2
    for prompt, negative in [(BANG, ""), (PLAIN, "blurry!!")]:
        cond, uncond = ours.encode_prompts(prompt, negative)             # (1, 77, 64) each
        for mine, text in ((cond, prompt), (uncond, negative)):
            reference = open_clip_context(tower, oc([text]))
            std = assert_close(mine, reference, f"{text!r} vs open_clip")
            # diffusers' text encoder agrees on open_clip's ids: the networks are equal, the ids are not
            assert_close(mine, ref.text_encoder(oc([text]))[0], f"{text!r} vs diffusers' encoder on open_clip ids")
            diffusers_ctx = ref.text_encoder(diffusers_ids(ref, text))[0]
            err = (mine - diffusers_ctx).abs().max().item()
            print(f"[{text!r}] minisd vs diffusers' own ids: max abs {err:.3f} (std {std:.3f})")
            if "!" in text:
                assert err > 0.1 * std                  # from position 5 on (causal attention): a different prompt
            else:
                assert err <= CONTEXT_TOL * std         # "" and the plain prompt: diffusers' context exactly


def test_bang_image_is_the_open_clip_reference_and_not_diffusers(sd2, oc):
    """Same seed, same sampler: minisd's image equals diffusers' pipeline given open_clip-tokenized prompt
    embeddings, and differs from diffusers' pipeline given the text. (test_pipeline.py: equal without "!".)"""
    import diffusers
    ours, ref, _ = sd2
    kw = dict(num_inference_steps=5, guidance_scale=7.5, width=32, height=32, output_type="np")
    mine = ours.generate(BANG, "", 5, 7.5, "euler", "linspace", seed=7, width=32, height=32).images
    mine = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in mine])
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="linspace")
    with torch.no_grad():
        embeds = ref.text_encoder(oc([BANG]))[0]
        empty = ref.text_encoder(oc([""]))[0]
    reference = ref(prompt_embeds=embeds, negative_prompt_embeds=empty, generator=torch.Generator().manual_seed(7),
                    **kw).images
    theirs = ref(BANG, generator=torch.Generator().manual_seed(7), **kw).images
    err, apart = np.abs(mine - reference).max(), np.abs(mine - theirs).max()
    print(f"[image] vs open_clip-tokenized reference {err * 255:.2f}/255; vs diffusers' {apart * 255:.1f}/255, "
          f"image std {reference.std():.3f}")
    assert err <= IMAGE_TOL
    assert apart > 10 * IMAGE_TOL


# ---------------------------------------------------------------------------------------------------------------
# Where else SD 2's pad token 0 ("!") could leak. A1111 (modules/sd_hijack_open_clip.py, sd_hijack_clip.py) tokenizes
# SD 2 prompts with open_clip's encode, fills each 75-token chunk with <|endoftext|>, frames it BOS ... EOS, and
# then sets every position after the first EOS to its id_pad, 0 (process_tokens: "this is for SD2").

def a1111_sd2_chunks(stream):
    """A1111's SD 2 rows of a token stream without commas, BREAK or embeddings (so chunks are plain 75-slices)."""
    rows = []
    for start in range(0, max(len(stream), 1), 75):
        chunk = stream[start:start + 75]
        row = [BOS, *chunk, *[EOS] * (75 - len(chunk)), EOS]           # tokenize_line: pad with id_end
        first_eos = row.index(EOS)
        rows.append(row[:first_eos + 1] + [0] * (77 - first_eos - 1))  # process_tokens: id_pad after it
    return rows


def test_long_sd2_prompt_chunks_are_a1111s_and_hold_the_bangs(oc):
    tok = Tokenizer(pad_id=0)
    prompt = " ".join(["wow!"] * 30 + ["night!!"] * 10 + ["what!?"] * 5)   # 60 + 20 + 10 = 90 tokens
    stream = oc.encode(prompt)
    assert tok.encode(prompt) == stream and len(stream) == 90 and 0 not in stream
    ids, weights = prompt_tokens(tok, prompt)
    assert ids.tolist() == a1111_sd2_chunks(stream)
    assert ids[0, 74:].tolist() == [748, 930, EOS]                     # a full chunk: no padding at all
    # the cut falls between "night" and its "!!": the next chunk starts with 748, and pads with 0 after its EOS
    assert ids[1, :17].tolist() == [BOS, 748, 930, 748, 930, 748, *[768, 6004] * 5, EOS] and (ids[1, 17:] == 0).all()
    assert ids[1].tolist() == oc(["!! night!! night!!" + " what!?" * 5])[0].tolist()
    assert (weights == 1).all()
    # the check can fail: SD 1's padding (<|endoftext|>) is not A1111's SD 2 row
    assert prompt_tokens(Tokenizer(), prompt)[0].tolist() != a1111_sd2_chunks(stream)


def test_emphasis_on_sd2_bangs_weights_the_merged_tokens_and_not_the_padding(oc):
    tok = Tokenizer(pad_id=0)
    ids, weights = prompt_tokens(tok, "a photo at (night!!:1.3), (wow!)")
    # each run is encoded on its own (A1111), with open_clip's rules: "!!" stays 748, "!" of "wow!" 256
    stream = [*oc.encode("a photo at "), *oc.encode("night!!"), *oc.encode(", "), *oc.encode("wow!")]
    assert stream == [320, 1125, 536, 930, 748, 267, 2781, 256]
    assert ids[0, :10].tolist() == [BOS, *stream, EOS] and (ids[0, 10:] == 0).all()
    assert weights[0, :10].tolist() == pytest.approx([1, 1, 1, 1, 1.3, 1.3, 1, 1.1, 1.1, 1])
    assert (weights[0, 10:] == 1).all()                                # the padding 0s are never weighted


def test_textual_inversion_word_next_to_bangs_keeps_the_bang_ids(sd2, oc):
    """minisd cuts the text at the word and tokenizes the rest with open_clip's rules ("!!" -> 748); diffusers'
    added token cuts it the same way, then its pad token turns "!!" into 0, 0."""
    ours, ref, _ = sd2
    words = Embeddings(SMALL_SD2.text)
    words.add("<cat-toy>", torch.zeros(2, SMALL_SD2.text.width))
    tok = ours.model.tokenizer
    text = "a <cat-toy>!! wow!"
    stream = words.tokenize(text, tok.encode)
    first = SMALL_SD2.text.vocab_size
    assert stream == [320, first, first + 1, 748, 2781, 256]
    assert stream == [*oc.encode("a"), first, first + 1, *oc.encode("!! wow!")]
    ids, _ = prompt_tokens(tok, text, encode=lambda t: words.tokenize(t, tok.encode), words=words.spans())
    assert ids[0, :8].tolist() == [BOS, *stream, EOS] and (ids[0, 8:] == 0).all()
    hf = copy.deepcopy(ref.tokenizer)                                  # the fixture's stays as loaded
    hf.add_tokens(["<cat-toy>", "<cat-toy>_1"])                        # what load_textual_inversion adds
    added = hf.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    # diffusers' pipeline rewrites the word as its n tokens first (maybe_convert_prompt)
    theirs = hf("a <cat-toy> <cat-toy>_1!! wow!", padding="max_length", max_length=77).input_ids
    assert theirs[:9] == [BOS, 320, *added, 0, 0, 2781, 0, EOS]


def test_negative_prompt_and_its_empty_chunks_pad_with_0_as_open_clip_and_diffusers(oc):
    tok = Tokenizer(pad_id=0)
    long = " ".join(["night!!"] * 80)                                   # 160 tokens: 3 chunks
    c_ids, _, u_ids, u_w = prompt_pair_tokens(tok, long, "blurry!!")
    assert c_ids.shape == u_ids.shape == (3, 77)
    assert u_ids[0].tolist() == oc(["blurry!!"])[0].tolist()           # [BOS, blurry, 748, EOS, 0, ...]
    empty = [BOS, EOS] + [0] * 75                                     # open_clip's "" = ComfyUI's SD2 empty_tokens
    assert u_ids[1].tolist() == u_ids[2].tolist() == empty == oc([""])[0].tolist()
    assert (u_w == 1).all()
    c_ids, _, u_ids, _ = prompt_pair_tokens(tok, "blurry!!", long)     # a longer negative pads the prompt the same
    assert c_ids[1].tolist() == c_ids[2].tolist() == empty
