"""BLIP-2 weights: transformers' Blip2ForConditionalGeneration <-> minisd/caption/blip2.py.

The maps are tables, one row per tensor (per layer where it repeats), read in both directions. The image encoder
is BLIP's ViT table (weights_convert/blip.py: `vision_table`, the class/position embeddings' batch dims) except
for the bias of q, k, v, which exists in two layouts:

    hub files (Salesforce/blip2-*, written by transformers 4):  self_attn.q_bias and self_attn.v_bias (width,)
    transformers 5's save_pretrained:                           self_attn.qkv.bias (3 * width,)

EVA's ViT has no key bias (adding the same vector to every key shifts each query's scores by a constant, which
the softmax ignores), so the packed bias is cat(q_bias, zeros, v_bias). Both layouts are read; `to_transformers`
writes transformers 5's (lossless) or, with `split_qkv_bias=True`, the hub's. (transformers 5.25 itself does not
read the hub's q_bias/v_bias: it reports them unexpected and starts the packed bias at zero.)

`from_transformers` ignores what captioning does not compute with: the output matrix `language_model.lm_head`
(tied to the token embedding) and the Q-Former's text-path MLP (`intermediate.*`, `output.*`, used only by the
first training stage). An unknown, missing or mis-shaped key raises ValueError naming the first one.
"""
import re

import torch

from .blip import _batch, _unbatch, vision_table
from .io import check_shapes

