"""DreamBooth (Ruiz et al. 2023): teach a model one subject from a few photos, under a rare token.

    minisd train dreambooth --instance-dir dog/ --instance-prompt "a photo of sks dog" --out runs/sks \
        [--class-prompt "a photo of a dog" --class-dir dogs/ --num-class-images 100 --prior-loss-weight 1.0]

It is fine-tuning (fit.fit) on the instance images, all captioned with --instance-prompt. With
--class-prompt, prior preservation (eq. 2 of the paper) adds a second loss on images the model itself drew for the
class prompt before training, so it keeps knowing what a dog in general looks like: each batch holds the instance
examples first, then as many class examples, and the loss is mse(instance) + prior_loss_weight * mse(class), as
diffusers' train_dreambooth.py computes it. Missing class images are generated first with minisd's pipeline, into
--class-dir; the images already there count, so a rerun only draws what is missing.

kohya-ss/sd-scripts' layout works too: --instance-dir of `N_prompt` subfolders (N repeats; the folder's prompt is
the caption of its uncaptioned images, so --instance-prompt is optional), and --reg-data-dir, kohya's name for
class images that already exist (a plain folder or `N_prompt` subfolders; nothing is generated, and --class-prompt
is only the caption of images that have none). With --enable-bucket the instance and class batches are each drawn
from one bucket, not always the same one: then each half goes through the networks on its own (fit.fit).
"""
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import distributed
from ..pipeline import Pipeline
from .batches import Stream
from .data import IMAGE_EXTENSIONS, find_examples, is_kohya_layout
from .fit import Training, fit
from .settings import DTYPES, TrainSettings, check, folder_options


@dataclass(frozen=True)
class DreamBoothConfig(TrainSettings):
    """A DreamBooth run: the shared settings, the subject's images and prompt, and prior preservation's class."""
    instance_dir: str | None = None          # the subject's images ...
    instance_prompt: str | None = None       # ... and their caption ("a photo of sks dog")
    class_prompt: str | None = None          # prior preservation: the class ("a photo of a dog")
    class_dir: str | None = None             # its images, generated until there are num_class_images
    reg_data_dir: str | None = None          # kohya's name: class images already there (none generated), a plain
                                             # folder or N_prompt subfolders; prior preservation without a prompt
    num_class_images: int = 100
    sample_batch_size: int = 4               # class images per generate call (diffusers' --sample_batch_size)
    prior_loss_weight: float = 1.0           # w of mse(instance) + w mse(class)
    with_prior_preservation: bool = False    # diffusers' flag: prior preservation is on with class_prompt (or
                                             # reg_data_dir) anyway; set, it must be
    learning_rate: float = 5e-6              # diffusers' train_dreambooth.py default


config = DreamBoothConfig                    # what `minisd train dreambooth` fills from its flags (cli/train.py)


