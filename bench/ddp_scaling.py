"""Scaling of a data-parallel training step: images per second per process with W processes, relative to one.

    python bench/ddp_scaling.py --device cpu --model tiny --batch 2 --procs 1,2          # CPU, gloo (smoke size)
    python bench/ddp_scaling.py --device cuda --model sd15 --resolution 512 --batch 4 \\
        --mixed-precision bf16 --procs 1,2,4,8 --json ddp.json                           # N GPUs, nccl

For each W in --procs the script starts itself under `torchrun --standalone --nproc-per-node W` and each process
times the optimizer steps of minisd's loop (train/loop.py) on its own batch of --batch examples: the loss of
train/loss.py (U-Net forward and backward on random latents of the resolution, text encoder forward), the
gradient average over the processes (distributed.average_gradients, the one all-reduce per step), clipping and
AdamW. Data loading and the VAE are left out: they scale with the batch per process and would hide what this
measures, the cost of the all-reduce. Efficiency(W) = (images/s per process at W) / (images/s at W = 1), the
median over --steps steps after --warmup; the goal on GPUs is >= 90%. On the CPU each process gets one thread
(OMP_NUM_THREADS=1), so W = 2 needs two free cores to mean anything.

--model sd15 is the SD1.5 architecture with random weights (nothing is downloaded); --model tiny is the built-in
64 px model.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def worker(args):
    from minisd import distributed
    from minisd.config import SD15
    from minisd.diffusion import alphas_cumprod_from_betas, scaled_linear_betas
    from minisd.model import StableDiffusion, load_model, tiny_model_path
    from minisd.train.loop import TrainConfig, make_optimizer
    from minisd.train.loss import diffusion_loss

    device = distributed.setup(args.device)
    if args.model == "tiny":
        model = load_model(tiny_model_path(), verbose=False, device=device)
    else:
        torch.manual_seed(0)                           # the same random weights in every process
        model = StableDiffusion(SD15).to(device)
    resolution = args.resolution or model.config.image_size
    factor = 2 ** (len(model.config.vae.ch_mult) - 1)
    mc = model.config
    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas(mc.beta_start, mc.beta_end, mc.num_timesteps))
    model.requires_grad_(False)
    model.unet.requires_grad_(True).train()
    params = list(model.unet.parameters())
    opt = make_optimizer([{"params": params}], TrainConfig(steps=1, lr=1e-5, optimizer="adamw"))
    autocast = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    tokens = model.tokenizer(["a red circle on a blue background"] * args.batch)
    g = torch.Generator().manual_seed(distributed.rank())
    shape = (args.batch, mc.unet.in_channels, resolution // factor, resolution // factor)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(args.grad_accum):
            x0 = torch.randn(shape, generator=g).to(device)
            with torch.autocast(device.type, autocast) if autocast else nullcontext():
                loss = diffusion_loss(model, x0, tokens, g, alphas_cumprod)
            (loss / args.grad_accum).backward()
        distributed.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if distributed.is_main():
        step = statistics.median(times[args.warmup:])
        Path(args.worker_out).write_text(json.dumps({
            "processes": distributed.world_size(), "device": str(device), "model": args.model,
            "resolution": resolution, "batch_per_process": args.batch, "grad_accum": args.grad_accum,
            "mixed_precision": args.mixed_precision, "median_step_seconds": step,
            "images_per_second_per_process": args.batch * args.grad_accum / step,
            "step_seconds": times}))
    distributed.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--model", default="tiny", choices=("tiny", "sd15"))
    p.add_argument("--resolution", type=int, default=None, help="default: the model's own size")
    p.add_argument("--batch", type=int, default=2, help="examples per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--procs", default="1,2", help="process counts to measure, comma-separated")
    p.add_argument("--json", default=None, help="write the figures there too")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)     # set when started by torchrun
    args = p.parse_args()
    if args.worker_out:
        return worker(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in [int(n) for n in args.procs.split(",")]:
            out = os.path.join(tmp, f"w{w}.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={w}",
                       __file__, *sys.argv[1:], "--worker-out", out]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            subprocess.run(command, check=True, env=env, cwd=ROOT)
            rows.append(json.loads(Path(out).read_text()))
    base = rows[0]["images_per_second_per_process"] if rows[0]["processes"] == 1 else None
    print(f"\n{'processes':>9} {'step s':>8} {'img/s/proc':>10} {'img/s':>8} {'efficiency':>10}")
    for r in rows:
        ips = r["images_per_second_per_process"]
        r["efficiency"] = ips / base if base else None
        eff = f"{100 * r['efficiency']:.1f}%" if base else "-"
        print(f"{r['processes']:>9} {r['median_step_seconds']:>8.3f} {ips:>10.2f} {ips * r['processes']:>8.2f} "
              f"{eff:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
