"""Random-weight checkpoints in the official layouts, built from the REFERENCE code's module names and shapes.

    write_ldm_checkpoint(path, cfg, seed)     the original single file (LatentDiffusion state dict):
                                              ldm UNetModel, ldm Encoder/Decoder, transformers CLIPTextModel
                                              (SD1) or open_clip's text tower (SD2), LDM's schedule buffers,
                                              optionally the LitEma copy (model_ema.*)
    write_diffusers_config(path, cfg)         model_index.json + each component's config + tokenizer files +
                                              scheduler config (what from_single_file(config=...) needs)
    write_diffusers_folder(path, cfg, seed)   the same plus weights, converted from the LDM file of that seed
                                              by diffusers itself (from_single_file + save_pretrained)
    build_pair(tmp_path_factory, cfg, seed)   minisd's Pipeline and diffusers' pipeline of one such file

Names and shapes come from the reference modules built on the meta device; values are drawn here. Reference
inits zero some output layers (LDM's zero_module), which would let comparisons pass trivially, so every
tensor is redrawn at a sane scale: weights ~ N(0, 1/fan_in), norm gains 1 + N(0, 0.1^2), biases N(0, 0.05^2).
Drawing 10^9 normals takes ~30 s on two cores, so values are slices of one pool of 2^24 normals taken at
random offsets: still distinct for every tensor (a swapped tensor is caught) and cheap at full size.

Test-only: imports ldm, transformers, open_clip, diffusers.
"""
import gzip
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

POOL = 2 ** 24
SD1_PREFIX = "cond_stage_model.transformer.text_model."
SD2_PREFIX = "cond_stage_model.model."


def is_sd2(cfg):
    return cfg.text.activation == "gelu"


