"""Peak memory of one LoRA training step (`minisd train lora --train-text-encoder`), with and without
--gradient-checkpointing, each in a fresh process.

    python bench/lora_checkpointing.py --config sd15 --res 512 --device cuda      # what the issue asks for
    python bench/lora_checkpointing.py --config tiny --res 256                    # what ran on the 2-core CPU

The step is what `minisd train lora` runs per micro-batch (train/fit.py): the factors at their start (up drawn
small so every factor gets a gradient), W + (alpha / r) up down computed from them, put into the model with
checkpointing (train/step.py's install) or passed through functional_call without it, step_loss on a batch of
cached latents (the VAE is not part of the comparison), backward. The networks have random weights at the
config's sizes. Memory: peak allocated CUDA memory, or on the CPU the process's peak resident set minus its resident
set before the step (model and factors included in both rows, so the difference is the step's own).
"""
import argparse
import json
import resource
import subprocess
import sys

import common  # noqa: F401  (sets sys.path and offline flags)
import torch


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args):
    from minisd import config as configs, lora
    from minisd.diffusion import alphas_cumprod_from_betas, scaled_linear_betas
    from minisd.model import StableDiffusion
    from minisd.train import lora as lora_train
    from minisd.train.step import draw, install, step_loss, uninstall
    torch.manual_seed(0)
    mc = {"sd15": configs.SD15, "tiny": configs.TINY}[args.config]
    device = torch.device(args.device)
    model = StableDiffusion(mc).to(device).requires_grad_(False).train()
    model.unet.gradient_checkpointing = model.text_encoder.gradient_checkpointing = args.gc
    cfg = lora_train.LoRAConfig(out="x", train_text_encoder=True)
    g = torch.Generator().manual_seed(1)
    params = {}
    for name, f in lora_train.initial_factors(mc, cfg, torch.Generator().manual_seed(0)).items():
        params[name + ".down"] = torch.nn.Parameter(f.down.to(device))
        params[name + ".up"] = torch.nn.Parameter((0.01 * torch.randn(f.up.shape, generator=g)).to(device))
    factors = {n: lora.Factors(params[n + ".down"], params[n + ".up"], cfg.alpha) for n in {k[:-5] for k in params
                                                                                             if k.endswith(".down")}}
    abar = alphas_cumprod_from_betas(scaled_linear_betas(mc.beta_start, mc.beta_end, mc.num_timesteps))
    h = args.res // 2 ** (len(mc.vae.ch_mult) - 1)
    shape = (args.batch, mc.unet.in_channels, h, h)
    moments = (torch.randn(shape, generator=g).to(device), torch.full(shape, -3.0, device=device))
    tokens = model.tokenizer(["a photo of sks dog"] * args.batch)
    d = draw(g, shape, mc.num_timesteps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    merged, installed = lora_train.merged_weights(model, factors), {}
    if args.gc:
        install(model, merged, installed)
    loss = step_loss(model, None, moments, tokens, d, abar, cfg, None, replaced=None if args.gc else merged)
    loss.backward()
    uninstall(model, installed)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"gc": args.gc, "step_peak_bytes": peak, "loss": loss.item()}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny", choices=("tiny", "sd15"))
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gc", action="store_true")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    for gc in (False, True):
        command = [sys.executable, __file__, "--child", "--config", args.config, "--res", str(args.res),
                   "--batch", str(args.batch), "--device", args.device] + (["--gc"] if gc else [])
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for row in rows:
        print(f"{args.config} {args.res} px batch {args.batch} on {args.device}: gradient checkpointing "
              f"{'on ' if row['gc'] else 'off'}: step peak {row['step_peak_bytes'] / 2**20:.0f} MiB "
              f"(loss {row['loss']:.6f})")


if __name__ == "__main__":
    main()
