"""Model configurations: one small frozen dataclass per network, and named presets.

The same network classes serve Stable Diffusion 1.5, 2.1 and the tiny built-in model; only these numbers
change. Every field is named after the argument of the original LDM / CLIP code it mirrors.
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer (SD1: OpenAI CLIP ViT-L/14; SD2: OpenCLIP ViT-H/14)."""
    vocab_size: int = 49408
    context_length: int = 77          # 75 tokens + <|startoftext|> + <|endoftext|>
    width: int = 768
    layers: int = 12                  # layers that are *computed*; SD2 keeps 23 of OpenCLIP-H's 24 (see below)
    heads: int = 12
    activation: str = "quick_gelu"    # OpenAI CLIP: x * sigmoid(1.702 x); OpenCLIP-H: exact gelu
    pad_id: int = 49407               # SD1 pads with <|endoftext|>, SD2 (open_clip) with 0
    # SD2 conditions on the penultimate layer of OpenCLIP-H followed by ln_final (LDM FrozenOpenCLIPEmbedder,
    # layer="penultimate"). Its 24th layer is never used, so minisd does not build it: `layers=23` and the
    # last computed layer *is* the penultimate one. diffusers ships SD2's encoder the same way.
    source_layers: int = 12           # layers in the original checkpoint (24 for OpenCLIP-H)


@dataclass(frozen=True)
class UNetConfig:
    """The LDM U-Net (`ldm.modules.diffusionmodules.openaimodel.UNetModel` arguments)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)   # downsampling factors at which a spatial transformer follows
    num_heads: int = 8                # SD1: a fixed number of heads at every level (head_dim varies)
    num_head_channels: int = -1       # SD2: a fixed head_dim of 64 (then num_heads is ignored), LDM's -1 = unused
    transformer_depth: int = 1
    context_dim: int = 768            # width of the text encoder output
    use_linear_in_transformer: bool = False   # SD2: proj_in/proj_out are Linear, SD1: 1x1 Conv2d
    norm_groups: int = 32
    # SD2: attention computed in fp32 when the weights are fp16/bf16, or its scores overflow fp16 (black images);
    # LDM's _ATTN_PRECISION = "fp32", diffusers' upcast_attention
    upcast_attention: bool = False


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (`ldm.modules.diffusionmodules.model.Encoder/Decoder` arguments)."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)     # len(ch_mult) - 1 stride-2 downsamplings: 3 -> factor 8
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    scale_factor: float = 0.18215     # latents are scaled to unit variance for the diffusion model
    norm_groups: int = 32


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: three networks, the noise schedule and what the U-Net predicts."""
    name: str
    text: TextConfig
    unet: UNetConfig
    vae: VAEConfig
    prediction: str = "eps"           # "eps" (noise) or "v" (velocity, Salimans & Ho 2022)
    image_size: int = 512             # the resolution the model was trained at (default output size)
    # Scaled-linear beta schedule (LDM `linear` schedule: linspace in sqrt space), 1000 training steps
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000


SD1_TEXT = TextConfig()
SD2_TEXT = TextConfig(width=1024, layers=23, heads=16, activation="gelu", pad_id=0, source_layers=24)

SD15 = ModelConfig(name="sd15", text=SD1_TEXT, unet=UNetConfig(), vae=VAEConfig())
SD21_BASE = ModelConfig(
    name="sd21-base", text=SD2_TEXT,
    unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True,
                    upcast_attention=True),
    vae=VAEConfig(), prediction="eps", image_size=512)
SD21_V = replace(SD21_BASE, name="sd21", prediction="v", image_size=768)

# The tiny built-in model (minisd/tiny/): the networks of SD 1.5 at a small size. The text encoder's 49408 x 64 token table (3.2M) is half the model:
# CLIP's whole vocabulary is kept so that any prompt tokenizes as it would for SD.
TINY = ModelConfig(
    name="minisd-tiny",
    text=TextConfig(width=64, layers=2, heads=4),
    # cross-attention at the 8x8 and 4x4 levels (and the middle), not at 16x16: as SDXL dropped it from its highest
    # resolution, where 256 tokens cost most (here twice the training time) for what convolutions already do
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                    num_heads=4, context_dim=64, norm_groups=8),
    # three levels = two stride-2 downsamplings: factor 4 as LDM's kl-f4 (64x64x3 -> 16x16x4; SD's 4 latent
    # channels, kl-f4 has 3), not SD's factor 8, whose 8x8 latents could not hold a ring's hole or two small discs
    # in the right colours (MODEL_CARD.md). scale_factor = 1 / 2.2947,
    # the latent std the shipped run measured after its VAE phases; train_tiny measures it again and stores it
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, scale_factor=0.43579),
    image_size=64,
)

PRESETS = {c.name: c for c in (SD15, SD21_BASE, SD21_V, TINY)}


# the hint encoder's widths at SD's config: three stride-2 convs bring a 512px condition image to 64x64 latents
HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """The ControlNet of a model: its U-Net's encoder (the U-Net's own config) and the hint encoder's widths.

    hint_channels: one width per resolution of the hint encoder; len - 1 stride-2 convs, so the hint reaches the
    latent size: 4 widths for SD's factor-8 VAE (cldm's fixed stack), fewer for a VAE that downsamples less."""
    unet: UNetConfig
    hint_channels: tuple = HINT_CHANNELS
    conditioning_channels: int = 3       # RGB condition images

    @classmethod
    def for_model(cls, cfg: ModelConfig):
        downsamplings = len(cfg.vae.ch_mult) - 1                         # the VAE's factor is 2 ** downsamplings
        # an inpainting U-Net's 5 extra input channels (mask, masked latent) are its own: a ControlNet reads the
        # latent alone, as diffusers' ControlNet inpainting pipeline gives it
        return cls(replace(cfg.unet, in_channels=cfg.unet.out_channels), HINT_CHANNELS[:downsamplings + 1])
