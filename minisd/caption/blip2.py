"""BLIP-2's captioner (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models"): a frozen image encoder and a frozen language model, joined by a small
trained Q-Former whose 32 query outputs the language model reads as if they were words.

    pixels (N, 3, 224, 224) -> EVA ViT-g/14 (vit.py: 1408 wide, 39 layers)  -> image tokens (N, 257, 1408)
    -> Q-Former (qformer.py)                                                -> query outputs (N, 32, 768)
    -> projection, a Linear 768 -> 2560 (the paper's fig. 3 "fully connected")  -> prefix (N, 32, 2560)
    -> OPT-2.7B (opt.py) reads [prefix, </s>, prompt tokens] and continues the text  -> caption

Captioning is decoding (decode.py's greedy or beam search) from that sequence. What transformers 5
(Blip2Processor + Blip2ForConditionalGeneration.generate) does, and so what this file does token for token:
- the sequence is 32 `<image>` placeholder ids (config.json's image_token_index) whose embeddings are replaced by
  the prefix, then OPT's bos "</s>", then the prompt's tokens: the tokenizer's own ids, bos included, when there
  is a prompt; `text_config.bos_token_id` alone when there is none;
- `max_length` and `min_length` count that whole sequence, the 32 placeholders included: the default
  max_length 75 leaves 75 - 33 = 42 tokens for a caption without a prompt, and min_length 5 never binds;
- decoding ends at `text_config.eos_token_id` ("\\n", 50118, in blip2-opt-2.7b: BLIP-2 trained OPT to end captions
  with a newline) and pads with `pad_token_id`;
- the text is the decoded sequence without special tokens (placeholders, </s>, <pad>), stripped of surrounding
  whitespace (the trailing newline): a prompt, if given, starts the caption.

transformers keeps the query tokens and the Q-Former in float32 whatever dtype the rest is loaded in, and casts
the image tokens to float32 for it and its output back; so does this file.

The files: transformers' Blip2ForConditionalGeneration folder (`Salesforce/blip2-opt-2.7b`): config.json,
weights (safetensors or .bin, one file or sharded), vocab.json + merges.txt (gpt2_tokenizer.py) and
preprocessor_config.json (preprocess.py: 224 px, bicubic, CLIP's mean and std); weights_convert/blip2.py maps
the names.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .decode import generate
from .opt import OPT, OPTConfig
from .qformer import QFormer, QFormerConfig
from .vit import ViT, ViTConfig

EVA_VIT_G = ViTConfig(width=1408, layers=39, heads=16, mlp_width=6144, image_size=224, patch_size=14,
                      layer_norm_eps=1e-6)


@dataclass(frozen=True)
class Blip2Config:
    vision: ViTConfig = EVA_VIT_G
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OPTConfig = field(default_factory=lambda: OPTConfig(vocab_size=50304, eos_token_id=50118))
    image_token_id: int | None = 50265   # the placeholder id; None in files written before transformers 4.47


BLIP2_OPT_2_7B = Blip2Config()


def config_from_json(d: dict) -> Blip2Config:
    """A Blip2Config from a transformers Blip2ForConditionalGeneration config.json dict. Missing entries take
    transformers' defaults (Blip2VisionConfig, Blip2QFormerConfig, OPTConfig), as the hub's file relies on them."""
    if d.get("model_type") != "blip-2":
        raise ValueError(f"config.json: model_type {d.get('model_type')!r}, expected 'blip-2'")
    v, q, t = (d.get(name) or {} for name in ("vision_config", "qformer_config", "text_config"))
    if t.get("model_type", "opt") != "opt":
        raise ValueError(f"config.json: the language model is {t.get('model_type')!r}; only BLIP-2 with OPT "
                         f"(blip2-opt-*) is supported")
    unsupported = [(f"vision_config.{k}", v, k, want) for k, want in (("hidden_act", "gelu"), ("qkv_bias", True))]
    unsupported += [(f"qformer_config.{k}", q, k, want) for k, want in (("hidden_act", "gelu"),)]
    unsupported += [(f"text_config.{k}", t, k, want) for k, want in (
        ("activation_function", "relu"), ("do_layer_norm_before", True), ("_remove_final_layer_norm", False),
        ("enable_bias", True), ("layer_norm_elementwise_affine", True), ("tie_word_embeddings", True))]
    for name, sub, key, want in unsupported:
        if sub.get(key, want) != want:
            raise ValueError(f"config.json: {name} is {sub[key]!r}; minisd's BLIP-2 supports only {want!r}")
    width = t.get("hidden_size", 768)
    if t.get("word_embed_proj_dim", width) not in (None, width):
        raise ValueError("config.json: text_config.word_embed_proj_dim differs from hidden_size (OPT-350M's "
                         "projected embeddings); not supported")

    vision = ViTConfig(width=v.get("hidden_size", 1408), layers=v.get("num_hidden_layers", 39),
                       heads=v.get("num_attention_heads", 16), mlp_width=v.get("intermediate_size", 6144),
                       image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
                       layer_norm_eps=v.get("layer_norm_eps", 1e-6))
    qformer = QFormerConfig(width=q.get("hidden_size", 768), layers=q.get("num_hidden_layers", 12),
                            heads=q.get("num_attention_heads", 12), mlp_width=q.get("intermediate_size", 3072),
                            layer_norm_eps=q.get("layer_norm_eps", 1e-12),
                            cross_attention_frequency=q.get("cross_attention_frequency", 2),
                            encoder_width=vision.width, queries=d.get("num_query_tokens", 32))
    text = OPTConfig(vocab_size=t.get("vocab_size", 50272), width=width, layers=t.get("num_hidden_layers", 12),
                     heads=t.get("num_attention_heads", 12), ffn_width=t.get("ffn_dim", 3072),
                     max_positions=t.get("max_position_embeddings", 2048),
                     bos_token_id=_token_id(t, "bos_token_id", 2), eos_token_id=_token_id(t, "eos_token_id", 2),
                     pad_token_id=_token_id(t, "pad_token_id", 1))
    return Blip2Config(vision, qformer, text, d.get("image_token_index", d.get("image_token_id")))


def _token_id(d, key, default):
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, list):       # transformers allows several end tokens; OPT's configs give one
        if len(value) != 1:
            raise ValueError(f"config.json: text_config.{key} {value!r}; one id expected")
        value = value[0]
    return int(value)


class Blip2(nn.Module):
    def __init__(self, cfg: Blip2Config = BLIP2_OPT_2_7B):
        super().__init__()
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        self.qformer = QFormer(cfg.qformer)
        self.projection = nn.Linear(cfg.qformer.width, cfg.text.width)
        self.text = OPT(cfg.text)

    def to(self, *args, **kwargs):
        """As nn.Module.to, but the Q-Former stays float32 (transformers' `_keep_in_fp32_modules`)."""
        super().to(*args, **kwargs)
        self.qformer.float()
        return self

    def image_features(self, pixels):
        """pixels (N, 3, S, S) -> (image tokens (N, T, 1408), query outputs (N, 32, 768) in float32,
        prefix (N, 32, text width): what OPT reads in place of the placeholders)."""
        image = self.vision(pixels)
        queries = self.qformer(image)
        return image, queries, self.projection(queries.to(image.dtype))

    def step(self, ids, cache):
        """decode.py's step. First call: ids = placeholders + bos + prompt, cache = [prefix]; the prefix takes
        the placeholders' places. Later calls: one new token each, cache = OPT's keys and values."""
        if len(cache) == 1:
            prefix = cache[0]
            n = prefix.shape[1]
            x = torch.cat([prefix, self.text.token_embedding(ids[:, n:])], dim=1)
            cache = self.text.empty_cache(ids.shape[0], prefix)
        else:
            x = self.text.token_embedding(ids)
        h, cache = self.text(x, cache)
        return self.text.logits(h[:, -1]), cache

    def generate(self, prefix, prompt_ids, num_beams=1, min_length=0, max_length=20):
        """prefix (N, 32, width), prompt_ids: the ids after the placeholders (bos first), the same for every
        image -> (N, L) ids as transformers returns them: placeholders, prompt, caption, padding."""
        placeholder = self.cfg.image_token_id
        if placeholder is None:   # older files: no placeholder token; the id is never looked up or decoded
            placeholder = self.cfg.text.pad_token_id
        row = [placeholder] * prefix.shape[1] + list(prompt_ids)
        ids = torch.tensor([row] * prefix.shape[0], device=prefix.device)
        t = self.cfg.text
        return generate(self.step, ids, cache=[prefix], num_beams=num_beams, min_length=min_length,
                        max_length=max_length, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)


class Blip2Captioner:
    """A loaded BLIP-2 with its tokenizer and image processor: `.caption(images) -> captions`."""

    def __init__(self, model: Blip2, tokenizer, processor):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    def prompt_ids(self, prompt=None):
        """The ids after the placeholders: the tokenizer's (bos first) for a prompt, else the bos alone."""
        return self.tokenizer(prompt) if prompt else [self.model.cfg.text.bos_token_id]

    @torch.no_grad()
    def generate_ids(self, images, prompt=None, num_beams=1, min_length=5, max_length=75):
        """PIL images -> (N, L) ids as transformers' generate returns them (placeholders and prompt first)."""
        weight = self.model.vision.patch_embed.weight
        _, _, prefix = self.model.image_features(self.processor(images).to(weight.device, weight.dtype))
        return self.model.generate(prefix, self.prompt_ids(prompt), num_beams=num_beams, min_length=min_length,
                                   max_length=max_length)

    def caption(self, images, prompt=None, num_beams=1, min_length=5, max_length=75):
        """PIL images -> one caption each (see the module docstring for how lengths count)."""
        ids = self.generate_ids(images, prompt, num_beams=num_beams, min_length=min_length, max_length=max_length)
        return [self.tokenizer.decode(row[self.model.cfg.qformer.queries:]).strip() for row in ids.tolist()]


def load_blip2(folder, device="cpu", dtype=torch.float32):
    """A Blip2Captioner from a transformers Blip2ForConditionalGeneration folder."""
    from weights_convert.blip2 import from_transformers
    from weights_convert.folders import read_config, read_weights

    from .gpt2_tokenizer import GPT2Tokenizer
    from .preprocess import ImageProcessor

    folder = Path(folder)
    cfg = config_from_json(read_config(folder))
    with torch.device("meta"):
        model = Blip2(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(from_transformers(read_weights(folder), cfg, shapes), assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    processor = ImageProcessor.from_json(read_config(folder, "preprocessor_config.json"))
    return Blip2Captioner(model, GPT2Tokenizer.from_folder(folder), processor)
