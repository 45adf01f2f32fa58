"""The `minisd` command line: one table of commands and one error wrapper. The library modules define functions;
the parsing of every command lives in this package:

  generate.py   generate, img2img, eval: the flags every generating command shares, and the Pipeline they load
  inpaint.py    inpaint, outpaint
  train.py      train (finetune | dreambooth | textual-inversion | lora | controlnet), train-tiny,
                train-tiny-features, train-tiny-captioner, train-tiny-controlnet, tiny-subject, sweep
  tools.py      convert, merge, merge-lora, fid
  caption.py    caption

An error minisd raises on purpose (a ValueError, a missing file, a bad checkpoint, a failed download) carries a
message for the user: it ends the command as one line, `minisd: error: ...`, with exit status 2, never a
traceback; Ctrl-C is one line too, with status 130 (128 + SIGINT). Under torchrun, a process whose peer died
ends with status 3 (distributed.PeerLost).
"""
import argparse
import sys

from weights_convert.io import CheckpointError

from .. import __version__, distributed
from ..download import DownloadError
from . import caption, generate, inpaint, serve, tools, train
from .help import DefaultsFormatter

# name: (what it does, adds its flags to its parser, runs it: returns an exit status, or None for 0)
COMMANDS = {
    "generate": ("text to image", generate.add_generate, generate.run_generate),
    "img2img": ("image + text to image", generate.add_img2img, generate.run_generate),
    "inpaint": ("repaint the white part of a mask (9-channel inpainting models or any other)", inpaint.add_inpaint,
                inpaint.run_inpaint),
    "outpaint": ("extend the canvas and paint the new area", inpaint.add_outpaint, inpaint.run_inpaint),
    "eval": ("generate images for a prompt list and score them; writes OUT/metrics.json and prints name=value "
             "lines last", generate.add_eval, generate.run_eval),
    "train": ("fine-tune: finetune | dreambooth | textual-inversion | lora | controlnet", train.add_train,
              train.run_train),
    "train-tiny": ("train the tiny built-in model from scratch", train.add_train_tiny, train.run_train_tiny),
    "train-tiny-features": ("train the tiny world's feature network (--features tiny) from scratch",
                            train.add_train_tiny_features, train.run_train_tiny_features),
    "train-tiny-captioner": ("train the tiny world's captioner (caption --model tiny) from scratch",
                             train.add_train_tiny_captioner, train.run_train_tiny_captioner),
    "train-tiny-controlnet": ("train the tiny model's canny ControlNet (--controlnet tiny-canny) and score it",
                              train.add_train_tiny_controlnet, train.run_train_tiny_controlnet),
    "tiny-subject": ("write a new subject's instance images for DreamBooth on the tiny model (and the class "
                     "images prior preservation reads)", train.add_tiny_subject, train.run_tiny_subject),
    "sweep": ("hyper-parameter search on Optuna: each trial runs the spec's commands (train, then minisd eval) in "
              "its own folder", train.add_sweep, train.run_sweep),
    "convert": ("convert a checkpoint between layouts (original LDM, diffusers, minisd)", tools.add_convert,
                tools.run_convert),
    "merge": ("merge two or three checkpoints into one (A1111's Checkpoint Merger): weighted-sum or "
              "add-difference", tools.add_merge, tools.run_merge),
    "merge-lora": ("merge LoRA files into a checkpoint's weights and write a new one", tools.add_merge_lora,
                   tools.run_merge_lora),
    "caption": ("write a caption beside every image of a folder with BLIP or BLIP-2 (NAME.txt or metadata.jsonl); "
                "prints 'captioned N, skipped M' last", caption.add_caption, caption.run_caption),
    "serve": ("AUTOMATIC1111's web API (/sdapi/v1) and a page that shows diffusion happening, on "
              "http://127.0.0.1:7860", serve.add_serve, serve.run_serve),
    "fid": ("Frechet Inception Distance between two image folders or pytorch-fid .npz statistics files; prints "
            "fid=VALUE last", tools.add_fid, tools.run_fid),
}
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, CheckpointError, DownloadError)


def build_parser():
    parser = argparse.ArgumentParser(prog="minisd", description="Stable Diffusion 1.5 / 2.1, readable.")
    parser.add_argument("--version", action="version", version=f"minisd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (what, add_flags, _) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=what.split(";")[0], description=what,
                                 formatter_class=DefaultsFormatter))
    return parser


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[args.command][2](args) or 0
    except USER_ERRORS as e:
        print(f"minisd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                  # Ctrl-C outside a training loop (which stops after its step instead)
        print("minisd: interrupted", file=sys.stderr)
        return 130
    except distributed.PeerLost as e:          # under torchrun: another process of the job died
        print(f"minisd: error: {e}", file=sys.stderr)
        return 3
    finally:
        distributed.shutdown()


