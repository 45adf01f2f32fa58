"""What the side-by-side benchmarks share: the random SD1.5 file, both pipelines, timing, memory, RESULTS.md.

The checkpoint is a random-weight file at the full SD1.5 configuration in the official single-file layout, written
by tests/checkpoints.py (names and shapes from the reference modules). Where the `ldm` package is missing (the GPU
machine), the U-Net and VAE names are taken from minisd's own modules, which are the LDM names by construction
(both key lists, in order, and hence the drawn values, are identical: `same_keys_as_ldm` checks it where ldm
is installed); the text encoder names always come from transformers' CLIPTextModel.
"""
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

PROMPT = "a castle on a hill at dusk, oil painting, highly detailed"
NEGATIVE = "blurry, low quality"
RESULTS = ROOT / "bench" / "RESULTS.md"


# ---------------------------------------------------------------------------------------------------------------
# the model files

def _has_ldm():
    try:
        import ldm.modules.diffusionmodules.openaimodel  # noqa: F401
        return True
    except ImportError:
        return False


def write_checkpoint(path, dtype=torch.float32, seed=0, cfg=None, ldm=None):
    """A random full-size SD1.5 file in the official layout (4.27 GB in fp32)."""
    import checkpoints
    from minisd.config import SD15
    cfg = cfg or SD15
    if _has_ldm() if ldm is None else ldm:
        checkpoints.write_ldm_checkpoint(path, cfg, seed=seed, dtype=dtype)
        return
    import math

    from safetensors.torch import save_file

    from minisd.model import build_on_meta
    model = build_on_meta(cfg)
    n = sum(p.numel() for p in model.unet.parameters())    # the pool size write_ldm_checkpoint picks
    draw = checkpoints._Draw(seed, min(checkpoints.POOL, 2 ** math.ceil(math.log2(n))))
    sd = {"model.diffusion_model." + k: draw.like(k, tuple(v.shape), dtype) for k, v in model.unet.state_dict().items()}
    sd.update({"first_stage_model." + k: draw.like(k, tuple(v.shape), dtype)
               for k, v in model.vae.state_dict().items()})
    sd.update(checkpoints.text_state_dict(cfg, draw, dtype))
    save_file(sd, str(path))        # LDM's schedule buffers are left out: neither library reads them


def same_keys_as_ldm():
    import checkpoints
    from minisd.config import SD15
    from minisd.model import build_on_meta
    model = build_on_meta(SD15)
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    return (shapes(model.unet) == shapes(checkpoints.reference_unet(SD15))
            and shapes(model.vae) == shapes(checkpoints.reference_vae(SD15)))


def write_config(folder):
    """The diffusers config folder from_single_file needs offline (tests/checkpoints.write_diffusers_config)."""
    import checkpoints
    from minisd.config import SD15
    checkpoints.write_diffusers_config(folder, SD15)


def load_minisd(ckpt, device, dtype, **kw):
    from minisd.pipeline import Pipeline
    return Pipeline.load(str(ckpt), device=device, dtype=dtype, log=lambda *_: None, **kw)


def load_diffusers(ckpt, config, device, dtype):
    """diffusers' own pipeline from the same file, its default attention (SDPA), with Euler (the benchmark's
    sampler) from the file's scheduler config (SD's: "leading" timesteps, steps_offset 1)."""
    import diffusers

    import checkpoints
    pipe = checkpoints.diffusers_from_single_file(ckpt, config, torch_dtype=dtype).to(device)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# timing and memory

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(fns, reps, device, warmup=1):
    """Run each of fns (name -> callable) in turn, `reps` rounds (after `warmup` rounds), so that machine noise
    hits all equally; returns name -> list of seconds."""
    times = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs):
    return statistics.median(xs)


def trim_heap():
    """Give freed heap memory back to the OS, so a resident-set reading after it counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_bytes(field="VmRSS"):
    """VmRSS (now) or VmHWM (peak since start or since reset_peak_rss) of this process, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS (proc(5))."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_of(fn):
    """Peak resident memory of fn(): (above the trimmed resident memory before it, in all), in bytes."""
    trim_heap()
    reset_peak_rss()
    before = rss_bytes()
    fn()
    peak = rss_bytes("VmHWM")
    return peak - before, peak


def peak_cuda_of(fn):
    """Peak CUDA memory of fn(): (allocated above what was allocated before, allocated in all, reserved in all)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - before, peak, torch.cuda.max_memory_reserved()


# ---------------------------------------------------------------------------------------------------------------
# reporting

def machine():
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    parts = [f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    try:
        import diffusers
        import transformers
        versions = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    except ImportError:
        versions = "diffusers not installed"
    parts.append(f"python {platform.python_version()}, torch {torch.__version__}, {versions}")
    parts.append(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start")
    parts.append(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return "; ".join(parts)


def cpu_flags():
    """lscpu's model name, whether the CPU has avx2 / avx512f, and whether an ISA limit is emulated (oneDNN's
    ONEDNN_MAX_CPU_ISA, ATen's ATEN_CPU_CAPABILITY, MKL's
    MKL_ENABLE_INSTRUCTIONS), with the capability ATen then runs at."""
    import subprocess
    info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                .splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    text = (f"{info.get('Model name', '?').strip()}; flags avx2 {'yes' if 'avx2' in flags else 'no'}, "
            f"avx512f {'yes' if 'avx512f' in flags else 'no'}")
    limits = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
              if k in os.environ]
    if limits:
        text += (f"; **emulated** instruction-set limit {', '.join(limits)} (set for every process of the run; "
                 f"not a real machine of that kind)")
    return text + f"; ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"


def gib(n):
    return f"{n / 2 ** 30:.2f} GiB" if abs(n) >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def write_section(name, markdown, path=RESULTS):
    """Replace (or append) the part of RESULTS.md between `<!-- begin NAME -->` and `<!-- end NAME -->`."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote the {name!r} section of {path}")


def report(result, text, json_path, write, section, title):
    """The end of a benchmark run: save the raw result (json_path), print the rendered text, and with `write`
    regenerate RESULTS.md's `section` (a --small smoke-test run never is)."""
    if json_path:
        save_json(json_path, result)
    print("\n" + text)
    if write:
        if result.get("small"):
            raise SystemExit("--small runs are smoke tests: not written to RESULTS.md")
        write_section(section, f"{title}\n\n{text}")


def save_json(path, data):
    Path(path).write_text(json.dumps(data, indent=1))
