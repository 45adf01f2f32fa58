"""Peak RAM and wall time of loading a full-size SD1.5 checkpoint with minisd.model.load_model.

    python bench/load_memory.py            # builds a random 4.27 GB fp32 official-layout file in a temp dir
    python bench/load_memory.py --ckpt     # also the same weights as a .ckpt (torch.load(weights_only=True))

Each load runs in a fresh subprocess; its peak resident set size is read with
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss by a small intermediate process that imports nothing heavy (a
child inherits its parent's high-water mark across exec on Linux, so the parent must stay lean). The baseline
row is a child that imports torch and minisd and loads nothing. The file comes from tests/checkpoints.py
(names and shapes of the reference modules, values from one random pool).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_build(path, fmt):
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import torch
    from checkpoints import ldm_state_dict, write_ldm_checkpoint
    from minisd.config import SD15
    if fmt == "safetensors":
        write_ldm_checkpoint(path, SD15, seed=0, views=True)
    else:       # torch.save would store the shared pool once: give every tensor its own memory
        sd = {k: v.clone() for k, v in ldm_state_dict(SD15, seed=0, views=True).items()}
        torch.save({"state_dict": sd}, path)


def child_load(path, dtype):
    sys.path.insert(0, ROOT)
    import torch
    from minisd.model import load_model
    if path == "-":      # baseline: the imports only
        print(json.dumps({"seconds": 0.0}))
        return
    t0 = time.perf_counter()
    model = load_model(path, dtype=getattr(torch, dtype), verbose=False)
    seconds = time.perf_counter() - t0
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "model_bytes": n}))


def measure(args):
    """Run one child and report its peak RSS (this process imports nothing heavy)."""
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024   # Linux: KiB
    print(json.dumps(out))


def run(cmd):
    r = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", action="store_true", help="also measure a .ckpt of the same weights")
    p.add_argument("--dir", default=None, help="where to write the temporary files (default: a temp dir)")
    args, rest = p.parse_known_args()
    if rest and rest[0] == "--child-build":
        return child_build(rest[1], rest[2])
    if rest and rest[0] == "--child-load":
        return child_load(rest[1], rest[2])
    if rest and rest[0] == "--measure":
        return measure(rest[1:])

    import torch   # only for the version string; children do the work
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = [("safetensors", os.path.join(tmp, "sd15.safetensors"))]
        if args.ckpt:
            files.append(("ckpt", os.path.join(tmp, "sd15.ckpt")))
        for fmt, path in files:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child-build", path, fmt], check=True)
            print(f"built {path}: {os.path.getsize(path) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
        base = run(["--measure", "--child-load", "-", "float32"])
        rows.append(("imports only (torch + minisd)", "-", "-", 0, base["peak_rss_bytes"], 0.0))
        for fmt, path in files:
            size = os.path.getsize(path)
            for dtype in ("float32", "float16"):
                r = run(["--measure", "--child-load", path, dtype])
                rows.append((f"load_model({fmt}, fp32 file)", dtype, f"{size / 1e9:.2f} GB", size,
                             r["peak_rss_bytes"], r["seconds"]))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print("| what | dtype | file | peak RSS | peak RSS / file | peak RSS - imports, / file | wall time |")
    print("|---|---|---|---|---|---|---|")
    for what, dtype, file, size, rss, sec in rows:
        ratio = f"{rss / size:.2f}" if size else "-"
        net = f"{(rss - base['peak_rss_bytes']) / size:.2f}" if size else "-"
        print(f"| {what} | {dtype} | {file} | {rss / 2**30:.2f} GiB | {ratio} | {net} | {sec:.1f} s |")


if __name__ == "__main__":
    main()
