r"""LoRA (Hu et al. 2021): low-rank changes to a trained model's weights, the files they come in, and using them.

A LoRA file holds, for some layers W (out x in) of the U-Net and the text encoder, two factors, `down` (r x in)
and `up` (out x r) with r small (4..128), and optionally a scalar `alpha`. Used at strength (multiplier) m, the
layer computes with

    W' = W + m * (alpha / r) * up @ down          (Hu et al. 2021, eq. 3, with kohya's and peft's alpha / r)

No alpha means alpha = r (scale 1): kohya's LoRAModule and diffusers/peft both do that (kohya also reads an
alpha of 0 so). A 1x1 convolution's weight (out, in, 1, 1) is the same matrix; a k x k convolution's LoRA
(LyCORIS' "LoCon") has down (r, in, k, k) and up (out, r, 1, 1), a 1x1 conv after a k x k one, and the product
is the same sum over r:  W'[o, i, :, :] = W[o, i, :, :] + s * sum_r up[o, r] down[r, i, :, :].

The files. One layer's LoRA is named after the layer, in one of these spellings (the table `layers` below has
every layer of the model under each of them):

    kohya / A1111      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                       (.lora_up.weight, .alpha): diffusers' module names with "_" for "."; what kohya's
                       sd-scripts write and what A1111 and ComfyUI read. The text encoder:
                       lora_te_text_model_encoder_layers_0_self_attn_q_proj..., in transformers' CLIP names
                       (SD2 too: kohya trains SD2 on diffusers' 23-layer CLIPTextModel)
    kohya, LDM names   lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q...: the same with the
                       original U-Net's names (= minisd's)
    diffusers / peft   unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight (lora_B), or
                       the older .lora.down.weight / .lora.up.weight, .lora_linear_layer.down.weight, and the 2023
                       attention-processor names (attn1.processor.to_q_lora.down.weight); text_encoder.text_model.
                       encoder.layers.0.self_attn.q_proj...; alpha from the `lora_adapter_metadata` diffusers
                       writes into the .safetensors header, else from `.alpha` tensors, else alpha = r

Reading checks every key against the model's layers before anything is applied: an unknown key, an up factor
whose rank differs from its down factor's, or a factor whose shape does not fit the layer (a LoRA made for
another base model: SD1's text is 768 wide, SD2's 1024, SD1's proj_in is a 1x1 conv, SD2's a Linear) is one
error line naming the first such key.

Using it: the merged weights W' are computed into new Parameters that replace the layers' weights, and the
original Parameters are kept aside and put back by `restore` (their values are never touched, so the base model
comes back bit for bit). Why not add the low-rank branch to the layers' forward? That needs hooks or wrapper
modules around every targeted layer, and costs two small matmuls per layer per step; the merge costs nothing per
step, keeps every fast path (oneDNN-prepared layers, CUDA graphs) computing plain layers, and needs no special
case for the text encoder's packed q/k/v projection (a q_proj LoRA is a change to the first third of the rows of
`in_proj_weight`). Its cost is memory: the merged copies of the targeted weights exist next to the originals
while a LoRA is in use (SD1.5 with a LoRA on every default target: ~250M U-Net and ~85M text weights, 1.3 GB in
fp32, 0.65 GB in fp16). `minisd merge-lora` (merge.py) writes the merged weights into a new checkpoint instead.

Targets (which layers a new LoRA trains, `targets`): "default" is what kohya's train_network.py trains, every
Linear and 1x1 conv inside the U-Net's transformer blocks (kohya's Transformer2DModel: proj_in, proj_out, the
attentions' to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2) and the text encoder's attention (q, k, v, out) and
MLP (fc1, fc2); "attention" is diffusers' train_text_to_image_lora.py: the U-Net's to_q/to_k/to_v/to_out.0, and
for the text encoder its q/k/v/out projections (diffusers' DreamBooth LoRA script).
"""
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from weights_convert.diffusers import rename, unet_table
from weights_convert.io import SafetensorsFile, unpickle_ckpt, write_safetensors

from .clip import TextEncoder
from .config import ModelConfig
from .unet import SpatialTransformer, UNet


