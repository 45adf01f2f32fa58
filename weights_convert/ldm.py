"""The original single-file layout (CompVis/Stability `v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.ckpt`).

The file is the state dict of LDM's `LatentDiffusion` training module:

    model.diffusion_model.*            the U-Net             -> minisd `unet.*` (same names: minisd's U-Net
                                                                mirrors LDM's UNetModel)
    first_stage_model.*                the KL autoencoder    -> `vae.*` (same names)
    cond_stage_model.transformer.*     SD1: transformers' CLIPTextModel   -> `text_encoder.*` via text.py
    cond_stage_model.model.*           SD2: open_clip's text tower        -> `text_encoder.*` via text.py
    betas, alphas_cumprod, ...         the noise schedule the trainer registered (derived data)
    model_ema.*                        full (non-pruned) files: EMA copies of the U-Net, keys without dots

Everything minisd does not use (schedule buffers, EMA copies not asked for, CLIP's projection head, OpenCLIP's
unused 24th layer, position_ids) is kept under `extra.<original key>` so that ldm -> minisd -> ldm gives back
every tensor unchanged.
"""
import numpy as np
import torch

from minisd.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from . import text
from .io import CheckpointError, LazyState, Tensors

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."   # + transformers CLIPTextModel names (text_model.*)
SD2_TEXT = "cond_stage_model.model."         # + open_clip names
EMA = "model_ema."
# Buffers LDM's DDPM.register_schedule stores (ldm/models/diffusion/ddpm.py); LatentDiffusion may add scale_factor.
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2")
OTHER_BUFFERS = ("scale_factor", "logvar")


def ema_key(unet_key):
    """`input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight` (LitEma drops the dots)."""
    return EMA + ("diffusion_model." + unet_key).replace(".", "")


def is_ldm(keys):
    return any(k.startswith(UNET) for k in keys)


def uses_open_clip(keys):
    """SD2 files carry OpenCLIP-H under cond_stage_model.model.*; SD1 files carry transformers' CLIP."""
    return any(k.startswith(SD2_TEXT) for k in keys)


# ---------------------------------------------------------------------------------------------------------
# Reading the config off the tensor shapes (no config file needed for SD1.5/2.1 or for small test models)

def _count(keys, fmt):
    n = 0
    while fmt.format(n) in keys:
        n += 1
    return n


def infer_unet_config(t, open_clip):
    """UNetConfig from `model.diffusion_model.*` shapes. Heads are not in any shape: SD2 (OpenCLIP) models use
    64 channels per head (num_head_channels=64), SD1 models 8 heads (the values of the official configs)."""
    keys = set(t)
    shape = lambda k: t.shape(UNET + k)
    ch = shape("input_blocks.0.0.weight")[0]
    mult, attention, blocks_per_level = [], [], []
    n, level, blocks = 1, 0, 0
    depth, context_dim, linear = 1, 768, False
    while UNET + f"input_blocks.{n}.0.in_layers.2.weight" in keys or UNET + f"input_blocks.{n}.0.op.weight" in keys:
        if UNET + f"input_blocks.{n}.0.op.weight" in keys:      # a downsample closes the level
            blocks_per_level.append(blocks)
            level, blocks = level + 1, 0
        else:
            out = shape(f"input_blocks.{n}.0.in_layers.2.weight")[0]
            if blocks == 0:
                mult.append(out // ch)
            if UNET + f"input_blocks.{n}.1.proj_in.weight" in keys and 2 ** level not in attention:
                attention.append(2 ** level)
                depth = _count(keys, UNET + f"input_blocks.{n}.1.transformer_blocks.{{}}.norm1.weight")
                context_dim = shape(f"input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight")[1]
                linear = len(shape(f"input_blocks.{n}.1.proj_in.weight")) == 2
            blocks += 1
        n += 1
    blocks_per_level.append(blocks)
    if len(set(blocks_per_level)) != 1:
        raise CheckpointError(f"U-Net levels have different numbers of res blocks {blocks_per_level}")
    heads = dict(num_head_channels=64) if open_clip else dict(num_heads=8)
    # SD2 (OpenCLIP) computes attention in fp32 under fp16 weights, as LDM's code and diffusers do
    return UNetConfig(in_channels=shape("input_blocks.0.0.weight")[1], out_channels=shape("out.2.weight")[0],
                      model_channels=ch, channel_mult=tuple(mult), num_res_blocks=blocks_per_level[0],
                      attention_resolutions=tuple(sorted(attention, reverse=True)),   # LDM order: (4, 2, 1)
                      transformer_depth=depth, context_dim=context_dim, use_linear_in_transformer=linear,
                      upcast_attention=open_clip, **heads)


def infer_vae_config(t, prefix=VAE, scale_factor=0.18215):
    keys = set(t)
    shape = lambda k: t.shape(prefix + k)
    ch = shape("encoder.conv_in.weight")[0]
    levels = _count(keys, prefix + "encoder.down.{}.block.0.conv1.weight")
    return VAEConfig(in_channels=shape("encoder.conv_in.weight")[1], out_ch=shape("decoder.conv_out.weight")[0],
                     ch=ch, ch_mult=tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch
                                          for i in range(levels)),
                     num_res_blocks=_count(keys, prefix + "encoder.down.0.block.{}.conv1.weight"),
                     z_channels=shape("decoder.conv_in.weight")[1], embed_dim=shape("quant_conv.weight")[0] // 2,
                     scale_factor=scale_factor)


