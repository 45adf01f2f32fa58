"""Plain vs oneDNN-prepared layers (minisd/fast/onednn.py), per layer shape of the SD1.5 U-Net and for whole calls.

    python bench/onednn_layers.py --latent 16 --reps 5            # each distinct conv/linear call of the U-Net
    python bench/onednn_layers.py --latent 16 --whole --reps 3    # and whole U-Net calls (random weights, 3.4 GB)
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/onednn_layers.py ...   # emulate an AVX2-only CPU

The layer calls are found by running the U-Net on the meta device (shapes only) with forward hooks; each distinct
(layer, input shape) is then built with random weights and timed plain and prepared, alternated, the fastest of
--reps (the least disturbed by other work on the machine); whole calls: the median.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from minisd.config import SD15  # noqa: E402
from minisd.fast import onednn  # noqa: E402
from minisd.model import build_on_meta  # noqa: E402


def layer_calls(latent, batch=2):
    """{(kind, args, input shape): count} over one U-Net call at `latent` x `latent`."""
    unet = build_on_meta(SD15).unet
    calls = {}

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            key = ("conv", (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]), tuple(inp[0].shape))
        else:
            key = ("linear", (m.in_features, m.out_features), tuple(inp[0].shape))
        calls[key] = calls.get(key, 0) + 1
    for m in unet.modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            m.register_forward_hook(hook)
    with torch.no_grad(), torch.device("meta"):
        unet(torch.empty(batch, 4, latent, latent), torch.empty(batch), torch.empty(batch, 77, 768))
    return calls


def build(kind, a):
    if kind == "conv":
        cin, cout, k, s, p = a
        return nn.Conv2d(cin, cout, k, s, p).eval()
    return nn.Linear(*a).eval()


def timed(fn, x, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def per_layer(latent, reps):
    """Each distinct conv / linear call: plain; prepared; and for convs, prepared with the weight left in the layout
    laid out for an 8x8 map (what onednn.Conv2d did before it laid weights out per input shape)."""
    rows = []
    with torch.no_grad():
        for (kind, a, shape), n in sorted(layer_calls(latent).items(), key=lambda kv: str(kv[0])):
            plain = build(kind, a)
            fns = {"plain": plain}
            if kind == "conv":
                prepared = onednn.Conv2d(plain)
                stale = prepared.weight                         # laid out for [1, C, 8, 8] (8 x stride)
                fns["8x8 layout"] = lambda x, p=prepared, w=stale: torch.ops.mkldnn._convolution_pointwise(
                    x, w, p.bias, p.padding, p.stride, p.dilation, p.groups, "none", [], "")
            else:
                prepared = onednn.Linear(plain)
            fns["prepared"] = prepared
            x = torch.randn(shape)
            for f in fns.values():
                f(x)                                            # warm-up: kernels, and the per-shape layout
            times = {k: [] for k in fns}
            for _ in range(reps):                               # alternated
                for k, f in fns.items():
                    times[k] += timed(f, x, 1)
            best = {k: min(v) for k, v in times.items()}        # the least disturbed run (a loaded machine)
            rows.append(dict(kind=kind, args=a, shape=shape, count=n, **best))
            print(f"{kind:6s} {str(a):24s} {str(shape):18s} x{n:2d}  "
                  + "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in best.items()), flush=True)
    for k in ("plain", "8x8 layout", "prepared"):
        total = sum(r.get(k, r["prepared"] if k == "8x8 layout" else 0) * r["count"] for r in rows)
        print(f"sum over one U-Net call ({k}; linears prepared in the 8x8 column): {total:.3f} s")
    return rows


def whole(latent, reps):
    import copy
    torch.manual_seed(0)
    with torch.device("meta"):
        from minisd.unet import UNet
        unet = UNet(SD15.unet)
    unet = unet.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
        for b in unet.buffers():
            b.normal_(0, 0.02) if b.is_floating_point() else None
    prepared = onednn.prepare(copy.deepcopy(unet))
    x, t, c = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    tp, tq = [], []
    with torch.no_grad():
        t0 = time.perf_counter(); unet(x, t, c); first_p = time.perf_counter() - t0
        t0 = time.perf_counter(); prepared(x, t, c); first_q = time.perf_counter() - t0
        for _ in range(reps):
            tp += timed(lambda x: unet(x, t, c), x, 1)
            tq += timed(lambda x: prepared(x, t, c), x, 1)
    mp, mq = statistics.median(tp), statistics.median(tq)
    print(f"whole U-Net, batch 2, {latent}x{latent}: plain {mp:.3f} s {[round(v, 3) for v in tp]} (first {first_p:.2f}),"
          f" prepared {mq:.3f} s {[round(v, 3) for v in tq]} (first {first_q:.2f}), ratio {mq / mp:.2f}", flush=True)
    return dict(plain=tp, prepared=tq)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--whole", action="store_true")
    p.add_argument("--no-layers", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}, threads {torch.get_num_threads()}")
    out = {}
    if not args.no_layers:
        out["layers"] = per_layer(args.latent, args.reps)
    if args.whole:
        out["whole"] = whole(args.latent, args.reps)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
