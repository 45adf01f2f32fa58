"""minisd against diffusers, side by side, on the same random-weight full-SD1.5 file in the official layout.

    python bench/compare.py                          # CPU, fp32: rows (a)-(f), about 20 minutes on 2 cores
    python bench/compare.py --write                  # ... and regenerate its section of bench/RESULTS.md
    python bench/compare.py --device cuda --dtype fp16 --json out.json   # rows (a)-(d) on a GPU
    python bench/compare.py --rows cli --ckpt FILE --diffusers-config DIR   # only the whole-process row (f)
    python bench/compare.py --from out.json --write  # write RESULTS.md from a saved run (e.g. from the GPU machine)
    python bench/compare.py --small                  # smoke test of the script on a small config (numbers meaningless)
    python bench/compare.py --rows text --update run.json --json run2.json   # measure rows again, keep the rest

The runs behind bench/RESULTS.md are saved in bench/results/*.json; `--from FILE --write` regenerates a section.
On CPU the U-Net row uses 32x32 latents and txt2img 256x256 px (a 512 px txt2img takes minutes on 2 cores);
--unet, --size, --vae, --steps and --reps set the size of the work.

Rows: (a) U-Net forward, batch 2 (one CFG step); (b) txt2img with Euler and CFG 7.5; (c) VAE decode;
(d) text encoding of a prompt and a negative prompt; (e) loading the single file (CPU only); (f) the whole process
a user waits for: `minisd generate PROMPT --model FILE --width 128 --height 128 --steps 10 --sampler euler
--schedule leading` against bench/diffusers_generate.py doing the same (load, first use, sampling, decode, save),
each a fresh subprocess, alternated, median of --reps cli (CPU only; --cli-size, --cli-steps).

Time: both pipelines live in this process and each row runs minisd, diffusers, minisd, diffusers, ... (after one
warm-up round each); the figure is the median, so machine noise hits both equally. Each row also prints the
largest difference between the two outputs, to show it is the same work.

Memory on CPU: a process can only see its own peak, so each implementation runs the work of every row again
(--mem-reps times per row) in a fresh child process that loads only its own library and model. Before each row the child returns freed heap
to the OS (malloc_trim) and resets its peak resident set (writing 5 to /proc/self/clear_refs); the row's figure
is the peak during the row minus the resident memory before it: the working memory on top of the loaded model (the
median of --mem-reps such runs: glibc keeps some freed blocks, which moves a single reading by tens of MiB).
Row (e) reports the child's whole peak while loading, and the peak minus the memory after its imports.
Memory on CUDA: torch.cuda.max_memory_allocated during the row minus what was allocated before it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

import common
from common import gib, median, torch

PROMPT, NEGATIVE = common.PROMPT, common.NEGATIVE
ROWS = ("unet", "txt2img", "vae", "text")
TITLES = {"unet": "(a) U-Net forward, batch 2 (CFG), {unet}x{unet} latents",
          "txt2img": "(b) txt2img {size}x{size} px, {steps} steps Euler, CFG 7.5, batch 1",
          "vae": "(c) VAE decode {vae}x{vae} px",
          "text": "(d) text encoding (prompt + negative prompt)",
          "load": "(e) load the single file ({file})",
          "cli": "(f) whole process: `minisd generate` {cli_size}x{cli_size} px, {cli_steps} steps Euler vs the same in diffusers"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--unet", type=int, default=None, help="U-Net latent side (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--size", type=int, default=None, help="txt2img image side (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vae", type=int, default=512, help="VAE decode image side")
    p.add_argument("--reps", default=None, help="rounds per row, e.g. unet=5,txt2img=2,vae=3,text=10,load=2")
    p.add_argument("--rows", default="unet,txt2img,vae,text,load,cli")
    p.add_argument("--cli-size", type=int, default=128, help="image side of the whole-process row (f)")
    p.add_argument("--cli-steps", type=int, default=10, help="sampling steps of the whole-process row (f)")
    p.add_argument("--ckpt", default=None, help="use this SD1.5-layout file instead of writing a random one")
    p.add_argument("--diffusers-config", default=None, help="the config folder for from_single_file")
    p.add_argument("--dir", default=None, help="where to write the temporary files")
    p.add_argument("--small", action="store_true", help="a small config, to smoke-test this script")
    p.add_argument("--json", default=None, help="save the results here")
    p.add_argument("--from", dest="from_json", default=None, help="render a saved run instead of measuring")
    p.add_argument("--write", action="store_true", help="regenerate this run's section of bench/RESULTS.md")
    p.add_argument("--update", default=None, help="measure --rows again and replace them in this saved run")
    p.add_argument("--mem-reps", default="unet=3,txt2img=3,vae=3,text=9",
                   help="CPU memory: runs of each row in each child, the figure is their median")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-rows", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.unet = args.unet or (64 if cuda else 32)
    args.size = args.size or (512 if cuda else 256)
    reps = dict(unet=5, txt2img=2, vae=3, text=10, load=2, cli=3) if not cuda else dict(unet=20, txt2img=5, vae=10, text=20)
    for item in filter(None, (args.reps or "").split(",")):
        k, v = item.split("=")
        reps[k] = int(v)
    args.reps = reps
    args.mem_reps = {k: int(v) for k, v in (item.split("=") for item in args.mem_reps.split(",") if item)}
    args.rows = [r for r in args.rows.split(",") if r and not (cuda and r in ("load", "cli"))]
    if args.small:
        args.unet, args.size, args.vae, args.steps = min(args.unet, 8), min(args.size, 64), min(args.vae, 64), 2
    return args


def torch_dtype(name):
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def model_config(args):
    if args.small:
        from checkpoints import SMALL_SD1
        return SMALL_SD1
    from minisd.config import SD15
    return SD15


# ---------------------------------------------------------------------------------------------------------------
# the work of each row, as a callable returning its output (so the two outputs can be compared)

def inputs(args, cfg):
    g = torch.Generator().manual_seed(0)
    L = args.unet
    return dict(x=torch.randn(2, cfg.unet.in_channels, L, L, generator=g),
                t=torch.tensor([500.0, 500.0]),
                context=torch.randn(2, 77, cfg.unet.context_dim, generator=g),
                latents=torch.randn(1, cfg.vae.embed_dim, args.vae // 8, args.vae // 8, generator=g))


def minisd_work(pipe, args, inp):
    dev, dt = pipe.device, pipe.dtype
    x, t, ctx = inp["x"].to(dev, dt), inp["t"].to(dev), inp["context"].to(dev, dt)
    latents = inp["latents"].to(dev)
    return dict(
        unet=lambda: pipe.unet_call(x, t, ctx),  # the U-Net as the pipeline runs it (oneDNN-prepared on the CPU)
        txt2img=lambda: np.asarray(pipe.generate(PROMPT, NEGATIVE, args.steps, 7.5, "euler", "leading", seed=1,
                                                 width=args.size, height=args.size).images[0]),
        vae=lambda: pipe.decode(latents),
        text=lambda: torch.cat(pipe.encode_prompts(PROMPT, NEGATIVE)))


def diffusers_work(pipe, args, inp, vae_dtype):
    import copy
    dev, dt = pipe.device, pipe.unet.dtype
    x, t, ctx = inp["x"].to(dev, dt), inp["t"].to(dev), inp["context"].to(dev, dt)
    # the decode row runs both VAEs in minisd's VAE dtype, the same work: fp32 for an fp16 model (minisd's default,
    # since SD 2.1's decoder overflows in fp16), where diffusers' SD1.5 pipeline would decode in fp16
    vae = pipe.vae if pipe.vae.dtype == vae_dtype else copy.deepcopy(pipe.vae).to(vae_dtype)
    latents = inp["latents"].to(dev, vae_dtype)
    scale = pipe.vae.config.scaling_factor

    def text():
        cond, uncond = pipe.encode_prompt(PROMPT, dev, 1, True, NEGATIVE)
        return torch.cat([cond, uncond])
    return dict(
        unet=lambda: pipe.unet(x, t, encoder_hidden_states=ctx).sample,
        txt2img=lambda: np.asarray(pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps,
                                        guidance_scale=7.5, generator=torch.Generator().manual_seed(1),
                                        width=args.size, height=args.size).images[0]),
        vae=lambda: vae.decode(latents / scale).sample,
        text=text)



def diff(a, b):
    """(max, mean) absolute difference of the two outputs; images as pixels in [0, 1]."""
    if isinstance(a, np.ndarray):
        d = np.abs(a.astype(np.float32) - b.astype(np.float32)) / 255
    else:
        d = (a.float() - b.float()).abs()
    return float(d.max()), float(d.mean())


# ---------------------------------------------------------------------------------------------------------------
# CPU memory: one child per implementation

def child(args):
    """Load one library's pipeline, then run each row once; print peak memory figures as JSON."""
    before_load = common.rss_bytes()
    t0 = time.perf_counter()
    dtype = torch_dtype(args.dtype)
    if args.child == "minisd":
        pipe = common.load_minisd(args.ckpt, args.device, args.dtype)
    else:
        pipe = common.load_diffusers(args.ckpt, args.diffusers_config, args.device, dtype)
    out = dict(load_seconds=time.perf_counter() - t0, imports_rss=before_load, load_peak_rss=common.rss_bytes("VmHWM"))
    rows = [r for r in args.child_rows.split(",") if r]
    if rows:
        # diffusers leaves the weights memory-mapped from the file: they become resident when first read. Read
        # every weight now, so that no row is charged for paging in weights (minisd's are resident already).
        modules = [pipe.model] if args.child == "minisd" else [pipe.unet, pipe.vae, pipe.text_encoder]
        with torch.no_grad():
            for m in modules:
                for p in m.parameters():
                    p.sum()
        out["weights_resident_rss"] = common.rss_bytes()
        lifetime_peak = common.rss_bytes("VmHWM")
        cfg = model_config(args)
        inp = inputs(args, cfg)
        work = (minisd_work(pipe, args, inp) if args.child == "minisd"
                else diffusers_work(pipe, args, inp, torch.float32 if dtype == torch.float16 else dtype))
        with torch.no_grad():
            # one-time allocations (thread pools, kernel caches) before any row: a U-Net call on 8x8 latents
            x, t, ctx = inp["x"][..., :8, :8].to(dtype), inp["t"], inp["context"].to(dtype)
            pipe.unet_call(x, t, ctx) if args.child == "minisd" else pipe.unet(x, t, encoder_hidden_states=ctx)
            for row in rows:
                # the heap's state (glibc keeps some freed blocks) moves a single reading by tens of MiB: the
                # median of --mem-reps runs, the same for both libraries
                runs = [common.peak_rss_of(work[row]) for _ in range(args.mem_reps.get(row, 1))]
                out[row] = [net for net, _ in runs]
                lifetime_peak = max([lifetime_peak, *(peak for _, peak in runs)])
        out["lifetime_peak_rss"] = lifetime_peak      # loading, reading every weight, and every row
    print(json.dumps(out))


