"""One DreamBooth training step, minisd beside diffusers, on the same random full-size SD1.5 file.

    python bench/train_step.py [--res 256] [--steps 2] [--write]         # the four CPU rows of RESULTS.md
    python bench/train_step.py --device cuda --res 512 --precision bf16   # the GPU rows

A step is what both training scripts do per optimizer step: a batch of one instance and one class image (prior
preservation), VAE encode (frozen), noise, U-Net forward and backward (and the text encoder's with
--train-text-encoder), gradient clipping, AdamW. diffusers' side is its train_dreambooth.py step written from its
parts (as tests/_train_refs.py does for the parity tests); minisd's side is the functions `minisd train` runs
(train/step.py step_loss, train/loop.py's optimizer). Each (library, setting) runs in a fresh process, in turn, so
that one's memory does not count in the other's; the time of a row is the median step after one warm-up step, the
memory the process's peak resident set (CPU) or peak allocated CUDA memory, model and optimizer state included.

Order matters on a shared VM: single steps of one process vary by up to 9%, and whichever library runs first after
the 4 GB checkpoint is written shares the CPU with the kernel flushing it. So the file is synced to disk before any
timing, and with --repeats R each setting runs 2R processes in the order minisd, diffusers, diffusers, minisd, ...
(each library first as often as second); a row's time is the median of all its timed steps, pooled over processes,
and the CPU steal time (/proc/stat) during the timed steps is recorded beside it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (sets sys.path and offline flags)
import torch

SETTINGS = [  # (train text encoder, gradient checkpointing)
    (False, False), (False, True), (True, False), (True, True)]
PROMPTS = ["a photo of sks dog", "a photo of a dog"]


def inputs(res, device):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, res, res, generator=g) * 2 - 1
    shape = (2, 4, res // 8, res // 8)
    return (pixels.to(device), torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device),
            torch.tensor([500, 300]).to(device))


def minisd_step(args):
    from minisd.train.dreambooth import DreamBoothConfig
    from minisd.train.loop import make_optimizer
    from minisd.train.fit import load, set_frozen_dtype, trainable_parameters
    from minisd.train.settings import train_config
    from minisd.train.step import Draws, step_loss
    cfg = DreamBoothConfig(out="", model=args.ckpt, train_text_encoder=args.te, gradient_checkpointing=args.gc,
                           mixed_precision=args.precision)
    model, _ = load(cfg, torch.device(args.device), log=lambda *_: None)     # as `minisd train` loads it
    set_frozen_dtype(model, cfg)
    model.unet.gradient_checkpointing = args.gc
    model.text_encoder.gradient_checkpointing = args.gc and args.te
    trainable = trainable_parameters(model, cfg)
    opt = make_optimizer([{"params": list(trainable.values())}], train_config(cfg))
    ac = model.config
    from minisd.diffusion import alphas_cumprod_from_betas, scaled_linear_betas
    abar = alphas_cumprod_from_betas(scaled_linear_betas(ac.beta_start, ac.beta_end, ac.num_timesteps))
    pixels, posterior, noise, t = inputs(args.res, args.device)
    d = Draws(posterior, noise, None, t.cpu())
    tokens = model.tokenizer(PROMPTS)
    low = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(args.device).type, low) if low else _null():
            loss = step_loss(model, pixels.to(model.vae.quant_conv.weight.dtype), None, tokens, d, abar, cfg, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        opt.step()
    return step


def diffusers_step(args):
    import checkpoints
    from diffusers import DDPMScheduler
    pipe = checkpoints.diffusers_from_single_file(args.ckpt, args.config, torch_dtype=torch.float32)
    unet, text, vae, tok = pipe.unet.to(args.device), pipe.text_encoder.to(args.device), pipe.vae.to(args.device), \
        pipe.tokenizer
    low = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if low:                                   # train_dreambooth.py: frozen parts in the low precision
        vae.to(low)
        if not args.te:
            text.to(low)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    text.requires_grad_(args.te)
    if args.gc:
        unet.enable_gradient_checkpointing()
        if args.te:
            text.gradient_checkpointing_enable()
    unet.train()
    text.train(args.te)
    params = list(unet.parameters()) + (list(text.parameters()) if args.te else [])
    opt = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pixels, posterior, noise, t = inputs(args.res, args.device)
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(args.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(args.device).type, low) if low else _null():
            with torch.no_grad():
                dist = vae.encode(pixels.to(vae.dtype)).latent_dist
                latents = (dist.mean + dist.std * posterior.to(dist.mean.dtype)) * vae.config.scaling_factor
            noisy = sched.add_noise(latents.float(), noise, t)
            with torch.set_grad_enabled(args.te):
                hidden = text(ids)[0]
            pred = unet(noisy, t, hidden).sample
            loss = (torch.nn.functional.mse_loss(pred[:1].float(), noise[:1].float())
                    + torch.nn.functional.mse_loss(pred[1:].float(), noise[1:].float()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def child(args):
    torch.manual_seed(0)
    step = (minisd_step if args.impl == "minisd" else diffusers_step)(args)
    times = []
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(1 + args.steps):
        common.sync(args.device)
        if i == 1:
            steal = _steal_ticks()
        t0 = time.perf_counter()
        step()
        common.sync(args.device)
        times.append(time.perf_counter() - t0)
    steal = (_steal_ticks() - steal) / os.sysconf("SC_CLK_TCK")
    peak = torch.cuda.max_memory_allocated() if cuda else common.rss_bytes("VmHWM")
    print(json.dumps({"times": times[1:], "first": times[0], "peak": peak, "steal_s": steal}))


def _steal_ticks():
    """Ticks the hypervisor gave this VM's CPUs to someone else (8th number of /proc/stat's cpu line)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def run_child(args, impl, te, gc):
    cmd = [sys.executable, __file__, "--child", impl, "--ckpt", args.ckpt, "--config", args.config,
           "--res", str(args.res), "--steps", str(args.steps), "--device", args.device,
           "--precision", args.precision] + (["--te"] if te else []) + (["--gc"] if gc else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{impl} te={te} gc={gc} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--repeats", type=int, default=1, help="process pairs per setting, in ABBA order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--ckpt", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--child", default=None)
    p.add_argument("--te", action="store_true")
    p.add_argument("--gc", action="store_true")
    p.add_argument("--only", default=None, help="te,gc pairs to run, e.g. 00,11")
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.child:
        args.impl = args.child
        return child(args)
    tmp = tempfile.TemporaryDirectory()
    if args.ckpt is None:
        args.ckpt = os.path.join(tmp.name, "sd15.safetensors")
        common.write_checkpoint(args.ckpt)
    os.sync()                      # the kernel's write-back of a fresh 4 GB file must not overlap the timing
    if args.config is None:
        args.config = os.path.join(tmp.name, "config")
        common.write_config(args.config)
    settings = [s for s in SETTINGS if args.only is None or f"{int(s[0])}{int(s[1])}" in args.only.split(",")]
    rows = []
    for te, gc in settings:
        runs = {"minisd": [], "diffusers": []}
        for k in range(args.repeats):
            for impl in (("minisd", "diffusers") if k % 2 == 0 else ("diffusers", "minisd")):
                runs[impl].append(run_child(args, impl, te, gc))
                print(te, gc, impl, [round(x, 2) for x in runs[impl][-1]["times"]],
                      common.gib(runs[impl][-1]["peak"]), f"steal {runs[impl][-1]['steal_s']:.1f} s", flush=True)
        r = {impl: {"times": [x for run in v for x in run["times"]], "peak": max(run["peak"] for run in v),
                    "steal_s": sum(run["steal_s"] for run in v), "runs": v} for impl, v in runs.items()}
        rows.append((te, gc, r))
    mem = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    lines = [f"Machine: {common.machine()}", "", f"CPU: {common.cpu_flags()}" if args.device == "cpu" else "",
             "", f"DreamBooth step (1 instance + 1 class image, prior preservation), full SD1.5 config, "
             f"{args.res} px, {args.precision if args.precision != 'no' else 'fp32'}, {args.device}; median of "
             f"{args.steps} steps after a warm-up step"
             + (f", pooled over {args.repeats} processes per library run in ABBA order" if args.repeats > 1 else "")
             + f"; {mem} of the whole process (model, optimizer state); CPU steal time during the timed steps.", "",
             "| text encoder | grad. checkpointing | minisd s/step | diffusers s/step | time ratio | minisd "
             f"{mem} | diffusers {mem} | memory ratio | steal minisd / diffusers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for te, gc, r in rows:
        tm, td = common.median(r["minisd"]["times"]), common.median(r["diffusers"]["times"])
        pm, pd = r["minisd"]["peak"], r["diffusers"]["peak"]
        lines.append(f"| {'trained' if te else 'frozen'} | {'on' if gc else 'off'} | {tm:.2f} | {td:.2f} | "
                     f"**{tm / td:.2f}** | {common.gib(pm)} | {common.gib(pd)} | **{pm / pd:.2f}** | "
                     f"{r['minisd']['steal_s']:.1f} s / {r['diffusers']['steal_s']:.1f} s |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        common.save_json(args.json, [(te, gc, r) for te, gc, r in rows])
    if args.write:
        common.write_section(f"train-step-{args.device}", "## DreamBooth training step\n\n" + text)


if __name__ == "__main__":
    main()
