"""Convert a Stable Diffusion checkpoint between layouts: `minisd convert` (= `python -m weights_convert`).

Reading and writing each layout is weights_convert's (one key map per layout, using minisd.config only); this
command adds what needs minisd's networks: every tensor is checked by name and shape against the model the config
describes (built on the meta device) before anything is written.

    python -m weights_convert v1-5-pruned-emaonly.safetensors sd15.safetensors --to minisd
    python -m weights_convert sd15.safetensors sd15-diffusers/ --to diffusers
    python -m weights_convert sd15.safetensors sd15-ldm.ckpt --to ldm        # .ckpt or .safetensors

Round trips are lossless: tensors minisd does not use travel in the minisd file under `extra.*` and are written
back to an LDM file (a diffusers folder has no place for them; we say how many are dropped). --fp16 casts the
model's floating-point weights (not the extras, e.g. the schedule buffers) to float16.
"""
import argparse
import json
import sys

from weights_convert import detect, diffusers, ldm, native
from weights_convert.io import CheckpointError, write_ckpt, write_safetensors

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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="checkpoint to read: .safetensors/.ckpt (original or minisd) or a diffusers folder")
    p.add_argument("dst", help="where to write (a folder for --to diffusers)")
    p.add_argument("--to", required=True, choices=("minisd", "ldm", "diffusers"))
    p.add_argument("--fp16", action="store_true", help="store the model weights as float16")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the U-Net predicts, if no config says")
    p.add_argument("--ema", action="store_true", help="take the U-Net from the EMA weights (model_ema.*)")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.dst, args.to, args.fp16, args.prediction, args.ema)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
