"""A separate VAE file over a model's own (A1111's "SD VAE" setting; `--vae FILE`), and how A1111 records it.

    model = load_model("v1-5-pruned-emaonly.safetensors")
    replace_vae(model, "vae-ft-mse-840000-ema-pruned.safetensors")    # or a diffusers VAE folder
    vae_fields("vae-ft-mse-840000-ema-pruned.safetensors")  # {"vae_hash": "735e4c3a44", "vae": "vae-ft-mse-..."}

The layouts it reads are in weights_convert/vae_file.py. Only the weights change: the latent scale factor stays
the model's, as in A1111, which swaps the first_stage_model's state dict and nothing else.
"""
import os

import torch

from weights_convert import vae_file
from .download import sha256_file
from weights_convert.io import CheckpointError


def replace_vae(model, path):
    """Load the VAE file `path` into model.vae in place: each tensor cast to the dtype and device of the one it
    replaces. A file of another shape or kind is a CheckpointError naming the first tensor that differs."""
    expected = model.vae.state_dict()
    state = vae_file.read_vae(path, model.vae.cfg)
    for name in state:
        if name not in expected:
            raise CheckpointError(f"--vae {path}: unexpected tensor {state.origin(name)!r} for this model's VAE")
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"--vae {path}: tensor {name!r} missing (not a whole VAE?)")
        if state.shape(name) != tuple(tensor.shape):
            raise CheckpointError(f"--vae {path}: {state.origin(name)!r} is {state.shape(name)}, this model's VAE "
                                  f"needs {tuple(tensor.shape)}: a VAE of another model family?")
    with torch.no_grad():
        for name, tensor in expected.items():       # state_dict() tensors share the parameters' storage
            tensor.copy_(state.pop(name))


def vae_fields(path):
    """A1111's infotext fields of a VAE file (modules/sd_vae.py): "VAE hash", the first 10 hex digits of the
    sha256 of the whole file (hashes.sha256), and "VAE", its file name (of a diffusers folder: the folder's)."""
    return {"vae_hash": sha256_file(vae_file.weights_file(path))[:10], "vae": os.path.basename(os.path.normpath(path))}