def run_child(args, impl, rows):
    cmd = [sys.executable, __file__, "--child", impl, "--child-rows", ",".join(rows), "--ckpt", args.ckpt,
           "--device", args.device, "--dtype", args.dtype, "--unet", str(args.unet), "--size", str(args.size),
           "--steps", str(args.steps), "--vae", str(args.vae),
           "--mem-reps", ",".join(f"{k}={v}" for k, v in args.mem_reps.items())]
    if args.diffusers_config:
        cmd += ["--diffusers-config", args.diffusers_config]
    if args.small:
        cmd.append("--small")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child {impl} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def whole_process(args):
    """Row (f): the wall time of `minisd generate ...` and of bench/diffusers_generate.py doing the same, each a fresh
    process (imports, load, first use, sampling, decode, PNG), alternated, after one warm-up round (which also puts
    the file in the page cache for both)."""
    out = tempfile.mkdtemp(dir=args.dir)
    common_args = ["--width", str(args.cli_size), "--height", str(args.cli_size), "--steps", str(args.cli_steps),
                   "--seed", "1"]
    cmds = {"minisd": [sys.executable, "-c", "from minisd.cli import main; main()", "generate", PROMPT,
                       "--model", args.ckpt, "--sampler", "euler", "--schedule", "leading", "--device", "cpu",
                       "--dtype", "fp32", "--overwrite", "--out", os.path.join(out, "minisd.png"), *common_args],
            "diffusers": [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_generate.py"),
                          PROMPT, "--model", args.ckpt, "--config", args.diffusers_config,
                          "--out", os.path.join(out, "diffusers.png"), *common_args]}
    logs = {impl: [] for impl in cmds}

    def runner(impl):
        def run():
            r = subprocess.run(cmds[impl], capture_output=True, text=True, cwd=str(common.ROOT))
            if r.returncode:
                raise SystemExit(f"{impl} generate failed:\n{r.stderr[-4000:]}")
            logs[impl].append(r.stdout + r.stderr)
        return run
    times = common.alternate({impl: runner(impl) for impl in cmds}, args.reps.get("cli", 3), "cpu", warmup=1)
    for impl in cmds:
        print(f"cli {impl}: {[round(t, 1) for t in times[impl]]} s", flush=True)
    a, b = (np.asarray(Image.open(os.path.join(out, f"{impl}.png"))) for impl in cmds)
    decision = [line for line in logs["minisd"][-1].splitlines() if "oneDNN" in line]
    return dict(minisd=dict(seconds=median(times["minisd"]), times=times["minisd"]),
                diffusers=dict(seconds=median(times["diffusers"]), times=times["diffusers"]),
                max_diff=diff(a, b)[0], mean_diff=diff(a, b)[1], onednn_log=decision)


