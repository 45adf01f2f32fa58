"""Every CUDA path of minisd checked by one prepared script, for the next lent GPU (issue 32).

    python3 bench/gpu_check.py --out $OUT                      # on the GPU machine: one call, about 7 minutes
    python3 bench/gpu_check.py --device cpu --dry-run --out /tmp/check   # every check at tiny sizes (the tests)

GPUs are lent for minutes, by chance. So the whole check is prepared here, runs in one call, and writes its
report into `--out` as it goes (gpu_check.json, gpu_check.md: one entry per check, rewritten after each), so a run
cut short still says what it did. Each check runs in its own try/except: one failure does not stop the others.
A global time budget (--budget-s) skips the checks whose estimate no longer fits, and records that it did.

Every model is built here with random weights at the real configurations (SD 1.5, SD 2.1-v): nothing is
downloaded. The checks and their bounds (each is the check's `bound` in the report):

  inference   fp32 on CUDA equals the CPU (images within 2/255: the same arithmetic, other kernels); one U-Net
              call in fp16 / bf16 within a relative error of fp32's (a random-weight U-Net is a fair test of one
              call: 20 guided steps amplify rounding, so images are not compared in low precision); SD 2 at 768 px
              in fp16 has no NaN (its attention upcast); --cuda-graph equals eager (1/255) and --compile equals
              eager (2/255); LoRA and embeddings change the image
  training    one DreamBooth + text encoder step on the full SD 1.5 config on CUDA equals the CPU's; bf16 and fp16
              (loss scaler) stay finite and close to fp32 (20 tiny steps, 3 SD 1.5 steps); 8-bit Adam moves the
              weights as AdamW does (if bitsandbytes is present); gradient checkpointing gives the same weights;
              LoRA and textual-inversion steps run; torchrun with one process on nccl runs
  figures     beside diffusers, on the same card: the U-Net step with CFG at 512 px (eager, CUDA graph, compile +
              graph) and its share of the measured bf16 matmul rate at 1.61 TFLOP per step; whole txt2img;
              the DreamBooth + text encoder step at 512 px in bf16 with peak memory; a LoRA step

The dry run (--device cpu --dry-run) uses the small configs of tests/checkpoints.py and the tiny model, at 64 px:
it proves every check runs, not the numbers. CUDA-only checks record "skipped" there. On the GPU machine diffusers
is not installed: carry its wheel as the device tool's README says (README.md, "Checking every CUDA path");
without it the diffusers figures record "skipped".
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common  # noqa: F401  (puts the repository and tests/ on sys.path, offline flags)
from common import median, torch

import gpu  # bench/gpu.py: matmul_tflops, event_time, unet_flops

UNET_TFLOP = 1.61        # one guided SD 1.5 U-Net step at 512 px (batch 2), FlopCounterMode's count (RESULTS.md)


@dataclasses.dataclass
class Sizes:
    """What the checks run at: the real thing on a GPU, the smallest that exercises the code in the dry run."""
    sd15: object                 # ModelConfig
    sd21v: object
    side: int                    # small image side for the CUDA-vs-CPU comparisons
    big_side: int                # SD 2's side for the NaN check
    figure_side: int             # the figures' side (512)
    steps: int                   # sampling steps of the correctness checks
    figure_steps: int            # sampling steps of the whole-txt2img figure
    train_side: int              # DreamBooth CUDA-vs-CPU step on the SD 1.5 config
    tiny_steps: int              # mixed precision on the tiny model
    sd15_steps: int              # mixed precision on SD 1.5
    rounds: int                  # timing rounds


def sizes(dry):
    from minisd.config import SD15, SD21_V
    if dry:      # the small configs with SD's 8x VAE, so that every side and latent size is SD's arithmetic
        from checkpoints import SMALL_SD1, SMALL_SD2
        from minisd.config import VAEConfig
        vae = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
        return Sizes(dataclasses.replace(SMALL_SD1, vae=vae), dataclasses.replace(SMALL_SD2, vae=vae), side=32,
                     big_side=48, figure_side=64, steps=2, figure_steps=2, train_side=32, tiny_steps=2,
                     sd15_steps=1, rounds=1)
    return Sizes(SD15, SD21_V, side=256, big_side=768, figure_side=512, steps=8, figure_steps=20, train_side=256,
                 tiny_steps=20, sd15_steps=3, rounds=5)


class Report:
    """The checks' results, rewritten to OUT/gpu_check.json and OUT/gpu_check.md after each check."""

    def __init__(self, out, meta):
        self.out, self.meta, self.entries = Path(out), meta, []
        self.out.mkdir(parents=True, exist_ok=True)

    def add(self, entry):
        self.entries.append(entry)
        self.write()

    def write(self):
        data = dict(self.meta, checks=self.entries)
        for name, text in (("gpu_check.json", json.dumps(data, indent=1, default=str)),
                           ("gpu_check.md", self.markdown())):
            tmp = self.out / (name + ".partial")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def markdown(self):
        lines = [f"GPU check ({'dry run, ' if self.meta['dry_run'] else ''}device {self.meta['device']}): "
                 f"{self.meta['machine']}", "",
                 "| check | status | result | bound | seconds |", "|---|---|---|---|---|"]
        for e in self.entries:
            result = "; ".join(f"{k} {_fmt(v)}" for k, v in e.get("values", {}).items()) or e.get("message", "")
            result = " ".join(result.replace("|", "/").split())           # one table cell: no pipes, no newlines
            lines.append(f"| {e['name']} | {e['status']} | {result} | {e.get('bound', '')} | {e['seconds']:.1f} |")
        return "\n".join(lines) + "\n"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


