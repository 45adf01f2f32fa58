"""`minisd merge-lora`: a new checkpoint with LoRAs merged into its weights (lora.py: the files and the merge).

    minisd merge-lora --model v1-5-pruned-emaonly.safetensors --lora arcane.safetensors:0.8 --out merged.safetensors

What it writes is an ordinary checkpoint, checked like `minisd convert` checks one (convert.py): every tensor by
name and shape against the model its config describes, before anything is written.
"""
import os

from weights_convert import detect, ldm, native
from weights_convert.io import write_ckpt, write_safetensors

from . import lora
from .model import build_on_meta, check_state


def merge_checkpoint(model_path, specs, out, log=print):
    """Write `model_path` with the LoRAs `specs` ([(file, multiplier)]) merged into its weights, to `out`.

    The layout written: an original single file (LDM) input gives an LDM file, every tensor it held kept (schedule
    buffers, EMA copies); a minisd file gives a minisd file; a diffusers folder gives an LDM single file (the layout
    A1111, ComfyUI and diffusers' from_single_file read). `.safetensors` or `.ckpt` by `out`'s suffix. Every LoRA
    is read and checked before anything is written; the file is written beside `out` and renamed into place, so
    `out` is never half-written."""
    ckpt = detect.read(model_path, log=log)
    cfg = ckpt.config
    loras = [(lora.read(path, cfg), scale, scale) for path, scale in specs]
    check_state(ckpt.state, build_on_meta(cfg), ckpt.layout + " checkpoint")
    tensors = {name: ckpt.state.pop(name) for name in list(ckpt.state)}    # lazily mapped from the file
    for param, w in lora.merged(cfg, tensors.__getitem__, loras):
        tensors[param] = w
    tmp = f"{out}.partial"
    try:
        if ckpt.layout == "minisd":
            native.write_native(tmp, tensors, cfg, ckpt.used_ema)
        else:
            tensors = ldm.to_ldm(tensors, cfg, ckpt.used_ema)
            if str(out).endswith(".ckpt"):
                write_ckpt(tmp, tensors)
            else:
                write_safetensors(tmp, tensors, {"minisd_config": native.config_to_json(cfg)})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"minisd: wrote {out} ({'minisd' if ckpt.layout == 'minisd' else 'ldm'} layout) with "
        + ", ".join(f"{applied.name} x {scale:g}" for applied, scale, _ in loras) + " merged in")
