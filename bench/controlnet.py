"""txt2img with one ControlNet: minisd against diffusers' StableDiffusionControlNetPipeline, on the same files.

    python bench/controlnet.py                   # CPU, fp32, 256x256 px, 10 Euler steps: about 15 minutes on 2 cores
    python bench/controlnet.py --write           # ... and regenerate its section of bench/RESULTS.md
    python bench/controlnet.py --small           # smoke test of the script on a small config (numbers meaningless)
    python bench/controlnet.py --from run.json --write     # RESULTS.md from a saved run

The files: a random-weight checkpoint at the full SD 1.5 configuration in the official single-file layout (bench/
common.py) and a random ControlNet at SD 1.5's ControlNet config in the ControlNet 1.1 layout (control_v11p_sd15_*
.safetensors: cldm's names, no prefix), every weight drawn, the zero convolutions too (at their real init, zero, a
ControlNet adds nothing, and its two outputs would agree whatever either library did); the condition image is a
synthetic edge map at the output size (so neither library resizes it). diffusers reads both files with its own
single-file converters.

Two measurements:

  whole process   `minisd generate PROMPT --model FILE --controlnet CN --control-image IMG --sampler euler --schedule
                  leading ...` against bench/diffusers_generate.py doing the same (imports, load, sampling with
                  CFG 7.5, decode, PNG), each a fresh process, alternated after one warm-up round (which also puts
                  the files in the page cache), median of --reps rounds.
  per step        in one process per library: txt2img without and with the ControlNet, alternated (a warm-up pair
                  first), the time between the sampler's step callbacks (the first step left out: the first
                  U-Net calls are where minisd measures its oneDNN choice); the median over the steps of --step-reps
                  runs. The ratio ControlNet step / plain step is each library's own, measured in one process.

Threads: both libraries run with the same --threads (OMP_NUM_THREADS, and minisd's --threads). The CPU's steal time
(/proc/stat) over the whole run is recorded: on a shared virtual machine it says how much of the CPU other guests
took.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

import common
from common import median, torch

PROMPT = common.PROMPT
SECTION, TITLE = "controlnet-cpu", "## txt2img with one ControlNet: minisd vs diffusers on CPU (bench/controlnet.py)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3, help="whole-process rounds (after one warm-up round)")
    p.add_argument("--step-reps", type=int, default=2, help="per-step runs of each kind (after one warm-up pair)")
    p.add_argument("--step-steps", type=int, default=None, help="sampling steps of the per-step runs (default --steps)")
    p.add_argument("--update", default=None, help="add this run's parts to a saved run (json) and save it with --json")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--what", default="whole,steps", help="whole, steps or both")
    p.add_argument("--ckpt", default=None, help="an SD 1.5-layout file to use instead of writing a random one")
    p.add_argument("--diffusers-config", default=None, help="its config folder for from_single_file")
    p.add_argument("--controlnet", default=None, help="a ControlNet 1.1 file to use instead of a random one")
    p.add_argument("--dir", default=None, help="where to write the temporary files")
    p.add_argument("--small", action="store_true", help="a small config, to smoke-test this script")
    p.add_argument("--json", default=None, help="save the results here")
    p.add_argument("--from", dest="from_json", default=None, help="render a saved run instead of measuring")
    p.add_argument("--write", action="store_true", help="regenerate this section of bench/RESULTS.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--control-image", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.size, args.steps = min(args.size, 64), min(args.steps, 4)
    args.step_steps = args.step_steps or args.steps
    return args


def model_config(small):
    if small:
        import dataclasses

        from checkpoints import SMALL_SD1
        from minisd.config import VAEConfig
        # a VAE that downsamples by 8, as SD's, so the hint encoder is cldm's fixed stack (tests/test_controlnet.py)
        return dataclasses.replace(SMALL_SD1, name="small-f8", vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2),
                                                                             num_res_blocks=1))
    from minisd.config import SD15
    return SD15


# ---------------------------------------------------------------------------------------------------------------
# the files

def write_files(args, folder):
    """The checkpoint, its diffusers config, the ControlNet 1.1 file, its diffusers config and the condition image
    (each unless given). The big writes run in a child process, so this one stays small."""
    cfg = model_config(args.small)
    if args.ckpt is None:
        args.ckpt = os.path.join(folder, "sd15.safetensors")
        args.diffusers_config = os.path.join(folder, "config")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", "write-model", "--ckpt", args.ckpt,
                        "--diffusers-config", args.diffusers_config] + (["--small"] if args.small else []), check=True)
        print(f"wrote {args.ckpt}: {os.path.getsize(args.ckpt) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
              flush=True)
    if args.controlnet is None:
        args.controlnet = os.path.join(folder, "control_v11p_sd15_random.safetensors")
        subprocess.run([sys.executable, __file__, "--child", "write-controlnet", "--controlnet", args.controlnet]
                       + (["--small"] if args.small else []), check=True)
        print(f"wrote {args.controlnet}: {os.path.getsize(args.controlnet) / 1e9:.2f} GB", flush=True)
    args.controlnet_config = os.path.join(folder, "controlnet_config")
    os.makedirs(args.controlnet_config, exist_ok=True)
    from minisd.config import ControlNetConfig
    from weights_convert import controlnet as wc
    with open(os.path.join(args.controlnet_config, "config.json"), "w") as f:
        json.dump(wc.config_json(ControlNetConfig.for_model(cfg)), f)
    args.control_image = os.path.join(folder, "edges.png")
    edge_map(args.size).save(args.control_image)


def write_model(args):
    import checkpoints
    cfg = model_config(args.small)
    if args.small:
        checkpoints.write_ldm_checkpoint(args.ckpt, cfg, seed=0)
    else:
        common.write_checkpoint(args.ckpt)
    checkpoints.write_diffusers_config(args.diffusers_config, cfg)


def write_controlnet(args):
    """Every weight N(0, 1/fan_in) (biases and norm gains as tests/checkpoints._Draw draws them), zero convs too."""
    from checkpoints import _Draw
    from minisd.config import ControlNetConfig
    from minisd.controlnet import ControlNet, save_controlnet
    with torch.device("meta"):
        net = ControlNet(ControlNetConfig.for_model(model_config(args.small)))
    draw = _Draw(seed=3)
    net.load_state_dict({k: draw.like(k, v.shape) for k, v in net.state_dict().items()}, assign=True)
    save_controlnet(net, args.controlnet, "1.1")


def edge_map(size):
    """White lines and circles on black, as a Canny edge map looks."""
    image = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(image)
    s = size / 256
    d.ellipse([40 * s, 30 * s, 150 * s, 140 * s], outline="white", width=max(1, round(2 * s)))
    d.rectangle([120 * s, 120 * s, 230 * s, 220 * s], outline="white", width=max(1, round(2 * s)))
    d.line([0, 200 * s, 256 * s, 170 * s], fill="white", width=max(1, round(2 * s)))
    return image


# ---------------------------------------------------------------------------------------------------------------
# whole processes

def env(args):
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                PYTHONPATH=str(common.ROOT))


def commands(args, out):
    size = ["--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps), "--seed", "1"]

    def minisd(name, *extra):
        return [sys.executable, "-m", "minisd", "generate", PROMPT, "--model", args.ckpt, "--sampler", "euler",
                "--schedule", "leading", "--device", "cpu", "--dtype", "fp32", "--threads", str(args.threads),
                "--overwrite", "--controlnet", args.controlnet, "--control-image", args.control_image, *extra,
                "--out", os.path.join(out, f"{name}.png"), *size]
    theirs = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_generate.py"),
              PROMPT, "--model", args.ckpt, "--config", args.diffusers_config, "--controlnet", args.controlnet,
              "--controlnet-config", args.controlnet_config, "--control-image", args.control_image,
              "--out", os.path.join(out, "diffusers.png"), *size]
    # "minisd-plain": every layer plain, which is what `minisd generate --controlnet` ran before the ControlNet
    # joined the oneDNN-prepared path (its call bypassed the U-Net's MeasuredChoice)
    return {"minisd": minisd("minisd"), "diffusers": theirs, "minisd-plain": minisd("minisd-plain", "--no-prepack")}


def whole_process(args, folder):
    cmds = commands(args, folder)
    logs = {impl: "" for impl in cmds}

    def runner(impl):
        def run():
            r = subprocess.run(cmds[impl], capture_output=True, text=True, cwd=str(common.ROOT), env=env(args))
            if r.returncode:
                raise SystemExit(f"{impl} failed:\n{r.stderr[-4000:]}")
            logs[impl] = r.stdout + r.stderr
        return run
    times = common.alternate({impl: runner(impl) for impl in cmds}, args.reps, "cpu", warmup=1)
    for impl in cmds:
        print(f"whole process {impl}: {[round(t, 1) for t in times[impl]]} s", flush=True)
    a, b = (np.asarray(Image.open(os.path.join(folder, f"{impl}.png")), dtype=np.float32) / 255
            for impl in ("minisd", "diffusers"))
    onednn = [line.strip() for line in logs["minisd"].splitlines() if "oneDNN" in line]
    return dict(**times, max_diff=float(np.abs(a - b).max()), mean_diff=float(np.abs(a - b).mean()), onednn_log=onednn,
                commands={k: " ".join(shlex.quote(os.path.basename(c) if os.sep in c else c) for c in v)
                          for k, v in cmds.items()})


# ---------------------------------------------------------------------------------------------------------------
# per step, in one process per library

def step_times(impl, args):
    """{"plain": [seconds per step], "controlnet": [...]}: txt2img without / with the ControlNet, alternated after a
    warm-up pair; the time between step callbacks, the first step of each run left out."""
    torch.set_num_threads(args.threads)
    image = Image.open(args.control_image).convert("RGB")
    g = dict(width=args.size, height=args.size)
    if impl == "minisd":
        from minisd.controls import load_control
        pipe = common.load_minisd(args.ckpt, "cpu", "fp32")
        control, _ = load_control(args.controlnet, image, "none", 1.0, 0.0, 1.0, False, pipe.model.config)

        def run(controls, stamps):
            pipe.generate(PROMPT, "", args.step_steps, 7.5, "euler", "leading", seed=1, controls=controls,
                          callback=lambda *_: stamps.append(time.perf_counter()), **g)
        kinds = {"plain": lambda s: run((), s), "controlnet": lambda s: run([control], s)}
    else:
        import diffusers
        pipe = common.load_diffusers(args.ckpt, args.diffusers_config, "cpu", torch.float32)
        cn = diffusers.ControlNetModel.from_single_file(args.controlnet, config=args.controlnet_config,
                                                        local_files_only=True, torch_dtype=torch.float32)
        parts = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "feature_extractor")}
        cpipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=cn, safety_checker=None,
                                                            feature_extractor=None, requires_safety_checker=False)
        cpipe.set_progress_bar_config(disable=True)

        def run(p, stamps, **kw):
            def stamp(_pipe, _i, _t, kwargs):
                stamps.append(time.perf_counter())
                return kwargs
            p(PROMPT, num_inference_steps=args.step_steps, guidance_scale=7.5,
              generator=torch.Generator().manual_seed(1),
              callback_on_step_end=stamp, output_type="latent", **g, **kw)
        kinds = {"plain": lambda s: run(pipe, s), "controlnet": lambda s: run(cpipe, s, image=image)}
    out = {k: [] for k in kinds}
    with torch.no_grad():
        for r in range(1 + args.step_reps):
            for kind, fn in kinds.items():
                stamps = []
                fn(stamps)
                if r:
                    out[kind] += np.diff(stamps).tolist()
        if impl == "minisd":
            # the same with every layer plain (the U-Net's choice forced), for the plain-layer figures
            from minisd import fast
            fast.restore(pipe.model)
            pipe.unet_call.choice = "plain"
            out["plain-layers"] = {k: [] for k in kinds}
            for r in range(args.step_reps):
                for kind, fn in kinds.items():
                    stamps = []
                    fn(stamps)
                    out["plain-layers"][kind] += np.diff(stamps).tolist()
    return out


def per_step(args):
    out = {}
    for impl in ("minisd", "diffusers"):
        r = subprocess.run([sys.executable, __file__, "--child", impl, "--ckpt", args.ckpt, "--diffusers-config",
                            args.diffusers_config, "--controlnet", args.controlnet, "--control-image",
                            args.control_image, "--size", str(args.size), "--steps", str(args.step_steps),
                            "--step-reps", str(args.step_reps), "--threads", str(args.threads)]
                           + (["--small"] if args.small else []), capture_output=True, text=True, env=env(args))
        if r.returncode:
            raise SystemExit(f"per-step child {impl} failed:\n{r.stderr[-4000:]}")
        out[impl] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"per step {impl}: plain {median(out[impl]['plain']):.3f} s, ControlNet "
              f"{median(out[impl]['controlnet']):.3f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------

def cpu_ticks():
    """(steal, total) jiffies of all CPUs since boot (/proc/stat's first line)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return fields[7], sum(fields[:8])


def measure(args):
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    write_files(args, tmp.name)
    if args.child is None:
        args.controlnet_config = os.path.join(tmp.name, "controlnet_config")
    result = dict(machine=common.machine(), cpu=common.cpu_flags(), size=args.size, steps=args.steps, reps=args.reps,
                  step_reps=args.step_reps, threads=args.threads, small=args.small,
                  file_gb=os.path.getsize(args.ckpt) / 1e9, controlnet_gb=os.path.getsize(args.controlnet) / 1e9)
    steal0, total0 = cpu_ticks()
    load0 = os.getloadavg()[0]
    if "whole" in args.what:
        result["whole"] = whole_process(args, tmp.name)
        if args.json:
            common.save_json(args.json, result)        # kept if the per-step part fails
    if "steps" in args.what:
        result["per_step"] = per_step(args)
        result["step_steps"] = args.step_steps
    steal1, total1 = cpu_ticks()
    result["steal"] = (steal1 - steal0) / max(total1 - total0, 1)
    result["load"] = [load0, os.getloadavg()[0]]
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return result


def render(r):
    lines = [f"Machine: {r['machine']}; finished {r['finished']}.", f"CPU: {r['cpu']}.",
             f"Threads: {r['threads']} in every process (OMP_NUM_THREADS, and minisd's --threads). CPU steal "
             f"{r.get('steal_note', 'over the whole run')}: {100 * r['steal']:.1f}% (/proc/stat); load average {r['load'][0]:.1f} at the start, "
             f"{r['load'][1]:.1f} at the end.", "",
             f"fp32, a random-weight checkpoint at the {'small test' if r['small'] else 'full SD 1.5'} "
             f"configuration ({r['file_gb']:.2f} GB) and a random "
             f"ControlNet 1.1 file at its ControlNet config ({r['controlnet_gb']:.2f} GB, every weight drawn, the "
             f"zero convolutions too); {r['size']}x{r['size']} px, {r['steps']} Euler steps on SD's \"leading\" "
             f"schedule, CFG 7.5 (the ControlNet runs on both halves of the CFG batch in both libraries), "
             f"ControlNet scale 1 on every step, a {r['size']}x{r['size']} edge map as the condition image. Ratios "
             f"are minisd / diffusers (below 1: minisd is faster)."]
    if "whole" in r:
        w = r["whole"]
        m, d = median(w["minisd"]), median(w["diffusers"])
        lines += ["", "Whole process (imports, load both files, sample, decode, write the PNG), alternated, after one "
                  f"warm-up round; median of {len(w['minisd'])} runs (all runs in brackets):", "",
                  "| | minisd | diffusers | ratio | max / mean pixel diff |", "|---|---|---|---|---|",
                  f"| txt2img with one ControlNet, {r['size']} px, {r['steps']} steps | {m:.1f} s "
                  f"({', '.join(f'{t:.1f}' for t in w['minisd'])}) | {d:.1f} s "
                  f"({', '.join(f'{t:.1f}' for t in w['diffusers'])}) | {m / d:.2f} | "
                  f"{w['max_diff']:.4f} / {w['mean_diff']:.5f} |"]
        if "minisd-plain" in w:
            p = median(w["minisd-plain"])
            lines.append(f"| the same, minisd with `--no-prepack` (every layer plain: what `--controlnet` ran before "
                         f"this benchmark's fix) | {p:.1f} s ({', '.join(f'{t:.1f}' for t in w['minisd-plain'])}) | "
                         f"{d:.1f} s | {p / d:.2f} | - |")
        lines += ["",
                  "minisd: `" + w["commands"]["minisd"] + "`", "", "diffusers: `" + w["commands"]["diffusers"] + "`"]
        if "minisd-plain" in w:
            lines += ["", "Why the `--no-prepack` row: before this benchmark, a ControlNet generation called the U-Net "
                      "module directly, around `minisd.fast.MeasuredChoice`, so in a fresh `minisd generate "
                      "--controlnet` process the U-Net and the ControlNet both ran on plain layers, whose convolutions "
                      "copy their whole weight into oneDNN's blocked layout at every call (minisd/fast/onednn.py). "
                      "Now the ControlNet runs on oneDNN-prepared layers whenever the U-Net does: the choice is "
                      "measured on the controlled call (the U-Net and the ControlNets prepared together) and kept for "
                      "the U-Net; the ControlNets are given back plain, in their own Parameters, after the run "
                      "(Pipeline._controlled; tests/test_controlnet.py checks the image against diffusers' within "
                      "2/255 on that path)."]
        if w.get("onednn_log"):
            lines += ["", "minisd's own log of its oneDNN decision in its last run: " + " ".join(w["onednn_log"])]
    if "per_step" in r:
        s = r["per_step"]
        lines += ["", f"Per sampling step (one CFG step: batch 2), in one process per library, txt2img without and "
                  f"with the ControlNet alternated after a warm-up pair, {r.get('step_steps', r['steps'])} steps a "
                  f"run; the "
                  f"median over {r['step_reps']} runs' steps (the first step of each run left out). The two "
                  f"libraries' processes run one after the other, under whatever load the machine has then: on a "
                  f"shared machine compare the ratio within a column (ControlNet step / plain step), not the "
                  f"columns:", "",
                  "| per step | minisd | diffusers | ratio |", "|---|---|---|---|"]
        mp, dp = median(s["minisd"]["plain"]), median(s["diffusers"]["plain"])
        mc, dc = median(s["minisd"]["controlnet"]), median(s["diffusers"]["controlnet"])
        lines += [f"| plain step (U-Net) | {mp:.3f} s | {dp:.3f} s | {mp / dp:.2f} |",
                  f"| ControlNet step (ControlNet + U-Net) | {mc:.3f} s | {dc:.3f} s | {mc / dc:.2f} |",
                  f"| ControlNet step / plain step | {mc / mp:.2f} | {dc / dp:.2f} | - |"]
        if "plain-layers" in s["minisd"]:
            pl = {k: median(v) for k, v in s["minisd"]["plain-layers"].items()}
            lines += [f"| minisd with every layer plain (`prepack=False`): plain step, ControlNet step, ratio | "
                      f"{pl['plain']:.3f} s, {pl['controlnet']:.3f} s, {pl['controlnet'] / pl['plain']:.2f} | - | - |"]
    if r.get("parts"):
        lines += ["", "Added afterwards with `--update`: " + "; ".join(r["parts"]) + "."]
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.child == "write-model":
        return write_model(args)
    if args.child == "write-controlnet":
        return write_controlnet(args)
    if args.child:
        cfg_dir = os.path.join(os.path.dirname(args.control_image), "controlnet_config")
        args.controlnet_config = cfg_dir
        return print(json.dumps(step_times(args.child, args)))
    result = json.loads(open(args.from_json).read()) if args.from_json else measure(args)
    if args.update:
        saved = json.loads(open(args.update).read())
        saved.update({k: v for k, v in result.items() if k in ("whole", "per_step", "step_steps", "step_reps")})
        saved["parts"] = saved.get("parts", []) + [f"{args.what}: {result['machine']}, "
                                                   f"steal {100 * result['steal']:.1f}%"]
        result = saved
    common.report(result, render(result), args.json, args.write, SECTION, TITLE)


if __name__ == "__main__":
    main()
