"""AdamW's update on the CPU, three ways, over the SD1.5 U-Net's own parameter shapes (860M weights).

    python bench/adamw.py [--steps 3] [--write]

torch.optim.AdamW has three implementations of the same update (decoupled weight decay, then Adam's moments;
Loshchilov & Hutter 2019, algorithm 2): "for-loop" (one tensor at a time, a few elementwise kernels per tensor: what
diffusers' scripts get on the CPU by default), "foreach" (the same kernels over lists of tensors) and "fused" (one
kernel per tensor that reads the weight, its gradient and both moments once and writes three of them back). The
update is memory-bound, so the number of passes over 4 x 3.4 GB decides its time. `minisd train` uses the fused one
(train/settings.py train_config); this measures that choice on the machine at hand, with the CPU's flags, and, when
the CPU has AVX-512, once more in a child process limited to ATen's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2), the
kernels an AVX2-only CPU runs. Each implementation gets a fresh optimizer (fresh moments); the time is the median
of --steps steps after one warm-up step (the first step allocates the moments).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import common
import torch

KINDS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def measure(steps):
    from minisd.config import SD15
    from minisd.model import build_on_meta
    shapes = [p.shape for p in build_on_meta(SD15).unet.parameters()]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    out = {"weights": sum(p.numel() for p in params), "tensors": len(params),
           "capability": torch.backends.cpu.get_cpu_capability()}
    for name, kw in KINDS.items():
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, **kw)
        times = []
        for _ in range(1 + steps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = times[1:]
        del opt
        common.trim_heap()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.steps)))
        return
    runs = [("native", {})]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        runs.append(("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}))
    rows = []
    for label, env in runs:
        r = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], capture_output=True,
                           text=True, env={**os.environ, **env})
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        m = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append((label, m))
        print(label, {k: [round(t, 3) for t in m[k]] for k in KINDS}, flush=True)
    n = rows[0][1]
    lines = [f"Machine: {common.machine()}", "", f"CPU: {common.cpu_flags()}", "",
             f"AdamW step over the SD1.5 U-Net's {n['tensors']} parameter tensors ({n['weights'] / 1e6:.0f}M fp32 "
             f"weights), torch threads {torch.get_num_threads()}; median of {args.steps} steps after a warm-up step.",
             "", "| ATen kernels | for-loop s | foreach s | fused s | for-loop / fused |", "|---|---|---|---|---|"]
    for label, m in rows:
        med = {k: common.median(m[k]) for k in KINDS}
        lines.append(f"| {m['capability']} ({label}) | {med['for-loop']:.2f} | {med['foreach']:.2f} | "
                     f"{med['fused']:.2f} | **{med['for-loop'] / med['fused']:.1f}x** |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        common.write_section("adamw-cpu", "## AdamW step, three implementations (CPU)\n\n" + text)


if __name__ == "__main__":
    main()
