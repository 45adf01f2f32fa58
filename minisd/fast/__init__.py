"""Speed paths: how a loaded model is prepared for fast inference on one device. None of it is Stable Diffusion;
each path computes what the plain networks compute (tests/test_fast_path.py, tests/test_onednn.py).

    unet_call = fast.prepare(model, device, compile=False, cuda_graph=False, onednn_layers=True, log=None)

  CPU           the VAE's conv weights in NHWC (channels_last): oneDNN reads NHWC maps as they are, and reorders
                NCHW ones into its blocked layout and back around every conv (at 512 px a 256 MiB copy each way);
                with onednn_layers=True (fp32 only), the text encoder's and U-Net's conv and linear layers swapped
                for oneDNN ones whose weights are prepared once (onednn.py), each network only where one call of
                it is measured faster so on this machine (choose_onednn)
  CUDA          the U-Net in channels_last, the layout the tensor cores' convolution kernels want
  compile       torch.compile on the U-Net call (TorchInductor fuses elementwise ops and norms into fewer kernels)
  cuda_graph    the U-Net call recorded once as a CUDA graph and replayed every step (cuda_graph.py)

`prepare` changes the networks in place and is for inference only: a network swapped for oneDNN has no backward
(calling it with autograd on raises) and cannot be moved with .to(); `restore(model)` gives the plain layers back.
"""
import time

import torch

from . import onednn
from .cuda_graph import CUDAGraphUNet


def prepare(model, device, compile=False, cuda_graph=False, onednn_layers=True, log=None):
    """Prepare `model` (already on `device`, in its dtype) for inference there; returns the callable the sampling
    loop uses for the U-Net. `log` (optional) is told what choose_onednn measured and chose."""
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if device.type == "cpu":
        model.vae.to(memory_format=torch.channels_last)
        fp32 = next(model.unet.parameters()).dtype == torch.float32
        if onednn_layers and fp32 and not compile:
            choose_onednn(model, log=log)
    if device.type == "cuda":
        model.unet.to(memory_format=torch.channels_last)
    unet_call = model.unet
    if compile:
        unet_call = torch.compile(unet_call)
    if cuda_graph:
        unet_call = CUDAGraphUNet(unet_call)
    return unet_call


def choose_onednn(model, log=None, seconds_of=None):
    """Prepare the text encoder and the U-Net for oneDNN (onednn.py) each only where that is faster on this machine.

    Whether it is depends on the CPU: oneDNN picks its kernels, and the weight layouts that go with them, per
    instruction set, and what wins on an AVX-512 machine need not on an AVX2 one (bench/RESULTS.md). So it is
    measured here, once, on the networks themselves: a U-Net call on a guided step's shapes at small latents
    (batch 2, 8x8) and a text encoder call on one prompt (1, 77), each timed plain, then prepared. The plain call
    is timed once, after the weights are paged in (a plain call copies every conv weight, so it is the costly
    one; oneDNN builds its plain kernels in it too, a few ms a layer);
    the prepared call after one warm-up call (which lays its weights out for these shapes). A network stays
    prepared only if its prepared call took less time. `seconds_of(network, call, warm_up)` times call() (tests
    inject one). Returns {"unet": (plain s, prepared s, chose prepared), "text_encoder": (...)}."""
    seconds_of = seconds_of or _seconds
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, cfg.text.context_length, cfg.unet.context_dim, generator=g)
    tokens = torch.randint(0, cfg.text.vocab_size, (1, cfg.text.context_length), generator=g)
    calls = {"unet": (model.unet, lambda: model.unet(x, t, context)),
             "text_encoder": (model.text_encoder, lambda: model.text_encoder(tokens))}
    t0 = time.perf_counter()
    chosen = {}
    with torch.no_grad():
        for name, (network, call) in calls.items():
            for p in network.parameters():
                p.sum()                 # page the weights in (a loaded file is memory-mapped): no call pays for it
            plain = seconds_of(network, call, warm_up=False)
            onednn.prepare(network)
            prepared = seconds_of(network, call, warm_up=True)
            if prepared >= plain:
                onednn.restore(network)
            chosen[name] = (plain, prepared, prepared < plain)
    if log:
        log("oneDNN-prepared layers (minisd.fast.choose_onednn), measured in "
            f"{time.perf_counter() - t0:.1f} s: " + "; ".join(
                f"{name} {p:.3f} s plain, {q:.3f} s prepared: {'prepared' if use else 'plain'}"
                for name, (p, q, use) in chosen.items()))
    return chosen


def _seconds(network, call, warm_up):
    if warm_up:
        call()
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def restore(model):
    """Undo prepare's layer swaps (the memory formats stay: they change no value)."""
    onednn.restore(model.text_encoder)
    onednn.restore(model.unet)
    return model
