"""The diffusers folder layout (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

diffusers renamed every module of the LDM U-Net and VAE. The maps below are generated from the config with
loops that walk the networks in the same order as their constructors do: each entry pairs a module prefix in
minisd/LDM naming with the diffusers prefix; parameter names inside a module are unchanged unless a more
specific entry says otherwise (the ResBlock rows). Keys are renamed by the longest matching prefix.

The text encoder folder is transformers' CLIPTextModel (text.py converts it). For SD2 diffusers ships only the
23 layers SD2 uses, so the folder has no OpenCLIP 24th layer; nothing else is lost.
"""
import dataclasses
import json
import os
from pathlib import Path

from minisd.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from . import text
from .io import CheckpointError, LazyState, Tensors, read_checkpoint, write_safetensors

# LDM ResBlock -> diffusers ResnetBlock2D, inside one block
UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
               ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]


def unet_table(cfg: UNetConfig):
    """[(LDM prefix, diffusers prefix)] for every module of the U-Net, in the order data flows."""
    def resnet(ldm, diff):
        return [(ldm, diff)] + [(f"{ldm}.{a}", f"{diff}.{b}") for a, b in UNET_RESNET]

    rows = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
            ("input_blocks.0.0", "conv_in")]
    levels = len(cfg.channel_mult)
    n = 1
    for level in range(levels):                                  # encoder half: input_blocks
        attention = 2 ** level in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks):
            rows += resnet(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}")
            if attention:
                rows.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}"))
            n += 1
        if level != levels - 1:
            rows.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            n += 1
    rows += resnet("middle_block.0", "mid_block.resnets.0")
    rows.append(("middle_block.1", "mid_block.attentions.0"))
    rows += resnet("middle_block.2", "mid_block.resnets.1")
    n = 0
    for i, level in enumerate(reversed(range(levels))):         # decoder half: output_blocks, deepest first
        attention = 2 ** level in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks + 1):
            rows += resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
            if attention:
                rows.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}"))
            if level != 0 and j == cfg.num_res_blocks:           # the upsample follows the level's last block
                rows.append((f"output_blocks.{n}.{2 if attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
            n += 1
    rows += [("out.0", "conv_norm_out"), ("out.2", "conv_out")]
    return rows


# LDM AttnBlock (1x1 convs q, k, v, proj_out) -> diffusers Attention (Linear to_q, to_k, to_v, to_out.0)
VAE_ATTENTION = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
# Names of older diffusers VAE files (diffusers still reads them): query/key/value/proj_attn
VAE_ATTENTION_LEGACY = [("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "proj_attn")]


def vae_table(cfg: VAEConfig):
    """[(LDM prefix, diffusers prefix)] for every module of the autoencoder."""
    def resnet(ldm, diff):
        return [(ldm, diff), (f"{ldm}.nin_shortcut", f"{diff}.conv_shortcut")]

    def mid(part):
        return (resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
                + [(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}") for a, b in VAE_ATTENTION]
                + resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1"))

    levels = len(cfg.ch_mult)
    rows = [("encoder.conv_in", "encoder.conv_in")]
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            rows += resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != levels - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    rows += mid("encoder")
    rows += [("encoder.norm_out", "encoder.conv_norm_out"), ("encoder.conv_out", "encoder.conv_out"),
             ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
             ("decoder.conv_in", "decoder.conv_in")]
    rows += mid("decoder")
    for level in reversed(range(levels)):       # LDM numbers decoder levels from the top, diffusers from the bottom
        i = levels - 1 - level
        for j in range(cfg.num_res_blocks + 1):
            rows += resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if level != 0:
            rows.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    rows += [("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out")]
    return rows


def rename(key, table):
    """Rename `key` by the longest prefix of it found in `table` (a dict); KeyError if none matches."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in table:
            return table[prefix] + "." + ".".join(parts[i:])
    raise KeyError(key)


def _ldm_name(key, inverse, where):
    """`key`'s LDM name by the diffusers -> LDM table `inverse`; a key the table has no row for is one
    CheckpointError naming `where` (the folder or file)."""
    try:
        return rename(key, inverse)
    except KeyError:
        raise CheckpointError(f"{where}: unexpected key {key!r} (not in the diffusers -> LDM map for this "
                              "config)") from None


def _is_vae_attention_weight(diffusers_key):
    return ".mid_block.attentions.0.to_" in diffusers_key and diffusers_key.endswith("weight")


def _to_linear(w):      # (C, C, 1, 1) 1x1 conv -> (C, C) linear: the same matrix
    return w.reshape(w.shape[0], w.shape[1]) if w.dim() == 4 else w


def _to_conv(w):
    return w.reshape(*w.shape, 1, 1) if w.dim() == 2 else w


# ---------------------------------------------------------------------------------------------------------
# configs (config.json of each component) <-> minisd configs

def unet_config_json(cfg: UNetConfig, image_size):
    levels = len(cfg.channel_mult)
    attention = [2 ** i in cfg.attention_resolutions for i in range(levels)]
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    # diffusers' attention_head_dim is (for SD) the number of heads per level; SD2's fixed head width of 64
    # becomes a per-level list.
    heads = [w // cfg.num_head_channels for w in widths] if cfg.num_head_channels > 0 else cfg.num_heads
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": image_size // 8,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cfg.context_dim, "attention_head_dim": heads,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": cfg.transformer_depth, "norm_num_groups": cfg.norm_groups,
        "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
        "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "upcast_attention": cfg.upcast_attention,
    }


def unet_config_from_json(c):
    widths = c["block_out_channels"]
    heads = c.get("num_attention_heads") or c["attention_head_dim"]
    depth = c.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        depth = depth[0]
    if isinstance(heads, int):
        head_args = dict(num_heads=heads)
    else:
        dims = {w // h for w, h in zip(widths, heads)}
        if len(dims) != 1:
            raise CheckpointError(f"unet/config.json: heads {heads} are neither fixed in number nor in width")
        head_args = dict(num_head_channels=dims.pop())
    return UNetConfig(in_channels=c["in_channels"], out_channels=c["out_channels"], model_channels=widths[0],
                      channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=c["layers_per_block"],
                      # listed from the lowest resolution up, as LDM's configs do: (4, 2, 1)
                      attention_resolutions=tuple(2 ** i for i, t in reversed(list(enumerate(c["down_block_types"])))
                                                  if t.startswith("CrossAttn")),
                      transformer_depth=depth, context_dim=c["cross_attention_dim"],
                      use_linear_in_transformer=c.get("use_linear_projection", False),
                      norm_groups=c.get("norm_num_groups", 32),
                      # SD2 (1024-wide text) upcasts whatever the folder says: 2.1-base's config leaves it off
                      upcast_attention=bool(c.get("upcast_attention")) or c["cross_attention_dim"] == 1024,
                      **head_args)


def vae_config_json(cfg: VAEConfig, image_size):
    n = len(cfg.ch_mult)
    if cfg.embed_dim != cfg.z_channels:
        raise CheckpointError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups, "act_fn": "silu",
        "sample_size": image_size, "scaling_factor": cfg.scale_factor,
    }


def vae_config_from_json(c):
    widths = c["block_out_channels"]
    return VAEConfig(in_channels=c["in_channels"], out_ch=c["out_channels"], ch=widths[0],
                     ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=c["layers_per_block"],
                     z_channels=c["latent_channels"], embed_dim=c["latent_channels"],
                     scale_factor=c.get("scaling_factor", 0.18215), norm_groups=c.get("norm_num_groups", 32))


def text_config_json(cfg: TextConfig, pad_id):
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.width, "intermediate_size": 4 * cfg.width, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "hidden_act": cfg.activation, "projection_dim": cfg.width,
        "layer_norm_eps": 1e-05, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": pad_id,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    }


def text_config_from_json(c, pad_id):
    gelu = c["hidden_act"] == "gelu"   # OpenCLIP-H (SD2); OpenAI CLIP uses quick_gelu
    return TextConfig(vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
                      width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                      activation=c["hidden_act"], pad_id=pad_id,
                      source_layers=c["num_hidden_layers"] + (1 if gelu else 0))


def scheduler_config_json(cfg: ModelConfig):
    return {"_class_name": "PNDMScheduler" if cfg.prediction == "eps" else "DDIMScheduler",
            "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": "scaled_linear",
            "num_train_timesteps": cfg.num_timesteps,
            "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[cfg.prediction],
            "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


def model_index_json(cfg: ModelConfig):
    return {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
            "safety_checker": [None, None], "requires_safety_checker": False, "image_encoder": [None, None],
            "scheduler": ["diffusers", scheduler_config_json(cfg)["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


# ---------------------------------------------------------------------------------------------------------
# reading and writing a folder

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")


def is_diffusers(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "unet", "config.json"))


def _json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a diffusers folder needs it)") from None


def _weights(folder):
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_checkpoint(path)
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES[:4])}, ...)")


def read_prediction(folder):
    """'eps' / 'v' from scheduler/scheduler_config.json, or None if the folder does not say."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    kind = _json(path).get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{path}: prediction_type {kind!r} is not supported (epsilon or v_prediction)")
    return "eps" if kind == "epsilon" else "v"


def read_config(folder, name="custom", prediction="eps"):
    """ModelConfig from a diffusers folder's config.json files."""
    unet = _json(os.path.join(folder, "unet", "config.json"))
    vae = _json(os.path.join(folder, "vae", "config.json"))
    te = _json(os.path.join(folder, "text_encoder", "config.json"))
    pad_id = 49407
    tok = os.path.join(folder, "tokenizer", "tokenizer_config.json")
    if os.path.isfile(tok) and _json(tok).get("pad_token") == "!":   # SD2's tokenizer pads with "!" (id 0)
        pad_id = 0
    kwargs = {}
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):
        s = _json(sched)
        kwargs = dict(beta_start=s.get("beta_start", 0.00085), beta_end=s.get("beta_end", 0.012),
                      num_timesteps=s.get("num_train_timesteps", 1000))
    text = text_config_from_json(te, pad_id)
    unet_cfg = unet_config_from_json(unet)
    if text.activation == "gelu":       # OpenCLIP: the SD2 family, whose attention runs in fp32 (as for LDM files)
        unet_cfg = dataclasses.replace(unet_cfg, upcast_attention=True)
    return ModelConfig(name=name, text=text, unet=unet_cfg,
                       vae=vae_config_from_json(vae), prediction=prediction,
                       image_size=8 * unet.get("sample_size", 64), **kwargs)


def from_diffusers(folder, cfg: ModelConfig):
    """minisd's state (lazy) from a diffusers folder."""
    state = LazyState()
    te = _weights(os.path.join(folder, "text_encoder"))
    ours, unused = text.from_transformers({k: te.pop(k) for k in list(te)}, cfg.text)
    ours, unused = Tensors(ours), Tensors(unused)
    for k in ours:
        state.add("text_encoder." + k, ours, k)
    for k in unused:
        state.add("extra.text_encoder." + k, unused, k)
    inverse = {diff: ldm for ldm, diff in unet_table(cfg.unet)}
    weights = _weights(os.path.join(folder, "unet"))
    for k in weights:
        state.add("unet." + _ldm_name(k, inverse, f"{folder}/unet"), weights, k)
    add_vae(state, _weights(os.path.join(folder, "vae")), cfg.vae, "vae.", f"{folder}/vae")
    return state


def add_vae(state, weights, cfg: VAEConfig, prefix, where):
    """Add a diffusers AutoencoderKL state dict `weights` to the LazyState `state` under LDM names + `prefix`.
    Its attention layers are Linear, LDM's are 1x1 convs (the same matrices). where: the file, for errors."""
    inverse = {diff: ldm for ldm, diff in vae_table(cfg)}
    for i in ("encoder", "decoder"):
        inverse.update({f"{i}.mid_block.attentions.0.{old}": f"{i}.mid.attn_1.{a}" for a, old in VAE_ATTENTION_LEGACY})
    for k in weights:
        name = _ldm_name(k, inverse, where)
        conv = ".mid.attn_1." in name and name.endswith("weight") and ".norm." not in name
        state.add(prefix + name, weights, k, _to_conv if conv else None)


def write_diffusers(state, cfg: ModelConfig, folder, vocab_files):
    """Write a diffusers folder. `vocab_files` = (vocab.json text, merges.txt text) for tokenizer/."""
    folder = Path(folder)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    def dump(obj, path):
        (folder / path).write_text(json.dumps(obj, indent=2) + "\n")

    dump(model_index_json(cfg), "model_index.json")
    dump(unet_config_json(cfg.unet, cfg.image_size), "unet/config.json")
    dump(vae_config_json(cfg.vae, cfg.image_size), "vae/config.json")
    dump(text_config_json(cfg.text, cfg.text.pad_id), "text_encoder/config.json")
    dump(scheduler_config_json(cfg), "scheduler/scheduler_config.json")
    pad = "<|endoftext|>" if cfg.text.pad_id == 49407 else "!"
    dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": cfg.text.context_length,
          "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
          "pad_token": pad, "do_lower_case": True}, "tokenizer/tokenizer_config.json")
    dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
          "pad_token": pad}, "tokenizer/special_tokens_map.json")
    (folder / "tokenizer" / "vocab.json").write_text(vocab_files[0])
    (folder / "tokenizer" / "merges.txt").write_text(vocab_files[1])

    ours = {k[len("text_encoder."):]: state[k] for k in state if k.startswith("text_encoder.")}
    write_safetensors(folder / "text_encoder" / "model.safetensors", text.to_transformers(ours),
                      {"format": "pt"})
    del ours
    for part, table in (("unet", unet_table(cfg.unet)), ("vae", vae_table(cfg.vae))):
        table = dict(table)
        out = {}
        for k in state:
            if k.startswith(part + "."):
                name = rename(k[len(part) + 1:], table)
                out[name] = _to_linear(state[k]) if part == "vae" and _is_vae_attention_weight(name) else state[k]
        write_safetensors(folder / part / "diffusion_pytorch_model.safetensors", out, {"format": "pt"})
        del out
