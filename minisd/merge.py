"""Merging weights into a checkpoint, two commands that write a new checkpoint file:

    minisd merge A B [C] --method weighted-sum|add-difference --alpha X --out merged.safetensors
        two or three checkpoints into one, as AUTOMATIC1111's Checkpoint Merger does (modules/extras.py,
        run_modelmerger): A*(1-alpha) + B*alpha, or A + (B - C)*alpha, over every tensor the files share
    minisd merge-lora --model M --lora arcane.safetensors:0.8 --out merged.safetensors
        LoRA files merged into a checkpoint's weights (lora.py: the files and the merge)

The classic use of "add difference": an inpainting version of your own fine-tune B, without training one.

    minisd merge sd-v1-5-inpainting.ckpt my-finetune.safetensors v1-5-pruned-emaonly.safetensors \\
        --method add-difference --alpha 1 --out my-finetune-inpainting.safetensors

B - C is what fine-tuning taught B; added to the inpainting model A it gives an inpainting model that knows it.
A's U-Net reads 9 channels (latent, mask, masked image's latent) where B and C read 4: the first 4 input
channels are merged and the other 5 are A's, as A1111 does. So A must be the model whose shape wins.

Every input is read through weights_convert (original single files, diffusers folders, minisd files) into
minisd's names and checked like `minisd convert` checks a file, before anything is written; what is written is
always the official single-file layout (the layout A1111, ComfyUI and diffusers' from_single_file read).
"""
import math
import os

import torch

from weights_convert import detect, ldm, native
from weights_convert.io import write_ckpt, write_safetensors

from . import lora
from .model import build_on_meta, check_state

