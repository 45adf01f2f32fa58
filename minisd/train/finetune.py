"""Full fine-tuning on a folder of captioned images (diffusers' train_text_to_image.py, one process):

    minisd train finetune --data DIR --out DIR [--model M] [--train-text-encoder] [--use-ema] ...

Every U-Net weight trains (and the text encoder's with --train-text-encoder) on the noise-prediction loss of the
images in --data, each with its caption (NAME.txt or metadata.jsonl; data.py), a plain folder or kohya's N_prompt
subfolders. run.fit does the training (with --enable-bucket, at each image's aspect-ratio bucket: buckets.py);
this method only says where the batches come from.
"""
from dataclasses import dataclass

from .batches import Stream
from .data import find_examples
from .run import Training, fit
from .settings import TrainSettings, check, folder_options


@dataclass(frozen=True)
class FinetuneConfig(TrainSettings):
    """A full fine-tuning run: the shared settings, and the folder of captioned images."""
    data: str | None = None                  # a folder of captioned images
    learning_rate: float = 1e-5              # diffusers' train_text_to_image examples (its argparse default: 1e-4)


config = FinetuneConfig                      # what `minisd train finetune` fills from its flags (cli/train.py)


def run(cfg: FinetuneConfig, draws=None, log=print):
    """Fine-tune cfg.model on cfg.data into cfg.out; returns the path of the model file written there."""
    check(cfg)
    if not cfg.data:
        raise ValueError("finetune needs --data DIR (a folder of images with captions)")

    def prepare(model, resolution, device, log):
        examples = find_examples(cfg.data, resolution, log=log, **folder_options(cfg))
        log(f"fine-tuning on {len(examples)} images of {cfg.data} at {resolution} px")
        return Training([Stream(examples, stream=0, root=cfg.data)])

    return fit(cfg, "finetune", prepare, draws, log)
