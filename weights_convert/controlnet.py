"""ControlNet files: the official ControlNet 1.0 and 1.1 layouts and the diffusers folder, both ways.

    1.0   control_sd15_canny.pth            a whole cldm model: the ControlNet under `control_model.`, beside the
                                            SD model it was trained with (model.diffusion_model.*, ...), unused
    1.1   control_v11p_sd15_canny.pth       the ControlNet alone, cldm's names without a prefix; also
          (.safetensors, fp16 variants)     SD 2.1 ControlNets (thibaud/controlnet-sd21) in this layout
    diffusers  config.json + diffusion_pytorch_model.safetensors (or .bin): ControlNetModel.save_pretrained

minisd's ControlNet (minisd/controlnet.py) has cldm's names, so 1.0 and 1.1 only add or drop the prefix. The
diffusers names are the U-Net's (diffusers.unet_table, its encoder rows) plus the rows below for the hint encoder
and the zero convolutions. SD2 differs only in shapes (1024-wide text, Linear proj_in/proj_out: the same in every
layout) and in the heads, which no file records: they come from the model the ControlNet is added to.
"""
import dataclasses
import json
import os

from minisd.config import ControlNetConfig, ModelConfig
from . import diffusers
from .io import CheckpointError, read_checkpoint, write_safetensors

PREFIX_1_0 = "control_model."
CONFIG = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
ENCODER = ("time_embed.", "input_blocks.", "middle_block.")      # the U-Net rows a ControlNet has


def table(cfg: ControlNetConfig):
    """[(minisd/cldm prefix, diffusers prefix)] for every module of the ControlNet, in the order data flows."""
    rows = [(ours, theirs) for ours, theirs in diffusers.unet_table(cfg.unet) if ours.startswith(ENCODER)]
    n = len(cfg.hint_channels)
    rows.append(("input_hint_block.0", "controlnet_cond_embedding.conv_in"))
    rows += [(f"input_hint_block.{2 + 2 * j}", f"controlnet_cond_embedding.blocks.{j}") for j in range(2 * (n - 1))]
    rows.append((f"input_hint_block.{4 * n - 2}", "controlnet_cond_embedding.conv_out"))
    blocks = 1 + len(cfg.unet.channel_mult) * (cfg.unet.num_res_blocks + 1) - 1
    rows += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(blocks)]
    rows.append(("middle_block_out.0", "controlnet_mid_block"))
    return rows


def to_diffusers(state, cfg: ControlNetConfig):
    """minisd/1.1 names -> diffusers names (the same tensors)."""
    t = dict(table(cfg))
    return {diffusers.rename(k, t): v for k, v in state.items()}


def from_diffusers(state, cfg: ControlNetConfig, source="file"):
    t = {theirs: ours for ours, theirs in table(cfg)}
    out = {}
    for k, v in state.items():
        try:
            out[diffusers.rename(k, t)] = v
        except KeyError:
            raise CheckpointError(f"{source}: unexpected ControlNet key {k!r} (not in the diffusers -> cldm map "
                                  f"for this config)") from None
    return out


def to_ldm(state, version="1.1"):
    """minisd names -> the 1.1 file's (the same) or the 1.0 file's (under `control_model.`)."""
    prefix = {"1.0": PREFIX_1_0, "1.1": ""}[version]
    return {prefix + k: v for k, v in state.items()}


def from_ldm(state):
    """A 1.0 or 1.1 state dict -> minisd names. A 1.0 file's other keys (the SD model it was trained with) are
    not the ControlNet's and are left out."""
    if any(k.startswith(PREFIX_1_0) for k in state):
        return {k[len(PREFIX_1_0):]: state[k] for k in state if k.startswith(PREFIX_1_0)}
    return dict(state)