class _Draw:
    """Random tensors from one seeded pool (see the module docstring)."""

    def __init__(self, seed, pool=POOL):
        self.g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(pool, generator=self.g)

    def normal(self, shape, std=1.0, mean=0.0, dtype=torch.float32):
        n = math.prod(shape)
        out = torch.empty(n, dtype=dtype)
        i = 0
        while i < n:      # one pass: scaled slices of the pool written straight into the output
            start = int(torch.randint(0, len(self.pool) // 2, (1,), generator=self.g))
            k = min(n - i, len(self.pool) - start)
            torch.mul(self.pool[start:start + k], std, out=out[i:i + k])
            i += k
        return (out.add_(mean) if mean else out).reshape(shape)

    def like(self, name, shape, dtype=torch.float32):
        if len(shape) >= 2:
            return self.normal(shape, 1 / math.sqrt(math.prod(shape[1:])), dtype=dtype)
        if len(shape) == 0:
            return torch.tensor(math.log(1 / 0.07), dtype=dtype)         # open_clip's logit_scale init
        if name.endswith("weight"):                                       # 1-D weights are norm gains
            return self.normal(shape, 0.1, 1.0, dtype=dtype)
        return self.normal(shape, 0.05, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# reference modules (meta device: names and shapes only)

def reference_unet(cfg, device="meta"):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    u = cfg.unet
    with torch.device(device):
        return UNetModel(image_size=32, in_channels=u.in_channels, out_channels=u.out_channels,
                         model_channels=u.model_channels, num_res_blocks=u.num_res_blocks,
                         attention_resolutions=list(u.attention_resolutions), channel_mult=list(u.channel_mult),
                         num_heads=u.num_heads if u.num_head_channels == -1 else -1,
                         num_head_channels=u.num_head_channels, use_spatial_transformer=True,
                         transformer_depth=u.transformer_depth, context_dim=u.context_dim,
                         use_linear_in_transformer=u.use_linear_in_transformer, use_checkpoint=False, legacy=False)


class ReferenceVAE(nn.Module):
    """LDM AutoencoderKL's modules (the class itself would build its LPIPS loss, which downloads weights)."""

    def __init__(self, v):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        dd = dict(ch=v.ch, out_ch=v.out_ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                  attn_resolutions=[], in_channels=v.in_channels, resolution=256, z_channels=v.z_channels,
                  double_z=True, dropout=0.0)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(2 * v.z_channels, 2 * v.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(v.embed_dim, v.z_channels, 1)


def reference_vae(cfg, device="meta"):
    with torch.device(device):
        return ReferenceVAE(cfg.vae)


def reference_text(cfg, device="meta"):
    """SD1: transformers CLIPTextModel; SD2: open_clip CLIP (text tower of ViT-H-14 at the full config)."""
    t = cfg.text
    with torch.device(device):
        if not is_sd2(cfg):
            from transformers import CLIPTextConfig, CLIPTextModel
            return CLIPTextModel(CLIPTextConfig(
                vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=4 * t.width,
                num_hidden_layers=t.source_layers, num_attention_heads=t.heads,
                max_position_embeddings=t.context_length, hidden_act=t.activation, projection_dim=t.width))
        import open_clip
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                        layers=t.source_layers)
        if text_cfg == open_clip.get_model_config("ViT-H-14")["text_cfg"]:
            assert t.width == open_clip.get_model_config("ViT-H-14")["embed_dim"]
        # the vision tower is not part of SD2 checkpoints: a tiny one keeps the meta build cheap
        return CLIP(embed_dim=t.width, vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=64, patch_size=16,
                                                               image_size=32),
                    text_cfg=CLIPTextCfg(**text_cfg))


def text_state_dict(cfg, draw, dtype=torch.float32):
    model = reference_text(cfg)
    if not is_sd2(cfg):
        sd = {SD1_PREFIX + k: draw.like(k, tuple(v.shape), dtype) for k, v in model.state_dict().items()}
        # older transformers saved this buffer, and the official SD1 files have it
        sd[SD1_PREFIX + "embeddings.position_ids"] = torch.arange(cfg.text.context_length)[None]
        return sd
    return {SD2_PREFIX + k: draw.like(k, tuple(v.shape), dtype) for k, v in model.state_dict().items()
            if not k.startswith("visual.")}


def schedule_buffers(cfg):
    """LDM DDPM.register_schedule (ldm/models/diffusion/ddpm.py, v_posterior=0), with LDM's own beta schedule.
    (Copied formulas: importing ddpm.py needs pytorch_lightning.)"""
    import numpy as np
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    betas = make_beta_schedule("linear", cfg.num_timesteps, linear_start=cfg.beta_start, linear_end=cfg.beta_end)
    alphas = 1. - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])
    posterior_variance = betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod)
    b = dict(betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=alphas_cumprod_prev,
             sqrt_alphas_cumprod=np.sqrt(alphas_cumprod), sqrt_one_minus_alphas_cumprod=np.sqrt(1. - alphas_cumprod),
             log_one_minus_alphas_cumprod=np.log(1. - alphas_cumprod),
             sqrt_recip_alphas_cumprod=np.sqrt(1. / alphas_cumprod),
             sqrt_recipm1_alphas_cumprod=np.sqrt(1. / alphas_cumprod - 1),
             posterior_variance=posterior_variance,
             posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
             posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod),
             posterior_mean_coef2=(1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod))
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in b.items()}


class _Views(_Draw):
    """Unscaled N(0, 1) values as views of one pool: no per-tensor work at all, for full-size files whose
    tensors are only compared, never run (forward passes need _Draw's scales)."""

    def __init__(self, seed, dtype):
        super().__init__(seed, 2 ** 26)              # > the largest SD tensor (OpenCLIP-H's token embedding)
        self.pool = self.pool.to(dtype)

    def like(self, name, shape, dtype=None):
        n = math.prod(shape)
        start = int(torch.randint(0, len(self.pool) - n + 1, (1,), generator=self.g))
        return self.pool[start:start + n].view(shape)


