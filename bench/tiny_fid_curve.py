"""FID in the tiny world's own features (`--features tiny`) at early checkpoints of the tiny model's recipe: it
should fall as the model trains. The figures of bench/RESULTS.md, section "FID as the tiny model trains".

    python bench/tiny_fid_curve.py --out runs/fid-curve              # steps 0, 250, 500, 1000, 2000 + shipped
    python bench/tiny_fid_curve.py --out runs/fid-curve --steps 0 500 --n 200   # a shorter look

Phase 3 of minisd/train/tiny.py (text encoder + U-Net from their seeded initial weights, the recipe's own
10000-step schedule, EMA) is run with TrainConfig.until, so each checkpoint is the recipe's run at that step, not a
shorter run with its own schedule. Phases 1-2 (the autoencoder) are taken from the shipped model instead of
being trained again: the bank of latents is encoded by the shipped VAE (fp16 weights, where the recipe's run
used fp32 ones), which changes the latents by rounding only. Each checkpoint's EMA weights draw `--n` images, one
per caption of the training distribution (DPM++ 2M Karras, 20 steps, CFG 7.5, seed = index), compared with
`--ref` real images; the shipped model (the recipe's step 10000) is the last row.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from minisd.config import TINY
from minisd.metrics import fid
from minisd.metrics import tiny_features
from minisd.model import StableDiffusion, load_model, tiny_model_path
from minisd.pipeline import Pipeline
from minisd.train import tiny as tiny_recipe
from minisd.tiny import shapes
from minisd.train.loop import TrainConfig


def as_u8(images):
    return torch.stack([fid.as_uint8(im) for im in images])


def model_fid(model, net, reference, n, batch=50):
    pipe = Pipeline(model, log=lambda *_: None)
    prompts = [shapes.sample(5, i).text for i in range(n)]          # the training distribution's captions
    images = []
    for start in range(0, n, batch):
        images += pipe.generate(prompts[start:start + batch], seed=list(range(start, min(start + batch, n))),
                                steps=20).images
    return fid.fid_from_stats(fid.moments(fid.activations(as_u8(images), net, batch_size=250)), reference)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="working folder (bank, checkpoint, results.json)")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 250, 500, 1000, 2000])
    p.add_argument("--n", type=int, default=500, help="generated images per checkpoint")
    p.add_argument("--ref", type=int, default=2000, help="real images of the reference set")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)     # the recipe writes sample grids there
    t0 = time.time()

    net = tiny_features.load_tiny_features()
    real = as_u8([shapes.sample(11, i).image for i in range(args.ref)])
    reference = fid.moments(fid.activations(real, net, batch_size=250))

    recipe = tiny_recipe.Recipe()
    torch.manual_seed(recipe.seed)                    # the recipe's initial weights (recipe.train_tiny)
    model = StableDiffusion(TINY)
    shipped = load_model(tiny_model_path(), verbose=False)
    model.vae.load_state_dict({k: v.float() for k, v in shipped.vae.state_dict().items()})
    bank = tiny_recipe.make_bank(model, recipe, args.out)
    config = dataclasses.replace(TINY, vae=dataclasses.replace(TINY.vae,
                                                               scale_factor=round(bank["scale_factor"].item(), 5)))
    model.config, model.vae.cfg = config, config.vae
    print(f"scale_factor {config.vae.scale_factor} (shipped {shipped.config.vae.scale_factor})", flush=True)
    cfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, lr_schedule="tiny", warmup_steps=100,
                      ema_decay=recipe.ema_decay, checkpoint_every=100, seed=recipe.seed + 1)   # recipe.train_tiny's

    rows = []
    for step in sorted(args.steps):
        if step > 0:
            tiny_recipe.train_text_and_unet(model, bank, recipe, dataclasses.replace(cfg, until=step), args.out,
                                            "unet", log=lambda *_: None)
        model.eval().requires_grad_(False)
        rows.append(dict(step=step, fid=model_fid(model, net, reference, args.n)))
        print(f"step {step}: FID {rows[-1]['fid']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    rows.append(dict(step=recipe.steps, fid=model_fid(shipped.float(), net, reference, args.n), shipped=True))
    print(f"step {recipe.steps} (shipped): FID {rows[-1]['fid']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    result = dict(rows=rows, n=args.n, ref=args.ref, threads=args.threads, seconds=round(time.time() - t0),
                  torch=torch.__version__, python=sys.version.split()[0])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("| recipe step | FID (tiny features) |\n|---|---|")
    for r in rows:
        print(f"| {r['step']}{' (shipped)' if r.get('shipped') else ''} | {r['fid']:.2f} |")


if __name__ == "__main__":
    main()