def infer_text_config(t, open_clip):
    """TextConfig from shapes. Heads: both CLIP-L and OpenCLIP-H use 64 channels per head."""
    keys = set(t)
    if open_clip:
        p = SD2_TEXT
        vocab, width = t.shape(p + "token_embedding.weight")
        source = _count(keys, p + "transformer.resblocks.{}.ln_1.weight")
        # SD2 conditions on the penultimate layer, so the last one is never computed (config.py, TextConfig)
        return TextConfig(vocab_size=vocab, context_length=t.shape(p + "positional_embedding")[0], width=width,
                          layers=source - 1, heads=width // 64, activation="gelu", pad_id=0, source_layers=source)
    p = SD1_TEXT + ("text_model." if SD1_TEXT + "text_model.embeddings.token_embedding.weight" in keys else "")
    vocab, width = t.shape(p + "embeddings.token_embedding.weight")
    layers = _count(keys, p + "encoder.layers.{}.layer_norm1.weight")
    return TextConfig(vocab_size=vocab, context_length=t.shape(p + "embeddings.position_embedding.weight")[0],
                      width=width, layers=layers, heads=width // 64, activation="quick_gelu", pad_id=49407,
                      source_layers=layers)


def infer_config(t, name="custom", prediction="eps", image_size=512, scale_factor=0.18215):
    """A ModelConfig from the shapes (and schedule buffers) of an LDM state dict."""
    open_clip = uses_open_clip(t)
    schedule = {}
    if "betas" in t:
        betas = t["betas"].double()
        # LDM's "linear" schedule is linspace(sqrt(start), sqrt(end))**2, so the ends are beta_start, beta_end
        schedule = dict(num_timesteps=len(betas), beta_start=float(f"{betas[0].item():.6g}"),
                        beta_end=float(f"{betas[-1].item():.6g}"))
    return ModelConfig(name=name, text=infer_text_config(t, open_clip), unet=infer_unet_config(t, open_clip),
                       vae=infer_vae_config(t, scale_factor=scale_factor), prediction=prediction,
                       image_size=image_size, **schedule)


def schedule_buffers(cfg: ModelConfig):
    """The buffers LDM's DDPM.register_schedule computes (float64 numpy, stored as float32), for files we write."""
    betas = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)     # DDPM eq. 7, beta tilde
    values = dict(
        betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac), log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------------
# LDM state dict <-> minisd state (`text_encoder.*`, `unet.*`, `vae.*`, `extra.*`)

