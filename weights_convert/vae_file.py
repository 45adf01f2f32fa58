"""A VAE on its own (A1111's "SD VAE" setting, minisd's --vae) -> minisd's VAE names, which are LDM's.

    vae-ft-mse-840000-ema-pruned.safetensors / .ckpt   the original layout: encoder.*, decoder.*, quant_conv.*,
                                                       post_quant_conv.* (or all of them under first_stage_model.)
    sd-vae-ft-mse/  or  a model folder's vae/          diffusers' AutoencoderKL: config.json beside
                                                       diffusion_pytorch_model.safetensors (or .bin)
    diffusion_pytorch_model.safetensors                that file alone (its keys say the layout)

A1111 drops the keys a VAE training file carries besides the network (modules/sd_vae.py: `loss.*`, the
discriminator and LPIPS of the training loss, and vae_ignore_keys, the EMA counters); so do we.
"""
import os

from minisd.config import VAEConfig
from . import diffusers
from .io import CheckpointError, LazyState, read_checkpoint

LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LDM_PREFIX = "first_stage_model."
IGNORED = ("model_ema.decay", "model_ema.num_updates")      # A1111's vae_ignore_keys


def weights_file(path):
    """The file that holds the VAE's weights: `path` itself, or the weights file of a diffusers VAE folder (or of
    the vae/ folder of a diffusers model folder)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file or folder")
        return path
    folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{path}: a VAE folder needs diffusers' config.json (and its weights file)")
    for name in diffusers.WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(diffusers.WEIGHT_FILES[:4])}, ...)")


def read_vae(path, cfg: VAEConfig) -> LazyState:
    """The VAE tensors of `path` (see the module) under minisd's names, read lazily. The names are checked here;
    the shapes against the model by the loader (minisd/vae_file.py)."""
    file = weights_file(path)
    t = read_checkpoint(file)
    keys = [k for k in t if not k.startswith("loss.") and k not in IGNORED]
    whole = next((k for k in keys if k.startswith(("model.diffusion_model.", "cond_stage_model."))), None)
    if whole:
        raise CheckpointError(f"{path}: not a VAE file: {whole!r} belongs to a whole SD checkpoint (--model takes "
                              "that; --vae takes a VAE alone)")
    state = LazyState()
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):    # diffusers' names
        diffusers.add_vae(state, t, cfg, "", file)
        return state
    for k in keys:
        name = k[len(LDM_PREFIX):] if k.startswith(LDM_PREFIX) else k
        if not name.startswith(LDM_PARTS):
            raise CheckpointError(f"{path}: not a VAE file: key {k!r} (a VAE has only "
                                  f"{', '.join(p + '*' for p in LDM_PARTS)}, or diffusers' names)")
        state.add(name, t, k)
    return state
