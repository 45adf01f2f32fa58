"""`minisd eval`'s library: generate images for a list of prompts, then score them (cli.py parses the command).

    minisd eval --prompts real/metadata.jsonl --num-images 1000 --out runs/eval --features tiny --ref shapes
    minisd eval --model sd15 --prompts coco.txt --num-images 5000 --out runs/sd15 --ref coco-val.npz \\
                --metrics fid,is,clip --inception-weights pt_inception-2015-12-05-6726825d.pth \\
                --clip-weights clip-vit-l-14.safetensors

Image k (0 <= k < N) shows prompt k mod P (P prompts in the file) and starts from seed `--seed` + k. Its file is
images/p{prompt index}-s{seed}.png, so the name says what made it: a rerun skips the images already on disk, and
a later sharded run (each worker taking some k) writes the same names. Every image comes from its own seed
alone (a batch is Pipeline.generate with one seed per image: its starting noise and any fresh noise of its sampler
come from its own generator), so which images share a batch does not change any image. The generation settings are
kept in settings.json; a rerun with other settings into the same folder is refused rather than mixing two sets.

Under torchrun (`torchrun --nproc-per-node 4 -m minisd eval ...`) the batches of missing images are shared out
among the processes (batch i to rank i mod W, the batches one process would run: the same images, byte for
byte), each process writes its own files, and rank 0 alone computes the metrics once all are on disk; the other
processes exit without printing any. On the CPU in fp32 each process measures for itself whether oneDNN-prepared
U-Net layers are faster (minisd.fast.MeasuredChoice), and the two kernels round differently in the last bits (images
within 1/255); --no-prepack keeps the plain layers everywhere, for images equal byte for byte across runs.

Several models in one command (the snapshots of a training run, `minisd train --save-model-steps`): a --model
or one --lora given as a pattern ('OUT/model-step*.safetensors', quoted so the shell leaves it alone) stands for
every file it matches, each scored alone with the same prompts, seeds and settings (any other --lora applies to
all of them). Each gets its own folder OUT/<file name without extension>/ (images/, settings.json, metrics.json,
as one model's run), then one table row per file is printed, `model-step000400.safetensors fid=... ...`, and a
last line `best=PATH`: the best by the first of --metrics (the lowest fid; the highest is, clip or adherence;
the first file on a tie). OUT/metrics.json holds the table ({"candidates": [...], "metric", "best"}).

Then metrics.json, and one `name=value` line per metric printed last (what SageMaker-style metric regexes read):
  fid         Fréchet distance to --ref (a folder of images, a statistics .npz from `minisd fid --save-stats`, or
              `shapes`: 5000 real images of the tiny world, only with --features tiny); fid.py
  is          Inception Score, 10 splits (also is_std); inception_score.py
  clip        CLIP score of each image against its own prompt (needs --clip-weights); clip_score.py
  adherence   for prompts of the tiny world ("a red circle on a blue background"): the fraction of images that
              shapes.judge, a fixed rule, reads back as exactly their prompt
"""
import glob
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import distributed, lora, samplers
from .images import a1111_parameters, save_png
from .metrics import fid as fid_mod
from .metrics.clip_score import clip_scores, load_clip
from .metrics.inception import load_inception
from .metrics.inception import weights_file as inception_weights_file
from .metrics.inception_score import inception_logits, inception_score
from .pipeline import DEFAULT_SAMPLER
from .tiny import shapes

METRICS = ("fid", "is", "clip", "adherence")
SHAPES_REF_IMAGES = 5000          # `--ref shapes`: this many real images ...
SHAPES_REF_SEED = 1_000_003       # ... from a stream no training run of minisd draws from


# ---- prompts and names -------------------------------------------------------------------------------------------

