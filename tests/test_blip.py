"""BLIP captioning (minisd/caption/) against transformers: BlipForConditionalGeneration with random weights at the
real configurations of Salesforce/blip-image-captioning-base and -large, saved as a user has them
(tests/_blip_refs.py), loaded with our code.

- image features (the ViT's output tokens) within 1e-4 relative (fp32; different op order, e.g. SDPA vs
  matmul/softmax, moves the last bits);
- generated token ids identical for greedy and 3-beam search, with and without a prompt ("a photo of"), on 4
  pictures, and the decoded captions identical to BlipProcessor.decode(skip_special_tokens=True). fp32 on both
  sides: no near-tie flipped an argmax in these runs, so float64 was not needed. The default suite runs base's
  greedy without and 3 beams with the prompt (each decoding costs ~10 s of one core per side, transformers
  re-reading the decoder's weights every token); the other two are marked slow;
- the tokenizer equal to transformers' BertTokenizer, the preprocessing equal to BlipImageProcessorPil (exactly);
- the weights read from model.safetensors, pytorch_model.bin and sharded indexes of either; the key map both ways.

The large model at full size is ViT-L/16 at 384 px: the default suite checks its features on one picture and a
short greedy caption (8 tokens); the full comparison (4 pictures, 4 decodings) is marked slow.
"""
import gc
import json

import numpy as np
import pytest
import torch
from PIL import Image

from _blip_refs import pictures, reference_blip, save_folder, save_tokenizer
from minisd.caption import bert_tokenizer, blip, decode
from minisd.caption.preprocess import ImageProcessor
from weights_convert import blip as blip_map
from weights_convert.folders import read_weights
from weights_convert.io import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")
LARGE_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
SMALL_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=64, patch_size=16)
SMALL_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
PROMPT = "a photo of"
DECODINGS = [(None, 1), (None, 3), (PROMPT, 1), (PROMPT, 3)]
FAST = [(None, 1), (PROMPT, 3)]          # the default suite's share of DECODINGS for base; the rest is slow


def relative(a, b):
    return float((a - b).norm() / a.norm())


class Reference:
    """What transformers computes for a folder: features and generate()'s ids for each decoding."""

    def __init__(self, ref, folder, images, decodings, max_length=20, min_length=5):
        from transformers import BlipProcessor
        processor = BlipProcessor.from_pretrained(str(folder))
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
        processor.image_processor = BlipImageProcessorPil.from_pretrained(str(folder))
        self.processor = processor
        pixels = processor(images=images, return_tensors="pt").pixel_values
        with torch.no_grad():
            vision_out = ref.vision_model(pixel_values=pixels)
        self.features = vision_out.last_hidden_state
        # generate() runs the ViT again for every call: hand it the output above (compared with ours separately)
        ref.vision_model.forward = lambda pixel_values, **kwargs: vision_out
        self.ids = {}
        for prompt, beams in decodings:
            kw = dict(num_beams=beams, max_length=max_length, min_length=min_length)
            if prompt:
                kw["input_ids"] = processor(text=[prompt] * len(images), return_tensors="pt").input_ids
            self.ids[prompt, beams] = ref.generate(pixel_values=pixels, **kw)
        self.captions = {k: processor.batch_decode(v, skip_special_tokens=True) for k, v in self.ids.items()}


def build(tmp_path_factory, name, vision, decodings, n_images, max_length=20, **kw):
    folder = tmp_path_factory.mktemp(name)
    ref = reference_blip(vision=vision, **kw)
    save_folder(ref, folder)
    images = pictures(n_images)
    expected = Reference(ref, folder, images, decodings, max_length=max_length)
    del ref
    gc.collect()
    return folder, images, expected


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder, images, expected = build(tmp_path_factory, "blip-base", {}, FAST, 4)
    ours = blip.load_blip(folder)
    return folder, ours.encode(images), expected, ours


# ---- full-size parity ------------------------------------------------------------------------------------

def test_base_image_features_match_transformers(base):
    folder, features, expected, ours = base
    assert features.shape == (4, 577, 768)
    assert relative(expected.features, features) < 1e-4
    assert relative(expected.features[:1], expected.features[1:2]) > 1e-2     # the pictures are told apart


@pytest.mark.parametrize("prompt, beams", FAST, ids=["greedy", "prompt-beam3"])
def test_base_generates_transformers_token_ids(base, prompt, beams):
    folder, features, expected, ours = base
    ids = ours.generate_ids(None, prompt, num_beams=beams, min_length=5, max_length=20, features=features)
    assert torch.equal(ids, expected.ids[prompt, beams])
    assert [ours.tokenizer.decode(row) for row in ids.tolist()] == expected.captions[prompt, beams]