class LoRAError(ValueError):
    """A LoRA file that does not fit the model; the message names the first offending key."""


# ---------------------------------------------------------------------------------------------------------
# The layers a LoRA can change, under each name the files use

@dataclass(frozen=True)
class Layer:
    param: str           # the minisd parameter it changes: "unet.input_blocks.1.1.proj_in.weight"
    rows: tuple          # (start, stop) of that parameter's rows, for the text encoder's packed q/k/v; else None
    shape: tuple         # the shape of what the LoRA adds: (out, in) or (out, in, kh, kw)
    kohya: str           # lora_unet_down_blocks_0_attentions_0_proj_in (the canonical name)
    diffusers: str       # unet.down_blocks.0.attentions.0.proj_in
    ldm: str = None      # lora_unet_input_blocks_1_1_proj_in (U-Net only)
    in_transformer: bool = False    # inside a U-Net SpatialTransformer (kohya's default targets)


# The text encoder: transformers' CLIPTextModel module under text_model.encoder.layers.{i}. -> the minisd
# parameter under text_encoder.transformer.resblocks.{i}. and which third of its rows (q, k, v are packed in
# in_proj_weight, rows q then k then v; see weights_convert/text.py)
TEXT_LAYERS = {
    "self_attn.q_proj": ("attn.in_proj_weight", 0),
    "self_attn.k_proj": ("attn.in_proj_weight", 1),
    "self_attn.v_proj": ("attn.in_proj_weight", 2),
    "self_attn.out_proj": ("attn.out_proj.weight", None),
    "mlp.fc1": ("mlp.c_fc.weight", None),
    "mlp.fc2": ("mlp.c_proj.weight", None),
}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")   # "attention" targets


def _kohya(prefix, module):
    return prefix + module.replace(".", "_")


@lru_cache(maxsize=8)
def layers(config: ModelConfig):
    """{kohya name: Layer} for every Linear and conv of the U-Net and every attention/MLP projection of the text
    encoder, in data-flow order. Built from the networks on the meta device (shapes only) and the diffusers key
    table of weights_convert, so any config (SD1, SD2, the small test ones) gets its own."""
    with torch.device("meta"):
        unet, text = UNet(config.unet), TextEncoder(config.text)
    table = dict(unet_table(config.unet))
    in_transformers = {f"{name}.{sub}" for name, m in unet.named_modules() if isinstance(m, SpatialTransformer)
                       for sub, _ in m.named_modules() if sub}
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            diffusers = rename(name + ".weight", table)[:-len(".weight")]
            out[_kohya("lora_unet_", diffusers)] = Layer(
                f"unet.{name}.weight", None, tuple(module.weight.shape), _kohya("lora_unet_", diffusers),
                "unet." + diffusers, _kohya("lora_unet_", name), name in in_transformers)
    w = config.text.width
    for i in range(len(text.transformer.resblocks)):
        for module, (param, third) in TEXT_LAYERS.items():
            theirs = f"text_model.encoder.layers.{i}.{module}"
            shape = tuple(text.get_parameter(f"transformer.resblocks.{i}.{param}").shape)
            rows = None if third is None else (third * w, (third + 1) * w)
            out[_kohya("lora_te_", theirs)] = Layer(
                f"text_encoder.transformer.resblocks.{i}.{param}", rows, (w, w) if rows else shape,
                _kohya("lora_te_", theirs), "text_encoder." + theirs)
    return out


@lru_cache(maxsize=8)
def aliases(config: ModelConfig):
    """Every spelling of a layer's name in a file (kohya, kohya with LDM names, diffusers) -> its kohya name."""
    out = {}
    for kohya, layer in layers(config).items():
        for name in (layer.kohya, layer.ldm, layer.diffusers):
            if name is not None:
                if out.get(name, kohya) != kohya:       # never happens for SD's networks (tested)
                    raise AssertionError(f"LoRA layer name {name!r} is ambiguous")
                out[name] = kohya
    return out