class Skip(Exception):
    """A check that cannot run here (no CUDA, a package missing): recorded as skipped."""


class Context:
    """What the checks share: the device, the sizes, a scratch folder, and models/files built once on demand."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dry = args.dry_run
        self.size = sizes(args.dry_run)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.scratch))
        self._cache = {}

    def once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def need_cuda(self):
        if not self.cuda:
            raise Skip("needs CUDA")

    def model(self, which):
        """A random-weight StableDiffusion at the config `which` ("sd15"/"sd21v"), fp32 on the CPU."""
        def build():
            from minisd.model import StableDiffusion
            torch.manual_seed({"sd15": 0, "sd21v": 1}[which])
            return StableDiffusion(getattr(self.size, which)).eval()
        return self.once(("model", which), build)

    def sd15_file(self):
        """The random SD 1.5 model as an official single file, fp32 (training reads files; diffusers too)."""
        def build():
            path = self.tmp / "sd15.safetensors"
            common.write_checkpoint(path, cfg=self.size.sd15)
            return path
        return self.once("sd15_file", build)

    def diffusers_config(self):
        def build():
            import checkpoints
            checkpoints.write_diffusers_config(self.tmp / "config", self.size.sd15)
            return self.tmp / "config"
        return self.once("config", build)

    def instance_folder(self, captions=True):
        """Two pictures of the tiny world's new subject (minisd/tiny/subject.py); without their captions for
        textual inversion (which then uses its template prompts)."""
        def build():
            from minisd.tiny import subject
            folder = self.tmp / ("instance" if captions else "images")
            subject.write_instance_folder(str(folder), combos=subject.INSTANCE_COMBOS[:2])
            if not captions:
                for caption in folder.glob("*.txt"):
                    caption.unlink()
            return folder
        return self.once(("instance", captions), build)


def pipeline(ctx, model, device, dtype, **kw):
    from minisd.pipeline import Pipeline
    return Pipeline(model, device, dtype, log=lambda *_: None, **kw)


def image(pipe, ctx, side, seed=1, prompt=common.PROMPT):
    import numpy as np
    with torch.no_grad():
        r = pipe.generate(prompt, common.NEGATIVE, ctx.size.steps, 7.5, "euler", seed=seed, width=side, height=side)
    return np.asarray(r.images[0]).astype(np.int16)


class exact_fp32:
    """TF32 off for the CUDA-vs-CPU comparisons: cuDNN convolutions default to TF32 (10-bit mantissa), which is a
    setting, not the arithmetic under test (its effect is recorded beside them)."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False


def max_diff_255(a, b):
    return int(abs(a - b).max())