def class_images(folder):
    """The image files in `folder` (none if it does not exist yet)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))


def generate_class_images(model, cfg: DreamBoothConfig, resolution, device, log=print):
    """Fill cfg.class_dir up to cfg.num_class_images with images of cfg.class_prompt. Image i is drawn with seed
    cfg.seed + i and written as class-{i:05d}.png, so what a rerun adds does not depend on what was there.

    They are drawn cfg.sample_batch_size (S) at a time through generate's list form, one seed per image, in fixed
    batches: image i is drawn in the batch of images S * (i // S) to S * (i // S) + S - 1, whichever of those are
    missing (the others are drawn and not written). Each image equals its seed generated alone up to the rounding
    of a batched U-Net call, and since its batch depends on i and S alone, so do its bits: a rerun draws the same
    image bit for bit. Under torchrun the batches are shared out (rank r draws every W-th), and every process waits
    until all images are written; each image is the same whichever process draws it."""
    os.makedirs(cfg.class_dir, exist_ok=True)
    have = len(class_images(cfg.class_dir))
    missing = cfg.num_class_images - have
    if missing <= 0:
        return
    log(f"generating {missing} class images of {cfg.class_prompt!r} into {cfg.class_dir} ({have} there)")
    todo = [i for i in range(cfg.num_class_images + have)
            if not os.path.exists(os.path.join(cfg.class_dir, f"class-{i:05d}.png"))][:missing]
    distributed.barrier()                       # every process has listed the folder before any image is added
    size = cfg.sample_batch_size
    batches = distributed.shard(sorted({i // size for i in todo}))      # rank r draws every W-th batch
    todo = set(todo)
    pipe = Pipeline(model, device, DTYPES[cfg.dtype], log=lambda *_: None)
    total = sum(i // size in batches for i in todo)
    with tqdm(total=total, desc="class images", unit="image", disable=not distributed.is_main()) as bar:
        for b in batches:
            indices = range(b * size, b * size + size)
            result = pipe.generate([cfg.class_prompt] * size, seed=[cfg.seed + i for i in indices],
                                   width=resolution, height=resolution)
            for i, image in zip(indices, result.images):
                if i in todo:
                    path = os.path.join(cfg.class_dir, f"class-{i:05d}.png")
                    image.save(path + ".tmp", format="PNG")     # not an image name: a killed run leaves no
                    os.replace(path + ".tmp", path)             # half-written image that would count
                    bar.update(1)
    model.unet.to(memory_format=torch.contiguous_format)
    model.vae.to(memory_format=torch.contiguous_format)
    distributed.barrier()                       # all images are on disk before any process lists the folder


def check_instances(cfg: DreamBoothConfig):
    """One-line errors for DreamBooth's own settings (settings.check does the rest), before any model is loaded."""
    if not cfg.instance_dir:
        raise ValueError("dreambooth needs --instance-dir DIR (the subject's images)")
    if not cfg.instance_prompt and not is_kohya_layout(cfg.instance_dir):
        raise ValueError("dreambooth needs --instance-prompt (e.g. \"a photo of sks dog\"), unless --instance-dir "
                         "is kohya's layout of N_prompt subfolders")
    if cfg.with_prior_preservation and cfg.class_prompt is None and not cfg.reg_data_dir:
        raise ValueError("--with-prior-preservation needs --class-prompt and --class-dir (or --reg-data-dir)")
    if cfg.reg_data_dir:
        if cfg.class_dir:
            raise ValueError("--reg-data-dir (kohya's name: existing class images) and --class-dir (class images "
                             "generated as needed) are two ways to give the class images; give one")
        return
    prior = cfg.class_prompt is not None
    if prior and not cfg.class_dir:
        raise ValueError("--class-prompt needs --class-dir DIR (where the class images are, or go)")
    if not prior and cfg.class_dir:
        raise ValueError("--class-dir is only used with --class-prompt (prior preservation)")
    if prior and cfg.num_class_images < 1:
        raise ValueError(f"--num-class-images must be >= 1, got {cfg.num_class_images}")
    if prior and cfg.sample_batch_size < 1:
        raise ValueError(f"--sample-batch-size must be >= 1, got {cfg.sample_batch_size}")


def instance_streams(cfg: DreamBoothConfig, model, resolution, device, log=print):
    """The instance stream, and with --reg-data-dir or --class-prompt the class stream (with --class-dir, its
    missing images generated first)."""
    # captions: the instance prompt, unless an image has its own (NAME.txt / metadata.jsonl / N_prompt folder)
    options = folder_options(cfg)
    streams = [Stream(find_examples(cfg.instance_dir, resolution, cfg.instance_prompt, log=log, **options), stream=0,
                      role="instance", root=cfg.instance_dir)]
    class_dir = cfg.reg_data_dir or cfg.class_dir
    if cfg.class_prompt is not None or cfg.reg_data_dir:
        if not cfg.reg_data_dir:
            generate_class_images(model, cfg, resolution, device, log)
        streams.append(Stream(find_examples(class_dir, resolution, cfg.class_prompt, log=log, **options), stream=1,
                              role="class", root=class_dir))
    log(f"DreamBooth on {len(streams[0].examples)} images of {cfg.instance_dir}"
        + (f" with {len(streams[1].examples)} class images" if len(streams) > 1 else "") + f" at {resolution} px")
    return streams


def run(cfg: DreamBoothConfig, draws=None, log=print):
    """DreamBooth on cfg.instance_dir into cfg.out; returns the path of the model file written there."""
    check(cfg)
    check_instances(cfg)

    def prepare(model, resolution, device, log):
        return Training(instance_streams(cfg, model, resolution, device, log), prior_loss_weight=cfg.prior_loss_weight)

    return fit(cfg, "dreambooth", prepare, draws, log)
