"""Reference BLIP-2 folders for the captioning tests: transformers' Blip2ForConditionalGeneration with random
weights at a given configuration, saved with save_pretrained beside an OPT-style byte-level BPE vocabulary made
here (vocab.json, merges.txt, the hub's tokenizer_config.json) and BlipImageProcessorPil's preprocessor_config.json.
No real weights or vocabulary exist offline.

The vocabulary: OPT's specials at OPT's ids (<s> 0, <pad> 1, </s> 2, <unk> 3), the 256 byte symbols, a few hundred
merges learned here from caption-like text (a plain BPE trainer: the most frequent adjacent pair, ties to the
larger pair), and filler words up to 50,265 entries, with the newline symbol "Ċ" at 50118, BLIP-2's end token.
Blip2Processor adds <image> as 50265, the real file's image_token_index; the real config's vocab_size is 50304.

Random weights: transformers' init is no use here (the ViT's std is 1e-10, the query tokens are zero), so every
tensor is redrawn: matrices N(0, 1/fan_in), LayerNorm weights 1 + N(0, 0.1^2), biases N(0, 0.02^2), the query
tokens N(0, 1), the ViT's class and position embeddings N(0, 0.02^2). Then, found by trying at the full size, so
that captions differ per picture and between greedy and beam search (checked by a test) instead of repeating one
token:
- the Q-Former's attention and MLP output projections x0.2: at full scale each post-LN layer's update swamps its
  input, and the 32 query outputs come out equal (std across queries 0.004 against 0.8 after scaling);
- OPT's token embeddings N(0, 0.03^2) and positions N(0, 0.3^2): its output matrix is the token embedding (tied),
  so larger embeddings make the last token its own best successor, and larger positions make every picture
  write the same word at the same place;
- OPT's fc2 rows centred: relu's outputs have a positive mean, which fc2 turns into one fixed direction of the
  residual stream, and the token nearest it wins at every step.
"""
import json
from collections import Counter

import torch

from _blip_refs import WORDS
from minisd.tokenizer import merge_pairs

OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
VOCAB_SIZE = 50265          # the tokenizer's vocab.json; <image> is 50265; the model's rows go to 50304
NEWLINE_ID = 50118
IMAGE_TOKEN_ID = 50265
TEXT_2_7B = dict(hidden_size=2560, num_attention_heads=32, ffn_dim=10240, vocab_size=50304, word_embed_proj_dim=2560,
                 eos_token_id=NEWLINE_ID)
TRAINING_TEXT = " ".join(WORDS) + " " + " ".join(
    "a photo of a cat sitting on a table . a picture of two dogs playing in the field , "
    "a man riding a red car on the street near a house . the sky is blue and the water is green ! "
    "there are many people looking at the large white tree ; they're holding their small black dogs".split() * 3)


def byte_symbols():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