def test_base_captions_differ_per_picture_and_decoding(base):
    # without this, the id comparisons above would test little (a random decoder repeating one token)
    folder, features, expected, ours = base
    greedy, beam = expected.ids[None, 1], expected.ids[PROMPT, 3]
    assert len({tuple(row) for row in greedy.tolist()}) >= 3
    assert len({tuple(row) for row in beam.tolist()}) >= 3
    assert not torch.equal(greedy[:, 1:5], beam[:, 1:5])
    assert all(c.startswith(PROMPT + " ") for c in expected.captions[PROMPT, 3])


@pytest.fixture(scope="module")
def large_short(tmp_path_factory):
    folder, images, expected = build(tmp_path_factory, "blip-large", LARGE_VISION, [(None, 1)], 1, max_length=8)
    return folder, images, expected, blip.load_blip(folder)


def test_large_image_features_and_a_short_greedy_caption_match_transformers(large_short):
    folder, images, expected, ours = large_short
    assert ours.model.cfg == blip.BLIP_LARGE
    features = ours.encode(images)
    assert features.shape == (1, 577, 1024)
    assert relative(expected.features, features) < 1e-4
    ids = ours.generate_ids(None, num_beams=1, min_length=5, max_length=8, features=features)
    assert torch.equal(ids, expected.ids[None, 1])


@pytest.mark.slow
@pytest.mark.parametrize("name, vision, decodings", [("base", {}, [d for d in DECODINGS if d not in FAST]),
                                                     ("large", LARGE_VISION, DECODINGS)], ids=["base", "large"])
def test_full_comparison(tmp_path_factory, name, vision, decodings):
    """The decodings the default suite leaves out: base's other two, and all four for large on 4 pictures."""
    folder, images, expected = build(tmp_path_factory, f"blip-{name}-full", vision, decodings, 4)
    ours = blip.load_blip(folder)
    features = ours.encode(images)
    assert relative(expected.features, features) < 1e-4
    for prompt, beams in decodings:
        ids = ours.generate_ids(None, prompt, num_beams=beams, min_length=5, max_length=20, features=features)
        assert torch.equal(ids, expected.ids[prompt, beams]), (prompt, beams)


# ---- decoding details on a small model: ends, padding, the beam-search settings ----------------------------

def small_blip(folder, sep_bias):
    ref = reference_blip(vision=SMALL_VISION, text=SMALL_TEXT, seed=2, sep_bias=sep_bias)
    with torch.no_grad():     # make the small decoder listen to the picture
        for layer in ref.text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(25)
    save_folder(ref, folder)
    return folder, ref


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small BLIP where some captions end ([SEP]) and some run to max_length, at different lengths."""
    return small_blip(tmp_path_factory.mktemp("blip-small"), sep_bias=1.0)


@pytest.fixture(scope="module")
def ending(tmp_path_factory):
    """A small BLIP whose captions all end early ([SEP] favoured), at lengths that differ per picture and beam:
    finished beam lists fill up, so early stopping and min_length decide the outcome."""
    return small_blip(tmp_path_factory.mktemp("blip-ending"), sep_bias=2.0)


@pytest.mark.parametrize("model, beams, length_penalty, early_stopping, prompt, min_length", [
    ("small", 1, 1.0, False, None, 3), ("small", 2, 1.0, False, None, 3), ("small", 3, 1.0, False, None, 3),
    ("small", 4, 1.0, False, None, 3), ("small", 3, 0.5, "never", None, 3), ("small", 3, 2.0, "never", None, 3),
    ("small", 3, -1.0, False, None, 3), ("small", 1, 1.0, False, PROMPT, 3), ("small", 3, 1.0, False, PROMPT, 3),
    ("small", 1, 1.0, False, None, 11), ("ending", 1, 1.0, False, None, 3), ("ending", 3, 1.0, False, None, 3),
    ("ending", 3, 1.0, True, None, 3), ("ending", 3, 1.0, True, None, 12), ("ending", 3, 1.0, False, None, 12),
    ("ending", 2, 1.0, True, None, 3), ("ending", 3, 2.0, True, None, 8), ("ending", 3, 0.5, "never", None, 5), ("ending", 3, 1.0, False, PROMPT, 10)])
def test_small_decoding_matches_transformers_with_ends_and_padding(request, model, beams, length_penalty,
                                                                   early_stopping, prompt, min_length):
    folder, ref = request.getfixturevalue(model)
    from transformers import BlipProcessor
    processor = BlipProcessor.from_pretrained(str(folder))
    images = pictures(5, seed=1)
    ours = blip.load_blip(folder)
    pixels = ours.processor(images)
    kw = {"input_ids": processor(text=[prompt] * 5, return_tensors="pt").input_ids} if prompt else {}
    expected = ref.generate(pixel_values=pixels, num_beams=beams, max_length=16, min_length=min_length,
                            length_penalty=length_penalty, early_stopping=early_stopping, **kw)
    with torch.no_grad():
        features = ours.model.vision(pixels)
    t = ours.model.cfg.text
    ids = torch.tensor([[t.bos_token_id, *(ours.tokenizer.encode(prompt) if prompt else [])]] * 5)
    got = decode.generate(ours.model.make_step(), ids, cache=[features], num_beams=beams, max_length=16,
                          min_length=min_length, eos_token_id=t.sep_token_id, pad_token_id=t.pad_token_id,
                          length_penalty=length_penalty, early_stopping=early_stopping)
    assert torch.equal(got, expected)
    if (length_penalty, early_stopping, prompt, min_length) == (1.0, False, None, 3) and beams in (1, 3):
        ends = (expected == t.sep_token_id).float().argmax(dim=1)
        assert len(set(ends.tolist())) > 1              # rows end at different lengths: the padding is compared
        assert ours.caption(images, num_beams=beams, min_length=3, max_length=16) == \
            processor.batch_decode(expected, skip_special_tokens=True)


def test_decoder_logits_for_a_prompt_match_transformers_forward(small):
    """Every position's logits of a prompt fed at once (the causal mask) and then token by token (the cache)."""
    folder, ref = small
    ours = blip.load_blip(folder)
    images = pictures(2, seed=4)
    pixels = ours.processor(images)
    ids = torch.tensor([[30522, *ours.tokenizer.encode("a photo of the cat sitting")]] * 2)
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=ids).logits                         # (2, 7, vocab)
        cross = ours.model.text.cross_kv(ours.model.vision(pixels))
        empty = [torch.zeros(2, 0, 64)] * 4
        at_once, _ = ours.model.text(ids, cross, empty)
        past, one_by_one = empty, []
        for i in range(ids.shape[1]):
            logits, past = ours.model.text(ids[:, i:i + 1], cross, past)
            one_by_one.append(logits)
    assert relative(expected, at_once) < 1e-5
    assert relative(expected, torch.cat(one_by_one, dim=1)) < 1e-5


