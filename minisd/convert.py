"""Convert a Stable Diffusion checkpoint between layouts: `minisd convert` (the command line is cli/tools.py).

Reading and writing each layout is weights_convert's (one key map per layout, using minisd.config only); this
command adds what needs minisd's networks: every tensor is checked by name and shape against the model the config
describes (built on the meta device) before anything is written.

    minisd convert v1-5-pruned-emaonly.safetensors sd15.safetensors --to minisd
    minisd convert sd15.safetensors sd15-diffusers/ --to diffusers
    minisd convert sd15.safetensors sd15-ldm.ckpt --to ldm        # .ckpt or .safetensors

Round trips are lossless: tensors minisd does not use travel in the minisd file under `extra.*` and are written
back to an LDM file (a diffusers folder has no place for them; we say how many are dropped). --fp16 casts the
model's floating-point weights (not the extras, e.g. the schedule buffers) to float16.
"""
import json

from weights_convert import detect, diffusers, ldm, native
from weights_convert.io import write_ckpt, write_safetensors

from .model import build_on_meta, check_state
from .tokenizer import Tokenizer


def vocab_files(tokenizer):
    """(vocab.json, merges.txt) contents for transformers' CLIPTokenizer, from minisd's tokenizer."""
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    return (json.dumps(tokenizer.encoder, ensure_ascii=False),
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def convert(src, dst, to, fp16=False, prediction=None, ema=False):
    ckpt = detect.read(src, prediction=prediction, ema=ema)
    cfg = ckpt.config
    check_state(ckpt.state, build_on_meta(cfg), ckpt.layout + " checkpoint")
    tensors = {}
    for name in list(ckpt.state):
        t = ckpt.state.pop(name)
        tensors[name] = t.half() if fp16 and t.is_floating_point() and not name.startswith("extra.") else t
    if to == "minisd":
        native.write_native(dst, tensors, cfg, ckpt.used_ema)
    elif to == "ldm":
        out = ldm.to_ldm(tensors, cfg, ckpt.used_ema)
        del tensors
        if str(dst).endswith(".safetensors"):
            write_safetensors(dst, out, {"minisd_config": native.config_to_json(cfg)})
        else:
            write_ckpt(dst, out)
    elif to == "diffusers":
        dropped = [k for k in tensors if k.startswith("extra.")]
        if dropped:
            print(f"minisd: a diffusers folder has no place for the {len(dropped)} tensors minisd does not use "
                  f"(e.g. {dropped[0][len('extra.'):]!r}); they are not written")
        tokenizer = Tokenizer(pad_id=cfg.text.pad_id)
        diffusers.write_diffusers({k: v for k, v in tensors.items() if not k.startswith("extra.")}, cfg, dst,
                                  vocab_files(tokenizer))
    else:
        raise ValueError(f"unknown target layout {to!r}")
    print(f"minisd: wrote {dst} ({to} layout, config {cfg.name!r}, {cfg.prediction}-prediction)")
