"""Speed paths: how a loaded model is prepared for fast inference on one device. None of it is Stable Diffusion;
each path computes what the plain networks compute (tests/test_fast_path.py, tests/test_onednn.py).

    unet_call = fast.prepare(model, device, compile=False, cuda_graph=False, onednn_layers=True, log=None)

  CPU           the VAE's conv weights in NHWC (channels_last): oneDNN reads NHWC maps as they are, and reorders
                NCHW ones into its blocked layout and back around every conv (at 512 px a 256 MiB copy each way);
                with onednn_layers=True (fp32 only), the U-Net's conv and linear layers swapped for oneDNN ones
                whose weights are prepared once (onednn.py), only if its own calls measure faster so on this
                machine (MeasuredChoice)
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
    loop uses for the U-Net. `log` (optional) is told what MeasuredChoice measured and chose."""
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if device.type == "cpu":
        model.vae.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        model.unet.to(memory_format=torch.channels_last)
    unet_call = model.unet
    fp32 = next(model.unet.parameters()).dtype == torch.float32
    if device.type == "cpu" and onednn_layers and fp32 and not compile and onednn.available():
        unet_call = MeasuredChoice(model.unet, log=log)
    if compile:
        unet_call = torch.compile(unet_call)
    if cuda_graph:
        unet_call = CUDAGraphUNet(unet_call)
    return unet_call


class MeasuredChoice:
    """The U-Net call on the CPU, run plain or oneDNN-prepared (onednn.py), whichever its own calls measure faster.

    Whether prepared layers win depends on the CPU: oneDNN picks its kernels, and the weight layouts that go with
    them, per instruction set, and what wins on an AVX-512 machine need not on an AVX2 one (bench/RESULTS.md). So it
    is measured here, on the sampling loop's own calls, at no extra cost: the first call runs plain (timed); the
    network is then prepared, and the second call lays each conv weight out for the shape it brings (a one-time
    copy, not timed); the third runs prepared (timed). If it took as long as the plain call or longer, the plain
    layers are put back; either way that choice holds for the rest of the process. The sampling loop calls the
    U-Net on the same shapes at every step, so the two timings compare like with like. (The plain timing includes
    oneDNN building its plain kernels, a few ms a layer, which leans the choice towards prepared by a few percent
    at most.) Nothing is called that the sampling loop did not ask for; the text encoder stays plain (one or two
    calls per prompt: oneDNN's matmul saves it ~5% there, less than one extra call would cost to find out).

    The first calls of a process thus run one path, then the other; the two round differently in the last bits, so
    the first image of a process can differ from later ones with the same seed within float rounding (< 1/255).
    `clock` is time.perf_counter (tests inject one). `choice` is None while measuring, then "prepared" or "plain".
    `modules`: the networks the call runs, prepared and restored together (default: the U-Net alone; with a
    ControlNet the call is controlnet.controlled_unet's and the modules the U-Net and the ControlNets); `what` names
    the call in the log."""

    def __init__(self, unet, log=None, clock=time.perf_counter, modules=None, what="U-Net call"):
        self.unet, self.log, self.clock, self.what = unet, log, clock, what
        self.modules = [unet] if modules is None else list(modules)
        self.plain_s = self.prepared_s = self.choice = None
        self.calls = 0

    def __call__(self, *args, **kwargs):
        if self.choice is not None:
            return self.unet(*args, **kwargs)
        self.calls += 1
        if self.calls == 2:                              # lays the weights out for these shapes: not timed
            return self.unet(*args, **kwargs)
        if self.calls == 1:
            for p in (p for m in self.modules for p in m.parameters()):
                p.sum()     # page the weights in (a loaded file is memory-mapped): the plain call is not charged for it
        t0 = self.clock()
        out = self.unet(*args, **kwargs)
        seconds = self.clock() - t0
        if self.calls == 1:
            self.plain_s = seconds
            for m in self.modules:
                onednn.prepare(m)
        else:
            self.prepared_s = seconds
            self.choice = "prepared" if self.prepared_s < self.plain_s else "plain"
            if self.choice == "plain":
                for m in self.modules:
                    onednn.restore(m)
            if self.log:
                self.log(f"oneDNN-prepared layers (minisd.fast.MeasuredChoice): {self.what} {self.plain_s:.3f} s "
                         f"plain, {self.prepared_s:.3f} s prepared: {self.choice}")
        return out


def restore(model):
    """Undo prepare's layer swaps (the memory formats stay: they change no value)."""
    onednn.restore(model.text_encoder)
    onednn.restore(model.unet)
    return model