def from_ldm(t, cfg: ModelConfig, ema=False, log=print):
    """minisd's state (lazy) from an LDM state dict `t` (a Tensors/SafetensorsFile).

    ema=True takes the U-Net from `model_ema.*` (the non-EMA U-Net is then kept under `extra.`); returns
    (state, used_ema).
    """
    keys = list(t)
    state = LazyState()
    unknown = [k for k in keys if not (k.startswith((UNET, VAE, SD1_TEXT, SD2_TEXT, EMA))
                                       or k in SCHEDULE or k in OTHER_BUFFERS)]
    if unknown:
        raise CheckpointError(f"unexpected key {unknown[0]!r} in an LDM checkpoint ({len(unknown)} such keys); "
                              "expected only model.diffusion_model.*, first_stage_model.*, cond_stage_model.*, "
                              "model_ema.* and schedule buffers")

    # Text encoder: the conversion concatenates/splits tensors, so this small part is materialized (first,
    # while the rest of the model is not loaded yet).
    prefix = SD2_TEXT if uses_open_clip(keys) else SD1_TEXT
    source = {k[len(prefix):]: t.pop(k) for k in keys if k.startswith(prefix)}
    if prefix == SD2_TEXT:
        ours, unused = text.from_open_clip(source, cfg.text)
    else:
        ours, unused = text.from_transformers(source, cfg.text)
    del source
    ours, unused = Tensors(ours), Tensors(unused)
    for k in ours:
        state.add("text_encoder." + k, ours, k)
    for k in unused:
        state.add("extra." + prefix + k, unused, k)
    other_text = [k for k in keys if k.startswith((SD1_TEXT, SD2_TEXT)) and not k.startswith(prefix)]
    if other_text:
        raise CheckpointError(f"unexpected key {other_text[0]!r}: the file holds text encoder keys of both SD1 "
                              f"({SD1_TEXT}*) and SD2 ({SD2_TEXT}*)")

    unet_keys = [k[len(UNET):] for k in keys if k.startswith(UNET)]
    used_ema = ema and all(ema_key(k) in t for k in unet_keys)
    if ema and not used_ema:
        log("minisd: no EMA weights (model_ema.*) in this file; using model.diffusion_model.* "
              "(in '-emaonly' / '-ema-pruned' files those already are the EMA weights)")
    for k in unet_keys:
        if used_ema:
            state.add("unet." + k, t, ema_key(k))
            state.add("extra." + UNET + k, t, UNET + k)
        else:
            state.add("unet." + k, t, UNET + k)
    consumed = {ema_key(k) for k in unet_keys} if used_ema else set()
    for k in keys:
        if k.startswith(VAE):
            state.add("vae." + k[len(VAE):], t, k)
        elif not k.startswith((UNET, SD1_TEXT, SD2_TEXT)) and k not in consumed:
            state.add("extra." + k, t, k)       # schedule buffers, EMA copies not used
    return state, used_ema


def to_ldm(state, cfg: ModelConfig, used_ema=False):
    """An LDM state dict (name -> tensor) from minisd's state. The inverse of from_ldm, extras included."""
    out = {}
    extra = {k[len("extra."):]: k for k in state if k.startswith("extra.")}
    ours = {k[len("text_encoder."):]: state[k] for k in state if k.startswith("text_encoder.")}
    if cfg.text.activation == "gelu":      # OpenCLIP (SD2) text tower; OpenAI CLIP (SD1) uses quick_gelu
        prefix, theirs = SD2_TEXT, text.to_open_clip(ours)
    else:
        prefix, theirs = SD1_TEXT, text.to_transformers(ours)
    del ours
    for k, v in theirs.items():
        out[prefix + k] = v
    for k in state:
        if k.startswith("unet."):
            out[ema_key(k[5:]) if used_ema else UNET + k[5:]] = state[k]
    for k in state:
        if k.startswith("vae."):
            out[VAE + k[4:]] = state[k]
    if "betas" not in extra:    # files minisd did not read from LDM get the buffers LDM would have stored
        out.update(schedule_buffers(cfg))
    for k, name in extra.items():
        if k in out:
            raise CheckpointError(f"extra tensor {name!r} collides with a model tensor")
        out[k] = state[name]
    return out
