"""The commands on files: `minisd convert` (convert.py), `minisd merge` and `minisd merge-lora` (merge.py) and
`minisd fid` (metrics/fid.py). Argument parsing only; each module holds the work."""
from pathlib import Path

from .. import lora
from ..convert import convert
from ..merge import DTYPES, METHODS, merge_checkpoint, merge_models
from ..metrics import fid
from ..metrics.resize import MODES


def add_convert(p):
    p.add_argument("src", help="checkpoint to read: .safetensors/.ckpt (original or minisd) or a diffusers folder")
    p.add_argument("dst", help="where to write (a folder for --to diffusers)")
    p.add_argument("--to", required=True, choices=("minisd", "ldm", "diffusers"))
    p.add_argument("--fp16", action="store_true", help="store the model weights as float16")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the U-Net predicts, if no config says")
    p.add_argument("--ema", action="store_true", help="take the U-Net from the EMA weights (model_ema.*)")


def run_convert(args):
    convert(args.src, args.dst, args.to, args.fp16, args.prediction, args.ema)


def add_merge(p):
    p.add_argument("models", nargs="+", metavar="A B [C]",
                   help="checkpoints (files or diffusers folders): A and B, plus C for add-difference")
    p.add_argument("--method", choices=tuple(METHODS), default="weighted-sum",
                   help="weighted-sum: A*(1-alpha) + B*alpha; add-difference: A + (B-C)*alpha (A1111's names)")
    p.add_argument("--alpha", type=float, required=True, help="the multiplier (A1111's 'Multiplier (M)')")
    p.add_argument("--out", required=True, help="the merged checkpoint, official layout (.safetensors or .ckpt)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="how to store the weights (default: as A stores them)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run_merge(args):
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    merge_models(args.models, args.method, args.alpha, args.out, args.dtype)


def add_merge_lora(p):
    p.add_argument("--model", required=True, help="checkpoint file or diffusers folder")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="a LoRA file and its multiplier (default 1); repeat for several")
    p.add_argument("--out", required=True, help="the merged checkpoint (.safetensors or .ckpt)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run_merge_lora(args):
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    merge_checkpoint(args.model, [lora.parse_spec(s) for s in args.lora], args.out)


def add_fid(p):
    p.add_argument("paths", nargs="+", metavar="DIR_OR_NPZ", help="two folders/.npz files, or one with --save-stats")
    p.add_argument("--resize", choices=MODES, default="pytorch-fid",
                   help="how images become Inception's 299x299 input (see minisd/metrics/resize.py)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--inception-weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--features", choices=fid.FEATURES, default="inception",
                   help="the feature network: Inception (FID proper) or tiny, the shapes world's own classifier "
                        "shipped in minisd/assets (tiny_features.py)")
    p.add_argument("--save-stats", metavar="NPZ", help="write the statistics of the one folder given to this file")


def run_fid(args):
    """Prints fid=VALUE last (what metric regexes read), or writes --save-stats."""
    if args.features != "inception" and args.inception_weights:
        raise ValueError("--inception-weights is for --features inception")
    if args.save_stats:
        if len(args.paths) != 1:
            raise ValueError("--save-stats takes exactly one folder")
        if Path(args.save_stats).exists():
            raise ValueError(f"{args.save_stats} exists already; not overwriting it")
        model = fid.load_network(args.features, args.inception_weights, args.device)
        mu, sigma = fid.moments(fid.activations(args.paths[0], model, args.batch_size, args.resize, args.device))
        fid.save_stats(args.save_stats, mu, sigma)
        print(f"wrote {args.save_stats} ({args.features} features" +
              (f", {args.resize} resize)" if args.features == "inception" else ")"))
        return
    if len(args.paths) != 2:
        raise ValueError(f"expected two folders or .npz files, got {len(args.paths)}")
    value = fid.fid(*args.paths, batch_size=args.batch_size, resize=args.resize, device=args.device,
                    weights=args.inception_weights, features=args.features)
    print(f"fid={value:.6f}")
