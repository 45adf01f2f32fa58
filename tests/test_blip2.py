"""BLIP-2 captioning (minisd/caption/blip2.py, qformer.py, opt.py, gpt2_tokenizer.py) against transformers 5's
Blip2ForConditionalGeneration + Blip2Processor, with random weights saved as a user has them (tests/_blip2_refs.py)
and loaded with our code.

The full-size model: EVA ViT-g/14 (1408 wide, 39 layers, 224 px) and the Q-Former (12 layers, 32 queries) at
blip2-opt-2.7b's configuration, OPT-2.7B at its real width (2560, 32 heads, MLP 10240, vocabulary 50304) with 2 of
its 32 layers: two layers already exercise the per-layer key/value cache and its reordering in beam search, and
each further layer would add ~80M parameters and ~1.3 s per decoding step of 12 sequences on one core.

- image features (the ViT's tokens, the Q-Former's outputs and their projection, what OPT reads) within 1e-4
  relative (fp32; SDPA against transformers' attention moves the last bits);
- generated token ids identical for greedy and 3-beam search, with and without a prompt ("a photo of"), on 4
  pictures, and captions equal to Blip2Processor.batch_decode(skip_special_tokens=True) stripped. fp32 on both
  sides: no near-tie flipped an argmax in these runs, so float64 (11 GB for this model) was not needed;
- the decoding's ends, padding and min/max lengths (which count the 32 placeholders) on a small model whose
  captions end at different lengths;
- the tokenizer equal to the processor's (transformers' GPT2Tokenizer plus <image>); the weights read from
  sharded safetensors (the full-size folder), one safetensors file, pytorch_model.bin, and the hub's q_bias/v_bias
  layout; the key map both ways.

tests/test_blip2_slow.py repeats the full-size comparison end to end (pixels to text through .caption()) at
minisd caption's default lengths. The ViT-g dominates the time (~40 s of one core per pass over 4 pictures): the reference's generate() would run it
once per decoding, so after its first pass it is handed that pass's output (as tests/test_blip.py does).
"""
import dataclasses
import gc
import json

import numpy as np
import pytest
import torch

from _blip2_refs import (IMAGE_TOKEN_ID, NEWLINE_ID, reference_blip2, reference_config, reference_processor,
                         save_folder, write_tokenizer)
from _blip_refs import pictures
from minisd.caption import blip2
from minisd.caption.gpt2_tokenizer import GPT2Tokenizer
from weights_convert import blip2 as blip2_map

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of"
DECODINGS = [(None, 1), (None, 3), (PROMPT, 1), (PROMPT, 3)]
MAX_LENGTH = 48             # counts the 32 placeholders and </s>: 11 to 15 caption tokens here
MIN_LENGTH = 5              # minisd caption's default (it never binds: the placeholders alone are longer)
SMALL_EOS = 44344       # the small model's end token: a word it writes at different places per picture (seed 4)
SMALL = dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=14),
             qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
             text=dict(hidden_size=64, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                       eos_token_id=SMALL_EOS),
             num_query_tokens=8)


def relative(a, b):
    return float((a - b).norm() / b.norm())