def unet_inputs(ctx, model, side, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side // 8, side // 8, generator=g)
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    return x.to(device, dtype), torch.tensor([500.0, 500.0], device=device), context.to(device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# inference

def cuda_vs_cpu(which):
    def check(ctx):
        model = ctx.model(which)
        side = ctx.size.side
        cpu = image(pipeline(ctx, model, "cpu", torch.float32), ctx, side)
        with exact_fp32():
            dev = image(pipeline(ctx, model, ctx.device, torch.float32), ctx, side)
        values = {"max diff /255": max_diff_255(cpu, dev), "side": side}
        if ctx.cuda:
            values["with the default cuDNN TF32"] = max_diff_255(cpu, image(pipeline(ctx, model, ctx.device,
                                                                                     torch.float32), ctx, side))
        model.to("cpu")
        return dict(ok=values["max diff /255"] <= 2, values=values, bound="<= 2/255, TF32 off")
    return check


def low_precision(ctx):
    """One U-Net call in fp16 and bf16 against fp32, relative L2 error, each model."""
    values, ok = {}, True
    bounds = {"fp16": 1e-2, "bf16": 5e-2}          # bf16 keeps 8 mantissa bits against fp16's 11
    for which in ("sd15", "sd21v"):
        model = ctx.model(which)
        fp32 = {k: v.clone() for k, v in model.unet.state_dict().items()}     # casts round: restored after
        with torch.no_grad():
            model.unet.to(ctx.device, torch.float32)
            x, t, c = unet_inputs(ctx, model, ctx.size.side, torch.float32, ctx.device)
            ref = model.unet(x, t, c).float()
            for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                if not ctx.cuda and name == "fp16":
                    continue                    # fp16 convolutions are CUDA's (the CPU runs them slowly or not)
                model.unet.to(dt)
                out = model.unet(x.to(dt), t, c.to(dt)).float()
                err = ((out - ref).norm() / ref.norm()).item()
                values[f"{which} {name}"] = err
                ok &= math.isfinite(err) and err <= bounds[name]
                model.unet.load_state_dict(fp32)
        model.to("cpu")
    return dict(ok=ok, values=values, bound="relative L2 error of one U-Net call: fp16 <= 1e-2, bf16 <= 5e-2")


def sd2_no_nan(ctx):
    ctx.need_cuda()
    model = ctx.model("sd21v")
    side = ctx.size.big_side
    with torch.no_grad():
        pipe = pipeline(ctx, model, ctx.device, torch.float16)
        r = pipe.generate(common.PROMPT, common.NEGATIVE, 2, 7.5, "euler", seed=1, width=side, height=side)
        finite = bool(torch.isfinite(r.latents).all())
    model.to("cpu")
    return dict(ok=finite, values={"latents finite": finite, "side": side}, bound="no NaN/inf in fp16 at 768 px")


def cuda_graph_image(ctx):
    ctx.need_cuda()
    model = ctx.model("sd15")
    eager = image(pipeline(ctx, model, ctx.device, torch.float16), ctx, ctx.size.side)
    graph = image(pipeline(ctx, model, ctx.device, torch.float16, cuda_graph=True), ctx, ctx.size.side)
    model.to("cpu")
    d = max_diff_255(eager, graph)
    return dict(ok=d <= 1, values={"max diff /255 vs eager": d}, bound="<= 1/255")


def compiled_pipeline(ctx):
    """`--compile --cuda-graph` on the SD 1.5 model, kept for the U-Net figure that follows (compiling takes a minute
    or more; the next check reuses it, so nothing may move the model's weights in between: a CUDA graph replays
    on the addresses it captured)."""
    return ctx.once("compiled", lambda: pipeline(ctx, ctx.model("sd15"), ctx.device, torch.float16, compile=True,
                                                 cuda_graph=True))


def compile_image(ctx):
    ctx.need_cuda()
    model = ctx.model("sd15")
    side = ctx.size.figure_side       # the figure's shapes, so that its step reuses this compilation
    eager = image(pipeline(ctx, model, ctx.device, torch.float16), ctx, side)
    fast = image(compiled_pipeline(ctx), ctx, side)
    d = max_diff_255(eager, fast)
    return dict(ok=d <= 2, values={"max diff /255 vs eager": d, "side": side}, bound="<= 2/255")


def lora_runs(ctx):
    from minisd import lora
    model = ctx.model("sd15")
    g = torch.Generator().manual_seed(3)
    factors = {}
    for name, layer in lora.targets(model.config, "default").items():
        out_f, in_f, *k = layer.shape
        down = torch.randn(4, in_f, *k, generator=g) / math.sqrt(in_f * math.prod(k or [1]))
        factors[name] = lora.Factors(down, torch.randn(out_f, 4, *[1] * len(k), generator=g) * 0.15, 2.0)
    path = ctx.tmp / "lora.safetensors"
    lora.save_kohya(path, factors)
    pipe = pipeline(ctx, model, ctx.device, torch.float16 if ctx.cuda else torch.float32)
    base = image(pipe, ctx, ctx.size.side)
    pipe.set_loras([(str(path), 0.8)])
    with_lora = image(pipe, ctx, ctx.size.side)
    pipe.set_loras([])
    model.to("cpu")
    d = max_diff_255(base, with_lora)
    return dict(ok=d > 2, values={"max diff /255 made by the LoRA": d}, bound="the LoRA changes the image (> 2/255)")


def embeddings_run(ctx):
    from safetensors.torch import save_file
    model = ctx.model("sd15")
    width = model.config.text.width
    path = ctx.tmp / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(4)) * 0.4}, str(path))
    pipe = pipeline(ctx, model, ctx.device, torch.float16 if ctx.cuda else torch.float32)
    base = image(pipe, ctx, ctx.size.side, prompt="a castle, shiny")
    words = pipe.load_embeddings([str(path)])
    with_word = image(pipe, ctx, ctx.size.side, prompt="a castle, shiny")
    model.to("cpu")
    d = max_diff_255(base, with_word)
    return dict(ok=d > 2, values={"words": words, "max diff /255 made by the embedding": d},
                bound="the embedding changes the image (> 2/255)")


