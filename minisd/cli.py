"""The `minisd` command line: generate, img2img, convert, train-tiny.

    minisd generate "a red circle on a blue background"                       # the tiny built-in model, CPU
    minisd generate "a castle at dusk" --model v1-5-pruned-emaonly.safetensors --steps 25 --seed 1 --out castle.png
    minisd img2img "a watercolour fox" --init-image fox.png --strength 0.6 --model sd15
    minisd convert v2-1_768-ema-pruned.safetensors sd21.minisd.safetensors --to minisd
"""
import argparse
import os
import random
import sys
import time

from PIL import Image

from weights_convert.io import CheckpointError

from . import convert, lora, merge, samplers, schedules
from .download import DownloadError
from .eval import main as eval_main
from .images import a1111_parameters, from_pil, output_paths, save_png
from .metrics import fid
from .pipeline import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline
from .sweep import main as sweep_main
from .tiny import recipe as tiny_recipe
from .train import cli as train_cli

SCHEDULE_CHOICES = ("default", *schedules.SHAPES, *schedules.SPACINGS)


def _add_common(p):
    p.add_argument("prompt", help="what the image should show")
    p.add_argument("--negative-prompt", default="", help="what it should not show (replaces the empty prompt in CFG)")
    p.add_argument("--model", default=None,
                   help="checkpoint file (.safetensors/.ckpt), diffusers folder, or sd15 | sd21 | sd21-base "
                        "(downloaded once); default: the tiny built-in model")
    p.add_argument("--prediction", default="auto", choices=("auto", "eps", "v"),
                   help="what the U-Net predicts; auto = a config beside the file, else detected (see README)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", default=None,
                   help="euler, euler_a, heun, dpm2, dpm2_a, dpmpp_2s_a, dpmpp_2m, lms, ddim, ddpm, plms, dpmpp_sde, "
                        "dpmpp_2m_sde, or an A1111 name such as 'DPM++ 2M Karras' (default dpmpp_2m, Karras)")
    p.add_argument("--schedule", default="default", choices=SCHEDULE_CHOICES,
                   help="sigma schedule; default: karras (leading for ddim/plms/ddpm)")
    p.add_argument("--eta", type=float, default=None, help="noise amount of ancestral samplers (default 1; ddim 0)")
    p.add_argument("--s-churn", type=float, default=None,
                   help="euler/heun/dpm2: noise added back before each step (Karras et al. 2022 Alg. 2; default 0)")
    p.add_argument("--s-tmin", type=float, default=None, help="churn only where sigma >= this (default 0)")
    p.add_argument("--s-tmax", type=float, default=None, help="churn only where sigma <= this (default inf)")
    p.add_argument("--s-noise", type=float, default=None, help="scale of the churn noise (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--out", default="outputs/", help="a .png file or a directory (default outputs/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: fp16 on CUDA (VAE decode kept in fp32), fp32 on CPU")
    p.add_argument("--emphasis", action="store_true", help="A1111 prompt weights: (word), (word:1.3), [word]")
    p.add_argument("--attention-slice", type=int, default=None, metavar="N",
                   help="compute attention N queries at a time: same image, less memory")
    p.add_argument("--vae-tile", type=int, default=None, metavar="N",
                   help="decode in N x N latent tiles with blended seams (e.g. 64) for very large images")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net (slow first step, faster after; best on CUDA)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: replay the U-Net step as a CUDA graph (removes Python launch overhead)")
    p.add_argument("--save-steps", default=None, metavar="DIR",
                   help="write each step's denoised estimate as a PNG into DIR (to watch the image form)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA (kohya/A1111 or diffusers file) at SCALE (default 1); repeat for several")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where A1111's <lora:NAME:SCALE> in the prompt finds NAME.safetensors")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion file; its word is the one the file names (else its stem)")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="every textual-inversion file in DIR, each word its file's stem (A1111)")