def test_min_length_forbids_the_end_token_until_reached(small):
    folder, ref = small
    ours = blip.load_blip(folder)
    images = pictures(5, seed=1)
    for min_length in (3, 9):
        ids = ours.generate_ids(images, num_beams=1, min_length=min_length, max_length=16)
        ended = (ids == 102).any(dim=1)
        ends = (ids == 102).float().argmax(dim=1)[ended]
        assert ended.any() and int(ends.min()) >= min_length - 1   # [SEP] at index i: the sequence has i + 1 tokens


def test_decode_rejects_bad_settings():
    step = lambda ids, cache: (torch.zeros(ids.shape[0], 5), cache)     # noqa: E731
    with pytest.raises(ValueError, match="num_beams"):
        decode.generate(step, torch.zeros(1, 1, dtype=torch.long), num_beams=0, eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match="max_length"):
        decode.generate(step, torch.zeros(1, 3, dtype=torch.long), max_length=3, eos_token_id=1, pad_token_id=0)


# ---- the tokenizer and the preprocessing --------------------------------------------------------------------

CORPUS = ["a photo of", "A Photo OF the  Cats, playing!", "Don't stop; it's 3.14 -- really?", "café naïve résumé",
          "中文字 and 日本", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "zzzzqqq unknownword",
          "x" * 120, "ünïcödé ÀÉÎ", "(brackets) [square] {curly} <angle>", "mixed中文text", "e-mail@host.com",
          "\x00nul\ufffdreplacement\x07bell", "looking holding standing sitting", "won't can't we're they've i'm",
          "", "   ", "$100 ^caret `tick` ~tilde", "„quotes“ «guillemets» — dash…"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    theirs = save_tokenizer(folder)
    return bert_tokenizer.BertTokenizer.from_folder(folder), theirs, folder


def test_tokenizer_encodes_as_transformers_bert_tokenizer(tokenizers):
    ours, theirs, _ = tokenizers
    for text in CORPUS:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    assert theirs(PROMPT).input_ids == [101, *ours.encode(PROMPT), 102]     # [CLS] ... [SEP] around it


def test_tokenizer_decodes_as_transformers_skipping_specials(tokenizers):
    ours, theirs, _ = tokenizers
    rng = np.random.default_rng(0)
    pieces = [theirs.convert_tokens_to_ids(t) for t in (".", ",", "?", "!", "'", "s", "t", "n", "##s", "##ing", "do")]
    specials = [0, 100, 101, 102, 103, 30522, 30523, 5]
    for text in CORPUS:
        ids = [30522, *theirs(text).input_ids, 0, 0]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    for _ in range(200):
        ids = rng.choice(pieces + specials + list(rng.integers(104, 30522, 5)), size=rng.integers(1, 15)).tolist()
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids


def test_tokenizer_reads_a_folder_with_only_tokenizer_json(tokenizers, tmp_path):
    ours, theirs, folder = tokenizers
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    alone = bert_tokenizer.BertTokenizer.from_folder(tmp_path)
    assert alone.vocab == ours.vocab and alone.special_ids == ours.special_ids
    with pytest.raises(ValueError, match="vocab.txt"):
        bert_tokenizer.BertTokenizer.from_folder(tmp_path / "nothing")


def test_preprocessing_equals_blip_image_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    images = pictures(5) + [pictures(1)[0].convert("L"), pictures(1)[0].convert("RGBA")]
    rgba = np.asarray(images[-1]).copy()
    rgba[:40, :, 3] = 90                                          # transparency: laid on white
    images[-1] = Image.fromarray(rgba)
    for size in (384, 224):
        theirs = BlipImageProcessorPil(size={"height": size, "width": size})
        ours = ImageProcessor.from_json(theirs.to_dict())
        expected = theirs(images=images, return_tensors="pt").pixel_values
        assert torch.equal(ours(images), expected)


def test_preprocessor_config_with_an_integer_size(tmp_path):
    assert ImageProcessor.from_json({"size": 224}).height == 224
    with pytest.raises(ValueError, match="size"):
        ImageProcessor.from_json({"size": {"shortest_edge": 224}})


# ---- weights: the key map and the folder forms -----------------------------------------------------------------

@pytest.mark.parametrize("vision", [{}, LARGE_VISION], ids=["base", "large"])
def test_key_map_matches_transformers_names_and_shapes_both_ways(vision):
    from transformers import BlipConfig, BlipForConditionalGeneration
    hf = BlipConfig(vision_config=vision, text_config={"num_attention_heads": 12})
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in BlipForConditionalGeneration(hf).state_dict().items()}
        cfg = blip.config_from_json(hf.to_dict())
        ours = {k: tuple(v.shape) for k, v in blip.Blip(cfg).state_dict().items()}
    tied = {k for k in theirs if k in blip_map.UNUSED}
    mapped = blip_map.to_transformers({k: torch.empty(s, device="meta") for k, s in ours.items()}, cfg)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: s for k, s in theirs.items() if k not in tied}
    back = blip_map.from_transformers({k: torch.empty(s, device="meta") for k, s in theirs.items()}, cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == ours


def test_key_map_is_lossless_and_names_bad_keys():
    cfg = blip.config_from_json({"model_type": "blip", "vision_config": SMALL_VISION, "text_config": SMALL_TEXT})
    ours = {k: torch.randn(v.shape) for k, v in blip.Blip(cfg).state_dict().items()}
    theirs = blip_map.to_transformers(ours, cfg)
    back = blip_map.from_transformers(theirs, cfg)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="text_decoder.foo"):
        blip_map.from_transformers({**theirs, "text_decoder.foo": torch.zeros(1)}, cfg)
    key = "vision_model.post_layernorm.bias"
    with pytest.raises(ValueError, match=key):
        blip_map.from_transformers({k: v for k, v in theirs.items() if k != key}, cfg)
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    with pytest.raises(ValueError, match="shape"):
        blip_map.from_transformers({**theirs, key: torch.zeros(3)}, cfg, shapes)
    with pytest.raises(ValueError, match="model_type"):
        blip.config_from_json({"model_type": "bert"})