def read_prompts(path):
    """A .txt file (one prompt a line; blank lines skipped) or a .jsonl file of {"text": ...} rows (the layout of
    minisd's training folders, metadata.jsonl; "prompt" is read too)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            if "text" not in row and "prompt" not in row:
                raise ValueError(f"{path}, line {number}: no 'text' or 'prompt' field")
            prompts.append(row.get("text", row.get("prompt")))
    else:
        prompts = [line.strip() for line in lines]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def image_plan(num_prompts, num_images, seed):
    """[(k, prompt index, seed, file name)] for images k = 0 .. num_images - 1."""
    return [(k, k % num_prompts, seed + k, f"p{k % num_prompts:05d}-s{seed + k}.png") for k in range(num_images)]


# ---- generation --------------------------------------------------------------------------------------------------

def generation_settings(args, generate, prompts):
    """What the images depend on: a rerun into the same folder must match these. args: the command's flags;
    generate: the keyword arguments of Pipeline.generate (cli.generation_kwargs). Settings added since the first
    settings.json (emphasis, churn, vae, clip_skip) are written only when used, so folders made before them still
    match."""
    settings = {"model": args.model or "tiny", "prediction": args.prediction,
                "negative_prompt": generate["negative_prompt"], "sampler": args.sampler or DEFAULT_SAMPLER,
                "schedule": args.schedule, "steps": generate["steps"], "cfg": generate["cfg"], "eta": generate["eta"],
                "seed": args.seed, "width": generate["width"], "height": generate["height"], "dtype": args.dtype,
                "lora": args.lora, "lora_dir": args.lora_dir, "embedding": args.embedding,
                "embeddings_dir": args.embeddings_dir,
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    optional = {"emphasis": generate["emphasis"], "churn": generate["churn"], "vae": args.vae,
                "clip_skip": generate["clip_skip"] if generate["clip_skip"] != 1 else None}
    return settings | {k: v for k, v in optional.items() if v}


def check_settings(out, settings):
    """Write out/settings.json, or check that the one there matches (names say prompt and seed, not sampler).
    Every process checks; rank 0 writes (atomically: another process reads the whole file or none)."""
    path = Path(out) / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} holds images made with other settings ({', '.join(changed)} differ: "
                             f"{ {k: old.get(k) for k in changed} } there); use another --out")
        return
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json.tmp").write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(path.with_suffix(".json.tmp"), path)


def missing_batches(plan, folder, batch_size, log=print):
    """The rows of `plan` not yet in `folder`, in batches of batch_size; under torchrun, this process's share of
    those batches (batch i goes to rank i mod W)."""
    todo = [row for row in plan if not (folder / row[3]).is_file()]
    if len(todo) < len(plan):
        log(f"{len(plan) - len(todo)} of {len(plan)} images already in {folder}; generating the other {len(todo)}")
    distributed.barrier()                   # every process has listed the folder before any image is added
    return distributed.shard([todo[start:start + batch_size] for start in range(0, len(todo), batch_size)])


def generate_missing(pipe, prompts, batches, folder, generate):
    """Generate the images of `batches` (missing_batches), one seed per image, with a progress bar. generate: the
    keyword arguments of Pipeline.generate but the prompts and seeds."""
    total = sum(map(len, batches))
    with tqdm(total=total, desc="images", unit="img", dynamic_ncols=True,
              disable=not total or not distributed.is_main()) as bar:
        for rows in batches:
            result = pipe.generate([prompts[p] for _, p, _, _ in rows], seed=[seed for _, _, seed, _ in rows],
                                   **generate)
            for (_, p, seed, name), image in zip(rows, result.images):
                params = a1111_parameters(prompts[p], generate["negative_prompt"], generate["steps"],
                                          samplers.display_name(result.sampler), generate["cfg"], seed, *image.size,
                                          pipe.name, clip_skip=generate["clip_skip"] if generate["clip_skip"] != 1
                                          else None)
                save_png(image, folder / name, params, overwrite=True)
            bar.update(len(rows))


# ---- metrics -----------------------------------------------------------------------------------------------------

def reference_statistics(ref, model, features, batch_size, device, log=print):
    """(mu, sigma) of --ref: a statistics .npz, a folder of images, or `shapes` (tiny features only)."""
    if ref == "shapes":
        if features != "tiny":
            raise ValueError("--ref shapes is the tiny world's real images: use it with --features tiny")
        log(f"reference: {SHAPES_REF_IMAGES} real shapes images (stream {SHAPES_REF_SEED})")
        images = [fid_mod.as_uint8(shapes.sample(SHAPES_REF_SEED, i).image) for i in range(SHAPES_REF_IMAGES)]
        return fid_mod.moments(fid_mod.activations(images, model, batch_size, device=device))
    return fid_mod.statistics(ref, model, batch_size, device=device)


def compute_metrics(files, captions, args, log=print, cache=None):
    """{name: value} for the metrics asked for, over the image files (captions: each image's prompt). cache: a
    dict that keeps FID's network and reference statistics for the next call (several models, one reference)."""
    wanted = args.metrics
    cache = {} if cache is None else cache
    out = {}
    if "fid" in wanted:
        if not args.ref:
            raise ValueError("the fid metric needs --ref DIR_OR_NPZ (or --ref shapes with --features tiny)")
        if "fid" not in cache:
            model = fid_mod.load_network(args.features, args.inception_weights, args.metrics_device)
            cache["fid"] = model, reference_statistics(args.ref, model, args.features, args.metrics_batch,
                                                       args.metrics_device, log)
        model, ref = cache["fid"]
        stats = fid_mod.moments(fid_mod.activations(files, model, args.metrics_batch, device=args.metrics_device))
        out["fid"] = fid_mod.fid_from_stats(stats, ref)
    if "is" in wanted:
        model = load_inception(args.inception_weights, device=args.metrics_device)
        logits = torch.cat([inception_logits(torch.stack([fid_mod.read_image(f) for f in files[i:i + 50]]), model,
                                             device=args.metrics_device) for i in range(0, len(files), 50)])
        out["is"], out["is_std"] = inception_score(logits, splits=10, generator=torch.Generator().manual_seed(0))
    if "clip" in wanted:                          # its weights were checked before the first image (check_weights)
        model = load_clip(args.clip_weights).to(args.metrics_device)
        scores = torch.cat([clip_scores([fid_mod.read_image(f) for f in files[i:i + 32]], captions[i:i + 32], model,
                                        device=args.metrics_device) for i in range(0, len(files), 32)])
        out["clip"] = max(float(scores.mean()), 0.0)                 # torchmetrics clamps the mean
    if "adherence" in wanted:
        hits = 0
        for f, text in zip(files, captions):
            words = shapes.parse_caption(text) if len(text.split()) == 7 else None
            if words is None or text != shapes.caption(*words):
                raise ValueError(f"adherence reads tiny-world prompts ('a red circle on a blue background'), "
                                 f"not {text!r}")
            with Image.open(f) as image:
                hits += shapes.agrees(image, *words)
        out["adherence"] = hits / len(files)
    return out


# ---- the command (cli.py parses it) -------------------------------------------------------------------------------

def candidates(args):
    """[(flag, path)]: the files a --model or --lora pattern matches (module docstring), sorted; [] when no flag is
    a pattern."""
    patterns = [("model", args.model)] if args.model and glob.has_magic(args.model) else []
    patterns += [("lora", spec) for spec in args.lora if glob.has_magic(spec)]
    if not patterns:
        return []
    if len(patterns) > 1:
        raise ValueError(f"one pattern at a time: --{patterns[0][0]} {patterns[0][1]!r} and --{patterns[1][0]} "
                         f"{patterns[1][1]!r} both are")
    flag, pattern = patterns[0]
    path, scale = lora.parse_spec(pattern) if flag == "lora" else (pattern, None)
    found = sorted(glob.glob(path))
    if not found:
        raise ValueError(f"--{flag} {pattern!r} matches no file")
    names = [Path(f).stem for f in found]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise ValueError(f"--{flag} {pattern!r} matches two files named {twice}: their image folders would mix")
    return [(flag, f if scale is None else f"{f}:{scale:g}") for f in found]


def better(metric, a, b):
    """Whether value a of `metric` beats b: lower FID, higher everything else."""
    return a < b if metric == "fid" else a > b


def run(args, generate, load_pipeline, log=print):
    """minisd eval. args: its flags (cli.py); generate: the keyword arguments of Pipeline.generate but the prompts
    and seeds, already checked (cli.generation_kwargs); load_pipeline(device, log) -> the Pipeline of args' model
    and LoRAs, called only if some image is missing. With a pattern, one run per file it matches (module
    docstring), args.model or args.lora set to each in turn."""
    found = candidates(args)
    if not found:
        return run_one(args, generate, load_pipeline, log)
    out, model, loras, cache, rows = args.out, args.model, list(args.lora), {}, []
    try:
        for flag, path in found:
            args.out = str(Path(out) / Path(lora.parse_spec(path)[0] if flag == "lora" else path).stem)
            if flag == "model":
                args.model = path
            else:
                args.lora = [path if glob.has_magic(spec) else spec for spec in loras]
            log(f"--- {path}")
            values = run_one(args, generate, load_pipeline, log, cache, quiet=True)
            rows.append({flag: path, "folder": args.out, **(values or {})})
    finally:
        args.out, args.model, args.lora = out, model, loras
    if not distributed.is_main():
        return
    metric, flag = args.metrics[0], found[0][0]
    best = rows[0]
    for row in rows[1:]:
        if better(metric, row[metric], best[metric]):
            best = row
    tmp = Path(out) / "metrics.json.tmp"
    tmp.write_text(json.dumps({"candidates": rows, "metric": metric, "best": best[flag]}, indent=1) + "\n")
    os.replace(tmp, Path(out) / "metrics.json")
    for row in rows:
        print(row[flag] + "  " + "  ".join(f"{name}={row[name]:.6f}" for name in args.metrics))
    print(f"best={best[flag]}")


def check_weights(args):
    """The metrics' network weights found (Inception fetched if it must be) before the first image is made."""
    if "clip" in args.metrics:
        if not args.clip_weights:
            raise ValueError("the clip metric needs --clip-weights FILE (OpenAI CLIP ViT-L/14, transformers' or "
                             "open_clip's layout)")
        if not os.path.isfile(args.clip_weights):
            raise ValueError(f"--clip-weights {args.clip_weights}: no such file")
    if "is" in args.metrics or ("fid" in args.metrics and args.features == "inception"):
        args.inception_weights = str(inception_weights_file(args.inception_weights))


def run_one(args, generate, load_pipeline, log=print, cache=None, quiet=False):
    """One model's images and metrics into args.out; returns {metric: value} on rank 0 (prints them unless
    quiet)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if isinstance(args.metrics, str):
        args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; valid: {', '.join(METRICS)}")
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be at least 1")
    if "fid" in args.metrics and not args.ref:
        raise ValueError("the fid metric needs --ref DIR_OR_NPZ (or --ref shapes with --features tiny)")
    if args.ref == "shapes" and args.features != "tiny":
        raise ValueError("--ref shapes is the tiny world's real images: use it with --features tiny")
    check_weights(args)
    prompts = read_prompts(args.prompts)
    device = distributed.setup(args.device)     # joins the job under torchrun; rank 0 alone writes and prints
    log = distributed.main_only(log)
    out = Path(args.out)
    settings = generation_settings(args, generate, prompts)
    check_settings(out, settings)
    plan = image_plan(len(prompts), args.num_images, args.seed)
    folder = out / "images"
    t0 = time.time()
    batches = missing_batches(plan, folder, args.batch_size, log)
    if batches:
        pipe = load_pipeline(str(device), log)
        generate_missing(pipe, prompts, batches, folder, generate)
        del pipe
    args.metrics_device = str(device)
    distributed.barrier()                   # every image is on disk
    if not distributed.is_main():
        return
    seconds = time.time() - t0
    files = [folder / name for *_, name in plan]
    values = compute_metrics(files, [prompts[p] for _, p, _, _ in plan], args, log, cache)
    report = {**values, "num_images": len(files), "features": args.features, "ref": args.ref,
              "generation_seconds": round(seconds, 1), "settings": settings}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / "metrics.json")
    if not quiet:
        for name, value in values.items():             # last, one a line: what metric regexes read
            print(f"{name}={value:.6f}")
    return values