def build_parser():
    parser = argparse.ArgumentParser(prog="minisd", description="Stable Diffusion 1.5 / 2.1, readable.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    _add_common(g)
    g.add_argument("--width", type=int, default=None, help="multiple of 8; default: the model's size")
    g.add_argument("--height", type=int, default=None, help="multiple of 8; default: the model's size")
    i = sub.add_parser("img2img", help="image + text to image")
    _add_common(i)
    i.add_argument("--init-image", required=True, help="the starting image (any mode; resized to a multiple of 8)")
    i.add_argument("--strength", type=float, required=True,
                   help="0..1: how much noise is added, i.e. how many of the steps run (int(steps * strength))")
    sub.add_parser("fid", help="Frechet Inception Distance between two image folders or .npz statistics "
                   "(minisd fid --help)", add_help=False)
    sub.add_parser("eval", help="generate images for a prompt list and score them (minisd eval --help)",
                   add_help=False)
    sub.add_parser("sweep", help="hyper-parameter search over training runs on Optuna (minisd sweep --help)",
                   add_help=False)
    c = sub.add_parser("convert", help="convert a checkpoint between layouts (python -m weights_convert)",
                       add_help=False)
    c.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("train", help="fine-tune: minisd train finetune | dreambooth (minisd train --help)",
                   add_help=False)
    t = sub.add_parser("train-tiny", help="train the tiny built-in model from scratch (minisd train-tiny --out DIR)",
                       add_help=False)
    t.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("merge-lora", help="merge LoRAs into a checkpoint (minisd merge-lora --help)", add_help=False)
    return parser


def _step_saver(pipe, folder):
    os.makedirs(folder, exist_ok=True)

    def callback(i, x, denoised, sigma):
        for b, image in enumerate(pipe.decode_preview(denoised)):
            image.save(os.path.join(folder, f"step-{i:03d}-{b}.png"))
    return callback


def run(args):
    sampler = args.sampler or DEFAULT_SAMPLER
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    cfg = DEFAULT_CFG if args.cfg is None else args.cfg
    samplers.resolve(sampler, args.schedule)            # a bad sampler/schedule fails before the model loads
    init = None
    if args.command == "img2img":
        if not 0.0 <= args.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {args.strength}")
        init = Image.open(args.init_image)
        from_pil(init, log=lambda *_: None)
    pipe = Pipeline.load(args.model, args.prediction, args.device, args.dtype, progress=True, compile=args.compile,
                         cuda_graph=args.cuda_graph)
    pipe.set_memory_options(args.attention_slice, args.vae_tile)
    pipe.load_embeddings(args.embedding, args.embeddings_dir)
    pipe.set_loras([lora.parse_spec(spec) for spec in args.lora])
    pipe.lora_dir = args.lora_dir
    seed = args.seed
    if seed is None:
        seed = random.randrange(2 ** 32)
    print(f"seed {seed}")
    paths = output_paths(args.out, [seed] * args.batch, overwrite=args.overwrite)
    callback = _step_saver(pipe, args.save_steps) if args.save_steps else None
    churn = {k: getattr(args, k) for k in ("s_churn", "s_tmin", "s_tmax", "s_noise") if getattr(args, k) is not None}
    common = dict(negative_prompt=args.negative_prompt, steps=steps, cfg=cfg, sampler=sampler,
                  schedule=args.schedule, eta=args.eta, seed=seed, batch=args.batch, emphasis=args.emphasis,
                  callback=callback, churn=churn or None)
    t0 = time.time()
    if args.command == "generate":
        result = pipe.generate(args.prompt, width=args.width, height=args.height, **common)
    else:
        result = pipe.img2img(args.prompt, init, args.strength, **common)
    width, height = result.images[0].size
    extra = {}
    if args.command == "img2img":
        extra["denoising_strength"] = args.strength
    for b, (image, path) in enumerate(zip(result.images, paths)):
        params = a1111_parameters(args.prompt, args.negative_prompt, steps, samplers.display_name(result.sampler), cfg,
                                  seed, width, height, pipe.name, schedule_type=result.schedule.capitalize(),
                                  batch_pos=b if args.batch > 1 else None, **extra)
        save_png(image, path, params, overwrite=args.overwrite)
        print(f"wrote {path}")
    print(f"{len(result.images)} image(s) in {time.time() - t0:.1f} s on {pipe.device} ({pipe.dtype})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert.main(argv[1:])
    if argv[:1] == ["train-tiny"]:
        return tiny_recipe.main(argv[1:])
    if argv[:1] == ["train"]:
        return train_cli.main(argv[1:])
    if argv[:1] == ["fid"]:
        return fid.main(argv[1:])
    if argv[:1] == ["merge-lora"]:
        return merge.main(argv[1:])
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileExistsError, FileNotFoundError, CheckpointError, DownloadError) as e:
        # errors minisd raised on purpose carry a message for the user; no traceback
        print(f"minisd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