def test_folder_reads_safetensors_bin_and_sharded_indexes(small, tmp_path):
    folder, ref = small
    expected = {k: v.clone() for k, v in ref.state_dict().items()}
    saved = read_weights(folder)                                   # model.safetensors (save_pretrained)
    assert set(saved) <= set(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)
    # the older pickle, as transformers 4 wrote it, and the sharded forms of both
    bin_dir, sharded, sharded_bin = (tmp_path / n for n in ("bin", "sharded", "sharded-bin"))
    for d in (bin_dir, sharded_bin):
        d.mkdir()
    torch.save(dict(saved), bin_dir / "pytorch_model.bin")
    ref.save_pretrained(str(sharded), max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    keys = sorted(saved)
    halves = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: saved[k] for k in part}, sharded_bin / name)
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))
    for d in (bin_dir, sharded, sharded_bin):
        got = read_weights(d)
        assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in keys), d.name
    # and a whole captioner loads from the .bin folder
    for name in ("config.json", "preprocessor_config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (bin_dir / name).write_bytes((folder / name).read_bytes())
    a, b = blip.load_blip(folder), blip.load_blip(bin_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_folder_errors_name_the_problem(small, tmp_path):
    with pytest.raises(CheckpointError, match="no weights"):
        read_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        read_weights(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_weights(tmp_path)