def targets(config: ModelConfig, which="default"):
    """{kohya name: Layer} a new LoRA trains: "default" (kohya's) or "attention" (diffusers'); module docstring."""
    if which not in ("default", "attention"):
        raise ValueError(f"unknown LoRA targets {which!r}; valid: default, attention")
    chosen = {}
    for kohya, layer in layers(config).items():
        if which == "attention":
            keep = layer.diffusers.endswith(ATTENTION)
        elif layer.param.startswith("unet."):      # kohya: Linear and 1x1 conv layers inside the transformers
            keep = layer.in_transformer and layer.shape[2:] in ((), (1, 1))
        else:
            keep = True
        if keep:
            chosen[kohya] = layer
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Reading a file

# How each format spells the two factors and the alpha of one layer (the key minus the layer's name)
SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",            # kohya / A1111
    ".lora_A.weight": "down", ".lora_B.weight": "up",                                  # peft (diffusers >= 0.24)
    ".lora.down.weight": "down", ".lora.up.weight": "up",                              # diffusers 0.18 - 0.23
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",    # its text-encoder layers
}
# diffusers' 2023 attention-processor names -> module names (then a suffix above)
OLD_DIFFUSERS = [
    (re.compile(r"\.processor\.to_(q|k|v)_lora\."), r".to_\1.lora."),
    (re.compile(r"\.processor\.to_out_lora\."), r".to_out.0.lora."),
    (re.compile(r"\.self_attn\.to_(q|k|v)_lora\."), r".self_attn.\1_proj.lora."),
    (re.compile(r"\.self_attn\.to_out_lora\."), r".self_attn.out_proj.lora."),
]


@dataclass
class Factors:
    down: torch.Tensor   # (r, in) or (r, in, kh, kw)
    up: torch.Tensor     # (out, r) or (out, r, 1, 1)
    alpha: float = None  # None: alpha = r

    @property
    def rank(self):
        return self.down.shape[0]

    def scale(self):
        """alpha / r: the factor every multiplier is multiplied by (kohya; peft's `scaling`)."""
        return 1.0 if not self.alpha else self.alpha / self.rank


@dataclass
class LoRA:
    path: str
    name: str                 # the file's stem: A1111's <lora:NAME:...>
    layers: dict              # kohya name -> Factors


def split_key(key):
    """A key of a LoRA file -> (layer name as written, "down" / "up" / "alpha"), or (None, None)."""
    for pattern, repl in OLD_DIFFUSERS:
        key = pattern.sub(repl, key)
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], part
    return None, None


def _read_tensors(path):
    path = str(path)
    if not os.path.isfile(path):
        raise LoRAError(f"{path}: no such LoRA file")
    if path.endswith(".safetensors"):
        f = SafetensorsFile(path)
        return f, f.metadata
    obj = unpickle_ckpt(path)         # torch's restricted unpickler (weights_convert/io.py): no code runs
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoRAError(f"{path}: not a LoRA file (expected a dict of tensors)")
    return obj, {}