# A1111's formulas, in its order of operations (which fixes the bits of the result)
METHODS = {
    "weighted-sum": (2, lambda a, b, c, alpha: (1 - alpha) * a + alpha * b),
    "add-difference": (3, lambda a, b, c, alpha: a + alpha * (b - c)),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INPUT_CONV = "unet.input_blocks.0.0.weight"      # (320, in_channels, 3, 3): 4, or 9 in an inpainting U-Net


def _role(name):
    """What happens to a tensor: "merge" (the weights of the model), "optional" (weights minisd keeps but never
    uses: OpenCLIP's last layer, CLIP's projection, EMA copies: merged when every input has them), "keep" (not
    weights: LDM's schedule buffers and CLIP's position_ids, which A1111 leaves as A has them too)."""
    if not name.startswith("extra."):
        return "merge"
    if "model" not in name or name.endswith("position_ids"):       # A1111 merges only keys holding "model"
        return "keep"
    return "optional"


def _check_pair(a, b, path_a, path_b):
    """Raise a one-line error naming the first key that keeps a and b (Checkpoints) from being merged."""
    sd2 = lambda c: c.config.text.activation == "gelu"      # OpenCLIP-H: SD2 (weights_convert/detect.py)
    if sd2(a) != sd2(b):
        family = lambda c: ("SD2 (OpenCLIP text encoder, cond_stage_model.model.*)" if sd2(c)
                            else "SD1 (OpenAI CLIP text encoder, cond_stage_model.transformer.*)")
        raise ValueError(f"{path_b} is {family(b)} but {path_a} is {family(a)}: cannot merge SD1 with SD2")
    for x, y, px, py in ((a, b, path_a, path_b), (b, a, path_b, path_a)):
        missing = [k for k in x.state if _role(k) == "merge" and k not in y.state]
        if missing:
            raise ValueError(f"tensor {x.state.origin(missing[0])!r} of {px} is missing from {py} "
                             f"({len(missing)} such tensors): not the same architecture")
    for k in a.state:
        if _role(k) == "merge" and a.state.shape(k) != b.state.shape(k) and not (
                k == INPUT_CONV and a.state.shape(k)[1] > b.state.shape(k)[1] == 4):
            hint = (" (an inpainting U-Net must be A: its extra input channels are kept from A)"
                    if k == INPUT_CONV and a.state.shape(k)[1] < b.state.shape(k)[1] else "")
            raise ValueError(f"tensor {a.state.origin(k)!r} has shape {tuple(a.state.shape(k))} in {path_a} but "
                             f"{tuple(b.state.shape(k))} in {path_b}{hint}")


def merge_tensors(fn, alpha, a, b, c=None, dtype=None):
    """One merged tensor: `fn` (a METHODS formula) computed in float32, then cast to `dtype` (default: a's).
    A U-Net input conv wider than b's (inpainting: 9 channels against 4) merges b's channels only; the rest is a's."""
    f = lambda t: None if t is None else t.float()
    if a.shape == b.shape:
        out = fn(f(a), f(b), f(c), alpha)
    else:
        n = b.shape[1]
        out = a.float().clone()
        out[:, :n] = fn(f(a[:, :n]), f(b), f(c), alpha)
    return out.to(dtype or a.dtype)


def merge_models(paths, method, alpha, out, dtype=None, log=print):
    """Write the merge of `paths` ([A, B] or [A, B, C]) by `method` (a METHODS name) with `alpha` to `out`, in
    the official single-file layout (.safetensors, or .ckpt by `out`'s suffix) with A's config.

    Floating tensors are computed in float32 and stored as `dtype` ("fp32"/"fp16"; default: as A stores each),
    so fp16 inputs lose nothing in the arithmetic. Inputs are read lazily (memory-mapped) and never written."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    n, fn = METHODS[method]
    if len(paths) != n:
        raise ValueError(f"{method} merges {n} checkpoints ({'A B' if n == 2 else 'A B C'}), got {len(paths)}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for p in paths:
        if os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p):
            raise ValueError(f"--out {out} is one of the inputs; inputs are never overwritten")
    ckpts = [detect.read(p, log=log) for p in paths]
    a, others = ckpts[0], ckpts[1:]
    for p, x in zip(paths[1:], others):
        _check_pair(a, x, paths[0], p)
    if n == 3:
        _check_pair(others[0], others[1], paths[1], paths[2])
    for p, x in zip(paths, ckpts):          # each file against the model its own config describes
        try:
            check_state(x.state, build_on_meta(x.config), x.layout + " checkpoint")
        except ValueError as e:
            raise type(e)(f"{p}: {e}") from None

    merged, kept, dropped = {}, [], []
    for k in list(a.state):
        t = a.state[k]
        everywhere = all(k in x.state and x.state.shape(k) == tuple(t.shape) for x in others)
        role = _role(k)
        if not t.is_floating_point() or role == "keep" or (role == "optional" and not everywhere):
            if role == "optional" and k.startswith("extra." + ldm.EMA):
                dropped.append(k)           # A's EMA copy beside a merged U-Net would be a stale model
                continue
            merged[k] = t
            kept.append(k)
            continue
        merged[k] = merge_tensors(fn, alpha, t, *(x.state[k] for x in others), dtype=DTYPES.get(dtype))
    write_checkpoint(out, merged, a.config)
    names = "ABC"
    what = ("A*(1-alpha) + B*alpha" if n == 2 else "A + (B-C)*alpha")
    log(f"minisd: wrote {out} (ldm layout, A's config): {what} with alpha={alpha:g}, "
        f"{len(merged) - len(kept)} tensors merged, {len(kept)} taken from A (schedule buffers, position ids, "
        f"tensors not in every input)" + (f", A's {len(dropped)} EMA tensors dropped" if dropped else "")
        + "; " + ", ".join(f"{names[i]}={p}" for i, p in enumerate(paths)))


def write_checkpoint(out, tensors, cfg, used_ema=False, layout="ldm"):
    """Write minisd-named `tensors` to `out`: the minisd layout, or the official single file (.safetensors or
    .ckpt by `out`'s suffix). Written beside `out` and renamed into place, so `out` is never half-written."""
    tmp = f"{out}.partial"
    try:
        if layout == "minisd":
            native.write_native(tmp, tensors, cfg, used_ema)
        else:
            tensors = ldm.to_ldm(tensors, cfg, used_ema)
            if str(out).endswith(".ckpt"):
                write_ckpt(tmp, tensors)
            else:
                write_safetensors(tmp, tensors, {"minisd_config": native.config_to_json(cfg)})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def merge_checkpoint(model_path, specs, out, log=print):
    """Write `model_path` with the LoRAs `specs` ([(file, multiplier)]) merged into its weights, to `out`.

    The layout written: an original single file (LDM) input gives an LDM file, every tensor it held kept (schedule
    buffers, EMA copies); a minisd file gives a minisd file; a diffusers folder gives an LDM single file (the layout
    A1111, ComfyUI and diffusers' from_single_file read). `.safetensors` or `.ckpt` by `out`'s suffix. Every LoRA
    is read and checked before anything is written."""
    ckpt = detect.read(model_path, log=log)
    cfg = ckpt.config
    loras = [(lora.read(path, cfg), scale, scale) for path, scale in specs]
    check_state(ckpt.state, build_on_meta(cfg), ckpt.layout + " checkpoint")
    tensors = {name: ckpt.state.pop(name) for name in list(ckpt.state)}    # lazily mapped from the file
    for param, w in lora.merged(cfg, tensors.__getitem__, loras):
        tensors[param] = w
    write_checkpoint(out, tensors, cfg, ckpt.used_ema, "minisd" if ckpt.layout == "minisd" else "ldm")
    log(f"minisd: wrote {out} ({'minisd' if ckpt.layout == 'minisd' else 'ldm'} layout) with "
        + ", ".join(f"{applied.name} x {scale:g}" for applied, scale, _ in loras) + " merged in")
