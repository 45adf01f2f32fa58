"""CPU inference with oneDNN weights prepared once: the U-Net's convolutions and the linear layers, fp32.

Why. PyTorch runs a CPU fp32 convolution in oneDNN, which computes from its own *blocked* weight layout (the
channels cut into blocks of 8 or 16, so that one vector load feeds a row of FMAs). An nn.Conv2d keeps PyTorch's
(out, in, kh, kw) layout, so every call first copies its whole weight into the blocked one. Where the feature
maps are small the copy costs more than the convolution: measured on a 2-core AMD EPYC, a 1280-channel 3x3 conv
on a 4x4 map (the U-Net's deepest level for a 256 px image) takes 29 ms with the copy and 6 ms without, and the
copy of the largest weight (2560 -> 1280 channels, 112.5 MiB) is the peak memory of a whole U-Net call.
`Conv2d` below makes that copy once for each input shape it is called with (the layout oneDNN wants depends on
the shape: see Conv2d.__init__). Linear layers: PyTorch sends fp32 matmuls to MKL's sgemm; oneDNN's matmul
on the same (unchanged) weight was faster on that machine (a 77x768 by 768x3072 product: 2.0 ms against 2.4 ms;
the whole SD1 text encoder about 5%), so `Linear` below only changes which library multiplies.

`prepare(module)` swaps a network's nn.Conv2d and nn.Linear layers for the two classes below, in place;
`restore(module)` swaps them back, with the same values. A prepared network computes the same function (up to
float rounding, tests/test_onednn.py) but it is for inference only: these ops have no backward (a call with
autograd on raises), `.to()` cannot move the blocked weights, and its state_dict holds them as opaque oneDNN
tensors, which safetensors and load_state_dict refuse. To save, train or move it, restore it first.
`minisd.fast.prepare` prepares the U-Net of a model that `Pipeline.load` loaded for the CPU where its calls are
measured faster so (minisd.fast.MeasuredChoice).

The ops are PyTorch's own oneDNN entry points (the ones TorchInductor's CPU backend emits), in `torch.ops.mkldnn`.
"""
import torch
import torch.nn as nn


def available():
    """True where this PyTorch build has oneDNN and the prepacked-weight ops used here."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Conv2d(nn.Module):
    """An nn.Conv2d whose weight is kept in oneDNN's blocked layout (a `torch._mkldnn` tensor), for inference."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not _zero_padded(conv):
            raise ValueError("minisd.onednn.Conv2d takes convolutions with numeric zero padding")
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        # oneDNN picks its kernel, and with it the weight's blocked layout, from the whole problem: the input's shape
        # as well as the weight's. A weight laid out for one input shape but called with another is reordered into
        # the layout that shape wants at *every* call, by a generic loop where no JIT reorder exists between the two
        # layouts. With AVX2 only, a 1280-channel 3x3 weight laid out for an 8x8 map but run on the U-Net's 2x2 one
        # went Acdb24a -> Acdb32a through `simple:any` at each call: about 1 s a call against 0.09 s plain and
        # 0.004 s laid out for 2x2 (ONEDNN_VERBOSE, bench/onednn_layers.py; 2 loaded cores), which made a whole
        # prepared U-Net 4x slower than the plain one on an AVX2 EPYC. So the weight is laid out at the first call,
        # for the shape that call brings, and again for each new shape (_lay_out_for): one copy, what a plain conv
        # pays at every call. Until then it is kept in oneDNN's plain layout (laid_out_for None).
        self.laid_out_for = None
        blocked = conv.weight.detach().to_mkldnn()
        # in the state_dict as it is (an opaque oneDNN tensor): saving it or loading into it fails loudly, never
        # silently; restore() gives the plain Parameter back
        self.register_buffer("weight", blocked)
        self.weight_requires_grad = conv.weight.requires_grad         # given back by to_conv
        self.bias = conv.bias                                         # the same Parameter (or None)

    def _reorder(self, mkldnn_weight, input_shape):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            mkldnn_weight, self.padding, self.stride, self.dilation, self.groups, input_shape)

    def _lay_out_for(self, input_shape):
        # from the plain layout: two JIT reorders, where blocked -> blocked may be the generic loop
        plain = self.weight if self.laid_out_for is None else self.weight.to_dense().to_mkldnn()
        self.weight = None                  # the old layout freed before the new one is made: a layer's copies at
        self.weight = self._reorder(plain, input_shape)     # once are three weights' worth at most, not four
        self.laid_out_for = input_shape

    def forward(self, x):
        _inference_only(self, x)
        if list(x.shape) != self.laid_out_for:
            self._lay_out_for(list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")

    def to_conv(self):
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, device="meta")
        conv.weight = nn.Parameter(self.weight.to_dense(), requires_grad=self.weight_requires_grad)
        conv.bias = self.bias
        return conv

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, oneDNN blocked weight")


class Linear(nn.Module):
    """An nn.Linear computed by oneDNN's matmul instead of MKL's sgemm; the same weight and bias Parameters."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        _inference_only(self, x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def to_linear(self):
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN matmul"


def _inference_only(layer, x):
    # these ops have no backward: autograd would pass through them silently with wrong (missing) gradients
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, layer.weight, layer.bias)):
        raise RuntimeError("a network prepared for oneDNN inference (minisd.onednn) ran with autograd on: run it "
                           "under torch.no_grad(), or call minisd.onednn.restore on it to train")


def _zero_padded(conv):
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)    # not "same" / "valid"


def _preparable(layer):
    w = layer.weight
    if isinstance(layer, nn.Conv2d) and not _zero_padded(layer):
        return False
    return w.device.type == "cpu" and w.dtype == torch.float32 and not w.is_mkldnn


def prepare(module):
    """Swap every fp32 CPU nn.Conv2d / nn.Linear inside `module` for Conv2d / Linear above, in place; returns
    `module`. A no-op where oneDNN is unavailable. Run it under torch.no_grad() or not: nothing is recorded."""
    if not available():
        return module

    def replacement(layer):
        if type(layer) is nn.Conv2d and _preparable(layer):
            return Conv2d(layer)
        if type(layer) is nn.Linear and _preparable(layer):
            return Linear(layer)
    return _swap(module, replacement)


def restore(module):
    """Undo prepare(): plain nn.Conv2d / nn.Linear layers again, holding the same values. Returns `module`."""
    return _swap(module, lambda layer: layer.to_conv() if isinstance(layer, Conv2d)
                 else layer.to_linear() if isinstance(layer, Linear) else None)


def _swap(module, replacement):
    """Replace each layer inside `module` for which replacement(layer) is not None, depth first. One layer at a
    time: a replaced layer is freed before the next is made, so preparing needs one layer's extra memory, not a
    second copy of the network."""
    for name in list(module._modules):
        child = module._modules[name]
        if child is None:
            continue
        new = replacement(child)
        if new is None:
            _swap(child, replacement)
        else:
            setattr(module, name, new)
        del child, new
    return module


def is_prepared(module):
    return any(isinstance(m, (Conv2d, Linear)) for m in module.modules())
