"""Which layout is this checkpoint, which model is in it, and what does its U-Net predict?

    layout      minisd file (metadata "format": "minisd") / diffusers folder (unet/config.json) /
                original LDM single file (model.diffusion_model.* keys), .safetensors or .ckpt
    SD1 / SD2   SD2 files carry OpenCLIP-H (`cond_stage_model.model.*`, cross-attention context 1024), SD1 files
                OpenAI CLIP-L (`cond_stage_model.transformer.*`, context 768); diffusers folders say it in
                text_encoder/config.json (hidden_act gelu = OpenCLIP)
    eps / v     nothing in an LDM file says it. In order: a config beside/inside the checkpoint (an LDM yaml
                with the file's stem, `parameterization: "v"`; a diffusers scheduler_config.json
                `prediction_type`; a minisd file's own config), then the `prediction=` argument, then a
                default: eps, except an SD2 file whose name contains "768" or a separate "v"
                (v2-1_768-ema-pruned, sd21-v) is guessed to be v-prediction, and we say that we guessed.
"""
import dataclasses
import os
import re

from minisd.config import PRESETS
from . import diffusers, ldm, native
from .io import CheckpointError, read_checkpoint


@dataclasses.dataclass
class Checkpoint:
    config: object            # minisd.config.ModelConfig
    state: object             # io.LazyState: minisd name -> tensor, read on demand
    layout: str               # "minisd", "diffusers" or "ldm"
    used_ema: bool = False
    tokenizer_folder: str = None


def _yaml_beside(path):
    stem = os.path.splitext(str(path))[0]
    for ext in (".yaml", ".yml"):
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


def read_ldm_yaml(path):
    """(prediction, image_size, scale_factor) from an LDM config yaml (a regex read: pyyaml is not a dependency)."""
    with open(path) as f:
        src = f.read()
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", src, re.M)
    kind = m.group(1) if m else "eps"       # LDM's default parameterization is eps
    if kind not in ("eps", "v"):
        raise CheckpointError(f"{path}: parameterization {kind!r} is not supported (eps or v)")
    m = re.search(r"^\s*image_size:\s*(\d+)", src, re.M)          # latent size, 64 or 96
    s = re.search(r"^\s*scale_factor:\s*([0-9.eE+-]+)", src, re.M)
    return kind, 8 * int(m.group(1)) if m else None, float(s.group(1)) if s else None


def choose_prediction(path, sd2, from_config, argument, source="", log=print):
    """The eps/v decision described in the module docstring; prints how it was made."""
    if argument not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {argument!r}")
    if from_config:
        if argument and argument != from_config:
            log(f"minisd: {source} says {from_config}-prediction; it wins over prediction={argument!r}")
        return from_config, f"from {source}"
    if argument:
        return argument, "as asked"
    stem = os.path.splitext(os.path.basename(str(path).rstrip("/")))[0].lower()
    if sd2 and re.search(r"768|(^|[^a-z0-9])v([^a-z0-9]|$)", stem):
        log(f"minisd: GUESSING v-prediction for {os.path.basename(str(path))!r} (an SD2 model with '768' or 'v' "
              f"in its name); pass prediction='eps' or put the LDM yaml beside the file if that is wrong")
        return "v", "guessed from the file name"
    return "eps", "default"


def _named(cfg, fallback):
    """A preset's name when the config is one of them, otherwise the file's name."""
    for preset in PRESETS.values():
        if dataclasses.replace(cfg, name=preset.name) == preset:
            return cfg if cfg.name == preset.name else dataclasses.replace(cfg, name=preset.name)
    return dataclasses.replace(cfg, name=fallback)


def read(path, prediction=None, ema=False, config=None, verbose=True, log=print):
    """Open any supported checkpoint; returns a Checkpoint whose state is minisd-named and lazy.

    `config` (a ModelConfig) replaces the config read off the file, for LDM files whose head counts differ
    from SD's (they are not in any tensor shape)."""
    path = str(path)
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    if os.path.isdir(path):
        if not diffusers.is_diffusers(path):
            raise CheckpointError(f"{path}: a folder, but not a diffusers model (no unet/config.json)")
        from_config = diffusers.read_prediction(path)
        cfg = diffusers.read_config(path, name=stem)
        pred, how = choose_prediction(path, cfg.text.activation == "gelu", from_config, prediction,
                                      "scheduler/scheduler_config.json", log=log)
        cfg = dataclasses.replace(config or cfg, prediction=pred)
        ckpt = Checkpoint(cfg, diffusers.from_diffusers(path, cfg), "diffusers",
                          tokenizer_folder=os.path.join(path, "tokenizer")
                          if os.path.isfile(os.path.join(path, "tokenizer", "vocab.json")) else None)
        desc = "diffusers folder"
    else:
        tensors = read_checkpoint(path)
        if tensors.metadata.get("format") == native.FORMAT:
            cfg, state, used_ema = native.read_native(path)
            pred, how = choose_prediction(path, False, cfg.prediction, prediction, "the minisd file's config",
                                          log=log)
            ckpt = Checkpoint(dataclasses.replace(config or cfg, prediction=pred), state, "minisd", used_ema)
            desc = "minisd file"
        elif ldm.is_ldm(tensors):
            sd2 = ldm.uses_open_clip(tensors)
            yaml = _yaml_beside(path)
            from_config, image_size, scale = read_ldm_yaml(yaml) if yaml else (None, None, None)
            stored = tensors.metadata.get("minisd_config")      # files minisd wrote carry their config
            if stored and not from_config:
                from_config = native.config_from_json(stored).prediction
            pred, how = choose_prediction(path, sd2, from_config, prediction,
                                          os.path.basename(yaml) if yaml else "the config minisd stored in the file",
                                          log=log)
            if config is not None:
                cfg = config
            elif stored:
                cfg = native.config_from_json(stored)
            else:
                cfg = ldm.infer_config(tensors, name=stem, scale_factor=scale or 0.18215,
                                       image_size=image_size or (768 if sd2 and pred == "v" else 512))
            cfg = dataclasses.replace(cfg, prediction=pred)
            state, used_ema = ldm.from_ldm(tensors, cfg, ema=ema, log=log)
            ckpt = Checkpoint(cfg, state, "ldm", used_ema)
            desc = "original LDM single file"
        else:
            first = next(iter(tensors), None)
            raise CheckpointError(f"{path}: unknown checkpoint layout (first key {first!r}); expected an original "
                                  "SD file (model.diffusion_model.*), a diffusers folder or a minisd file")
    ckpt.config = _named(ckpt.config, ckpt.config.name if ckpt.layout == "minisd" else stem)
    if verbose:
        t = ckpt.config.text
        family = "SD2 (OpenCLIP-H text encoder)" if t.activation == "gelu" else "SD1 (OpenAI CLIP text encoder)"
        log(f"minisd: {path}: {desc}; {family}, text width {t.width}, context {ckpt.config.unet.context_dim}; "
              f"{ckpt.config.prediction}-prediction ({how}); U-Net weights: "
              f"{'EMA (model_ema.*)' if ckpt.used_ema else 'as stored'}"
              f"{'; inpainting (9 input channels)' if ckpt.config.unet.in_channels == 9 else ''}; "
              f"config {ckpt.config.name!r}")
    return ckpt
