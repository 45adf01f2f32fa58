"""How each FID implementation turns an image into Inception's 299x299 input. The choice changes the score
(Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"), so a FID is only
comparable with FIDs computed the same way. Every mode takes uint8 RGB images (N, 3, H, W), or a list of
(3, H, W) of any sizes, and returns (N, 3, 299, 299) float32 in the network's range:

mode           resize to 299x299                                       then          used by
"pytorch-fid"  bilinear, half-pixel centres (align_corners=False),     2 x/255 - 1   pytorch-fid (Seitzer)
               no antialiasing, on x/255
"clean"        PIL bicubic on each channel as a float32 image          (x-128)/128   clean-fid's "clean" mode
               (antialiased), clipped to [0, 255], not re-quantised
"torchmetrics" bilinear, half-pixel centres, antialias=True, on x      (x-128)/128   torchmetrics FID / KID / IS
"tensorflow"   TensorFlow 1.x bilinear: output pixel i samples input   (x-128)/128   original TTUR FID code,
               position i * in/out (no half-pixel shift), no antialias               torch-fidelity

(x-128)/128 is the TF graph's own first step; it maps 255 to 0.992, where 2 x/255 - 1 maps it to 1, so even at
299x299 input "pytorch-fid" and the others differ slightly. Upsampling (images under 299 px) is the same with
and without antialiasing; only downsampling aliases without it.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIZE = 299
MODES = ("pytorch-fid", "clean", "torchmetrics", "tensorflow")


def pytorch_fid(x):
    """pytorch-fid's InceptionV3.forward: F.interpolate(bilinear, align_corners=False) of ToTensor's x/255."""
    x = F.interpolate(x.float() / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def clean(x):
    """clean-fid's make_resizer("PIL", quantize_after=False, "bicubic"): PIL mode "F" per channel."""
    out = []
    for image in x:
        channels = [np.asarray(Image.fromarray(c.numpy().astype(np.float32), mode="F")
                               .resize((SIZE, SIZE), resample=Image.BICUBIC)) for c in image]
        out.append(torch.from_numpy(np.stack(channels).clip(0, 255)))
    return (torch.stack(out) - 128) / 128


def torchmetrics(x):
    """torchmetrics' NoTrainInceptionV3 with its default antialias=True."""
    x = F.interpolate(x.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (x - 128) / 128


def tensorflow(x):
    """tf.compat.v1.image.resize_bilinear(align_corners=False), as torch-fidelity reimplements it
    (interpolate_bilinear_2d_like_tensorflow1x): sample input position i * in/out, lerp between the two
    neighbours, the last row/column repeated past the edge."""
    x = x.float()

    def axis(n_in):   # source position of each output pixel: integer part (lo, hi) and fraction
        pos = torch.arange(SIZE, dtype=torch.float32) * torch.tensor(n_in / SIZE, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    y0, y1, dy = axis(x.shape[2])
    x0, x1, dx = axis(x.shape[3])
    top = x[:, :, y0][:, :, :, x0] + (x[:, :, y0][:, :, :, x1] - x[:, :, y0][:, :, :, x0]) * dx
    bottom = x[:, :, y1][:, :, :, x0] + (x[:, :, y1][:, :, :, x1] - x[:, :, y1][:, :, :, x0]) * dx
    x = top + (bottom - top) * dy[:, None]
    return (x - 128) / 128


RESIZERS = {"pytorch-fid": pytorch_fid, "clean": clean, "torchmetrics": torchmetrics, "tensorflow": tensorflow}


def to_inception_input(images, mode="pytorch-fid"):
    """uint8 images (N, 3, H, W) or a list of (3, H, W) -> (N, 3, 299, 299) network input (see the table)."""
    if mode not in RESIZERS:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(MODES)}")
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected uint8 RGB images of shape (3, H, W), got {image.dtype} {tuple(image.shape)}")
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) == 1:   # one batched resize; images of several sizes are resized one by one
        return RESIZERS[mode](torch.stack(images).cpu())
    return torch.cat([RESIZERS[mode](image[None].cpu()) for image in images])
