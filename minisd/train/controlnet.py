"""ControlNet training (Zhang, Rao & Agrawala 2023), as diffusers' train_controlnet.py does it:

    minisd train controlnet --data DIR --out DIR [--model M] [--controlnet FILE] [--validation-prompt P
                            --validation-image EDGES.png] ...
    minisd train controlnet --dataset-name NAME_OR_PATH [--image-column image]
                            [--conditioning-image-column conditioning_image] [--caption-column text] --out DIR ...

The data: a folder (control_data.py) or a Hugging Face dataset's rows with diffusers' train_controlnet.py columns
(hf_dataset.py; fill50k's layout), each row's conditioning image read as a folder's NAME.cond.png is.

The ControlNet (minisd/controlnet.py) reads the noisy latents, the timestep, the caption's text features and the
conditioning image (RGB in [0, 1], cropped and flipped as its image: control_data.py, batches.take); its residuals
are added to the U-Net's skips and middle block at scale 1, and the loss is fine-tuning's noise-prediction loss
(step.step_loss). Only the ControlNet trains: the U-Net, VAE and text encoder are frozen (paper Sec. 3.2; the
text encoder cannot be trained here: --train-text-encoder is an error).

Start: --controlnet FILE, any ControlNet file or folder minisd reads (1.0, 1.1, diffusers), or by default the
U-Net's own encoder (time embedding, input blocks, middle block) copied, the hint encoder at torch's default init
(drawn from --seed) with its last conv zero, and every zero convolution zero: diffusers'
ControlNetModel.from_unet. At that start the ControlNet adds exactly nothing, so the first step's loss is the
frozen model's and only the zero convolutions get a gradient (the paper's Sec. 3.1 argument).

The rest is fit.fit's: the batches, schedules, accumulation, mixed precision (the ControlNet's weights stay
float32; the frozen U-Net too, autocast computes it in the low precision), EMA, gradient checkpointing (the
U-Net's and the ControlNet's blocks), checkpoints and --resume, torchrun, snapshots, validation images (each
--validation-prompt drawn with its --validation-image, or the one image for all).

The output: OUT/controlnet.safetensors in the ControlNet 1.1 single-file layout (cldm's keys, as in
control_v11p_sd15_canny.pth: what A1111's sd-webui-controlnet, ComfyUI, diffusers' ControlNetModel.from_single_file
and `minisd generate --controlnet` read), or with --save-format diffusers the folder OUT/controlnet
(ControlNetModel.from_pretrained's config.json + diffusion_pytorch_model.safetensors).
"""
import os
from dataclasses import dataclass

import torch

from weights_convert import controlnet as files
from ..config import ControlNetConfig as NetworkConfig
from ..controlnet import Control, ControlNet, load_controlnet
from ..controls import resolve
from .batches import Stream
from .control_data import find_pairs
from .data import load_image
from .fit import Training, fit, snapshot_path
from .hf_dataset import DatasetSettings, check_source, dataset_examples
from .settings import DTYPES, SAVE_FORMATS, TrainSettings, check, folder_options


@dataclass(frozen=True)
class ControlNetConfig(DatasetSettings, TrainSettings):
    """A ControlNet run: the shared settings, the data folder (or dataset), the ControlNet to start from, the
    validation images' conditions."""
    data: str | None = None                  # images with conditioning images and captions (control_data.py)
    conditioning_image_column: str = "conditioning_image"    # --dataset-name's (diffusers' train_controlnet.py)
    controlnet: str | None = None            # a ControlNet file or folder to start from; None: the U-Net's encoder
    validation_images: tuple = ()            # a condition image per validation prompt, or one for all
    learning_rate: float = 1e-5              # diffusers' train_controlnet.py examples (its argparse default: 5e-6)


config = ControlNetConfig                    # what `minisd train controlnet` fills from its flags (cli/train.py)