QFORMER = {    # ours (under qformer.): transformers (under qformer.)
    "ln_in.weight": "layernorm.weight",
    "ln_in.bias": "layernorm.bias",
}
QFORMER_LAYER = {    # under qformer.layers.{i}. : under qformer.encoder.layer.{i}.
    **{f"self_attn.{ours}.{p}": f"attention.attention.{theirs}.{p}" for ours, theirs in
       (("q", "query"), ("k", "key"), ("v", "value")) for p in ("weight", "bias")},
    "self_attn.out.weight": "attention.output.dense.weight",
    "self_attn.out.bias": "attention.output.dense.bias",
    "ln_1.weight": "attention.output.LayerNorm.weight",
    "ln_1.bias": "attention.output.LayerNorm.bias",
    "fc1.weight": "intermediate_query.dense.weight",
    "fc1.bias": "intermediate_query.dense.bias",
    "fc2.weight": "output_query.dense.weight",
    "fc2.bias": "output_query.dense.bias",
    "ln_3.weight": "output_query.LayerNorm.weight",
    "ln_3.bias": "output_query.LayerNorm.bias",
}
QFORMER_CROSS = {    # the same, in the layers with cross-attention (every cross_attention_frequency-th)
    **{f"cross_attn.{ours}.{p}": f"crossattention.attention.{theirs}.{p}" for ours, theirs in
       (("q", "query"), ("k", "key"), ("v", "value")) for p in ("weight", "bias")},
    "cross_attn.out.weight": "crossattention.output.dense.weight",
    "cross_attn.out.bias": "crossattention.output.dense.bias",
    "ln_2.weight": "crossattention.output.LayerNorm.weight",
    "ln_2.bias": "crossattention.output.LayerNorm.bias",
}
OTHER = {    # ours: transformers
    "qformer.queries": "query_tokens",                      # (32, w) <-> (1, 32, w)
    "projection.weight": "language_projection.weight",
    "projection.bias": "language_projection.bias",
    "text.token_embedding.weight": "language_model.model.decoder.embed_tokens.weight",
    "text.positional_embedding": "language_model.model.decoder.embed_positions.weight",
    "text.ln_final.weight": "language_model.model.decoder.final_layer_norm.weight",
    "text.ln_final.bias": "language_model.model.decoder.final_layer_norm.bias",
}
TEXT_BLOCK = {    # under text.blocks.{i}. : under language_model.model.decoder.layers.{i}.
    "ln_1.weight": "self_attn_layer_norm.weight",
    "ln_1.bias": "self_attn_layer_norm.bias",
    **{f"attn.{ours}.{p}": f"self_attn.{theirs}.{p}" for ours, theirs in
       (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")) for p in ("weight", "bias")},
    "ln_2.weight": "final_layer_norm.weight",
    "ln_2.bias": "final_layer_norm.bias",
    "fc1.weight": "fc1.weight",
    "fc1.bias": "fc1.bias",
    "fc2.weight": "fc2.weight",
    "fc2.bias": "fc2.bias",
}
UNUSED = re.compile(r"^language_model\.lm_head\.weight$"            # tied to the token embedding
                    r"|^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")   # the Q-Former's text path
QKV_BIAS = "self_attn.qkv.bias"
SPLIT_BIAS = ("self_attn.q_bias", "self_attn.v_bias")


def table(cfg):
    """[(ours, theirs)] for every tensor of a BLIP-2 of configuration `cfg` (caption.blip2.Blip2Config), the
    q, k, v biases of the image encoder excepted (see the module docstring)."""
    rows = [(o, t) for o, t in vision_table("vision_model.", cfg.vision.layers) if not o.endswith("attn.qkv.bias")]
    rows += [(f"qformer.{o}", f"qformer.{t}") for o, t in QFORMER.items()]
    for i in range(cfg.qformer.layers):
        layer = {**QFORMER_LAYER, **(QFORMER_CROSS if i % cfg.qformer.cross_attention_frequency == 0 else {})}
        rows += [(f"qformer.layers.{i}.{o}", f"qformer.encoder.layer.{i}.{t}") for o, t in layer.items()]
    rows += list(OTHER.items())
    for i in range(cfg.text.layers):
        rows += [(f"text.blocks.{i}.{o}", f"language_model.model.decoder.layers.{i}.{t}")
                 for o, t in TEXT_BLOCK.items()]
    return rows


def _qkv_bias_keys(cfg):
    """[(ours, transformers 5's packed key, (the hub's q key, v key))] per image-encoder layer."""
    return [(f"vision.blocks.{i}.attn.qkv.bias", f"vision_model.encoder.layers.{i}.{QKV_BIAS}",
             tuple(f"vision_model.encoder.layers.{i}.{k}" for k in SPLIT_BIAS)) for i in range(cfg.vision.layers)]


def _unbatch_queries(ours_name, tensor):
    if ours_name == "qformer.queries":
        if tensor.ndim != 3 or tensor.shape[0] != 1:
            raise ValueError(f"query_tokens: expected shape (1, queries, width), got {tuple(tensor.shape)}")
        return tensor[0]
    return _unbatch(ours_name, tensor)


def from_transformers(sd, cfg, shapes=None):
    """transformers Blip2ForConditionalGeneration state dict (hub or transformers-5 layout) -> ours, checked
    against `cfg`."""
    rows = table(cfg)
    bias_keys = _qkv_bias_keys(cfg)
    known = {t for _, t in rows} | {k for _, packed, split in bias_keys for k in (packed, *split)}
    for key in sd:
        if key not in known and not UNUSED.match(key):
            raise ValueError(f"unknown key {key!r} in a BLIP-2 (Blip2ForConditionalGeneration) file")
    ours = {}
    for o, t in rows:
        if t not in sd:
            raise ValueError(f"missing key {t!r} in a BLIP-2 file")
        ours[o] = _unbatch_queries(o, sd[t])
    for o, packed, (q_key, v_key) in bias_keys:
        if packed in sd:
            ours[o] = sd[packed]
        elif q_key in sd and v_key in sd:
            q, v = sd[q_key], sd[v_key]
            ours[o] = torch.cat([q, torch.zeros_like(q), v])
        else:
            raise ValueError(f"missing key {q_key!r} (or {packed!r}) in a BLIP-2 file")
    if shapes is not None:      # the network's own {name: shape}, built by the loader (this layer names no network)
        check_shapes(ours, shapes, "BLIP-2", cfg)
    return ours


def to_transformers(ours, cfg, split_qkv_bias=False):
    """Ours -> transformers Blip2ForConditionalGeneration names and shapes (the tied lm_head left out, as
    transformers 5's save_pretrained leaves it out). split_qkv_bias: the hub's q_bias/v_bias instead of the packed
    bias; the key part must then be zero (it has no effect, but dropping it would not be lossless)."""
    sd = {t: _batch(o, ours[o]) for o, t in table(cfg) if o != "qformer.queries"}
    sd["query_tokens"] = ours["qformer.queries"][None]
    for o, packed, (q_key, v_key) in _qkv_bias_keys(cfg):
        if not split_qkv_bias:
            sd[packed] = ours[o]
            continue
        q, k, v = ours[o].chunk(3)
        if k.any():
            raise ValueError(f"{o}: the key bias is not zero, so it cannot be written as q_bias/v_bias")
        sd[q_key], sd[v_key] = q, v
    return sd
