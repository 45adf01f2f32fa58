"""minisd's own layout: one .safetensors file holding `text_encoder.*`, `unet.*`, `vae.*` (the state_dict of
minisd.model.StableDiffusion), `extra.*` (tensors of the source checkpoint minisd does not use, kept so that a
conversion back is lossless), and the ModelConfig as JSON in the file's metadata.
"""
import dataclasses
import json

from minisd.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .io import CheckpointError, LazyState, SafetensorsFile, write_safetensors

FORMAT = "minisd"


def config_to_json(cfg: ModelConfig):
    return json.dumps(dataclasses.asdict(cfg))


def config_from_json(s):
    """The inverse of config_to_json (JSON lists become the tuples the dataclasses hold)."""
    d = json.loads(s)
    if "unet" in d and "upcast_attention" not in d["unet"]:      # written before the field existed: SD2 upcasts
        d["unet"]["upcast_attention"] = d["unet"].get("context_dim") == 1024
    tuples = lambda sub: {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
    try:
        return ModelConfig(**{**d, "text": TextConfig(**d["text"]), "unet": UNetConfig(**tuples(d["unet"])),
                              "vae": VAEConfig(**tuples(d["vae"]))})
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"the ModelConfig stored in the file does not fit this minisd ({e})") from None


def is_native(path):
    return str(path).endswith(".safetensors") and SafetensorsFile(path).metadata.get("format") == FORMAT


def read_native(path):
    """(config, state, used_ema) of a minisd file; the state is lazy (tensors are read when popped)."""
    f = SafetensorsFile(path)
    if f.metadata.get("format") != FORMAT or "config" not in f.metadata:
        raise CheckpointError(f"{path}: not a minisd file (no 'format': 'minisd' and config in its metadata)")
    state = LazyState()
    for k in f:
        state.add(k, f, k)
    return config_from_json(f.metadata["config"]), state, f.metadata.get("unet_from") == "model_ema"


def write_native(path, tensors, cfg: ModelConfig, used_ema=False):
    """`tensors`: name -> tensor in minisd naming (a state_dict, plus any `extra.*`)."""
    metadata = {"format": FORMAT, "config": config_to_json(cfg)}
    if used_ema:    # the U-Net came from an LDM file's model_ema.* copy: writing LDM puts it back there
        metadata["unet_from"] = "model_ema"
    write_safetensors(path, tensors, metadata)
