"""Text-encoder weights: transformers' CLIPTextModel (SD1, diffusers) and open_clip (SD2) <-> minisd.

minisd's names *are* open_clip's text-tower names (minisd/clip.py), so open_clip needs only a prefix strip and
a split of what SD does not use. transformers renames every module and keeps q, k, v as three Linear layers;
minisd packs them into one `in_proj` (rows q, k, v) as nn.MultiheadAttention does. The maps are tables below,
one per layout; each direction reads them.

Every `from_*` returns (ours, unused): `unused` holds the input tensors minisd does not compute with, verbatim
under their input keys (position_ids, text_projection, logit_scale, OpenCLIP-H's 24th block), so a caller can
write a file back losslessly. An unknown, missing or mis-shaped key raises ValueError naming the first one.
"""
import re

import torch

from minisd.config import TextConfig

from .io import check_shapes

# ---- transformers CLIPTextModel (keys under `text_model.`; transformers >= 5.6 saves them without it) ----
TRANSFORMERS = {    # minisd name: transformers name
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
TRANSFORMERS_BLOCK = {    # under transformer.resblocks.{i}. : under encoder.layers.{i}.
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
TRANSFORMERS_QKV = {      # one packed minisd tensor: the three transformers tensors concatenated along dim 0
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
TRANSFORMERS_UNUSED = ("embeddings.position_ids", "text_projection.weight")   # a buffer; the CLIP-space head
# the same tables read the other way: transformers name -> minisd name
FROM_TRANSFORMERS = {v: k for k, v in TRANSFORMERS.items()}
FROM_TRANSFORMERS_BLOCK = {v: k for k, v in TRANSFORMERS_BLOCK.items()}

# ---- open_clip (the SD2 file holds them under `cond_stage_model.model.`) ----
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "logit_bias")   # the contrastive heads SD never uses

_TRANSFORMERS_PREFIX = re.compile(r"^(transformer\.)?text_model\.")   # SD1 file: cond_stage_model.transformer.
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def expected_shapes(cfg: TextConfig):
    """minisd's text-encoder parameter names and shapes for `cfg` (minisd/clip.py builds exactly these; tested)."""
    w = cfg.width
    shapes = {"token_embedding.weight": (cfg.vocab_size, w), "positional_embedding": (cfg.context_length, w)}
    block = {"ln_1.weight": (w,), "ln_1.bias": (w,), "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
             "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
             "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,), "mlp.c_proj.weight": (w, 4 * w),
             "mlp.c_proj.bias": (w,)}
    for i in range(cfg.layers):
        shapes.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.items()})
    shapes.update({"ln_final.weight": (w,), "ln_final.bias": (w,)})
    return shapes


def check(ours, cfg: TextConfig):
    """Raise ValueError naming the first unknown, missing or mis-shaped key of a minisd text state dict."""
    check_shapes(ours, expected_shapes(cfg), "text-encoder", cfg)


def from_transformers(sd, cfg: TextConfig = None):
    """transformers CLIPTextModel state dict -> (minisd state dict, unused). Keys may carry `text_model.`
    (or the SD1 file's `transformer.text_model.`) or not. With `cfg`, shapes are checked and blocks past
    cfg.layers go to `unused`."""
    ours, unused, qkv = {}, {}, {}
    for key, tensor in sd.items():
        name = _TRANSFORMERS_PREFIX.sub("", key)
        layer = _LAYER.match(name)
        if name in TRANSFORMERS_UNUSED or (layer and cfg is not None and int(layer[1]) >= cfg.layers):
            unused[key] = tensor
        elif name in FROM_TRANSFORMERS:
            ours[FROM_TRANSFORMERS[name]] = tensor
        elif layer and layer[2] in FROM_TRANSFORMERS_BLOCK:
            ours[f"transformer.resblocks.{layer[1]}.{FROM_TRANSFORMERS_BLOCK[layer[2]]}"] = tensor
        elif layer and any(layer[2] in parts for parts in TRANSFORMERS_QKV.values()):
            qkv[(int(layer[1]), layer[2])] = tensor
        else:
            raise ValueError(f"unknown key {key!r} in a transformers CLIPTextModel state dict")
    for i in sorted({i for i, _ in qkv}):
        for packed, parts in TRANSFORMERS_QKV.items():
            missing = [p for p in parts if (i, p) not in qkv]
            if missing:
                raise ValueError(f"missing key 'text_model.encoder.layers.{i}.{missing[0]}'")
            tensors = [qkv[(i, p)] for p in parts]
            if len({t.shape for t in tensors}) != 1:
                raise ValueError(f"q, k, v of text_model.encoder.layers.{i} differ in shape: "
                                 f"{[tuple(t.shape) for t in tensors]}")
            ours[f"transformer.resblocks.{i}.{packed}"] = torch.cat(tensors, dim=0)
    if cfg is None:   # infer the depth from the input and check nothing inside it is missing
        layers = 1 + max((int(m[1]) for k in ours if (m := _BLOCK.match(k))), default=-1)
        expected = [*TRANSFORMERS, *(f"transformer.resblocks.{i}.{name}" for i in range(layers)
                                     for name in [*TRANSFORMERS_BLOCK, *TRANSFORMERS_QKV])]
        for k in expected:
            if k not in ours:
                raise ValueError(f"missing text-encoder key {k!r} (transformers: {_to_transformers_name(k)!r})")
    else:
        check(ours, cfg)
    return ours, unused


def _to_transformers_name(name):
    if name in TRANSFORMERS:
        return "text_model." + TRANSFORMERS[name]
    block = _BLOCK.match(name)
    if block and block[2] in TRANSFORMERS_BLOCK:
        return f"text_model.encoder.layers.{block[1]}.{TRANSFORMERS_BLOCK[block[2]]}"
    raise ValueError(f"unknown text-encoder key {name!r}")


def to_transformers(ours):
    """minisd state dict -> transformers CLIPTextModel names, with the `text_model.` prefix (as the hub's
    diffusers folders hold them). Add `unused` back for a lossless file."""
    sd = {}
    for name, tensor in ours.items():
        block = _BLOCK.match(name)
        if block and block[2] in TRANSFORMERS_QKV:
            for part, t in zip(TRANSFORMERS_QKV[block[2]], tensor.chunk(3, dim=0)):
                sd[f"text_model.encoder.layers.{block[1]}.{part}"] = t.clone()
        else:
            sd[_to_transformers_name(name)] = tensor
    return sd


def from_open_clip(sd, cfg: TextConfig):
    """open_clip text-tower state dict (keys with or without SD2's `model.`) -> (minisd state dict, unused).
    Blocks from cfg.layers to cfg.source_layers - 1 (OpenCLIP-H's 24th) and the contrastive heads are unused."""
    ours, unused = {}, {}
    for key, tensor in sd.items():
        name = key.removeprefix("model.")
        block = _BLOCK.match(name)
        if name in OPEN_CLIP_UNUSED or (block and cfg.layers <= int(block[1]) < cfg.source_layers):
            unused[key] = tensor
        else:
            ours[name] = tensor
    check(ours, cfg)   # names the first key that is neither minisd's nor known-unused
    return ours, unused


def to_open_clip(ours):
    """minisd state dict -> open_clip names (the same names). Add `unused` back for a lossless file."""
    for name in ours:
        block = _BLOCK.match(name)
        in_block = block and (block[2] in TRANSFORMERS_BLOCK or block[2] in TRANSFORMERS_QKV)
        if name not in TRANSFORMERS and not in_block:
            raise ValueError(f"unknown text-encoder key {name!r}")
    return dict(ours)