def ldm_state_dict(cfg, seed=0, ema=False, dtype=torch.float32, views=False):
    """The official single-file state dict of a random model at `cfg` (key order as LDM saves it).
    views=True: unscaled values sharing one pool's memory (see _Views)."""
    unet = reference_unet(cfg)
    # a pool of 2^24 for full-size models, smaller (and quicker to draw) for small ones
    draw = _Views(seed, dtype) if views else _Draw(
        seed, min(POOL, 2 ** math.ceil(math.log2(sum(p.numel() for p in unet.parameters())))))
    sd = {}
    sd.update({"model.diffusion_model." + k: draw.like(k, tuple(v.shape), dtype) for k, v in unet.state_dict().items()})
    sd.update({"first_stage_model." + k: draw.like(k, tuple(v.shape), dtype)
               for k, v in reference_vae(cfg).state_dict().items()})
    sd.update(text_state_dict(cfg, draw, dtype))
    sd.update(schedule_buffers(cfg))          # float32, as LDM registers them
    if ema:
        from ldm.modules.ema import LitEma
        wrapper = nn.Module()
        wrapper.diffusion_model = unet          # LatentDiffusion.model is a DiffusionWrapper like this
        lit = LitEma(wrapper)                   # names: model_ema.diffusion_modelinput_blocks00weight, ...
        for k, v in lit.state_dict().items():
            sd["model_ema." + k] = v if k in ("decay", "num_updates") else draw.like(k, tuple(v.shape), dtype)
    return sd


def write_ldm_checkpoint(path, cfg, seed=0, fmt="safetensors", ema=False, dtype=torch.float32, wrap=True,
                         parameterization=None, views=False):
    """Write a random official-layout file; returns its state dict. fmt "ckpt" wraps it in {"state_dict": ...}
    like LDM training did (wrap=False writes the bare dict). parameterization="v"/"eps" also writes the LDM
    yaml beside it (same stem) that says so. views=True (full-size files that are only compared): see _Views;
    the safetensors library refuses tensors sharing memory, so those are streamed by minisd's writer, which
    tests/test_weights_convert.py checks against the library."""
    sd = ldm_state_dict(cfg, seed, ema, dtype, views)
    if fmt == "safetensors" and views:
        from weights_convert.io import write_safetensors
        write_safetensors(str(path), sd)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    elif fmt == "ckpt":
        torch.save({"state_dict": sd, "global_step": 0} if wrap else sd, str(path))
    else:
        raise ValueError(fmt)
    if parameterization:
        Path(os.path.splitext(str(path))[0] + ".yaml").write_text(
            "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
            f"    parameterization: \"{parameterization}\"\n    scale_factor: {cfg.vae.scale_factor}\n"
            f"    image_size: {cfg.image_size // 8}\n")
    return sd


# ---------------------------------------------------------------------------------------------------------
# diffusers folders

def clip_vocab_files():
    """(vocab.json, merges.txt) for transformers' CLIPTokenizer, from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({t: i for i, t in enumerate(vocab)}), "#version: 0.2\n" + "\n".join(merges) + "\n"


def reference_diffusers_unet(cfg, device="meta"):
    """diffusers' UNet2DConditionModel at `cfg` (meta device: names and shapes only)."""
    from diffusers import UNet2DConditionModel
    u = cfg.unet
    levels = len(u.channel_mult)
    attention = [2 ** i in u.attention_resolutions for i in range(levels)]
    widths = [u.model_channels * m for m in u.channel_mult]
    # diffusers' attention_head_dim is, for SD, the number of heads; SD2's 64-wide heads give a list per level
    heads = [w // u.num_head_channels for w in widths] if u.num_head_channels > 0 else u.num_heads
    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=cfg.image_size // 8, in_channels=u.in_channels, out_channels=u.out_channels,
            block_out_channels=widths, layers_per_block=u.num_res_blocks, cross_attention_dim=u.context_dim,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            attention_head_dim=heads, use_linear_projection=u.use_linear_in_transformer,
            transformer_layers_per_block=u.transformer_depth, norm_num_groups=u.norm_groups)


def reference_diffusers_vae(cfg, device="meta"):
    from diffusers import AutoencoderKL
    v = cfg.vae
    with torch.device(device):
        return AutoencoderKL(in_channels=v.in_channels, out_channels=v.out_ch,
                             block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
                             down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult),
                             up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult), latent_channels=v.z_channels,
                             norm_num_groups=v.norm_groups, sample_size=cfg.image_size,
                             scaling_factor=v.scale_factor)