def _peft_alphas(metadata, path):
    """{"unet": (lora_alpha, alpha_pattern), "text_encoder": ...} from the `lora_adapter_metadata` that diffusers'
    save_lora_weights writes (peft LoraConfig fields, prefixed with the component's name)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path}: unreadable lora_adapter_metadata ({e})") from None
    return {part: (meta.get(f"{part}.lora_alpha"), meta.get(f"{part}.alpha_pattern") or {})
            for part in ("unet", "text_encoder") if f"{part}.lora_alpha" in meta}


def _peft_alpha(peft, layer):
    part, module = layer.diffusers.split(".", 1)
    if part not in peft:
        return None
    alpha, pattern = peft[part]
    for key, value in pattern.items():        # peft matches pattern keys as regexes on the module name's tail
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(alpha)


def _check_shape(path, key, part, t, layer):
    """down (r, in[, kh, kw]), up (out, r[, 1, 1]), alpha one number, for `layer` of shape (out, in[, kh, kw])."""
    if part == "alpha":
        if t.numel() != 1:
            raise LoRAError(f"{path}: key {key!r} should hold one number, has shape {tuple(t.shape)}")
        return
    conv = len(layer.shape) == 4
    if t.ndim != len(layer.shape):
        raise LoRAError(f"{path}: key {key!r} has shape {tuple(t.shape)}, but {layer.param} is "
                        f"{'a conv' if conv else 'a Linear'} layer: a LoRA for another base model (SD1's "
                        "proj_in/proj_out are 1x1 convs, SD2's Linear)?")
    want = (t.shape[0], *layer.shape[1:]) if part == "down" else (layer.shape[0], t.shape[1], *[1] * (t.ndim - 2))
    if tuple(t.shape) != want:
        raise LoRAError(f"{path}: key {key!r} has shape {tuple(t.shape)}, the model's layer {layer.param}"
                        f"{'' if layer.rows is None else f' rows {layer.rows}'} needs {want}: a LoRA for another "
                        "base model (SD1 text is 768 wide, SD2 1024)?")


def read(path, config: ModelConfig):
    """Read and check a LoRA file for a model of `config`. Raises LoRAError naming the first key that is unknown,
    incomplete, of the wrong rank or of a shape that does not fit (module docstring)."""
    tensors, metadata = _read_tensors(path)
    names, table = aliases(config), layers(config)
    found = {}                  # kohya name -> {"down": (key, tensor), ...}
    for key in tensors:         # in file order, so the error names the first offending key
        layer, part = split_key(key)
        if layer is None or layer not in names:
            what = ("a DoRA/LyCORIS tensor minisd does not read" if re.search(r"dora_scale|magnitude|hada_|lokr_", key)
                    else "no layer of this model has that name: a LoRA for another base model?")
            raise LoRAError(f"{path}: unknown key {key!r} ({what})")
        parts = found.setdefault(names[layer], {})
        if part in parts:
            raise LoRAError(f"{path}: key {key!r} names the same layer as {parts[part][0]!r}")
        parts[part] = (key, tensors[key])
        _check_shape(path, key, part, tensors[key], table[names[layer]])
    if not found:
        raise LoRAError(f"{path}: holds no LoRA tensors")
    peft = _peft_alphas(metadata, path)
    out = {}
    for kohya, parts in found.items():
        for part in ("down", "up"):
            if part not in parts:
                other = next(iter(parts.values()))[0]
                raise LoRAError(f"{path}: key {other!r} has no {part} factor beside it")
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        if up.shape[1] != down.shape[0]:
            raise LoRAError(f"{path}: rank mismatch: {down_key!r} has rank {down.shape[0]}, {up_key!r} rank "
                            f"{up.shape[1]}")
        alpha = float(parts["alpha"][1].reshape(())) if "alpha" in parts else _peft_alpha(peft, table[kohya])
        out[kohya] = Factors(down, up, alpha)
    return LoRA(str(path), os.path.splitext(os.path.basename(str(path)))[0], out)


EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")


def find(folder, name):
    """The LoRA file A1111's <lora:NAME> means: the file NAME.safetensors (.pt, .ckpt, .bin) in `folder` or one of
    its subfolders."""
    if not os.path.isdir(folder):
        raise LoRAError(f"{folder}: no such LoRA folder")
    for root, _, files in sorted(os.walk(folder)):
        for ext in EXTENSIONS:
            if name + ext in files:
                return os.path.join(root, name + ext)
    raise LoRAError(f"no LoRA named {name!r} in {folder} (looked for {name}{'/'.join(EXTENSIONS)})")


def parse_spec(spec):
    """"FILE" or "FILE:SCALE" (the CLI's --lora) -> (FILE, SCALE). A colon followed by something that is not a
    number belongs to the file name (C:\\...)."""
    path, _, scale = str(spec).rpartition(":")
    try:
        return (path, float(scale)) if path else (spec, 1.0)
    except ValueError:
        if os.path.isfile(path) and not os.path.exists(spec):       # FILE:abc, FILE existing: the scale is bad
            raise LoRAError(f"--lora {spec}: the scale {scale!r} is not a number (FILE:SCALE, e.g. {path}:0.8)")
        return spec, 1.0


# ---------------------------------------------------------------------------------------------------------
# Merging

def delta(layer: Layer, factors: Factors, multiplier, device="cpu", dtype=torch.float32):
    """multiplier * alpha / r * up @ down, in `dtype` (float32; float64 for a float64 model) on `device`, shaped
    like what it is added to."""
    up, down = (t.flatten(1).to(device, dtype) for t in (factors.up, factors.down))
    return (up @ down).reshape(layer.shape) * (multiplier * factors.scale())


def _multiplier(layer, unet, text):
    return unet if layer.param.startswith("unet.") else text


def merged(config, weights, loras):
    """Yield (param name, merged tensor) for each parameter the LoRAs change. `weights(name)` gives a parameter's
    current tensor; `loras` is [(LoRA, unet multiplier, text multiplier)]. One parameter at a time: the merged copy
    of the whole model never exists at once. The sum is taken in float32 (float64 for a float64 weight: at least
    float32) and cast back to the weight's dtype.
    Outside no_grad it is differentiable in the factors: LoRA training computes its W' with it."""
    table = layers(config)
    by_param = {}
    for lora, unet, text in loras:
        for kohya, factors in lora.layers.items():
            layer = table[kohya]
            by_param.setdefault(layer.param, []).append((layer, factors, _multiplier(layer, unet, text)))
    for param, changes in by_param.items():
        weight = weights(param)
        w = weight.to(device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32), copy=True)
        for layer, factors, multiplier in changes:
            rows = slice(None) if layer.rows is None else slice(*layer.rows)
            w[rows] += delta(layer, factors, multiplier, w.device, w.dtype)
        yield param, w.to(weight.dtype)


