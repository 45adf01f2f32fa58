"""`minisd serve` under load: p50/p95 latency and throughput of the tiny model through the server (A1111's
/sdapi/v1/txt2img over loopback HTTP, a FIFO queue, one job at a time) against the plain generate loop in-process.

    python bench/serve_load.py                     # 50 requests from 10 clients, 20 steps, one torch thread
    python bench/serve_load.py --requests 100 --clients 20 --steps 10

Three runs on the same loaded Pipeline settings (plain layers, --no-prepack, so both sides run the same code):
  loop       Pipeline.generate one image at a time, as `minisd generate` does: the floor
  serial     one client, one request at a time through the server: the HTTP + PNG + base64 overhead per image
  loaded     --clients concurrent clients: latency includes the wait in the queue; throughput should match the loop
Prints a Markdown table (wall and process CPU seconds: on a shared machine the wall time inflates, CPU time less).
"""
import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
import torch  # noqa: E402

from minisd.pipeline import Pipeline  # noqa: E402
from minisd.serve import start_in_thread  # noqa: E402
from minisd.serve.app import create_app  # noqa: E402

PROMPT = "a red circle on a blue background"


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def row(name, latencies, wall, cpu, n):
    return (f"| {name} | {n} | {statistics.median(latencies) * 1e3:.0f} | {percentile(latencies, 0.95) * 1e3:.0f} | "
            f"{n / wall:.2f} | {wall:.1f} | {cpu:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the tiny model)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    body = lambda seed: dict(prompt=PROMPT, seed=seed, steps=args.steps, width=64, height=64)

    pipe = Pipeline.load(None, prepack=False, log=lambda *_: None)
    pipe.generate(PROMPT, seed=[0], steps=args.steps, emphasis=True)             # warm-up
    latencies, cpu0, t0 = [], cpu_seconds(), time.perf_counter()
    for seed in range(args.requests):
        t = time.perf_counter()
        pipe.generate(PROMPT, seed=[seed], steps=args.steps, emphasis=True)
        latencies.append(time.perf_counter() - t)
    rows = [row("generate loop (in-process)", latencies, time.perf_counter() - t0, cpu_seconds() - cpu0,
                args.requests)]
    del pipe

    server, url = start_in_thread(create_app({"minisd-tiny": None}, prepack=False, log=lambda *_: None))
    session = requests.Session()

    def one(seed, client=session):
        t = time.perf_counter()
        reply = client.post(f"{url}/sdapi/v1/txt2img", json=body(seed), timeout=600)
        reply.raise_for_status()
        return time.perf_counter() - t

    one(0)                                                                        # warm-up
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    latencies = [one(seed) for seed in range(args.requests)]
    rows.append(row("server, 1 client", latencies, time.perf_counter() - t0, cpu_seconds() - cpu0, args.requests))

    def client(k):
        with requests.Session() as s:
            return [one(seed, s) for seed in range(k, args.requests, args.clients)]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        latencies = [t for ts in pool.map(client, range(args.clients)) for t in ts]
    rows.append(row(f"server, {args.clients} concurrent clients", latencies, time.perf_counter() - t0,
                    cpu_seconds() - cpu0, args.requests))
    server.should_exit = True

    load = os.getloadavg()
    print(f"tiny model, 64x64, {args.steps} steps DPM++ 2M Karras, CFG 7.5, {args.threads} torch thread(s), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} "
          f"at the end, torch {torch.__version__}\n")
    print("| run | images | p50 latency (ms) | p95 latency (ms) | images/s | wall (s) | process CPU (s) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
