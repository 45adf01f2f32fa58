"""A whole Stable Diffusion model: text encoder, U-Net, autoencoder and tokenizer, and loading it from a file.

    model = load_model("v1-5-pruned-emaonly.safetensors")       # original single file (.safetensors / .ckpt)
    model = load_model("stable-diffusion-2-1")                  # a diffusers folder
    model = load_model("sd15.minisd.safetensors")               # minisd's own layout

Loading goes tensor by tensor: the networks are built on the meta device (shapes only, no memory, no random
init), each tensor is read from the file, cast, and becomes the parameter itself (`assign=True`). Peak memory
is the model plus one tensor, not the model twice. The key maps live in weights_convert/.
"""
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from weights_convert import detect, native
from weights_convert.io import CheckpointError

from . import download, hub
from .clip import TextEncoder
from .config import ModelConfig
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import VAE


TINY_WEIGHTS = Path(__file__).parent / "assets" / "minisd-tiny.safetensors"


def tiny_model_path():
    """The tiny built-in model's weights (fp16, inside the package; see minisd/tiny/)."""
    if not TINY_WEIGHTS.exists():
        raise FileNotFoundError(f"the tiny built-in model is missing ({TINY_WEIGHTS}); rebuild it with "
                                f"`minisd train-tiny --out DIR` and copy DIR/minisd-tiny.safetensors there")
    return str(TINY_WEIGHTS)


def locate(model, log=print):
    """(path, display name) of what the user named: None = the tiny built-in model, a named model ("sd15", "sd21",
    "sd21-base", fetched once into the cache), a checkpoint file or diffusers folder, else a Hugging Face
    repository (owner/repo or owner/repo/file.safetensors, fetched once: hub.py)."""
    if model is None:
        log(f"no --model given: using the tiny built-in model ({tiny_model_path()})")
        return tiny_model_path(), "minisd-tiny"
    if model in download.MODELS:
        return download.fetch_model(model), model
    if hub.parse(model):        # owner/repo[/file.safetensors] that is no local path (hub.py: which wins)
        return str(hub.fetch(model, log=log)), hub.display_name(model)
    path = Path(model)
    return model, path.name if path.is_dir() else path.stem     # A1111 names a model by its file name


class StableDiffusion(nn.Module):
    """The three networks of SD. Its state_dict is minisd's checkpoint layout: text_encoder.*, unet.*, vae.*."""

    def __init__(self, config: ModelConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config.text)
        self.unet = UNet(config.unet)
        self.vae = VAE(config.vae)
        self.tokenizer = tokenizer or default_tokenizer(config.text.pad_id)


@lru_cache(maxsize=2)
def default_tokenizer(pad_id):
    """CLIP's tokenizer with the merges shipped in the package. Building it parses 49k merges (~0.5 s), and
    it holds no per-model state, so models with the same padding share one."""
    return Tokenizer(pad_id=pad_id)


def check_state(state, model, layout="checkpoint"):
    """Raise a CheckpointError naming the first missing, unexpected or mis-shaped tensor of `state` (a
    LazyState in minisd naming, `extra.*` aside) against `model`'s state_dict. Reads no tensor data."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    present = [k for k in state if not k.startswith("extra.")]
    where = lambda k: f" ({state.origin(k)!r} in the {layout})" if state.origin(k) != k else ""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the {layout}, first {missing[0]!r} "
                              f"(shape {expected[missing[0]]}) for config {model.config.name!r}")
    unexpected = [k for k in present if k not in expected]
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}{where(unexpected[0])}"
                              f" for config {model.config.name!r}")
    for k in present:
        if state.shape(k) != expected[k]:
            raise CheckpointError(f"mis-shaped tensor {k!r}{where(k)}: {state.shape(k)} in the {layout}, the model "
                                  f"expects {expected[k]} (config {model.config.name!r})")


def build_on_meta(config: ModelConfig, tokenizer=None):
    """The model with shapes only: no memory, no random init (the checkpoint supplies every value)."""
    with torch.device("meta"):
        return StableDiffusion(config, tokenizer)


def load_model(path, prediction=None, ema=False, dtype=torch.float32, device="cpu", config=None, verbose=True,
               log=print):
    """Load any supported checkpoint into a StableDiffusion (in eval mode).

    prediction: "eps" / "v" when no config beside the file says it (see weights_convert/detect.py);
    ema: take the U-Net from the EMA copy (model_ema.*) of full LDM training files;
    dtype: floating-point tensors are cast one at a time as they are read;
    config: a ModelConfig to use instead of the one read off the file;
    verbose: say what was found (layout, text encoder, prediction) through `log`.
    """
    ckpt = detect.read(path, prediction=prediction, ema=ema, config=config, verbose=verbose, log=log)
    tokenizer = None
    if ckpt.tokenizer_folder:
        tokenizer = Tokenizer.from_diffusers(ckpt.tokenizer_folder)
    model = build_on_meta(ckpt.config, tokenizer)
    check_state(ckpt.state, model, ckpt.layout + " checkpoint")
    tensors = {}
    for name in model.state_dict():
        t = ckpt.state.pop(name)                 # read from disk (or handed over) now, one tensor at a time
        tensors[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        del t
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:    # a non-persistent buffer would have to be computed, not loaded
        raise CheckpointError(f"tensors not in the state_dict were left unset: {left[:3]}")
    return model.eval()


def save_model(model: StableDiffusion, path, extra=None):
    """Write minisd's layout (one .safetensors with the config in its metadata); `extra` = more tensors to keep."""
    tensors = dict(model.state_dict())
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    native.write_native(path, tensors, model.config)
