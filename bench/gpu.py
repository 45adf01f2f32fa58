"""The CUDA fast path: throughput against diffusers, the U-Net's achieved TFLOP/s, peak memory by image size.

    python bench/gpu.py --json gpu.json                  # on a machine with a CUDA GPU (about 5 minutes)
    python bench/gpu.py --from gpu.json --write          # regenerate its section of bench/RESULTS.md
    python bench/gpu.py --device cpu --small             # smoke test of the script (CUDA-only parts skipped)

The run behind bench/RESULTS.md is saved in bench/results/gpu_h100_fp16.json. It was made with
`--ckpt FILE --diffusers-config DIR` (a file and config folder written beforehand by bench/common.py), on a
machine where only torch, transformers and the carried diffusers wheel were installed.

What it measures, all on one random-weight full-SD1.5 file in the official layout:
  1. the device's dense matmul rate (8192^3 bf16 and fp16 products on random data; median of 20 after warm-up);
  2. the FLOPs of one guided U-Net step (batch 2 for CFG, 64x64 latents = 512 px), counted by
     torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and attention; elementwise work not counted);
  3. the time of that U-Net call (CUDA events, median) for diffusers and for minisd eager, torch.compile, CUDA
     graph, and both: achieved TFLOP/s = counted FLOPs / time;
  4. whole txt2img, 512x512, batch 1, CFG 7.5, 20 Euler steps, text encoding and VAE decode included, alternating
     diffusers' default fp16 pipeline (SDPA attention; its SD1.5 pipeline decodes in fp16, while minisd decodes in
     fp32 by default) with each minisd variant;
  5. that the sampling loop never synchronises with the GPU (torch.cuda.set_sync_debug_mode("error"));
  6. peak CUDA memory (max_memory_allocated / max_memory_reserved, weights included, only that pipeline on the
     GPU) of a whole txt2img at 512, 768 and 1024 px, with and without the tiled VAE decode;
  7. that it is the same work: the 512 px txt2img of both libraries in fp32 on the GPU (a random-weight network
     amplifies fp16 rounding over 20 guided steps, so the fp16 images agree only roughly).
"""
import argparse
import json
import time

import numpy as np

import common
from common import gib, median, torch

