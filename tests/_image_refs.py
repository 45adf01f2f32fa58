"""Reference builders for the image-side parity tests (U-Net and VAE), all offline with random weights.

The original LDM modules are built with the arguments of Stable Diffusion's own configs (configs/stable-diffusion/
v1-inference.yaml and v2-inference.yaml; written out here, not derived from minisd's presets, so the tests also
check that the presets match them). diffusers models are built from hand-written configs matching the SD1.5 and
SD2.1 hub folders and load the same LDM-layout weights through diffusers' own converter.

Memory: the full U-Net is 860M parameters (3.4 GB in fp32). The reference is built on the meta device (no
initialisation cost), materialised once with our random draw, and minisd / diffusers take the SAME tensors with
`load_state_dict(..., assign=True)`, so three models cost one copy of the weights.
"""
import torch
import torch.nn as nn

# --- LDM (the original code) -------------------------------------------------------------------------------

# unet_config.params of v1-inference.yaml and v2-inference.yaml, minus image_size (unused) and with
# use_checkpoint=False (gradient checkpointing; irrelevant under no_grad) and use_fp16=False (v2's yaml says
# True, which only changes the dtype LDM casts the input to)
LDM_UNET_ARGS = {
    "sd15": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, legacy=False),
    "sd21-base": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                      num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
                      use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1,
                      context_dim=1024, legacy=False),
}
# first_stage_config.params.ddconfig (identical in v1 and v2, except v2 asks for attn_type "vanilla-xformers",
# which is the same single-head attention through xformers; "vanilla" runs without xformers) and embed_dim 4
LDM_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0, attn_type="vanilla")
LDM_EMBED_DIM = 4


def redraw_(module, seed):
    """Re-draw every parameter at a sane scale, in place. Weights have variance 1/fan_in (keeps activations O(1));
    norm gains have mean 1 and biases mean 0, both with a spread of about 0.2 and 0.1, far from their inits (1
    and 0), so a swapped gain and bias or a dropped bias shows. Nothing stays zero: LDM's `zero_module` init of
    output convs would otherwise hide whole branches. Uniform draws (same variance as the normal ones) because
    they are 3x faster than randn for the U-Net's 860M numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                a = (3 / p[0].numel()) ** 0.5                 # U(-a, a) has variance a^2/3 = 1/fan_in
                p.uniform_(-a, a, generator=g)
            elif name.endswith("weight"):
                p.uniform_(1 - 0.35, 1 + 0.35, generator=g)
            else:
                p.uniform_(-0.17, 0.17, generator=g)
    return module


def materialize(build, seed):
    """Build a module on the meta device (skipping its init), give it real storage, and redraw it."""
    with torch.device("meta"):
        module = build()
    return redraw_(module.to_empty(device="cpu"), seed).eval()


def ldm_unet(name_or_args, seed=0):
    """LDM's UNetModel for a preset name (see LDM_UNET_ARGS) or a dict of its arguments, with random weights."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    args = LDM_UNET_ARGS[name_or_args] if isinstance(name_or_args, str) else name_or_args
    return materialize(lambda: UNetModel(image_size=32, use_checkpoint=False, use_fp16=False, **args), seed)


class LDMAutoencoderKL(nn.Module):
    """The networks of ldm.models.autoencoder.AutoencoderKL (without its training losses, which need extra
    packages): same attribute names, so the same state_dict keys; encode/decode as in its methods."""

    def __init__(self):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        self.encoder = Encoder(**LDM_DDCONFIG)
        self.decoder = Decoder(**LDM_DDCONFIG)
        self.quant_conv = nn.Conv2d(2 * LDM_DDCONFIG["z_channels"], 2 * LDM_EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(LDM_EMBED_DIM, LDM_DDCONFIG["z_channels"], 1)

    def moments(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        return posterior.mean, posterior.logvar

    def decode(self, z):   # z unscaled, as LDM's AutoencoderKL.decode takes it
        return self.decoder(self.post_quant_conv(z))


def ldm_vae(seed=0):
    return materialize(LDMAutoencoderKL, seed)


# --- diffusers --------------------------------------------------------------------------------------------

DIFFUSERS_UNET_CONFIGS = {
    # runwayml/stable-diffusion-v1-5 unet/config.json (attention_head_dim is really the number of heads)
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
                 upcast_attention=False),
    # stabilityai/stable-diffusion-2-1-base unet/config.json (upcast_attention only matters in fp16)
    "sd21-base": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=[320, 640, 1280, 1280],
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                      cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                      upcast_attention=False),
}
# the vae/config.json of both SD1.5 and SD2.1
DIFFUSERS_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=512,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            scaling_factor=0.18215)


def _assign(build, state_dict):
    with torch.device("meta"):
        model = build()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def diffusers_unet(name, ldm_state_dict):
    """diffusers' UNet2DConditionModel holding the given LDM U-Net weights (keys without prefix), converted by
    diffusers' single-file converter, which wants the full-checkpoint prefix."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    config = DIFFUSERS_UNET_CONFIGS[name]
    full = {"model.diffusion_model." + k: v for k, v in ldm_state_dict.items()}
    converted = convert_ldm_unet_checkpoint(full, config)
    return _assign(lambda: UNet2DConditionModel(**config), converted)


def diffusers_vae(ldm_state_dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    full = {"first_stage_model." + k: v for k, v in ldm_state_dict.items()}
    converted = convert_ldm_vae_checkpoint(full, DIFFUSERS_VAE_CONFIG)
    return _assign(lambda: AutoencoderKL(**DIFFUSERS_VAE_CONFIG), converted)


# --- minisd -----------------------------------------------------------------------------------------------

def minisd_with(build, state_dict, dtype=None):
    """A minisd module holding `state_dict` (strict: no missing or unexpected keys), optionally cast."""
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    return _assign(build, state_dict)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()