def check_controlnet(cfg: ControlNetConfig):
    """One-line errors for the run's own settings, before any model is loaded."""
    check(cfg, SAVE_FORMATS)
    check_source(cfg, "minisd train controlnet")
    if cfg.train_text_encoder:
        raise ValueError("--train-text-encoder: only the ControlNet trains (the U-Net, VAE and text encoder stay "
                         "frozen, as in diffusers' train_controlnet.py)")
    if cfg.controlnet is not None and not os.path.exists(resolve(cfg.controlnet)):
        raise ValueError(f"--controlnet {cfg.controlnet} does not exist")
    if cfg.validation_prompts and not cfg.validation_images:
        raise ValueError("--validation-prompt needs --validation-image, the conditioning image its samples are "
                         "drawn with")
    if cfg.validation_images and len(cfg.validation_images) not in (1, len(cfg.validation_prompts)):
        raise ValueError(f"{len(cfg.validation_images)} --validation-image for {len(cfg.validation_prompts)} "
                         "--validation-prompt: give one for each, or one for all")
    for path in cfg.validation_images:
        if not os.path.isfile(path):
            raise ValueError(f"--validation-image {path} does not exist")


def initial_controlnet(model, cfg: ControlNetConfig, log=print):
    """The ControlNet training starts from (module docstring), in cfg.dtype on the CPU."""
    dtype = DTYPES[cfg.dtype]
    if cfg.controlnet is not None:
        log(f"starting from the ControlNet {cfg.controlnet}")
        return load_controlnet(resolve(cfg.controlnet), model.config, dtype)
    with torch.random.fork_rng(devices=[]):           # the hint encoder's init, from --seed alone
        torch.manual_seed(cfg.seed)
        net = ControlNet(NetworkConfig.for_model(model.config)).to(dtype)
    encoder = {k: v for k, v in model.unet.state_dict().items() if k.startswith(files.ENCODER)}
    result = net.load_state_dict(encoder, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for k in result.missing_keys)
    log("starting from the U-Net's encoder, with zero convolutions (ControlNetModel.from_unet)")
    return net


def output_path(cfg: ControlNetConfig, step=None):
    path = os.path.join(cfg.out, "controlnet.safetensors" if cfg.save_format == "single_file" else "controlnet")
    return path if step is None else snapshot_path(path, step)


def run(cfg: ControlNetConfig, draws=None, log=print):
    """Train a ControlNet on cfg.data into cfg.out; returns the path of the file (or folder) written."""
    check_controlnet(cfg)

    def prepare(model, resolution, device, log):
        if cfg.dataset_name:
            examples = dataset_examples(cfg, resolution, log=log, condition_column=cfg.conditioning_image_column)
        else:
            examples = find_pairs(cfg.data, resolution, log, **folder_options(cfg))
        log(f"ControlNet on {len(examples)} images and their conditioning images of {cfg.dataset_name or cfg.data} "
            f"at {resolution} px")
        net = initial_controlnet(model, cfg, log).to(device).requires_grad_(True).train()
        net.gradient_checkpointing = cfg.gradient_checkpointing
        params = {f"controlnet.{k}": p for k, p in net.named_parameters()}
        log(f"{sum(p.numel() for p in params.values()):,} trainable numbers")
        conditions = [load_image(p) for p in cfg.validation_images]

        def save(model, weights, step=None, meta=None):
            """The ControlNet file (`meta`, the run's metadata.py keys, in its header); the final one also puts
            `weights` into the network (the final validation images use them: EMA values with --use-ema)."""
            state = {k.removeprefix("controlnet."): v.detach().cpu().contiguous() for k, v in weights.items()}
            if step is None:
                net.load_state_dict(state)
            path = output_path(cfg, step)
            files.write(state, net.cfg, path, "1.1" if cfg.save_format == "single_file" else "diffusers", meta)
            return path

        def controls(i):
            return [Control(net, conditions[i if len(conditions) > 1 else 0])]

        return Training([Stream(examples, stream=0, root=cfg.data)], trainable=params, save=save, controlnet=net,
                        validation_controls=controls)

    return fit(cfg, "controlnet", prepare, draws, log)