def write_diffusers_config(path, cfg):
    """model_index.json, unet/vae/text_encoder configs, tokenizer and scheduler: a folder diffusers can use as
    `config=` for from_single_file, written through the reference classes themselves."""
    from diffusers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer
    path = Path(path)
    t = cfg.text
    unet, vae = reference_diffusers_unet(cfg), reference_diffusers_vae(cfg)
    unet.save_config(path / "unet")
    vae.save_config(path / "vae")
    CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=4 * t.width,
                   num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                   hidden_act=t.activation, projection_dim=t.width,
                   pad_token_id=1 if t.pad_id == 49407 else 0, bos_token_id=49406, eos_token_id=49407,
                   architectures=["CLIPTextModel"]).save_pretrained(path / "text_encoder")
    sched = dict(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="scaled_linear",
                 num_train_timesteps=cfg.num_timesteps, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="epsilon" if cfg.prediction == "eps" else "v_prediction")
    if cfg.prediction == "eps":     # what the SD1.5 and SD2.1 repositories ship
        PNDMScheduler(skip_prk_steps=True, **sched).save_config(path / "scheduler")
    else:
        DDIMScheduler(clip_sample=False, **sched).save_config(path / "scheduler")
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = clip_vocab_files()
        (Path(tmp) / "vocab.json").write_text(vocab)
        (Path(tmp) / "merges.txt").write_text(merges)
        CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                      pad_token="<|endoftext|>" if t.pad_id == 49407 else "!",
                      model_max_length=t.context_length).save_pretrained(path / "tokenizer")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler" if cfg.prediction == "eps" else "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return path


def diffusers_from_single_file(ckpt_path, config_folder, **kwargs):
    """diffusers' own conversion of an official file (offline, given a config folder)."""
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_single_file(str(ckpt_path), config=str(config_folder),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False, **kwargs)


def build_pair(tmp_path_factory, cfg, seed):
    """(our Pipeline, diffusers' StableDiffusionPipeline, the folder) of one random LDM checkpoint of `cfg`: fp32 on
    the CPU, ours without oneDNN-prepared layers; diffusers' keeps its file's scheduler config in
    `sd_scheduler_config` (tests build each scheduler from it)."""
    from minisd.pipeline import Pipeline
    d = tmp_path_factory.mktemp(cfg.name)
    ckpt = d / "model.safetensors"
    write_ldm_checkpoint(ckpt, cfg, seed=seed, parameterization=cfg.prediction)
    write_diffusers_config(d / "config", cfg)
    ours = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=lambda *_: None, prepack=False)
    ref = diffusers_from_single_file(ckpt, d / "config")
    ref.set_progress_bar_config(disable=True)
    ref.sd_scheduler_config = ref.scheduler.config
    return ours, ref, d


def write_diffusers_folder(path, cfg, seed=0, weights=True):
    """A complete diffusers folder of the random model `write_ldm_checkpoint(..., cfg, seed)` writes, converted by
    diffusers (from_single_file then save_pretrained), so that from_pretrained(path) loads it offline."""
    path = Path(path)
    write_diffusers_config(path, cfg)
    if weights:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "model.safetensors"
            write_ldm_checkpoint(ckpt, cfg, seed)
            pipe = diffusers_from_single_file(ckpt, path)
            pipe.save_pretrained(str(path), safe_serialization=True)
            del pipe
    return path


# ---------------------------------------------------------------------------------------------------------
# small configs: the full structure at a fraction of the size (and different choices, for breadth)

def _small():
    from minisd.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
    vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    sd1 = ModelConfig(
        name="small-sd1", text=TextConfig(width=64, layers=2, heads=1, source_layers=2),
        # attention only at the lower-resolution level: DownBlock2D/UpBlock2D appear in diffusers' naming
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(2,),
                        num_heads=8, context_dim=64),
        vae=vae)
    sd2 = ModelConfig(
        name="small-sd2",
        text=TextConfig(width=64, layers=2, heads=1, activation="gelu", pad_id=0, source_layers=3),
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                        num_head_channels=64, context_dim=64, use_linear_in_transformer=True,
                        upcast_attention=True),        # the SD2 family computes attention in fp32 (config.py)
        vae=vae, prediction="v", image_size=768)
    return sd1, sd2


SMALL_SD1, SMALL_SD2 = _small()
