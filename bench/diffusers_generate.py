"""What `minisd generate PROMPT --model FILE --width W --height H --steps N --sampler euler --schedule leading
--seed S --out OUT` does, written with diffusers: load the single file, encode, sample with Euler on SD's
("leading") scheduler config with CFG 7.5, decode, save a PNG. bench/compare.py times it as a whole process.
With --controlnet FILE --controlnet-config DIR --control-image IMG it is `minisd generate ... --controlnet FILE
--control-image IMG` instead: StableDiffusionControlNetPipeline with the ControlNet 1.1 file read by diffusers' own
single-file converter (bench/controlnet.py times it).

    python bench/diffusers_generate.py PROMPT --model FILE --config DIFFUSERS_CONFIG_FOLDER --width 128 --height 128 \\
        --steps 10 --seed 1 --out out.png
"""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import torch  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--config", required=True, help="the diffusers config folder from_single_file reads offline")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--controlnet", default=None, help="a ControlNet 1.1 file")
    p.add_argument("--controlnet-config", default=None, help="the folder holding its diffusers config.json")
    p.add_argument("--control-image", default=None)
    args = p.parse_args()
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        args.model, config=args.config, local_files_only=True, safety_checker=None, requires_safety_checker=False,
        torch_dtype=torch.float32)
    extra = {}
    if args.controlnet:
        from PIL import Image
        controlnet = diffusers.ControlNetModel.from_single_file(args.controlnet, config=args.controlnet_config,
                                                                local_files_only=True, torch_dtype=torch.float32)
        parts = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "feature_extractor")}
        pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                                           feature_extractor=None, requires_safety_checker=False)
        extra["image"] = Image.open(args.control_image).convert("RGB")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=7.5, width=args.width,
                 height=args.height, generator=torch.Generator().manual_seed(args.seed), **extra).images[0]
    image.save(args.out)


if __name__ == "__main__":
    main()