def _random_controlnet(model, seed=5):
    """A ControlNet for `model` with random weights at a sane scale (its zero convolutions too: else it adds 0)."""
    from minisd.config import ControlNetConfig
    from minisd.controlnet import ControlNet
    net = ControlNet(ControlNetConfig.for_model(model.config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
    return net


def _pattern(side, seed):
    """A blocky random RGB picture, side x side."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(side // 8, side // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(blocks).resize((side, side), Image.NEAREST)


def controlnet_cuda_vs_cpu(ctx):
    """One ControlNet (scale 0.7 over every step: a dry run has too few steps for a start and end) on SD 1.5: CUDA
    fp32 equals the CPU, and the ControlNet changes the image."""
    import numpy as np
    from minisd.controlnet import Control
    model, side = ctx.model("sd15"), ctx.size.side
    net = _random_controlnet(model)
    control = Control(net, _pattern(side, 6), 0.7)

    def run(device):
        pipe = pipeline(ctx, model, device, torch.float32)
        with torch.no_grad():
            r = pipe.generate(common.PROMPT, common.NEGATIVE, ctx.size.steps, 7.5, "euler", seed=1, width=side,
                              height=side, controls=[control])
        return np.asarray(r.images[0]).astype(np.int16)
    cpu = run("cpu")
    with exact_fp32():
        dev = run(ctx.device)
    plain = image(pipeline(ctx, model, "cpu", torch.float32), ctx, side)
    model.to("cpu")
    net.to("cpu")
    values = {"max diff /255": max_diff_255(cpu, dev), "made by the ControlNet /255": max_diff_255(cpu, plain)}
    return dict(ok=values["max diff /255"] <= 2 and values["made by the ControlNet /255"] > 2, values=values,
                bound="<= 2/255, TF32 off; the ControlNet changes the image (> 2/255)")


def inpainting_cuda_vs_cpu(ctx):
    """Inpainting on SD 1.5 (the blend of an ordinary model) at strength 0.8: CUDA fp32 equals the CPU, and the
    kept region outside the blurred mask is the original's, pixel for pixel."""
    import numpy as np
    from PIL import Image
    model, side = ctx.model("sd15"), ctx.size.side
    picture = _pattern(side, 7)
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))

    def run(device):
        pipe = pipeline(ctx, model, device, torch.float32)
        with torch.no_grad():
            r = pipe.inpaint(common.PROMPT, picture, mask, 0.8, common.NEGATIVE, ctx.size.steps, 7.5, "euler",
                             seed=1, mask_blur=2)
        return np.asarray(r.images[0]).astype(np.int16)
    cpu = run("cpu")
    with exact_fp32():
        dev = run(ctx.device)
    model.to("cpu")
    from minisd.inpaint import prepare_mask
    far = np.asarray(prepare_mask(mask, (side, side), blur_radius=2)) == 0      # beyond the blurred edge
    kept = bool(far.any() and (dev[far] == np.asarray(picture).astype(np.int16)[far]).all())
    values = {"max diff /255": max_diff_255(cpu, dev), "kept region equal to the original": kept}
    return dict(ok=values["max diff /255"] <= 2 and kept, values=values,
                bound="<= 2/255, TF32 off; outside the blurred mask the original's pixels")


# ---------------------------------------------------------------------------------------------------------------
# training: `minisd train` as a user runs it, on the tiny model or the random SD 1.5 file