def config_json(cfg: ControlNetConfig):
    """diffusers' ControlNetModel config.json for `cfg`: the U-Net's down half, and the hint encoder."""
    unet = diffusers.unet_config_json(cfg.unet, 512)
    keep = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "transformer_layers_per_block", "norm_num_groups",
            "act_fn", "downsample_padding", "flip_sin_to_cos", "freq_shift", "mid_block_scale_factor", "norm_eps",
            "upcast_attention")
    return {"_class_name": "ControlNetModel", **{k: unet[k] for k in keep},
            "conditioning_channels": cfg.conditioning_channels,
            "conditioning_embedding_out_channels": list(cfg.hint_channels),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


def check_fits(cfg: ControlNetConfig, model_cfg: ModelConfig, what="ControlNet"):
    """A one-line ValueError when a ControlNet cannot be added to this model's U-Net."""
    u, m = cfg.unet, model_cfg.unet
    if u.context_dim != m.context_dim:
        raise ValueError(f"{what} is for a {u.context_dim}-wide text encoder, this model's is {m.context_dim}-wide "
                         "(768: SD 1.x, 1024: SD 2.x): it was made for another model family")
    if (u.model_channels, u.channel_mult, u.num_res_blocks) != (m.model_channels, m.channel_mult, m.num_res_blocks):
        raise ValueError(f"{what}'s encoder ({u.model_channels} channels x {u.channel_mult}, {u.num_res_blocks} "
                         f"blocks a level) does not fit the model's U-Net ({m.model_channels} x {m.channel_mult}, "
                         f"{m.num_res_blocks})")
    factor = 2 ** (len(cfg.hint_channels) - 1)
    if factor != 2 ** (len(model_cfg.vae.ch_mult) - 1):
        raise ValueError(f"{what}'s hint encoder downsamples by {factor}, the model's VAE by "
                         f"{2 ** (len(model_cfg.vae.ch_mult) - 1)}")


# ---------------------------------------------------------------------------------------------------------------
# reading a file or folder

def _read_diffusers_folder(folder):
    with open(os.path.join(folder, CONFIG)) as f:
        c = json.load(f)
    if c.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{folder}: config.json is a {c['_class_name']}, not a ControlNetModel")
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return read_checkpoint(os.path.join(folder, name)), c
    raise CheckpointError(f"{folder}: no ControlNet weights (looked for {', '.join(WEIGHT_FILES)})")


def _infer(shapes, model_cfg: ModelConfig, source):
    """The ControlNetConfig a state dict (minisd names -> shapes) was built at, as far as check_fits needs it: its
    text width, channels and hint encoder (the hint convs at 0, 4, 8 ... set the widths); the rest is the
    model's, and a file that differs there fails the shape check that follows."""
    if "input_blocks.0.0.weight" not in shapes or "input_hint_block.0.weight" not in shapes:
        raise CheckpointError(f"{source}: not a ControlNet (no input_blocks.0.0.weight / input_hint_block.0.weight)")
    to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    hint = [shapes[f"input_hint_block.{i}.weight"][0] for i in range(0, 64, 4) if f"input_hint_block.{i}.weight"
            in shapes]
    unet = dataclasses.replace(model_cfg.unet, model_channels=shapes["input_blocks.0.0.weight"][0],
                               in_channels=shapes["input_blocks.0.0.weight"][1],
                               context_dim=to_k[1] if to_k else model_cfg.unet.context_dim)
    return ControlNetConfig(unet, tuple(hint), shapes["input_hint_block.0.weight"][1])


def read(path, model_cfg: ModelConfig):
    """(ControlNetConfig, state in minisd names) of a ControlNet file or folder, checked to fit `model_cfg` (a
    one-line ValueError otherwise), tensors as stored; minisd.controlnet.load_controlnet checks every shape."""
    path = str(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CONFIG)):
            raise CheckpointError(f"{path}: a folder without config.json is not a diffusers ControlNet")
        sd, c = _read_diffusers_folder(path)
        cfg = ControlNetConfig(diffusers.unet_config_from_json({**c, "out_channels": c["in_channels"]}),
                               tuple(c.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                               c.get("conditioning_channels", 3))
        check_fits(cfg, model_cfg, f"ControlNet {path}")
        state = from_diffusers(sd, dataclasses.replace(cfg, unet=model_cfg.unet), path)
    else:
        sd = read_checkpoint(path)
        if any(k.startswith("controlnet_cond_embedding.") for k in sd):     # a diffusers file on its own
            state = from_diffusers(sd, ControlNetConfig.for_model(model_cfg), path)
        else:
            state = from_ldm(sd)
    cfg = _infer({k: tuple(v.shape) for k, v in state.items()}, model_cfg, path)
    check_fits(cfg, model_cfg, f"ControlNet {path}")
    return dataclasses.replace(cfg, unet=model_cfg.unet), state


def write(state, cfg: ControlNetConfig, path, layout="1.1", metadata=None):
    """Write a ControlNet's state (minisd names) as a 1.1 / 1.0 `.safetensors` file or a diffusers folder
    (layout="diffusers": config.json + diffusion_pytorch_model.safetensors), each file atomically. `metadata`
    ({str: str}, e.g. a training run's) goes into the single file's header."""
    path = str(path)
    if layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        _atomic(os.path.join(path, WEIGHT_FILES[0]),
                lambda tmp: write_safetensors(tmp, to_diffusers(state, cfg), {"format": "pt"}))
        text = json.dumps(config_json(cfg), indent=2) + "\n"
        _atomic(os.path.join(path, CONFIG), lambda tmp: open(tmp, "w").write(text))
    else:
        _atomic(path, lambda tmp: write_safetensors(tmp, to_ldm(state, layout), metadata))


def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