# ---------------------------------------------------------------------------------------------------------------

def measure(args):
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    cfg = model_config(args)
    if args.ckpt is None:
        args.ckpt = os.path.join(tmp.name, "sd15.safetensors")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common, torch;"
                        "from checkpoints import SMALL_SD1; "
                        "common.write_checkpoint(sys.argv[2], cfg=SMALL_SD1 if sys.argv[3] == '1' else None)",
                        os.path.dirname(os.path.abspath(__file__)), args.ckpt, str(int(args.small))], check=True)
        print(f"wrote {args.ckpt}: {os.path.getsize(args.ckpt) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
              flush=True)
    if args.diffusers_config is None:
        args.diffusers_config = os.path.join(tmp.name, "config")
        if args.small:
            import checkpoints
            checkpoints.write_diffusers_config(args.diffusers_config, cfg)
        else:
            common.write_config(args.diffusers_config)
    result = dict(machine=common.machine(), cpu=common.cpu_flags(), device=args.device, dtype=args.dtype, unet=args.unet, size=args.size,
                  steps=args.steps, vae=args.vae, reps=args.reps, mem_reps=args.mem_reps, file_gb=os.path.getsize(args.ckpt) / 1e9,
                  rows={}, small=args.small)
    cpu = not args.device.startswith("cuda")
    rows = [r for r in args.rows if r in ROWS]

    if cpu and ("load" in args.rows or rows):     # children first, while this process is still small
        loads = {"minisd": [], "diffusers": []}
        mem = {}
        for r in range(max(args.reps.get("load", 1), 1)):
            for impl in ("minisd", "diffusers"):
                out = run_child(args, impl, rows if r == 0 else [])
                loads[impl].append(out["load_seconds"])
                if r == 0:
                    mem[impl] = out
                print(f"child {impl}: load {out['load_seconds']:.1f} s, peak {gib(out['load_peak_rss'])}", flush=True)
        if "load" in args.rows:
            result["rows"]["load"] = {impl: dict(seconds=median(loads[impl]), times=loads[impl],
                                                 peak=mem[impl]["load_peak_rss"],
                                                 net_peak=mem[impl]["load_peak_rss"] - mem[impl]["imports_rss"])
                                      for impl in loads}
        if rows:
            result["rows"]["lifetime"] = {impl: dict(peak=mem[impl]["lifetime_peak_rss"]) for impl in mem}

    if cpu and "cli" in args.rows:
        result["rows"]["cli"] = whole_process(args)
        result.update(cli_size=args.cli_size, cli_steps=args.cli_steps)
    if not rows:
        tmp.cleanup()
        return result

    dtype = torch_dtype(args.dtype)
    ours = common.load_minisd(args.ckpt, args.device, args.dtype)
    theirs = common.load_diffusers(args.ckpt, args.diffusers_config, args.device, dtype)
    inp = inputs(args, cfg)
    work = {"minisd": minisd_work(ours, args, inp), "diffusers": diffusers_work(theirs, args, inp, ours.vae_dtype)}
    for row in rows:
        with torch.no_grad():
            a, b = work["minisd"][row](), work["diffusers"][row]()      # also the warm-up round
            entry = dict(zip(("max_diff", "mean_diff"), diff(a, b)))
            del a, b
            times = common.alternate({impl: work[impl][row] for impl in work}, args.reps[row], args.device, warmup=0)
            entry.update({impl: dict(seconds=median(times[impl]), times=times[impl]) for impl in work})
            for impl in work:
                if cpu:
                    entry[impl]["peak"], entry[impl]["peak_runs"] = median(mem[impl][row]), mem[impl][row]
                else:
                    entry[impl]["peak"], _, entry[impl]["reserved"] = common.peak_cuda_of(work[impl][row])
        result["rows"][row] = entry
        print(f"{row}: minisd {entry['minisd']['seconds']:.3f} s, diffusers {entry['diffusers']['seconds']:.3f} s, "
              f"max diff {entry['max_diff']:.2e}", flush=True)
    tmp.cleanup()
    return result