def apply(model, loras):
    """Merge `loras` ([(LoRA, unet multiplier, text multiplier)]) into `model`'s weights (module docstring).
    Returns {param name: original Parameter} for `restore`. Plain layers only: a oneDNN-prepared network must be
    restored first (minisd.fast.restore), since its convolutions keep their own copy of the weight."""
    with torch.no_grad():
        return swap(model, merged(model.config, model.get_parameter, loras))


def swap(model, tensors):
    """Put each (param name, tensor) of `tensors` into `model` as a new Parameter in place of the one there;
    returns {param name: original Parameter} for `restore`. The originals' values are not touched."""
    originals = {}
    for param, w in tensors:
        module_name, attr = param.rsplit(".", 1)
        module = model.get_submodule(module_name)
        original = getattr(module, attr)
        originals[param] = original
        setattr(module, attr, nn.Parameter(w, requires_grad=original.requires_grad))
    return originals


def restore(model, originals):
    """Put the original Parameters `apply` returned back: the base model again, bit for bit."""
    for param, original in originals.items():
        module_name, attr = param.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, original)


# ---------------------------------------------------------------------------------------------------------
# Writing LoRA files (what training calls)

def save_kohya(path, lora_layers, metadata=None, dtype=None):
    """Write {kohya name: Factors} as kohya's / A1111's .safetensors (lora_down.weight, lora_up.weight, alpha).
    Factors of a 1x1 conv layer are written 4-D, (r, in, 1, 1) and (out, r, 1, 1), as kohya does."""
    tensors = {}
    for name, f in lora_layers.items():
        cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)
        tensors[f"{name}.lora_down.weight"] = cast(f.down.detach())
        tensors[f"{name}.lora_up.weight"] = cast(f.up.detach())
        tensors[f"{name}.alpha"] = torch.tensor(float(f.rank if f.alpha is None else f.alpha))
    write_safetensors(str(path), tensors, metadata)


def save_diffusers(path, lora_layers, config: ModelConfig, dtype=None, metadata=None):
    """Write {kohya name: Factors} with diffusers/peft keys (unet....to_q.lora_A.weight / lora_B.weight), as
    diffusers' save_lora_weights does. peft keeps alpha outside the tensors (in a LoraConfig), so it is folded
    into lora_B (up * alpha / r): every reader then computes the same W' with its default alpha = r.
    `metadata`: more header entries (a training run's, train/metadata.py)."""
    table, tensors = layers(config), {}
    for name, f in lora_layers.items():
        layer = table[name]
        cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)
        tensors[f"{layer.diffusers}.lora_A.weight"] = cast(f.down.detach())
        tensors[f"{layer.diffusers}.lora_B.weight"] = cast(f.up.detach() * f.scale())
    write_safetensors(str(path), tensors, {**(metadata or {}), "format": "pt"})