class Reference:
    """What transformers computes for a folder: the image features, and generate()'s ids and decoded captions for
    each (prompt, beams)."""

    def __init__(self, ref, folder, images, decodings, max_length=MAX_LENGTH, min_length=MIN_LENGTH, **kw):
        processor = reference_processor(folder, ref.config.num_query_tokens)
        self.pixels = processor(images=images, return_tensors="pt").pixel_values
        with torch.no_grad():
            out = ref.get_image_features(self.pixels, return_dict=True)
        self.vision = out.vision_outputs.last_hidden_state
        self.queries = out.qformer_outputs.last_hidden_state
        self.prefix = out.pooler_output
        vision_out = out.vision_outputs
        ref.vision_model.forward = lambda pixel_values, **kwargs: vision_out      # see the module docstring
        self.ids, self.captions = {}, {}
        for prompt, beams in decodings:
            inputs = {}
            if prompt:
                inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
                inputs = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}
            ids = ref.generate(pixel_values=self.pixels, num_beams=beams, max_length=max_length,
                               min_length=min_length, **inputs, **kw)
            self.ids[prompt, beams] = ids
            self.captions[prompt, beams] = [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)]
        del ref.vision_model.forward                          # the real ViT again, for the next pictures


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The full-size reference (1.4B parameters, 5.5 GB): built, saved as sharded safetensors, its outputs
    computed, the reference deleted; then ours loaded (and the shards deleted) and its features computed once."""
    folder = tmp_path_factory.mktemp("blip2")
    ref = reference_blip2(reference_config())
    save_folder(ref, folder, max_shard_size="2GB")
    images = pictures(4)
    expected = Reference(ref, folder, images, DECODINGS)
    del ref
    gc.collect()
    ours = blip2.load_blip2(folder)
    for shard in folder.glob("model-*.safetensors"):        # 5.5 GB read: the disk back (the index stays)
        shard.unlink()
    with torch.no_grad():
        features = ours.model.image_features(ours.processor(images))
    return folder, images, expected, ours, features


# ---- full-size parity --------------------------------------------------------------------------------------

def test_full_size_configuration_is_blip2_opt_2_7b_but_for_the_depth(full):
    folder, images, expected, ours, features = full
    assert ours.model.cfg.vision == blip2.BLIP2_OPT_2_7B.vision
    assert ours.model.cfg.qformer == blip2.BLIP2_OPT_2_7B.qformer
    assert ours.model.cfg.text == dataclasses.replace(blip2.BLIP2_OPT_2_7B.text, layers=2)
    assert (folder / "model.safetensors.index.json").is_file()       # sharded: read through the index


def test_image_features_match_transformers(full):
    folder, images, expected, ours, (vision, queries, prefix) = full
    assert torch.equal(ours.processor(images), expected.pixels)
    assert vision.shape == (4, 257, 1408) and queries.shape == (4, 32, 768) and prefix.shape == (4, 32, 2560)
    assert relative(vision, expected.vision) < 1e-4
    assert relative(queries, expected.queries) < 1e-4
    assert relative(prefix, expected.prefix) < 1e-4
    assert relative(expected.prefix[0], expected.prefix[1]) > 1e-2      # the pictures are told apart


@pytest.mark.parametrize("prompt, beams", DECODINGS, ids=["greedy", "beam3", "prompt-greedy", "prompt-beam3"])
def test_generates_transformers_token_ids(full, prompt, beams):
    folder, images, expected, ours, (_, _, prefix) = full
    ids = ours.model.generate(prefix, ours.prompt_ids(prompt), num_beams=beams, min_length=MIN_LENGTH,
                              max_length=MAX_LENGTH)
    assert torch.equal(ids, expected.ids[prompt, beams])
    captions = [ours.tokenizer.decode(row[32:]).strip() for row in ids.tolist()]
    assert captions == expected.captions[prompt, beams]


def test_captions_differ_per_picture_and_decoding(full):
    # without this, the id comparisons above would test little (a random decoder repeating one token)
    folder, images, expected, ours, features = full
    greedy, beam = expected.ids[None, 1][:, 33:], expected.ids[None, 3][:, 33:]
    assert len({tuple(row) for row in greedy.tolist()}) == 4
    assert all(len(set(row)) > 3 for row in greedy.tolist())
    assert not torch.equal(greedy, beam)
    assert all(c.startswith(PROMPT + " ") for c in expected.captions[PROMPT, 1])


def test_caption_of_one_picture_end_to_end(full):
    # pixels to text through .caption() (the other tests start from the features): one picture, ~10 s
    folder, images, expected, ours, features = full
    assert ours.caption(images[:1], PROMPT, num_beams=1, min_length=MIN_LENGTH, max_length=MAX_LENGTH) == \
        expected.captions[PROMPT, 1][:1]


# ---- decoding details on a small model: ends, padding, lengths counted with the placeholders ----------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small BLIP-2 (8 queries, OPT 64 wide with the real vocabulary) whose captions end at different lengths
    per picture: the end and padding paths. (Its "\\n" it never writes, so another word ends its captions.)"""
    folder = tmp_path_factory.mktemp("blip2-small")
    ref = reference_blip2(reference_config(**SMALL), seed=4)
    save_folder(ref, folder)
    return folder, ref


@pytest.mark.parametrize("prompt, beams", [(None, 1), (None, 2), (None, 3), (PROMPT, 1), (PROMPT, 4)])
@pytest.mark.parametrize("min_length", [0, 16])
def test_small_decoding_matches_transformers_with_ends_and_padding(small, prompt, beams, min_length):
    folder, ref = small
    images = pictures(5, seed=1)
    expected = Reference(ref, folder, images, [(prompt, beams)], max_length=24, min_length=min_length)
    ours = blip2.load_blip2(folder)
    ids = ours.generate_ids(images, prompt, num_beams=beams, min_length=min_length, max_length=24)
    assert torch.equal(ids, expected.ids[prompt, beams])
    assert ours.caption(images, prompt, num_beams=beams, min_length=min_length, max_length=24) == \
        expected.captions[prompt, beams]
    ends = [row.index(SMALL_EOS) if SMALL_EOS in row else None for row in ids.tolist()]
    if prompt is None and min_length == 0 and beams in (1, 3):
        assert len(set(ends)) >= 4 - beams          # rows end at different lengths: the padding is compared
    if min_length:
        assert all(e is None or e >= min_length - 1 for e in ends)    # the placeholders count towards it


