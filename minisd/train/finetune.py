"""Full fine-tuning on a folder of captioned images (diffusers' train_text_to_image.py, one process):

    minisd train finetune --data DIR --out DIR [--model M] [--train-text-encoder] [--use-ema] ...

Every U-Net weight trains (and the text encoder's with --train-text-encoder) on the noise-prediction loss of the
images in --data, each with its caption (NAME.txt or metadata.jsonl; data.py). common.fit does the training.
"""
import dataclasses

from .. import distributed
from .common import FinetuneConfig, Stream, check, fit, load
from .data import find_examples

DEFAULT_LR = 1e-5          # diffusers' train_text_to_image examples use 1e-5 (its argparse default is 1e-4)


def run(cfg: FinetuneConfig, draws=None, log=print):
    """Fine-tune cfg.model on cfg.data into cfg.out; returns the path of the model file written there."""
    check(cfg)
    if not cfg.data:
        raise ValueError("finetune needs --data DIR (a folder of images with captions)")
    device = distributed.setup(cfg.device)
    log = distributed.main_only(log)
    model, source = load(cfg, device, log)
    resolution = cfg.resolution or model.config.image_size
    examples = find_examples(cfg.data, resolution, log=log)
    log(f"fine-tuning on {len(examples)} images of {cfg.data} at {resolution} px")
    return fit(cfg, "finetune", [Stream(examples, stream=0)], model, source, device, draws, log)


def config(**kwargs):
    """A FinetuneConfig with this method's defaults (the learning rate) for what is not given."""
    return dataclasses.replace(FinetuneConfig(out=kwargs.pop("out"), learning_rate=DEFAULT_LR), **kwargs)