def render(result):
    r = result
    fmt = dict(unet=r["unet"], size=r["size"], steps=r["steps"], vae=r["vae"], file=f"{r['file_gb']:.2f} GB",
               cli_size=r.get("cli_size", 128), cli_steps=r.get("cli_steps", 10))
    device = "CPU" if r["device"] == "cpu" else "CUDA"
    lines = [f"Machine: {r['machine']}.", *([f"CPU: {r['cpu']}."] if "cpu" in r else []),
             *[f"Update: {u}." for u in r.get("updates", [])], "",
             f"{device}, {r['dtype']}, full SD1.5 configuration (random weights), official single-file layout. "
             "Each row runs the same work in both: (b) minisd's `euler` sampler on the `leading` schedule against "
             "diffusers' EulerDiscreteScheduler with SD's scheduler config"
             + (", each library with its default VAE dtype: minisd decodes an fp16 model's latents in fp32 "
                "(SD 2.1's decoder overflows in fp16), diffusers' SD1.5 pipeline in fp16, hence minisd's larger "
                "peak there; (c) both VAEs in fp32" if r["dtype"] == "fp16" else "") + ". "
             + ("On CPU, txt2img runs at 256x256 px (32x32 latents) to keep a full run near 15 minutes. "
                if r["device"] == "cpu" else "")
             + f"Times are medians over alternated rounds after a warm-up round (rounds per row: "
             f"{', '.join(f'{k} {v}' for k, v in r['reps'].items())}); ratios are minisd / diffusers "
             f"(below 1: minisd is faster or smaller). "
             + ("Memory: peak resident memory of the row's work above the loaded model, each implementation in "
                "its own child process (see the docstring of bench/compare.py)"
                + (", the median of several runs of the row (" + ", ".join(f"{k} {v}" for k, v in r["mem_reps"].items())
                   + ")" if "mem_reps" in r else "")
                + "; load: the child's whole peak, and "
                "in brackets the peak above the memory after its imports. diffusers leaves the weights "
                "memory-mapped from the file, to be read when first used, which makes its load fast and small; "
                "(e') is the peak over the whole child process, once every weight has been read."
                if r["device"] == "cpu" else
                "Memory: peak torch.cuda.max_memory_allocated during the row above what was allocated before "
                "it (the working memory; weights excluded).")
             + " 'max diff' is the largest difference between the two outputs (pixels in [0, 1] for txt2img; with the "
               "mean in brackets)"
             + (": in reduced precision a random-weight network amplifies rounding over 20 guided steps, so the "
                "images agree only roughly; bench/gpu.py compares them in fp32." if r["dtype"] != "fp32" else "."),
             "", "| row | minisd | diffusers | time ratio | minisd peak | diffusers peak | memory ratio | max diff |",
             "|---|---|---|---|---|---|---|---|"]
    for row in (*ROWS, "load", "lifetime", "cli"):
        if row not in r["rows"]:
            continue
        e = r["rows"][row]
        m, d = e["minisd"], e["diffusers"]
        if row == "cli":
            lines.append(f"| {TITLES[row].format(**fmt)} | {m['seconds']:.1f} s | {d['seconds']:.1f} s | "
                         f"{m['seconds'] / d['seconds']:.2f} | - | - | - | {e['max_diff']:.1e} ({e['mean_diff']:.1e}) |")
            continue
        if row == "lifetime":
            lines.append(f"| (e') the child process's whole life: load, read every weight, prepare (minisd), rows (a)-(d) | - | - "
                         f"| - | {gib(m['peak'])} | {gib(d['peak'])} | {m['peak'] / d['peak']:.2f} | - |")
            continue
        if row == "load":
            mem = (f"{gib(m['peak'])} ({gib(m['net_peak'])})", f"{gib(d['peak'])} ({gib(d['net_peak'])})",
                   f"{m['peak'] / d['peak']:.2f} ({m['net_peak'] / d['net_peak']:.2f})")
            diff = "-"
        else:
            mem = (gib(m["peak"]), gib(d["peak"]), f"{m['peak'] / d['peak']:.2f}")
            diff = f"{e['max_diff']:.1e}"
            if row == "txt2img" and "mean_diff" in e:
                diff += f" ({e['mean_diff']:.1e})"
        lines.append(f"| {TITLES[row].format(**fmt)} | {m['seconds']:.3f} s | {d['seconds']:.3f} s | "
                     f"{m['seconds'] / d['seconds']:.2f} | {' | '.join(mem)} | {diff} |")
    if "cli" in r["rows"] and r["rows"]["cli"].get("onednn_log"):
        lines += ["", "(f): minisd's own log of its oneDNN decision in its last run: "
                  + " ".join(r["rows"]["cli"]["onednn_log"]).strip()]
    if "prepare" in r:
        p = r["prepare"]
        lines += ["", f"minisd prepares the text encoder and U-Net for oneDNN at their first use on the CPU "
                  f"(minisd/onednn.py: conv weights reordered once into oneDNN's blocked layout): "
                  f"{p['seconds']:.1f} s once, peak {gib(p['peak'])} above the loaded model while it runs; "
                  f"(e') includes it, the timed rows run after it."]
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.child:
        return child(args)
    result = json.loads(open(args.from_json).read()) if args.from_json else measure(args)
    if args.update:
        new, result = result, json.loads(open(args.update).read())
        if not set(ROWS) <= set(new["rows"]):
            new["rows"].pop("lifetime", None)        # a partial child run says nothing of the whole life
        result["rows"].update(new["rows"])
        if "prepare" in new:
            result["prepare"] = new["prepare"]
        result.setdefault("updates", []).append(f"rows {', '.join(new['rows'])} measured again: {new['machine']}")
    if result["device"] == "cpu":
        section, title = "compare-cpu", "## minisd vs diffusers on CPU (bench/compare.py)"
    else:
        section = f"compare-cuda-{result['dtype']}"
        title = f"## minisd vs diffusers on CUDA, {result['dtype']} (bench/compare.py)"
    common.report(result, render(result), args.json, args.write, section, title)


if __name__ == "__main__":
    main()