def train(ctx, name, method, device=None, model=None, steps=2, extra=()):
    """Run `minisd train METHOD` into a fresh folder; returns (folder, losses)."""
    import contextlib
    import io

    from minisd.cli import main
    out = ctx.tmp / name
    args = ["train", *method, "--out", str(out), "--max-train-steps", str(steps), "--seed", "3",
            "--device", (device or ctx.device).type if not isinstance(device, str) else device,
            "--checkpointing-steps", "100000", *extra]
    if model:
        args += ["--model", str(model)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(args)
    if status != 0:
        raise RuntimeError(f"minisd {' '.join(args)}: {err.getvalue().strip().splitlines()[-1:]}")
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return out, losses


def dreambooth(ctx):
    return ["dreambooth", "--instance-dir", str(ctx.instance_folder()), "--instance-prompt", "a sks circle",
            "--center-crop"]


def weights(folder):
    return start_weights(folder / "model.safetensors")


def update_error(a, b, start):
    """||a - b|| / ||b - start|| over the tensors that moved: how far two runs' updates differ, relative to the
    update itself."""
    moved = [k for k in b if k in start and b[k].is_floating_point() and not torch.equal(b[k], start[k])]
    if not moved:
        raise RuntimeError("no weight moved in the reference run: the comparison would show nothing")
    diff = math.sqrt(sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in moved))
    step = math.sqrt(sum(((b[k].float() - start[k].float()) ** 2).sum().item() for k in moved))
    return diff / max(step, 1e-30), len(moved)


def start_weights(path):
    """The minisd-named weights of a checkpoint (any layout: training writes the layout it read), fp32."""
    from weights_convert import detect
    ckpt = detect.read(str(path), verbose=False)
    return {k: ckpt.state[k].float() for k in ckpt.state if not k.startswith("extra.")}


def dreambooth_cuda_vs_cpu(ctx):
    path = ctx.sd15_file()
    flags = ["--train-text-encoder", "--resolution", str(ctx.size.train_side), "--train-batch-size", "1"]
    cpu, cpu_loss = train(ctx, "db_cpu", dreambooth(ctx), "cpu", path, 1, flags)
    with exact_fp32():
        dev, dev_loss = train(ctx, "db_cuda", dreambooth(ctx), ctx.device, path, 1, flags)
    err, n = update_error(weights(dev), weights(cpu), start_weights(path))
    loss_err = abs(dev_loss[0] - cpu_loss[0]) / abs(cpu_loss[0])
    return dict(ok=loss_err <= 1e-3 and err <= 5e-2, values={"loss rel err": loss_err, "update rel err": err,
                                                             "tensors moved": n},
                bound="TF32 off; loss within 1e-3; update within 5e-2 (Adam's first step is about lr*sign(g): gradients at "
                      "the noise level flip)")


def mixed_precision(which):
    def check(ctx):
        if which == "sd15":
            model, steps = ctx.sd15_file(), ctx.size.sd15_steps
            flags = ["--resolution", str(ctx.size.train_side), "--train-batch-size", "1"]
        else:
            model, steps, flags = None, ctx.size.tiny_steps, []
        ref, ref_losses = train(ctx, f"mp_{which}_fp32", dreambooth(ctx), model=model, steps=steps, extra=flags)
        start = start_weights(model or _tiny())
        values, ok = {}, True
        for precision in ("bf16", "fp16"):
            if not ctx.cuda and precision == "fp16":
                continue                           # fp16 autocast with a loss scaler is CUDA's
            out, losses = train(ctx, f"mp_{which}_{precision}", dreambooth(ctx), model=model, steps=steps,
                                extra=flags + ["--mixed-precision", precision])
            err, _ = update_error(weights(out), weights(ref), start)
            loss_err = abs(sum(losses) - sum(ref_losses)) / abs(sum(ref_losses))
            finite = all(math.isfinite(x) for x in losses)
            values[precision] = {"mean loss rel err": loss_err, "update rel err": err, "finite": finite}
            ok &= finite and loss_err <= 0.05 and err <= 0.5
        return dict(ok=ok, values=values, bound="finite; mean loss within 5% of fp32's; update within 50% of "
                                                "fp32's (relative L2)")
    return check


def _tiny():
    from minisd.model import tiny_model_path
    return tiny_model_path()