# ---- the tokenizer ----------------------------------------------------------------------------------------------

CORPUS = ["a photo of", "A Photo OF the  Cats, playing!", "Don't stop; it's 3.14159 -- really?", "I'M HE'S we'Ve",
          "café naïve résumé", "中文字 and 日本語", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n  x",
          "zzzzqqq unknownword", "x" * 120, "ünïcödé ÀÉÎ e\u0301", "(brackets) [square] {curly} <angle>",
          "e-mail@host.com", "\x00nul\ufffdreplacement\x07bell", "file\x1cseparators\x1d\x1e\x1f here", "a \x1cb  \x1c\x1c x",
          "nbsp\u00a0and\u3000ideographic\u2009thin \u0085nel", "emoji 😀👍🏽 and flags 🇫🇷", "12345 67 8.9e10",
          "</s>a photo<pad>of<image>the <s> <unk> <mask>", "", " ", "   ", "\n", "$100 ^caret `tick` ~tilde",
          "„quotes“ «guillemets» — dash…", "looking holding standing sitting", "won't can't we're they've i'm"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opt-tokenizer")
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 224}}))
    return GPT2Tokenizer.from_folder(folder), reference_processor(folder).tokenizer, folder


def test_tokenizer_encodes_as_the_blip2_processor(tokenizers):
    ours, theirs, _ = tokenizers
    for text in CORPUS:
        assert ours(text) == theirs(text).input_ids, text
    assert ours(PROMPT)[0] == 2                                              # OPT's bos, </s>
    assert len(ours(PROMPT)) > 2 and max(ours(PROMPT)) < 3000               # merged tokens, not fillers


def test_tokenizer_decodes_as_the_blip2_processor_skipping_specials(tokenizers):
    ours, theirs, _ = tokenizers
    rng = np.random.default_rng(0)
    for text in CORPUS:
        ids = [IMAGE_TOKEN_ID] * 3 + theirs(text).input_ids + [NEWLINE_ID, 1, 1]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    # any ids: specials, <s>/<unk> (text in OPT's vocabulary), byte symbols that are parts of UTF-8 characters,
    # fillers, and ids past the vocabulary (the model's rows 50266..50303), which name no token
    pool = [0, 1, 2, 3, NEWLINE_ID, IMAGE_TOKEN_ID, 50300, *range(4, 300)]
    for _ in range(300):
        ids = rng.choice(pool + list(rng.integers(0, 50304, 5)), size=rng.integers(1, 20)).tolist()
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids


def test_tokenizer_reads_a_folder_transformers_5_wrote(tokenizers, tmp_path):
    # transformers 5's save_pretrained writes tokenizer.json and tokenizer_config.json only (no vocab.json)
    ours, theirs, _ = tokenizers
    theirs.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    alone = GPT2Tokenizer.from_folder(tmp_path)
    for text in CORPUS:
        assert alone(text) == ours(text), text
    assert alone.special == ours.special and alone.decoder == ours.decoder
    with pytest.raises(ValueError, match="vocab.json"):
        GPT2Tokenizer.from_folder(tmp_path / "nothing")


# ---- weights: the key map, the folder forms, the hub's q_bias/v_bias --------------------------------------------

