"""BLIP captioner weights: transformers' BlipForConditionalGeneration <-> minisd/caption/blip.py.

The maps are tables, one row per tensor (per layer where it repeats), read in both directions. Two tensors
change shape: transformers keeps the ViT's class and position embeddings with leading batch dims, (1, 1, w) and
(1, T, w); ours are (w,) and (T, w). The vision tables serve any transformers ViT of this layout
(`vision_table(prefix, layers)`: BLIP-2's vision_model differs only in storing the qkv bias as q_bias/v_bias).

`from_transformers` ignores what BLIP does not compute with: the output projection and its bias, which
transformers ties to the token embedding and to `cls.predictions.bias` (older files store the copies), and the
`position_ids` buffers older transformers saved. An unknown, missing or mis-shaped key raises ValueError naming
the first one.
"""
from .io import check_shapes

VISION = {    # ours (under vision.): transformers (under the vision model's prefix)
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "patch_embed.bias": "embeddings.patch_embedding.bias",
    "class_embedding": "embeddings.class_embedding",              # (w,) <-> (1, 1, w)
    "positional_embedding": "embeddings.position_embedding",      # (T, w) <-> (1, T, w)
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
VISION_BLOCK = {    # under blocks.{i}. : under encoder.layers.{i}.
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.qkv.bias": "self_attn.qkv.bias",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
BATCHED = {"class_embedding": (1, 1), "positional_embedding": (1,)}   # leading dims transformers adds

TEXT = {    # ours (under text.): transformers (under text_decoder.)
    "token_embedding.weight": "bert.embeddings.word_embeddings.weight",
    "positional_embedding": "bert.embeddings.position_embeddings.weight",
    "ln_embed.weight": "bert.embeddings.LayerNorm.weight",
    "ln_embed.bias": "bert.embeddings.LayerNorm.bias",
    "head_dense.weight": "cls.predictions.transform.dense.weight",
    "head_dense.bias": "cls.predictions.transform.dense.bias",
    "head_ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "head_ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "head_bias": "cls.predictions.bias",
}
TEXT_LAYER = {    # under layers.{i}. : under bert.encoder.layer.{i}.
    **{f"self_attn.{ours}.{p}": f"attention.self.{theirs}.{p}" for ours, theirs in
       (("q", "query"), ("k", "key"), ("v", "value")) for p in ("weight", "bias")},
    "self_attn.out.weight": "attention.output.dense.weight",
    "self_attn.out.bias": "attention.output.dense.bias",
    "ln_1.weight": "attention.output.LayerNorm.weight",
    "ln_1.bias": "attention.output.LayerNorm.bias",
    **{f"cross_attn.{ours}.{p}": f"crossattention.self.{theirs}.{p}" for ours, theirs in
       (("q", "query"), ("k", "key"), ("v", "value")) for p in ("weight", "bias")},
    "cross_attn.out.weight": "crossattention.output.dense.weight",
    "cross_attn.out.bias": "crossattention.output.dense.bias",
    "ln_2.weight": "crossattention.output.LayerNorm.weight",
    "ln_2.bias": "crossattention.output.LayerNorm.bias",
    "fc1.weight": "intermediate.dense.weight",
    "fc1.bias": "intermediate.dense.bias",
    "fc2.weight": "output.dense.weight",
    "fc2.bias": "output.dense.bias",
    "ln_3.weight": "output.LayerNorm.weight",
    "ln_3.bias": "output.LayerNorm.bias",
}
UNUSED = ("text_decoder.cls.predictions.decoder.weight",    # tied to the token embedding
          "text_decoder.cls.predictions.decoder.bias",      # tied to cls.predictions.bias
          "text_decoder.bert.embeddings.position_ids",      # buffers older transformers saved
          "vision_model.embeddings.position_ids")


def vision_table(prefix, layers):
    """[(ours, theirs)] for a ViT of `layers` blocks: ours under `vision.`, theirs under `prefix`."""
    rows = [(f"vision.{o}", prefix + t) for o, t in VISION.items()]
    for i in range(layers):
        rows += [(f"vision.blocks.{i}.{o}", f"{prefix}encoder.layers.{i}.{t}") for o, t in VISION_BLOCK.items()]
    return rows


def table(cfg):
    """[(ours, theirs)] for every tensor of a BLIP captioner of configuration `cfg` (caption.blip.BlipConfig)."""
    rows = vision_table("vision_model.", cfg.vision.layers)
    rows += [(f"text.{o}", f"text_decoder.{t}") for o, t in TEXT.items()]
    for i in range(cfg.text.layers):
        rows += [(f"text.layers.{i}.{o}", f"text_decoder.bert.encoder.layer.{i}.{t}") for o, t in TEXT_LAYER.items()]
    return rows


def _unbatch(ours_name, tensor):
    dims = BATCHED.get(ours_name.removeprefix("vision."))
    if dims is None:
        return tensor
    if tuple(tensor.shape[:len(dims)]) != dims:
        raise ValueError(f"{ours_name}: expected leading dims {dims}, got shape {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[len(dims):])


def _batch(ours_name, tensor):
    dims = BATCHED.get(ours_name.removeprefix("vision."))
    return tensor if dims is None else tensor.reshape(*dims, *tensor.shape)


def from_transformers(sd, cfg, shapes=None):
    """transformers BlipForConditionalGeneration state dict -> ours: every key known and present for `cfg`, and
    each tensor of the shape in `shapes` ({our name: shape}) when given."""
    by_theirs = {t: o for o, t in table(cfg)}
    for key in sd:
        if key not in by_theirs and key not in UNUSED:
            raise ValueError(f"unknown key {key!r} in a BLIP captioner (BlipForConditionalGeneration) file")
    ours = {}
    for o, t in table(cfg):
        if t not in sd:
            raise ValueError(f"missing key {t!r} in a BLIP captioner file")
        ours[o] = _unbatch(o, sd[t])
    if shapes is not None:      # the network's own {name: shape}, built by the loader (this layer names no network)
        check_shapes(ours, shapes, "BLIP", cfg)
    return ours


def to_transformers(ours, cfg):
    """Ours -> transformers BlipForConditionalGeneration names and shapes (the tied copies left out, as
    transformers 5's save_pretrained leaves them out)."""
    return {t: _batch(o, ours[o]) for o, t in table(cfg)}
