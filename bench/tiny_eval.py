"""Adherence of a tiny-model file, judged by shapes.judge: the figures of minisd/assets/MODEL_CARD.md.

    python bench/tiny_eval.py                      # the shipped weights
    python bench/tiny_eval.py runs/tiny/minisd-tiny.safetensors --seeds 4

For each cfg: exact agreement (colour, shape and background all right) and per-attribute accuracy on the 26
training combinations of tiny.eval_combinations, and exact agreement on the 12 held-out combinations; one image per
(combination, seed) from tiny.judged, as tests/test_tiny.py (DPM++ 2M Karras, 20 steps). Then the deterministic
samplers' spread.
"""
import argparse
import itertools
import time

import torch

from minisd.pipeline import Pipeline
from minisd.tiny.evaluate import eval_combinations, judged


def summary(rows):
    n = len(rows)
    exact = sum(want == got for want, got in rows)
    per = [sum(want[i] == got[i] for want, got in rows) / n for i in range(3)]
    return exact, n, per


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default=None, help="a tiny-model file (default: the shipped one)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--cfg", type=float, nargs="+", default=[7.5, 1.0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model, device="cpu", log=lambda *_: None)
    seeds = range(args.seeds)
    train, held = eval_combinations(held_out=False), eval_combinations(held_out=True)
    print(f"{len(train)} training and {len(held)} held-out combinations, seeds 0-{args.seeds - 1}")
    print("| cfg | train, exact | colour | shape | background | held out, exact |")
    print("|---|---|---|---|---|---|")
    for cfg in args.cfg:
        t0 = time.time()
        exact, n, (colour, shape, background) = summary(judged(pipe, train, seeds, cfg))
        h_exact, h_n, _ = summary(judged(pipe, held, seeds, cfg))
        print(f"| {cfg:g} | {exact / n:.1%} ({exact}/{n}) | {colour:.1%} | {shape:.1%} | {background:.1%} | "
              f"{h_exact / h_n:.1%} ({h_exact}/{h_n}) |   ({time.time() - t0:.0f} s)", flush=True)

    prompt, names = "a yellow square on a black background", ("euler", "heun", "dpmpp_2m", "lms")
    for steps in (8, 20, 40):
        latents = [pipe.generate(prompt, sampler=s, steps=steps, seed=3).latents for s in names]
        spread = max((a - b).abs().mean().item() for a, b in itertools.combinations(latents, 2))
        print(f"largest mean |latent difference| between {', '.join(names)} at {steps} steps: {spread:.4f}")
    t0 = time.time()
    pipe.generate("a red circle on a blue background", seed=0)
    print(f"one image (20 steps, cfg 7.5, fp32, {args.threads} threads): {time.time() - t0:.2f} s")


if __name__ == "__main__":
    main()