def test_key_map_matches_transformers_names_and_shapes_both_ways():
    from transformers import Blip2ForConditionalGeneration
    hf = reference_config(text_layers=32)                      # blip2-opt-2.7b itself
    cfg = blip2.config_from_json(hf.to_dict())
    assert cfg == blip2.BLIP2_OPT_2_7B
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in Blip2ForConditionalGeneration(hf).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in blip2.Blip2(cfg).state_dict().items()}
    meta = lambda shapes: {k: torch.empty(s, device="meta") for k, s in shapes.items()}     # noqa: E731
    mapped = blip2_map.to_transformers(meta(ours), cfg)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == \
        {k: s for k, s in theirs.items() if k != "language_model.lm_head.weight"}           # tied: not saved
    back = blip2_map.from_transformers(meta(theirs), cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == ours


def test_key_map_is_lossless_and_names_bad_keys(small):
    folder, ref = small
    cfg = blip2.config_from_json(ref.config.to_dict())
    theirs = {k: v for k, v in ref.state_dict().items() if k != "language_model.lm_head.weight"}
    ours = blip2_map.from_transformers(theirs, cfg)
    back = blip2_map.to_transformers(ours, cfg)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    with pytest.raises(ValueError, match="key bias"):         # the reference's random k bias: not writable split
        blip2_map.to_transformers(ours, cfg, split_qkv_bias=True)
    with pytest.raises(ValueError, match="qformer.foo"):
        blip2_map.from_transformers({**theirs, "qformer.foo": torch.zeros(1)}, cfg)
    for key in ("language_model.model.decoder.layers.1.fc2.bias", "qformer.encoder.layer.2.crossattention."
                "output.dense.weight", "vision_model.encoder.layers.0.self_attn.qkv.bias"):
        with pytest.raises(ValueError, match="missing key"):
            blip2_map.from_transformers({k: v for k, v in theirs.items() if k != key}, cfg)
    with pytest.raises(ValueError, match="shape"):
        blip2_map.from_transformers({**theirs, "language_projection.bias": torch.zeros(3)}, cfg,
                                    {k: tuple(v.shape) for k, v in ours.items()})
    # what captioning ignores: the tied output matrix, the Q-Former's text-path MLP of older files
    extra = {"language_model.lm_head.weight": ref.language_model.lm_head.weight,
             "qformer.encoder.layer.0.intermediate.dense.weight": torch.zeros(128, 64),
             "qformer.encoder.layer.0.output.LayerNorm.bias": torch.zeros(64)}
    assert blip2_map.from_transformers({**theirs, **extra}, cfg).keys() == ours.keys()


def test_the_hubs_q_bias_v_bias_layout_and_a_bin_file_load(small, tmp_path):
    """The hub's files (transformers 4) store the ViT's q and v biases apart and no k bias: load that layout from
    a pytorch_model.bin. The reference's random k bias is dropped on the way; the features stay the same, since a
    bias added to every key shifts each query's scores by a constant."""
    folder, ref = small
    sd = {k: v for k, v in ref.state_dict().items()}
    for i in range(ref.config.vision_config.num_hidden_layers):
        q, _, v = sd.pop(f"vision_model.encoder.layers.{i}.self_attn.qkv.bias").chunk(3)
        sd[f"vision_model.encoder.layers.{i}.self_attn.q_bias"] = q
        sd[f"vision_model.encoder.layers.{i}.self_attn.v_bias"] = v
    torch.save(sd, tmp_path / "pytorch_model.bin")
    for name in ("config.json", "preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                 "special_tokens_map.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    hub, saved = blip2.load_blip2(tmp_path), blip2.load_blip2(folder)
    images = pictures(3, seed=2)
    with torch.no_grad():
        pixels = hub.processor(images)
        a, b = hub.model.image_features(pixels), saved.model.image_features(pixels)
    k_bias = saved.model.vision.blocks[0].attn.qkv.bias.chunk(3)[1]
    assert k_bias.abs().min() > 0 and not hub.model.vision.blocks[0].attn.qkv.bias.chunk(3)[1].any()
    for x, y in zip(a, b):
        assert relative(x, y) < 1e-5
    assert torch.equal(hub.generate_ids(images, max_length=16), saved.generate_ids(images, max_length=16))


def test_config_errors_name_the_problem():
    good = reference_config(**SMALL).to_dict()
    with pytest.raises(ValueError, match="model_type"):
        blip2.config_from_json({**good, "model_type": "blip"})
    with pytest.raises(ValueError, match="t5"):
        blip2.config_from_json({**good, "text_config": {"model_type": "t5"}})
    for key, value in (("do_layer_norm_before", False), ("word_embed_proj_dim", 32),
                       ("activation_function", "gelu"), ("tie_word_embeddings", False)):
        with pytest.raises(ValueError, match=key):
            blip2.config_from_json({**good, "text_config": {**good["text_config"], key: value}})


def test_minisd_caption_writes_the_blip2_captions(small, tmp_path, capsys):
    from minisd import cli
    folder, ref = small
    images = pictures(3, seed=5)
    for i, image in enumerate(images):
        image.save(tmp_path / f"img{i}.png")
    expected = Reference(ref, folder, images, [(PROMPT, 3)], max_length=24)
    status = cli.main(["caption", str(tmp_path), "--model", str(folder), "--prompt", PROMPT, "--num-beams", "3",
                       "--max-length", "24", "--prefix", "sks"])
    assert status in (0, None) and "captioned 3, skipped 0" in capsys.readouterr().out
    for i, text in enumerate(expected.captions[PROMPT, 3]):
        assert (tmp_path / f"img{i}.txt").read_text(encoding="utf-8") == f"sks {text}\n"
    bad = tmp_path / "t5"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": "t5"}}))
    assert cli.main(["caption", str(tmp_path), "--model", str(bad), "--overwrite"]) == 2
    assert "minisd: error:" in capsys.readouterr().err