def adam_8bit(ctx):
    ctx.need_cuda()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes is not installed") from None
    ref, _ = train(ctx, "adamw", dreambooth(ctx), steps=5)
    out, losses = train(ctx, "adam8", dreambooth(ctx), steps=5, extra=["--use-8bit-adam"])
    err, _ = update_error(weights(out), weights(ref), start_weights(_tiny()))
    return dict(ok=err <= 0.1 and all(map(math.isfinite, losses)), values={"update rel err vs AdamW": err},
                bound="update within 10% of AdamW's (8-bit state quantization)")


def gradient_checkpointing(ctx):
    """3 steps: Adam's first update is about lr*sign(g), blind to the gradient's size; the later ones are not."""
    ref, ref_losses = train(ctx, "gc_off", dreambooth(ctx), steps=3, extra=["--train-text-encoder"])
    out, losses = train(ctx, "gc_on", dreambooth(ctx), steps=3,
                        extra=["--train-text-encoder", "--gradient-checkpointing"])
    err, _ = update_error(weights(out), weights(ref), start_weights(_tiny()))
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    return dict(ok=err <= 1e-2 and loss_err <= 1e-5, values={"update rel err": err, "loss rel err": loss_err},
                bound="losses within 1e-5, update within 1e-2 (recomputation is the same arithmetic)")


def lora_step(ctx):
    out, losses = train(ctx, "lora", ["lora", "--instance-dir", str(ctx.instance_folder()), "--instance-prompt",
                                      "a sks circle", "--rank", "4"], steps=2)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    return dict(ok=bool(files) and all(map(math.isfinite, losses)), values={"losses": losses, "files": files},
                bound="runs, finite, writes the LoRA file")


def textual_inversion_step(ctx):
    out, losses = train(ctx, "ti", ["textual-inversion", "--data", str(ctx.instance_folder(captions=False)),
                                    "--token", "<w>",
                                    "--init-token", "red"], steps=2)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    return dict(ok="learned_embeds.safetensors" in files and all(map(math.isfinite, losses)),
                values={"losses": losses, "files": files}, bound="runs, finite, writes the embedding files")