VARIANTS = {"eager": {}, "compile": dict(compile=True), "cuda graph": dict(cuda_graph=True),
            "compile + cuda graph": dict(compile=True, cuda_graph=True)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    p.add_argument("--ckpt", default=None)
    p.add_argument("--diffusers-config", default=None)
    p.add_argument("--dir", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", default="512,768,1024", help="image sides for the memory table")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--small", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--from", dest="from_json", default=None)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    if args.small:
        args.size, args.steps, args.sizes, args.rounds = 64, 2, "64,128", 2
    return args


def dtype_of(name):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


def matmul_tflops(device, dtype, n=8192, reps=20):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / median(times) / 1e12


def event_time(fn, reps=20, warmup=3):
    """Median seconds of fn() by CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return median(times)


def unet_flops(unet, x, t, context):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context)
    return counter.get_total_flops()


def sync_check(pipe, steps=3, size=512):
    """Run the sampling loop with every synchronising CUDA call made an error."""
    from minisd import samplers
    out = {}
    original = samplers.sample

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    samplers.sample = strict
    try:
        for sampler in ("euler", "euler_a", "dpmpp_2m", "heun"):
            try:
                pipe.generate(common.PROMPT, common.NEGATIVE, steps, 7.5, sampler, seed=1, width=size, height=size)
                out[sampler] = "no sync"
            except RuntimeError as e:
                out[sampler] = f"SYNC: {str(e).splitlines()[0][:120]}"
    finally:
        samplers.sample = original
    return out


def txt2img(args, name, pipe):
    if name == "diffusers":
        return lambda: np.asarray(pipe(common.PROMPT, negative_prompt=common.NEGATIVE, num_inference_steps=args.steps,
                                       guidance_scale=7.5, generator=torch.Generator().manual_seed(1),
                                       width=args.size, height=args.size).images[0])
    return lambda: np.asarray(pipe.generate(common.PROMPT, common.NEGATIVE, args.steps, 7.5, "euler", "leading",
                                            seed=1, width=args.size, height=args.size).images[0])


def image_diff(a, b):
    """(max, mean) absolute difference of two uint8 images, in [0, 1]."""
    d = np.abs(a.astype(np.float32) - b.astype(np.float32)) / 255
    return float(d.max()), float(d.mean())


def measure(args):
    import tempfile

    from minisd.pipeline import Pipeline
    cuda = args.device.startswith("cuda")
    dtype = dtype_of(args.dtype)
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    cfg = None
    if args.small:
        from checkpoints import SMALL_SD1 as cfg
    if args.ckpt is None:
        args.ckpt = f"{tmp.name}/sd15.safetensors"
        t0 = time.perf_counter()
        common.write_checkpoint(args.ckpt, dtype=torch.float16, cfg=cfg)     # fp16 storage: half the file
        print(f"wrote the checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.diffusers_config is None:
        import checkpoints
        from minisd.config import SD15
        args.diffusers_config = f"{tmp.name}/config"
        checkpoints.write_diffusers_config(args.diffusers_config, cfg or SD15)
    result = dict(machine=common.machine(), dtype=args.dtype, size=args.size, steps=args.steps, small=args.small)
    if cuda:
        result["matmul_tflops"] = {name: matmul_tflops(args.device, dt) for name, dt in
                                   (("bf16", torch.bfloat16), ("fp16", torch.float16))}
        print("matmul TFLOP/s", result["matmul_tflops"], flush=True)

    ours = common.load_minisd(args.ckpt, args.device, args.dtype)
    theirs = common.load_diffusers(args.ckpt, args.diffusers_config, args.device, dtype)
    print("loaded both", flush=True)
    if cuda:
        result["sync"] = sync_check(ours, size=args.size)
        print("sync check", result["sync"], flush=True)

    # -- peak memory by size (only the measured pipeline on the device) --------------------------------------
    memory = []
    if cuda:
        theirs.to("cpu")
        for side in [int(s) for s in args.sizes.split(",")]:
            for tile in (None, 64):
                if tile and side // 8 <= tile:
                    continue
                ours.set_memory_options(vae_tile=tile)
                with torch.no_grad():
                    _, peak, reserved = common.peak_cuda_of(lambda: ours.generate(
                        common.PROMPT, common.NEGATIVE, args.steps, 7.5, "euler", "leading", seed=1,
                        width=side, height=side))
                memory.append(dict(impl="minisd", side=side, tile=tile, peak=peak, reserved=reserved))
                print(memory[-1], flush=True)
        ours.set_memory_options(vae_tile=None)
        ours.model.to("cpu")
        theirs.to(args.device)
        for side in [int(s) for s in args.sizes.split(",")]:
            for tiling in (False, True):
                if tiling and side <= 512:
                    continue
                theirs.vae.enable_tiling() if tiling else theirs.vae.disable_tiling()
                _, peak, reserved = common.peak_cuda_of(lambda: theirs(
                    common.PROMPT, negative_prompt=common.NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(1), width=side, height=side))
                memory.append(dict(impl="diffusers", side=side, tile=tiling or None, peak=peak, reserved=reserved))
                print(memory[-1], flush=True)
        theirs.vae.disable_tiling()
        ours.model.to(args.device)
        ours = Pipeline(ours.model, ours.device, ours.dtype, log=lambda *_: None)    # channels_last again
    result["memory"] = memory
    if args.json:
        common.save_json(args.json, result)

    # -- the U-Net step alone, then whole txt2img: each group of variants alternated with diffusers -----------
    g = torch.Generator().manual_seed(0)
    L = args.size // 8
    x = torch.randn(2, 4, L, L, generator=g).to(args.device, dtype)
    t = torch.tensor([500.0, 500.0], device=args.device)
    context = torch.randn(2, 77, ours.model.config.unet.context_dim, generator=g).to(args.device, dtype)
    result["unet_flops"] = unet_flops(ours.model.unet, x, t, context)
    print(f"U-Net step: {result['unet_flops'] / 1e12:.3f} TFLOP counted", flush=True)
    if cuda:    # every attention of the U-Net can run on the flash kernel (an error here if one could not)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ours.model.unet(x, t, context)
            result["flash"] = "yes"
        except RuntimeError as e:
            result["flash"] = f"no: {str(e).splitlines()[0][:100]}"
        print("flash attention:", result["flash"], flush=True)
    result["unet_step"], result["txt2img"] = {}, {}
    wanted = [v for v in args.variants.split(",") if v in VARIANTS and (cuda or "graph" not in v)]
    # compiling takes minutes: the variants without it are measured (and saved) first
    for group in ([v for v in wanted if "compile" not in v], [v for v in wanted if "compile" in v]):
        if not group:
            continue
        pipes = {"diffusers": theirs}
        for name in group:
            pipes[f"minisd {name}"] = Pipeline(ours.model, ours.device, ours.dtype, log=lambda *_: None,
                                               **VARIANTS[name])
        with torch.no_grad():
            for name, pipe in pipes.items():
                if name == "diffusers":
                    fn = lambda: pipe.unet(x, t, encoder_hidden_states=context).sample
                else:
                    fn = lambda pipe=pipe: pipe.unet_call(x, t, context)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize() if cuda else None
                first = time.perf_counter() - t0                         # compile / capture time
                if name not in result["unet_step"]:
                    result["unet_step"][name] = dict(seconds=event_time(fn), first_call=first)
                    print(name, result["unet_step"][name], flush=True)
            fns = {name: txt2img(args, name, pipe) for name, pipe in pipes.items()}
            images = {name: fn() for name, fn in fns.items()}
            times = common.alternate(fns, args.rounds, args.device, warmup=1)
        base = median(times["diffusers"])
        for name in fns:
            if name == "diffusers" and name in result["txt2img"]:
                continue
            max_diff, mean_diff = image_diff(images[name], images["diffusers"])
            result["txt2img"][name] = dict(seconds=median(times[name]), times=times[name], diffusers_seconds=base,
                                           max_diff=max_diff, mean_diff=mean_diff)
            print(f"txt2img {name}: {median(times[name]):.3f} s (diffusers in the same rounds {base:.3f} s), "
                  f"pixel diff vs diffusers max {max_diff:.3f} mean {mean_diff:.4f}", flush=True)
        if args.json:
            common.save_json(args.json, result)

    # -- the same work: both in fp32 ------------------------------------------------------------------------
    if cuda:
        ours32 = Pipeline(ours.model, ours.device, torch.float32, log=lambda *_: None)
        theirs.to(torch.float32)
        with torch.no_grad():
            a, b = txt2img(args, "minisd", ours32)(), txt2img(args, "diffusers", theirs)()
        result["fp32_diff"] = image_diff(a, b)
        print("fp32 txt2img pixel diff (max, mean):", result["fp32_diff"], flush=True)
        if args.json:
            common.save_json(args.json, result)
    tmp.cleanup()
    return result


def render(r):
    lines = [f"Machine: {r['machine']}.", ""]
    flops = r["unet_flops"]
    rate = r.get("matmul_tflops", {})
    if rate:
        lines += [f"Measured dense matmul rate (8192^3, random data): bf16 {rate['bf16']:.0f} TFLOP/s, "
                  f"fp16 {rate['fp16']:.0f} TFLOP/s.", ""]
    lines += [f"One guided U-Net step at {r['size']} px (batch 2, {r['size'] // 8}x{r['size'] // 8} latents, "
              f"{r['dtype']}): {flops / 1e12:.2f} TFLOP counted by FlopCounterMode (matmuls, convolutions, attention; "
              f"elementwise ops not counted; the issue's estimate was about 1.8 TFLOP)."
              + (f" All its attention layers run on SDPA's flash kernel when forced to: {r['flash']}."
                 if r.get("flash") else ""), "",
              "| U-Net step | time | TFLOP/s | share of the bf16 matmul rate | first call (compile / capture) |",
              "|---|---|---|---|---|"]
    for name, s in r["unet_step"].items():
        achieved = flops / s["seconds"] / 1e12
        share = f"{achieved / rate['bf16']:.0%}" if rate else "-"
        lines.append(f"| {name} | {s['seconds'] * 1e3:.2f} ms | {achieved:.0f} | {share} | {s['first_call']:.1f} s |")
    lines += ["", f"Whole txt2img, {r['size']}x{r['size']}, batch 1, CFG 7.5, {r['steps']} Euler steps (text encoding "
              f"and VAE decode included; diffusers: its default {r['dtype']} pipeline with SDPA attention, which "
              f"decodes in {r['dtype']}; minisd decodes in fp32 by default for fp16 models, i.e. does more work). "
              "Median of alternated rounds; each minisd variant's ratio is against diffusers' median in the same "
              "rounds (variants with torch.compile ran in a second group). Pixel differences from diffusers' "
              "image in [0, 1]: a random-weight network amplifies fp16 rounding over 20 guided steps"
              + (f"; in fp32 on the same GPU the two images differ by at most {r['fp32_diff'][0]:.4f} "
                 f"(mean {r['fp32_diff'][1]:.5f}): the same work." if r.get("fp32_diff") else "."), "",
              "| pipeline | seconds / image | images / s | throughput vs diffusers | max / mean pixel diff |",
              "|---|---|---|---|---|"]
    for name, t in r["txt2img"].items():
        diff = f"{t['max_diff']:.3f} / {t['mean_diff']:.4f}" if "mean_diff" in t else f"{t['max_diff']:.3f} / -"
        lines.append(f"| {name} | {t['seconds']:.3f} | {1 / t['seconds']:.2f} | "
                     f"{t['diffusers_seconds'] / t['seconds']:.2f}x | {diff} |")
    if r.get("sync"):
        lines += ["", "Host-device synchronisation inside the sampling loop (torch.cuda.set_sync_debug_mode('error'), "
                  "3 steps at 512 px): " + ", ".join(f"{k}: {v}" for k, v in r["sync"].items()) + "."]
    if r.get("memory"):
        lines += ["", f"Peak CUDA memory of a whole txt2img ({r['dtype']}, {r['steps']} Euler steps, CFG, batch 1, SDPA "
                  "attention; weights included; only that pipeline on the GPU). Tiled VAE: minisd "
                  "`set_memory_options(vae_tile=64)` (64x64-latent tiles), diffusers `vae.enable_tiling()`.", "",
                  "| pipeline | image | VAE decode | peak allocated | peak reserved |", "|---|---|---|---|---|"]
        for m in r["memory"]:
            lines.append(f"| {m['impl']} | {m['side']}x{m['side']} | {'tiled' if m['tile'] else 'whole'} | "
                         f"{gib(m['peak'])} | {gib(m['reserved'])} |")
        big = [m for m in r["memory"] if m["impl"] == "minisd" and m["side"] == 1024]
        if big:
            worst = max(m["reserved"] for m in big)
            lines += ["", f"1024x1024 within 12 GB: {'yes' if worst < 12e9 else 'NO'} (minisd's largest peak "
                      f"reserved at 1024 px is {gib(worst)}, whole or tiled decode)."]
    return "\n".join(lines)


def main():
    args = parse_args()
    result = json.loads(open(args.from_json).read()) if args.from_json else measure(args)
    common.report(result, render(result), args.json, args.write, f"gpu-{result['dtype']}",
                  f"## The CUDA fast path, {result['dtype']} (bench/gpu.py)")


if __name__ == "__main__":
    main()
