"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder (input blocks and middle block, built by unet.encoder, the very function
the U-Net builds its own with) reads the noisy latents, the timestep, the text AND a condition image (Canny
edges, a pose skeleton ...). Its output at each of the 12 input blocks and at the middle block goes through a
1x1 "zero convolution" and is added to the frozen U-Net's skip connections and middle block (unet.UNet.forward's
down_residuals / mid_residual):

    hint (B, 3, H, W) in [0, 1] --input_hint_block (8 convs, 3 stride 2)--> (B, 320, H/8, W/8)
    x_t (B, 4, H/8, W/8) --input_blocks[0]--> + hint --input_blocks[1:]--> each output --zero_convs[i]--> down[i]
                                                              --middle_block--> --middle_block_out--> mid

The zero convolutions start at zero (paper Sec. 3.1): a fresh ControlNet adds nothing, and training grows the
control in from there without first damaging the pretrained model.

Module names follow the official `cldm.cldm.ControlNet` so its files load by attribute path (weights_convert/
controlnet.py maps them and diffusers' names). The map at SD's config:

    input_hint_block    0 conv 3->16, 2 16->16, 4 16->32 s2, 6 32->32, 8 32->96 s2, 10 96->96, 12 96->256 s2,
                        14 256->320 (zero-initialised); SiLU at the odd indices between them
    time_embed, input_blocks.0-11, middle_block     as the U-Net (unet.py's map)
    zero_convs.0-11.0   1x1 conv, one per input block (channels of that block's output)
    middle_block_out.0  1x1 conv on the middle block's output
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from minisd.attention import AttentionSettings
from minisd.config import ControlNetConfig, ModelConfig
from minisd.unet import UNet, embed_time, encoder, time_embedding
from weights_convert import controlnet as files
from weights_convert.io import CheckpointError, check_shapes


def hint_encoder(cfg: ControlNetConfig):
    """cldm's `input_hint_block`: conv, then per width a conv and a stride-2 conv to the next width, then a conv to
    model_channels; SiLU between them (diffusers' ControlNetConditioningEmbedding)."""
    widths, layers = cfg.hint_channels, [nn.Conv2d(cfg.conditioning_channels, cfg.hint_channels[0], 3, padding=1)]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [nn.SiLU(), nn.Conv2d(c_in, c_in, 3, padding=1),
                   nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
    layers += [nn.SiLU(), nn.Conv2d(widths[-1], cfg.unet.model_channels, 3, padding=1)]
    return nn.Sequential(*layers)


def zero_conv(channels):
    """1x1 conv initialised to zero (paper Sec. 3.1); nn.Sequential so the key is `<name>.0.weight`, as in cldm."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv)


def guess_mode_scales(n):
    """Guess mode's "soft weights": 10^-1 for the first input block up to 10^0 for the middle block, in log steps
    (diffusers' `guess_mode`: logspace(-1, 0, 13) at SD's config; cldm 1.1's soft control uses 0.825 ** (12 - i),
    nearly the same). The deep, semantic residuals are kept and the shallow ones muted: the network must recognise
    the hint and fill in the rest, with no prompt needed."""
    return torch.logspace(-1, 0, n).tolist()


class ControlNet(AttentionSettings, nn.Module):
    """x_t, t, context, hint -> (down residuals, one per U-Net input block, and the mid residual), scaled."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = time_embedding(cfg.unet)
        self.input_hint_block = hint_encoder(cfg)
        nn.init.zeros_(self.input_hint_block[-1].weight)      # cldm: zero_module on the last hint conv too
        nn.init.zeros_(self.input_hint_block[-1].bias)
        self.input_blocks, self.middle_block, skips = encoder(cfg.unet)
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in skips)
        self.middle_block_out = zero_conv(skips[-1])
        self.set_attention_upcast(cfg.unet.upcast_attention)
        self.gradient_checkpointing = False      # training (train/controlnet.py), as the U-Net's

    _run = UNet._run          # each block, or with --gradient-checkpointing its recomputation in the backward pass

    def forward(self, x, t, context, hint, scale=1.0, guess_mode=False):
        """x (B, 4, h, w), t (B,) or a scalar, context (B, N, C), hint (B, 3, 8h, 8w) in [0, 1] ->
        ([down residual (B, C_i, h_i, w_i) per input block], mid residual), each times `scale` (times the guess
        mode weights when guess_mode)."""
        dtype = self.time_embed[0].weight.dtype
        emb = embed_time(self.time_embed, t, x.shape[0], self.cfg.unet.model_channels)
        h, context = x.to(dtype), context.to(dtype)
        hint = self.input_hint_block(hint.to(dtype))                    # (B, model_channels, h, w)
        if hint.shape[-2:] != h.shape[-2:]:
            raise ValueError(f"the control image is {tuple(hint.shape[-2:])} at latent size after the hint encoder,"
                             f" the latents {tuple(h.shape[-2:])}: it must be the output image's size")
        outs = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if i == 0:
                h = h + hint          # the condition enters after the first conv, as a bias per position
            outs.append(zero(h))
        h = self._run(self.middle_block, h, emb, context)
        outs.append(self.middle_block_out(h))
        weights = guess_mode_scales(len(outs)) if guess_mode else [1.0] * len(outs)
        outs = [o * (w * scale) for o, w in zip(outs, weights)]
        return outs[:-1], outs[-1]


# ---------------------------------------------------------------------------------------------------------------
# Using ControlNets in sampling (pipeline.py)

@dataclass
class Control:
    """One ControlNet in a generation: its network, condition image (PIL, resized to the output size), scale, and
    the fraction of the steps it acts on, [start, end] (diffusers' control_guidance_start / _end; A1111's Guidance
    Start / End). guess_mode: the soft weights above, and no control on the unconditional half of CFG."""
    net: ControlNet
    image: object
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def check(self, model_cfg):
        if not isinstance(self.net, ControlNet):
            raise ValueError(f"Control.net must be a ControlNet, got {type(self.net).__name__}")
        if not isinstance(self.image, Image.Image):
            raise ValueError(f"a control image must be a PIL image, got {type(self.image).__name__}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"control start and end must satisfy 0 <= start < end <= 1, got {self.start}, "
                             f"{self.end}")
        files.check_fits(self.net.cfg, model_cfg)


def control_image(image, width, height):
    """PIL image -> (1, 3, height, width) in [0, 1]: RGB, resized with Lanczos, not normalised to [-1, 1]
    (diffusers' control image processor: VaeImageProcessor(do_convert_rgb=True, do_normalize=False))."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def keep(steps, start, end):
    """Per step i of `steps`, 1.0 if the control acts there, else 0.0 (diffusers' controlnet_keep)."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def controlled_unet(unet, controls, hints, timesteps, batch):
    """The U-Net call (x, t, context) with the ControlNets' residuals added, summed over the controls (diffusers'
    MultiControlNetModel).

    hints: each control's image on the device, (1, 3, H, W); timesteps: the t of each sampling step, decreasing
    (a call's step is the last one whose t is not below the call's t: a sampler that evaluates between two steps
    counts as the earlier one); batch: images in the run: a call on 2 * batch is CFG's [uncond, cond]."""
    keeps = [keep(len(timesteps), c.start, c.end) for c in controls]
    timesteps = timesteps.tolist()

    def call(x, t, context):
        now = float(t.reshape(-1)[0])
        step = max(sum(ts >= now - 1e-4 for ts in timesteps) - 1, 0)
        down, mid = None, None
        for c, hint, k in zip(controls, hints, keeps):
            scale = c.scale * k[step]
            if scale == 0:
                continue              # adds exactly nothing: skip the network
            cfg_batch = c.guess_mode and x.shape[0] == 2 * batch
            part = slice(batch, None) if cfg_batch else slice(None)       # guess mode: the conditional half only
            latent = x[part, :c.net.cfg.unet.in_channels]       # a 9-channel inpainting input: its latent part
            d, m = c.net(latent, t[part], context[part], hint.expand(latent.shape[0], -1, -1, -1), scale,
                         c.guess_mode)
            if cfg_batch:
                d, m = [torch.cat([torch.zeros_like(r), r]) for r in d], torch.cat([torch.zeros_like(m), m])
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return unet(x, t, context, down_residuals=down, mid_residual=mid)

    return call


# ---------------------------------------------------------------------------------------------------------------
# Files (the layouts and their key maps: weights_convert/controlnet.py)

def load_controlnet(path, model_config: ModelConfig, dtype=torch.float32):
    """The ControlNet in a 1.0 / 1.1 file or a diffusers folder, for the model of `model_config`, in `dtype` on the
    CPU. One that does not fit the model (another text width, U-Net or VAE factor) is a ValueError naming why."""
    cfg, state = files.read(path, model_config)
    with torch.device("meta"):
        net = ControlNet(cfg)
    try:
        check_shapes(state, {k: tuple(v.shape) for k, v in net.state_dict().items()}, "ControlNet", "the model")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    net.load_state_dict({k: state[k].to(dtype) for k in state}, assign=True)
    return net.eval()


def save_controlnet(net: ControlNet, path, layout="1.1"):
    """Write `net` as a ControlNet 1.1 (or 1.0) `.safetensors` file, or a diffusers folder (layout="diffusers")."""
    files.write({k: v.detach().contiguous() for k, v in net.state_dict().items()}, net.cfg, path, layout)