def torchrun_one_process(ctx):
    out = ctx.tmp / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "minisd",
           "train", *dreambooth(ctx), "--out", str(out), "--max-train-steps", "2", "--device", ctx.device.type]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(common.ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if r.returncode:
        raise RuntimeError(f"torchrun exited {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    # One process never joins a process group in minisd (distributed.setup: minisd's collectives are no-ops for
    # one process), so the backend itself is checked here, on a group of one: the collectives minisd calls.
    import torch.distributed as dist
    backend = "nccl" if ctx.cuda else "gloo"
    import socket
    with socket.socket() as free:            # a free port, and no MASTER_* variables left in the environment
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": torch.device("cuda", torch.cuda.current_device())} if ctx.cuda else {}))
    try:
        x = torch.arange(4.0, device=ctx.device)
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    ok = (out / "model.safetensors").exists() and x.tolist() == [0, 1, 2, 3]
    return dict(ok=ok, values={"backend": backend, "collectives": "all_reduce, broadcast, barrier"},
                bound="the job runs and rank 0 writes the model; the backend's collectives give the inputs back")


# ---------------------------------------------------------------------------------------------------------------
# figures, each beside diffusers in the same run

def _diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise Skip("diffusers is not installed (carry its wheel: README.md)") from None


def unet_step(ctx):
    """The guided U-Net step at 512 px, fp16: minisd eager, CUDA graph, compile + graph; diffusers' eager."""
    model = ctx.model("sd15")
    dtype = torch.float16 if ctx.cuda else torch.float32
    x, t, c = unet_inputs(ctx, model, ctx.size.figure_side, dtype, ctx.device)
    values = {}
    if ctx.cuda:
        values["bf16 matmul TFLOP/s"] = peak = gpu.matmul_tflops(ctx.device, torch.bfloat16)
    variants = {"eager": {}}
    if ctx.cuda:
        variants.update({"cuda graph": dict(cuda_graph=True), "compile + graph": None})
    with torch.no_grad():
        for name, kw in variants.items():
            pipe = compiled_pipeline(ctx) if kw is None else pipeline(ctx, model, ctx.device, dtype, **kw)
            seconds = gpu.event_time(lambda: pipe.unet_call(x, t, c), reps=20 if ctx.cuda else 1,
                                     warmup=3 if ctx.cuda else 1)
            values[f"minisd {name} ms"] = seconds * 1e3
            if ctx.cuda:
                values[f"minisd {name} share of bf16 peak"] = UNET_TFLOP / seconds / peak
        model.to("cpu")
        ctx._cache.pop("compiled", None)
        try:
            _diffusers()
            import checkpoints
            from diffusers import UNet2DConditionModel
            unet = UNet2DConditionModel.from_config(checkpoints.reference_diffusers_unet(ctx.size.sd15).config)
            unet = unet.to(ctx.device, dtype).eval()
            seconds = gpu.event_time(lambda: unet(x, t, encoder_hidden_states=c).sample,
                                     reps=20 if ctx.cuda else 1, warmup=3 if ctx.cuda else 1)
            values["diffusers eager ms"] = seconds * 1e3
            if ctx.cuda:
                values["diffusers eager share of bf16 peak"] = UNET_TFLOP / seconds / peak
            del unet
        except Skip as e:
            values["diffusers"] = str(e)
    return dict(ok=True, values=values, bound=f"goal: >= 50% of the bf16 matmul rate at {UNET_TFLOP} TFLOP/step")


def txt2img(ctx):
    """Whole txt2img, 512 px, 20 Euler steps, CFG: minisd (fp16, CUDA graph) against diffusers' default fp16."""
    _diffusers()
    dtype = torch.float16 if ctx.cuda else torch.float32
    path = ctx.sd15_file()
    side, steps = ctx.size.figure_side, ctx.size.figure_steps
    ours = common.load_minisd(path, str(ctx.device), dtype, cuda_graph=ctx.cuda, prepack=False)
    theirs = common.load_diffusers(path, ctx.diffusers_config(), ctx.device, dtype)
    fns = {"minisd": lambda: ours.generate(common.PROMPT, common.NEGATIVE, steps, 7.5, "euler", "leading", seed=1,
                                           width=side, height=side),
           "diffusers": lambda: theirs(common.PROMPT, negative_prompt=common.NEGATIVE, num_inference_steps=steps,
                                       guidance_scale=7.5, generator=torch.Generator().manual_seed(1), width=side,
                                       height=side)}
    with torch.no_grad():
        times = common.alternate(fns, ctx.size.rounds, ctx.device, warmup=1)
    del ours, theirs
    m, d = median(times["minisd"]), median(times["diffusers"])
    return dict(ok=True, values={"minisd s": m, "diffusers s": d, "speed-up": d / m},
                bound="goal: >= 10x diffusers' default pipeline")


def _train_step_child(ctx, impl, precision, te):
    """bench/train_step.py's step of `impl`, in its own process (peak memory is the process's); in the dry run
    in this one (a process of its own costs seconds of imports on the CPU)."""
    import contextlib
    import io

    import train_step
    ns = argparse.Namespace(ckpt=str(ctx.sd15_file()), config=str(ctx.diffusers_config()),
                            res=ctx.size.figure_side, steps=2 if ctx.cuda else 1, device=ctx.device.type,
                            precision=precision, te=te, gc=False, impl=impl)
    if not ctx.dry:
        return train_step.run_child(ns, impl, te, False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_step.child(ns)
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def dreambooth_figure(ctx):
    """DreamBooth + text encoder step at 512 px in bf16 (bench/train_step.py: each library in its own process)."""
    _diffusers()
    precision = "bf16"
    values = {}
    for impl in ("minisd", "diffusers"):
        r = _train_step_child(ctx, impl, precision, te=True)
        values[f"{impl} s/step"] = median(r["times"])
        values[f"{impl} peak GB"] = r["peak"] / 1e9
    ok = values["minisd peak GB"] < 12 if ctx.cuda else True
    return dict(ok=ok, values=values, bound="goal: peak below 12 GB (peak CUDA allocated; peak RSS on the CPU)")


def lora_figure(ctx):
    """A LoRA step on SD 1.5 at 512 px, the median of train_log.jsonl's step times after the first (minisd only:
    diffusers' LoRA script is not in its wheel, so there is no reference to run beside it)."""
    flags = ["--resolution", str(ctx.size.figure_side), "--train-batch-size", "1", "--rank", "4"]
    method = ["lora", "--instance-dir", str(ctx.instance_folder()), "--instance-prompt", "a sks circle"]
    out, _ = train(ctx, "lora_figure", method, model=ctx.sd15_file(), steps=4, extra=flags)
    clock = [json.loads(line)["seconds"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return dict(ok=True, values={"minisd s/step": median([b - a for a, b in zip(clock[:-1], clock[1:])])},
                bound="recorded (no diffusers reference in its wheel)")


# name: (check, estimated seconds on a GPU; dry-run checks are all cheap)
CHECKS = {
    "inference: SD 1.5 fp32 CUDA = CPU": (cuda_vs_cpu("sd15"), 40),
    "inference: SD 2.1-v fp32 CUDA = CPU": (cuda_vs_cpu("sd21v"), 60),
    "inference: fp16 / bf16 U-Net vs fp32": (low_precision, 15),
    "inference: SD 2.1-v fp16 at 768 px has no NaN": (sd2_no_nan, 15),
    "inference: --cuda-graph = eager": (cuda_graph_image, 15),
    "inference: LoRA": (lora_runs, 10),
    "inference: embeddings": (embeddings_run, 10),
    "inference: ControlNet": (controlnet_cuda_vs_cpu, 20),
    "inference: inpainting": (inpainting_cuda_vs_cpu, 20),
    "training: DreamBooth + text encoder SD 1.5 step CUDA = CPU": (dreambooth_cuda_vs_cpu, 80),
    "training: bf16 / fp16, tiny model": (mixed_precision("tiny"), 20),
    "training: bf16 / fp16, SD 1.5": (mixed_precision("sd15"), 40),
    "training: 8-bit Adam vs AdamW": (adam_8bit, 15),
    "training: gradient checkpointing": (gradient_checkpointing, 10),
    "training: LoRA step": (lora_step, 10),
    "training: textual inversion step": (textual_inversion_step, 10),
    "training: torchrun, 1 process": (torchrun_one_process, 30),
    # these two share one compilation (compiled_pipeline): keep them together, in this order
    "inference: --compile --cuda-graph = eager": (compile_image, 100),
    "figure: U-Net step with CFG, 512 px": (unet_step, 60),
    "figure: whole txt2img, 512 px": (txt2img, 60),
    "figure: DreamBooth + text encoder step, 512 px, bf16": (dreambooth_figure, 60),
    "figure: LoRA step, 512 px": (lora_figure, 40),
}


def _cpu_seconds():
    """User + system CPU time of this process and its finished children (torchrun, bench/train_step.py)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_check(name, fn, ctx):
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        r = fn(ctx)
        status = r.pop("status", None) or ("pass" if r.pop("ok") else "FAIL")
        entry = dict(name=name, status=status, **r)
    except Skip as e:
        entry = dict(name=name, status="skipped", message=str(e))
    except Exception as e:           # one failing check must not stop the others: record it, go on
        entry = dict(name=name, status="ERROR", message=f"{type(e).__name__}: {str(e).strip()[:300]}",
                     traceback=traceback.format_exc()[-3000:])
    entry["seconds"] = time.perf_counter() - t0
    entry["cpu_seconds"] = _cpu_seconds() - cpu0
    if ctx.cuda:
        torch.cuda.empty_cache()
    return entry


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="the report folder (default: $OUT)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: proves every check runs")
    p.add_argument("--budget-s", type=float, default=420, help="skip checks whose estimate no longer fits")
    p.add_argument("--only", default=None, help="run the checks whose name contains this text")
    p.add_argument("--scratch", default=None, help="where models and runs are written (default: the temp dir)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required (or $OUT)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here; use --device cpu --dry-run")
    try:
        import minisd.pipeline  # noqa: F401  (ftfy, einops, ...: every check needs them)
    except ImportError as e:
        p.error(f"{e}: install minisd's dependencies, or carry their wheels (README.md, 'Checking every CUDA path')")
    start = time.perf_counter()
    ctx = Context(args)
    report = Report(args.out, dict(machine=common.machine(), device=str(ctx.device), dry_run=args.dry_run,
                                   budget_s=args.budget_s, started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    for name, (fn, estimate) in CHECKS.items():
        if args.only and args.only not in name:
            continue
        left = args.budget_s - (time.perf_counter() - start)
        if (0 if args.dry_run else estimate) > left:
            report.add(dict(name=name, status="skipped", message=f"time budget: needs ~{estimate} s, {left:.0f} s left",
                            seconds=0.0))
            continue
        print(f"-- {name}", flush=True)
        entry = run_check(name, fn, ctx)
        report.add(entry)
        print(f"   {entry['status']} {entry.get('values', entry.get('message', ''))} ({entry['seconds']:.1f} s)",
              flush=True)
    report.meta["total_s"] = time.perf_counter() - start
    report.write()
    print(report.markdown())
    return 1 if any(e["status"] in ("FAIL", "ERROR") for e in report.entries) else 0


if __name__ == "__main__":
    sys.exit(main())