def learn_merges(text, n):
    """The BPE merges of `text` split GPT-2 style (a word keeps its leading space)."""
    import re
    table = byte_symbols()
    words = Counter("".join(table[b] for b in w.encode("utf-8")) for w in re.findall(r" ?\w+| ?[^\w\s]+", text))
    splits = {w: list(w) for w in words}
    merges = []
    for _ in range(n):
        pairs = Counter()
        for w, count in words.items():
            for pair in zip(splits[w], splits[w][1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        splits = {w: merge_pairs(s, {best: 0}) for w, s in splits.items()}     # every occurrence of `best`
    return merges


def write_tokenizer(folder, n_merges=400):
    """vocab.json, merges.txt and the hub's tokenizer_config.json / special_tokens_map.json for OPT."""
    # plus " " + U+001C as one token: U+001C is whitespace to Python's \s but not to the `tokenizers` regex, so
    # only a pre-tokeniser with the latter's whitespace keeps them together (gpt2_tokenizer.WHITE_SPACE)
    merges = learn_merges(TRAINING_TEXT, n_merges) + [("Ġ", byte_symbols()[0x1C])]
    vocab = [*OPT_SPECIALS, *byte_symbols().values()]
    vocab += list(dict.fromkeys(a + b for a, b in merges if a + b not in vocab))
    letters = "abcdefghijklmnopqrstuvwxyz"
    i, known = 0, set(vocab)
    while len(vocab) < VOCAB_SIZE:      # filler words: " qab", " qac", ... (never produced by encoding)
        word = "Ġq" + letters[i // 676 % 26] + letters[i // 26 % 26] + letters[i % 26] + ("" if i < 17576 else str(i))
        if word not in known:
            vocab.append(word)
        i += 1
    n = vocab.index("Ċ")
    vocab[n], vocab[NEWLINE_ID] = vocab[NEWLINE_ID], vocab[n]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def added(content, normalized=True):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
                "single_word": False, "special": True}
    config = {"add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>", "eos_token": "</s>",
              "unk_token": "</s>", "pad_token": "<pad>", "errors": "replace", "processor_class": "Blip2Processor",
              "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1000000000000000019884624838656,
              "added_tokens_decoder": {"1": added("<pad>"), "2": added("</s>"),
                                       str(IMAGE_TOKEN_ID): added("<image>", normalized=False)}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")


def reference_processor(folder, num_query_tokens=32):
    """Blip2Processor as a user builds it from the folder, with the PIL image processor (minisd's preprocessing
    equals it exactly: tests/test_blip.py)."""
    from transformers import Blip2Processor, GPT2Tokenizer
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    processor = Blip2Processor(BlipImageProcessorPil.from_pretrained(str(folder)),
                               GPT2Tokenizer.from_pretrained(str(folder)),
                               num_query_tokens=num_query_tokens)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return processor


def reference_config(vision=None, qformer=None, text=None, text_layers=2, num_query_tokens=32):
    from transformers import Blip2Config
    return Blip2Config(vision_config=vision or {}, qformer_config=qformer or {},
                       text_config={"model_type": "opt", **TEXT_2_7B, "num_hidden_layers": text_layers, **(text or {})},
                       num_query_tokens=num_query_tokens, image_token_index=IMAGE_TOKEN_ID)


@torch.no_grad()
def reference_blip2(cfg, seed=0):
    """Blip2ForConditionalGeneration(cfg) with every tensor drawn as the module docstring says. Built on the meta
    device and then filled, so transformers' own init (1.4B draws at full size) is skipped."""
    from transformers import Blip2ForConditionalGeneration
    with torch.device("meta"):
        ref = Blip2ForConditionalGeneration(cfg)
    ref.to_empty(device="cpu")
    ref.tie_weights()
    g = torch.Generator().manual_seed(seed)
    for name, p in ref.named_parameters():
        if p.ndim == 1:
            norm = any(s in name.lower() for s in ("layer_norm", "layernorm")) and name.endswith("weight")
            p.copy_(float(norm) + (0.1 if norm else 0.02) * torch.randn(p.shape, generator=g))
        elif name == "query_tokens":
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith(("class_embedding", "embeddings.position_embedding")):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(0.03 * torch.randn(p.shape, generator=g))
        elif name.endswith("embed_positions.weight"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    for layer in ref.qformer.encoder.layer:          # keep the 32 queries apart (see the module docstring)
        for m in (layer.attention.output, layer.output_query, getattr(layer, "crossattention", None)):
            if m is not None:
                (m.output if hasattr(m, "output") else m).dense.weight.mul_(0.2)
    for layer in ref.language_model.model.decoder.layers:      # no fixed direction from relu's positive mean
        layer.fc2.weight.sub_(layer.fc2.weight.mean(dim=1, keepdim=True))
    embed = ref.language_model.model.decoder.embed_tokens.weight
    assert ref.language_model.lm_head.weight.data_ptr() == embed.data_ptr()
    return ref.eval()


def save_folder(ref, folder, max_shard_size="50GB"):
    """The transformers-layout folder a user has: weights, config, tokenizer, preprocessor config."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(str(folder), max_shard_size=max_shard_size)
    size = ref.config.vision_config.image_size
    BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder
