"""The commands that generate: `minisd generate`, `minisd img2img` and `minisd eval`.

    minisd generate "a red circle on a blue background"                       # the tiny built-in model, CPU
    minisd generate "a castle at dusk" --model v1-5-pruned-emaonly.safetensors --steps 25 --seed 1 --out castle.png
    minisd generate "a castle at dusk" --model sd15 --seed 1 --batch-size 4   # seeds 1, 2, 3, 4 (A1111's batch)
    minisd img2img "a watercolour fox" --init-image fox.png --strength 0.6 --model sd15
    minisd eval --prompts coco.txt --num-images 5000 --out runs/sd15 --model sd15 --ref coco-val.npz

They share their flags (`add_generation_flags`, also for the inpaint and ControlNet commands to come) and turn
them into the same two things: the keyword arguments of the Pipeline call (`generation_kwargs`, which checks the
sampling settings, so a bad sampler, schedule, eta or churn fails before any model loads) and the loaded Pipeline
(`load_pipeline`). A batch is A1111's: image b has seed SEED + b and equals that seed generated alone.

A1111's conveniences live in their own modules: --vae (vae_file.py), --prompts-file (prompts_file.py: one run per
line, the model loaded once), --grid and JPEG/WebP output with the parameters in the EXIF (images.py).
"""
import os
import random
import time
from pathlib import Path

import torch
from PIL import Image

from .. import eval as evaluation
from .. import download, lora, prompts_file, samplers, schedules, variation
from ..controls import load_control, resolve
from ..hires import UPSCALERS, Hires
from ..images import a1111_parameters, from_pil, grid_path, image_grid, output_paths, save_image
from ..metrics import fid
from ..pipeline import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline
from ..vae_file import replace_vae, vae_fields
from weights_convert.vae_file import weights_file

SCHEDULE_CHOICES = ("default", *schedules.SHAPES, *schedules.SPACINGS)


def add_generation_flags(p, size=True):
    """The flags of every command that generates: the model and how it runs, then the sampling settings, seeds
    and batch size (size: --width and --height too; img2img takes its size from the image)."""
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="checkpoint file (.safetensors/.ckpt), diffusers folder, sd15 | sd21 | sd21-base, or a "
                        "Hugging Face repository owner/repo (diffusers) or owner/repo/file.safetensors (downloaded "
                        "once); default: the tiny built-in model")
    m.add_argument("--prediction", default="auto", choices=("auto", "eps", "v"),
                   help="what the U-Net predicts; auto = a config beside the file, else detected (see README)")
    m.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    m.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: fp16 on CUDA (VAE decode kept in fp32), fp32 on CPU")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA (kohya/A1111 or diffusers file) at SCALE (default 1); repeat for several")
    m.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where A1111's <lora:NAME:SCALE> in the prompt finds NAME.safetensors")
    m.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion file; its word is the one the file names (else its stem)")
    m.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="every textual-inversion file in DIR, each word its file's stem (A1111)")
    m.add_argument("--attention-slice", type=int, default=None, metavar="N",
                   help="compute attention N queries at a time: same image, less memory")
    m.add_argument("--vae-tile", type=int, default=None, metavar="N",
                   help="decode in N x N latent tiles with blended seams (e.g. 64) for very large images")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net (slow first step, faster after; best on CUDA)")
    m.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: replay the U-Net step as a CUDA graph (removes Python launch overhead)")
    m.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default: 1 for the tiny built-in model (its layers are too small to "
                        "share: on a busy 2-core machine 2 threads took 11x one thread's time), else torch's")
    m.add_argument("--no-prepack", action="store_true", help="CPU: plain layers, no oneDNN-prepared ones (whose "
                   "choice is measured per run and changes the last bits): the same bytes in every run")
    m.add_argument("--vae", default=None, metavar="FILE",
                   help="a separate VAE in place of the model's (A1111's SD VAE): vae-ft-mse-840000-ema-pruned"
                        ".safetensors/.ckpt, or a diffusers VAE folder")
    m.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="condition on the text encoder's layer N-1 before the last: 1 the last (default), 2 the "
                        "penultimate (A1111's Clip skip; diffusers' clip_skip=N-1)")
    g = p.add_argument_group("generation")
    g.add_argument("--negative-prompt", default="", help="what it should not show (replaces the empty prompt in CFG)")
    g.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {DEFAULT_STEPS})")
    g.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance scale (default {DEFAULT_CFG})")
    g.add_argument("--sampler", default=None,
                   help="euler, euler_a, heun, dpm2, dpm2_a, dpmpp_2s_a, dpmpp_2m, lms, ddim, ddpm, plms, dpmpp_sde, "
                        "dpmpp_2m_sde, or an A1111 name such as 'DPM++ 2M Karras' (default dpmpp_2m, Karras)")
    g.add_argument("--schedule", default=None, choices=SCHEDULE_CHOICES,
                   help="sigma schedule; default: karras (leading for ddim/plms/ddpm)")
    g.add_argument("--eta", type=float, default=None, help="noise amount of ancestral samplers (default 1; ddim 0)")
    g.add_argument("--s-churn", type=float, default=None,
                   help="euler/heun/dpm2: noise added back before each step (Karras et al. 2022 Alg. 2; default 0)")
    g.add_argument("--s-tmin", type=float, default=None, help="churn only where sigma >= this (default 0)")
    g.add_argument("--s-tmax", type=float, default=None, help="churn only where sigma <= this (default inf)")
    g.add_argument("--s-noise", type=float, default=None, help="scale of the churn noise (default 1)")
    g.add_argument("--emphasis", action="store_true", help="A1111 prompt weights: (word), (word:1.3), [word]")
    g.add_argument("--seed", type=int, default=None,
                   help="image k uses seed SEED + k; -1 or none: a random seed, printed and recorded (A1111)")
    g.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=1,
                   help="images per sampling run, each equal to its seed generated alone (default %(default)s)")
    if size:
        g.add_argument("--width", type=int, default=None, help="multiple of 8; default: the model's size")
        g.add_argument("--height", type=int, default=None, help="multiple of 8; default: the model's size")


def generation_kwargs(args):
    """The keyword arguments of Pipeline.generate / img2img from the flags, but the prompt and seeds. The
    sampling settings, batch size and seed are checked here (samplers.check), before any model loads."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed is not None and args.seed < -1:
        raise ValueError(f"--seed must be >= 0, or -1 for a random seed; got {args.seed}")
    churn = {k: getattr(args, k) for k in samplers.CHURN_DEFAULTS if getattr(args, k) is not None}
    s = samplers.check(args.sampler or DEFAULT_SAMPLER, args.schedule,
                       DEFAULT_STEPS if args.steps is None else args.steps, args.eta, churn)
    cfg = DEFAULT_CFG if args.cfg is None else args.cfg
    if args.clip_skip < 1:
        raise ValueError(f"--clip-skip must be at least 1 (1 = the last layer), got {args.clip_skip}")
    kwargs = dict(negative_prompt=args.negative_prompt, steps=s.steps, cfg=cfg, sampler=s.sampler,
                  schedule=s.schedule, eta=s.eta, churn=s.churn, emphasis=args.emphasis, clip_skip=args.clip_skip)
    if "width" in args and args.command != "img2img":     # img2img's --width/--height resize the init image
        kwargs.update(width=args.width, height=args.height)
    return kwargs


def load_pipeline(args, device=None, log=print, progress=False):
    """The Pipeline the flags ask for: the model on --device (or `device`) in --dtype, with its speed paths and
    memory options, textual-inversion embeddings and LoRAs."""
    if args.threads or args.model is None:
        torch.set_num_threads(args.threads or 1)
    loras = [lora.parse_spec(spec) for spec in args.lora]       # a bad scale or a missing file: before the load
    for path, _ in loras:
        if not os.path.isfile(path):
            raise ValueError(f"--lora {path}: no such LoRA file")
    if args.vae:
        weights_file(args.vae)                                  # a missing --vae: before the load
    pipe = Pipeline.load(args.model, args.prediction, device or args.device, args.dtype, log=log, progress=progress,
                         compile=args.compile, cuda_graph=args.cuda_graph, prepack=not args.no_prepack)
    if args.vae:
        replace_vae(pipe.model, args.vae)
    pipe.set_memory_options(args.attention_slice, args.vae_tile)
    pipe.load_embeddings(args.embedding, args.embeddings_dir)
    pipe.set_loras(loras)
    pipe.lora_dir = args.lora_dir
    return pipe


def _add_output(p, prompts_file=False):
    p.add_argument("prompt", nargs="?" if prompts_file else None, help="what the image should show")
    p.add_argument("--out", default="outputs/", help="a .png/.jpg/.webp file or a directory (default outputs/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--save-steps", default=None, metavar="DIR",
                   help="write each step's denoised estimate as a PNG into DIR (to watch the image form)")
    p.add_argument("--format", choices=("png", "jpg", "webp"), default=None,
                   help="file format in an --out folder (default png); the parameters go into the EXIF of jpg/webp")
    p.add_argument("--grid", action="store_true",
                   help="also save the images as one grid (A1111's: grid-NNNN in the folder) with the first "
                        "image's parameters")
    if prompts_file:
        p.add_argument("--prompts-file", default=None, metavar="FILE",
                       help="one prompt a line, or A1111 'prompts from file' lines: --prompt \"a cat\" --steps 20 "
                            "--seed 3 ... (instead of PROMPT; --out must be a folder)")


def _add_eval(p):
    """eval's own flags, beside the generation flags (see eval.py)."""
    p.add_argument("--prompts", required=True, help=".txt (one a line) or .jsonl with a 'text' field")
    p.add_argument("--num-images", type=int, required=True, help="N: image k shows prompt k mod P with seed SEED+k")
    p.add_argument("--out", required=True, help="folder: images/, settings.json, metrics.json")
    p.add_argument("--ref", default=None, help="FID reference: folder of images, .npz statistics, or shapes")
    p.add_argument("--metrics", default="fid",
                   help=f"comma-separated, of {', '.join(evaluation.METRICS)} (default fid)")
    p.add_argument("--features", choices=fid.FEATURES, default="inception",
                   help="FID's feature network: Inception, or tiny (the shapes world's classifier, shipped)")
    p.add_argument("--inception-weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth (fid, is)")
    p.add_argument("--clip-weights", metavar="FILE", help="CLIP ViT-L/14 weights (clip)")
    p.add_argument("--metrics-batch", type=int, default=50, help="images per feature-network call")


def add_control_flags(p):
    """ControlNet (controlnet.py): one --control-image per --controlnet; the settings given once apply to every
    ControlNet, or are given once per --controlnet in the same order."""
    c = p.add_argument_group("ControlNet")
    c.add_argument("--controlnet", action="append", default=[], metavar="FILE",
                   help="a ControlNet: 1.0 (control_sd15_*.pth), 1.1 (control_v11p_sd15_*.pth/.safetensors) or a "
                        "diffusers folder, or tiny-canny (the tiny model's, built in); repeat for several (their "
                        "residuals add up)")
    c.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="the condition image of each --controlnet, in order (resized to the output size)")
    c.add_argument("--control-scale", action="append", type=float, default=[], metavar="W",
                   help="how strongly each ControlNet acts (default 1.0)")
    c.add_argument("--control-start", action="append", type=float, default=[], metavar="F",
                   help="fraction of the steps after which it starts acting (default 0.0)")
    c.add_argument("--control-end", action="append", type=float, default=[], metavar="F",
                   help="fraction of the steps after which it stops acting (default 1.0)")
    c.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess mode: the control alone on CFG's conditional half, deep blocks weighted "
                        "more (A1111's 'ControlNet is more important')")
    c.add_argument("--control-preprocess", action="append", default=[], choices=CONTROL_PREPROCESS,
                   help="make the condition from the image first: canny edges or an openpose skeleton (default none)")
    c.add_argument("--canny-low", type=int, default=100, metavar="N", help="canny's lower threshold (default %(default)s)")
    c.add_argument("--canny-high", type=int, default=200, metavar="N", help="canny's upper threshold (default %(default)s)")
    c.add_argument("--openpose-weights", default=None, metavar="FILE",
                   help="body_pose_model.pth for --control-preprocess openpose (default: fetched by name)")


CONTROL_PREPROCESS = ("none", "canny", "openpose")


def _per_control(args, flag, default):
    """A ControlNet setting per --controlnet: given once it applies to all, else one per --controlnet."""
    values = getattr(args, flag.replace("-", "_"))
    n = len(args.controlnet)
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"--{flag} is given {len(values)} times for {n} --controlnet: give it once or once per "
                         "--controlnet")
    return values


def read_image(path, flag):
    """The image file a flag names, read now (so a bad one fails before any model loads), or one clear line."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as an image ({e.__class__.__name__})") from None
    return image


def control_settings(args):
    """The ControlNet settings of the flags, checked (and the images read) before any model loads:
    [(file, image, preprocess, scale, start, end)]."""
    files, images = args.controlnet, args.control_image
    if len(images) != len(files):
        raise ValueError(f"{len(files)} --controlnet and {len(images)} --control-image: give one control image "
                         "per ControlNet")
    settings = []
    for file, path, pre, scale, start, end in zip(files, images, _per_control(args, "control-preprocess", "none"),
                                                   _per_control(args, "control-scale", 1.0),
                                                   _per_control(args, "control-start", 0.0),
                                                   _per_control(args, "control-end", 1.0)):
        file = resolve(file)
        if not os.path.exists(file):
            raise ValueError(f"--controlnet {file}: no such file or folder")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"--control-start {start} and --control-end {end}: need 0 <= start < end <= 1")
        settings.append((file, read_image(path, "--control-image"), pre, scale, start, end))
    return settings


def addnet_hash(path):
    """A1111's short hash of a LoRA file (modules/hashes.py, addnet_hash_safetensors): the first 12 hex digits of
    sha256 over a .safetensors file's tensor bytes (after its header, so editing the metadata keeps it), or over
    the whole file for other formats."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def ti_hashes(words, *texts):
    """A1111's "TI hashes" field: "NAME: HASH, ..." for each textual-inversion word of `words` (an Embeddings)
    that the prompts use and that came from a file (modules/sd_hijack_clip.py writes it; the name loses ":" and
    ","). HASH is the embedding's shorthash, the first 12 hex digits of the SHA-256 of the whole file
    (textual_inversion.py, Embedding.set_hash). Each word is listed once, the prompt's before the negative
    prompt's. None when no loaded word is used."""
    named = [words.files[w] for w in words.used(*texts) if w in words.files]
    listed = [f"{name.replace(':', '').replace(',', '')}: {download.sha256_file(path)[:12]}" for name, path in named]
    return ", ".join(listed) or None


def recorded_prompt(args, words=None):
    """(the prompt as the PNG records it, its fields) with the --lora files written as A1111 writes the LoRAs it
    used: <lora:NAME:SCALE> in the prompt text and "Lora hashes", so that the PNG alone says how to remake it;
    and the embeddings the prompts use (`words`, an Embeddings) as "TI hashes"."""
    fields = {}
    hashes = ti_hashes(words, args.prompt, args.negative_prompt or "") if words else None
    if hashes:
        fields["TI hashes"] = hashes
    loras = [lora.parse_spec(spec) for spec in args.lora]
    if not loras:
        return args.prompt, fields
    names = [(os.path.splitext(os.path.basename(path))[0], path, scale) for path, scale in loras]
    tags = " ".join(f"<lora:{name}:{scale:g}>" for name, _, scale in names)
    fields["Lora hashes"] = ", ".join(f"{name}: {addnet_hash(path)}" for name, path, _ in names)
    return f"{args.prompt} {tags}".strip(), fields


def load_controls(args, settings, pipe):
    """(controls for the Pipeline, their A1111 infotext fields {"ControlNet i": "Module: ..., Model: ..."})."""
    controls, fields = [], {}
    for i, (file, image, pre, scale, start, end) in enumerate(settings):
        control, fields[f"ControlNet {i}"] = load_control(
            file, image, pre, scale, start, end, args.guess_mode, pipe.model.config, (args.canny_low, args.canny_high),
            args.openpose_weights)
        controls.append(control)
    return controls, fields


def add_variation_flags(p):
    v = p.add_argument_group("variation seed (A1111's; see variation.py)")
    v.add_argument("--subseed", type=int, default=None,
                   help="image k's starting noise is bent toward seed SUBSEED + k's; -1 or none: random, printed "
                        "and recorded")
    v.add_argument("--subseed-strength", type=float, default=0.0,
                   help="how far: 0 (the seed's image, default) to 1 (the subseed's)")


def add_hires_flags(p):
    h = p.add_argument_group("hires fix (A1111's; see hires.py)")
    h.add_argument("--enable-hr", action="store_true",
                   help="generate at --width x --height, then upscale and refine with an img2img pass")
    h.add_argument("--hr-scale", type=float, default=None, help="the upscale factor (turns it on; default 2)")
    h.add_argument("--hr-upscaler", default=None, choices=UPSCALERS,
                   help="latent (bilinear, A1111's 'Latent', default), latent-nearest, or lanczos (the decoded image)")
    h.add_argument("--hr-denoising-strength", type=float, default=None,
                   help="the second pass's strength (default 0.7)")
    h.add_argument("--hr-steps", type=int, default=None,
                   help="the second pass's steps, run exactly (A1111); 0 or none: --steps")


def hires_settings(args):
    """The hires fix the flags ask for (None: off), checked before any model loads."""
    given = [flag for flag in ("hr_upscaler", "hr_denoising_strength", "hr_steps") if getattr(args, flag) is not None]
    if not (args.enable_hr or args.hr_scale is not None):
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a hires fix setting: add --enable-hr or --hr-scale")
        return None
    hires = Hires(scale=2.0 if args.hr_scale is None else args.hr_scale, upscaler=args.hr_upscaler or "latent",
                  strength=0.7 if args.hr_denoising_strength is None else args.hr_denoising_strength,
                  steps=args.hr_steps or 0)
    hires.check()
    return hires


def add_generate(p):
    _add_output(p, prompts_file=True)
    add_generation_flags(p)
    add_variation_flags(p)
    add_hires_flags(p)
    add_control_flags(p)


def add_img2img(p):
    _add_output(p, prompts_file=True)
    add_generation_flags(p, size=False)
    p.add_argument("--init-image", required=True, help="the starting image (any mode; resized to a multiple of 8)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="0..1: how much noise is added, i.e. how many of the steps run (int(steps * strength)); "
                        "default %(default)s, as A1111 and diffusers")
    p.add_argument("--width", type=int, default=None,
                   help="resize the init image to this width first (Lanczos, A1111's 'Just resize'); default: its own")
    p.add_argument("--height", type=int, default=None,
                   help="resize the init image to this height first; default: its own")
    add_variation_flags(p)
    add_control_flags(p)


def add_eval(p):
    _add_eval(p)
    add_generation_flags(p)
    p.set_defaults(seed=0, batch_size=8)        # reproducible by default; the batch size changes no image


def _step_saver(pipe, folder):
    os.makedirs(folder, exist_ok=True)

    def callback(i, x, denoised, sigma):
        for b, image in enumerate(pipe.decode_preview(denoised)):
            image.save(os.path.join(folder, f"step-{i:03d}-{b}.png"))
    return callback


def load_run(args):
    """What every image command does once its own inputs are read: the control images read, then the model and its
    ControlNets loaded. Returns (pipe, controls, their PNG fields)."""
    settings = control_settings(args)       # the control images are read before the model loads
    pipe = load_pipeline(args, progress=True)
    controls, control_fields = load_controls(args, settings, pipe)
    return pipe, controls, control_fields


def start_run(args):
    """load_run, then the seeds chosen (A1111's batch: image b is seed + b's image alone) and the output paths
    checked. Returns (pipe, controls, their PNG fields, seeds, paths)."""
    pipe, controls, control_fields = load_run(args)
    seeds = choose_seeds(args)
    return pipe, controls, control_fields, seeds, output_paths(args.out, seeds, args.overwrite, out_suffix(args))


def save_results(pipe, args, kwargs, result, paths, width, height, prompt, fields, per_image=None):
    """Image b of `result` saved at paths[b] with A1111's parameters: the sampling settings, `fields` and
    per_image[b] (its own fields, if given). Returns [(image, parameters)]."""
    written = []
    for b, (image, path, image_seed) in enumerate(zip(result.images, paths, result.seeds)):
        params = a1111_parameters(prompt, args.negative_prompt, kwargs["steps"],
                                  samplers.display_name(result.sampler), kwargs["cfg"], image_seed, width, height,
                                  pipe.name, schedule_type=result.schedule.capitalize(),
                                  batch_pos=b if len(paths) > 1 else None, **fields,
                                  **(per_image[b] if per_image else {}))
        save_image(image, path, params, overwrite=args.overwrite)
        print(f"wrote {path}")
        written.append((image, params))
    return written


def choose_seeds(args, count=None):
    """SEED, SEED + 1, ... for the batch (or `count` images); -1 or none: a random SEED, printed (A1111)."""
    seed = random.randrange(2 ** 32) if args.seed in (None, -1) else args.seed
    print(f"seed {seed}")
    return [seed + b for b in range(count or args.batch_size)]


def out_suffix(args):
    return None if args.format is None else "." + args.format


def model_fields(args):
    """A1111's infotext fields of --vae ("VAE hash", "VAE") and --clip-skip ("Clip skip", only when not 1)."""
    fields = vae_fields(args.vae) if args.vae else {}
    if args.clip_skip != 1:
        fields["clip_skip"] = args.clip_skip
    return fields


def save_grid(args, written):
    """--grid: the images `written` [(image, parameters)] as one grid with the first one's parameters (A1111 saves
    none for one image: grid_only_if_multiple)."""
    if len(written) < 2:
        print("--grid: one image, no grid (as A1111)")
        return
    path = grid_path(args.out, out_suffix(args) or ".png")
    save_image(image_grid([image for image, _ in written]), path, written[0][1], overwrite=args.overwrite)
    print(f"wrote {path}")


def resize_init(image, width, height):
    """The init image at --width x --height (each defaults to the image's own), as A1111's 'Just resize' and
    diffusers' image processor do: a Lanczos resize that ignores the aspect ratio."""
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"{flag} must be a positive multiple of 8, got {value}")
    size = (width or image.width, height or image.height)
    return image if size == image.size else image.convert("RGB").resize(size, Image.LANCZOS)


def run_generate(args):
    """minisd generate / img2img: one run, or one per line of --prompts-file (prompts_file.py), the model loaded
    once and every line checked before it loads."""
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give a PROMPT or --prompts-file FILE (one of them)")
    if args.prompts_file and Path(args.out).suffix:
        raise ValueError(f"--prompts-file writes its images into a folder: give --out a folder, not {args.out}")
    jobs = prompts_file.read_jobs(args.prompts_file, args) if args.prompts_file else [args]
    kwargs = [generation_kwargs(job) for job in jobs]   # a bad sampler, schedule, eta or churn: before the load
    # so are the hires fix and the variation seed
    hires = [hires_settings(job) if args.command == "generate" else None for job in jobs]
    for job in jobs:
        variation.subseeds_for([0], job.subseed, job.subseed_strength)
    init = None
    if args.command == "img2img":
        if not 0.0 <= args.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {args.strength}")
        init = [resize_init(read_image(args.init_image, "--init-image"), job.width, job.height) for job in jobs]
        from_pil(init[0], log=lambda *_: None)
    pipe, controls, control_fields = load_run(args)
    fields = dict(control_fields, **model_fields(args))
    written = []
    for j, (job, job_kwargs) in enumerate(zip(jobs, kwargs)):
        seeds = choose_seeds(job, job.batch_size * getattr(job, "n_iter", 1))
        for start in range(0, len(seeds), job.batch_size):      # A1111's n_iter batches
            batch = seeds[start:start + job.batch_size]
            written += _generate(pipe, job, job_kwargs, batch, init and init[j], controls, fields, hires[j])
    if args.grid:
        save_grid(args, written)


def _generate(pipe, args, kwargs, seeds, init, controls, fields, hires):
    """One batch: the images of `seeds`, saved with their parameters (hires: generate's hires fix, or None).
    Returns [(image, parameters)]."""
    paths = output_paths(args.out, seeds, args.overwrite, out_suffix(args))
    callback = _step_saver(pipe, args.save_steps) if args.save_steps else None
    subseeds = variation.subseeds_for(seeds, args.subseed, args.subseed_strength)   # -1: random, as A1111
    if subseeds:
        print(f"subseed {subseeds[0]}")
    kwargs.update(subseed=subseeds, subseed_strength=args.subseed_strength)
    t0 = time.time()
    if args.command == "generate":
        result = pipe.generate(args.prompt, seed=seeds, callback=callback, controls=controls, hires=hires, **kwargs)
    else:
        result = pipe.img2img(args.prompt, init, args.strength, seed=seeds, callback=callback, controls=controls,
                              **kwargs)
    width, height = result.images[0].size
    if hires:                                   # A1111 records the first pass's size
        width, height = (v or pipe.model.config.image_size for v in (kwargs["width"], kwargs["height"]))
    prompt, lora_fields = recorded_prompt(args, pipe.embeddings)
    extra = dict(fields)
    if args.command == "img2img":
        extra["denoising_strength"] = args.strength
    extra.update(lora_fields)
    extra.update(hires.parameters(kwargs["steps"]) if hires else {})
    variations = subseeds and [{"Variation seed": s, "Variation seed strength": args.subseed_strength}
                               for s in subseeds]
    written = save_results(pipe, args, kwargs, result, paths, width, height, prompt, extra, variations)
    print(f"{len(result.images)} image(s) in {time.time() - t0:.1f} s on {pipe.device} ({pipe.dtype})")
    return written


def run_eval(args):
    """minisd eval (eval.py)."""
    generate = generation_kwargs(args)          # checked before any image is looked for or model loaded
    evaluation.run(args, generate, lambda device, log: load_pipeline(args, device, log))
