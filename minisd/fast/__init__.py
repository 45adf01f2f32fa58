"""Speed paths: how a loaded model is prepared for fast inference on one device. None of it is Stable Diffusion;
each path computes what the plain networks compute (tests/test_fast_path.py, tests/test_onednn.py).

    unet_call = fast.prepare(model, device, compile=False, cuda_graph=False, onednn=True)

  CPU           the VAE's conv weights in NHWC (channels_last): oneDNN reads NHWC maps as they are, and reorders
                NCHW ones into its blocked layout and back around every conv (at 512 px a 256 MiB copy each way);
                with onednn=True (fp32 only), the text encoder's and U-Net's conv and linear layers swapped for
                oneDNN ones whose weights are prepared once (onednn.py)
  CUDA          the U-Net in channels_last, the layout the tensor cores' convolution kernels want
  compile       torch.compile on the U-Net call (TorchInductor fuses elementwise ops and norms into fewer kernels)
  cuda_graph    the U-Net call recorded once as a CUDA graph and replayed every step (cuda_graph.py)

`prepare` changes the networks in place and is for inference only: a network swapped for oneDNN has no backward
(calling it with autograd on raises) and cannot be moved with .to(); `restore(model)` gives the plain layers back.
"""
import torch

from . import onednn
from .cuda_graph import CUDAGraphUNet


def prepare(model, device, compile=False, cuda_graph=False, onednn_layers=True):
    """Prepare `model` (already on `device`, in its dtype) for inference there; returns the callable the sampling
    loop uses for the U-Net."""
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if device.type == "cpu":
        model.vae.to(memory_format=torch.channels_last)
        fp32 = next(model.unet.parameters()).dtype == torch.float32
        if onednn_layers and fp32 and not compile:
            onednn.prepare(model.text_encoder)
            onednn.prepare(model.unet)
    if device.type == "cuda":
        model.unet.to(memory_format=torch.channels_last)
    unet_call = model.unet
    if compile:
        unet_call = torch.compile(unet_call)
    if cuda_graph:
        unet_call = CUDAGraphUNet(unet_call)
    return unet_call


def restore(model):
    """Undo prepare's layer swaps (the memory formats stay: they change no value)."""
    onednn.restore(model.text_encoder)
    onednn.restore(model.unet)
    return model
