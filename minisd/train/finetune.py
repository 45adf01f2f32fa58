"""Full fine-tuning on a folder of captioned images (diffusers' train_text_to_image.py, one process):

    minisd train finetune --data DIR --out DIR [--model M] [--train-text-encoder] [--use-ema] ...
    minisd train finetune --dataset-name NAME_OR_PATH [--image-column image] [--caption-column text] --out DIR ...

Every U-Net weight trains (and the text encoder's with --train-text-encoder) on the noise-prediction loss of the
images in --data, each with its caption (NAME.txt or metadata.jsonl; data.py), a plain folder or kohya's N_prompt
subfolders, or of a Hugging Face dataset's rows (hf_dataset.py). fit.fit does the training (with --enable-bucket,
at each image's aspect-ratio bucket: buckets.py); this method only says where the batches come from.
"""
from dataclasses import dataclass

from .batches import Stream
from .hf_dataset import DatasetSettings, check_source, training_examples
from .fit import Training, fit
from .settings import TrainSettings, check


@dataclass(frozen=True)
class FinetuneConfig(DatasetSettings, TrainSettings):
    """A full fine-tuning run: the shared settings, and the folder (or dataset) of captioned images."""
    data: str | None = None                  # a folder of captioned images
    learning_rate: float = 1e-5              # diffusers' train_text_to_image examples (its argparse default: 1e-4)


config = FinetuneConfig                      # what `minisd train finetune` fills from its flags (cli/train.py)


def run(cfg: FinetuneConfig, draws=None, log=print):
    """Fine-tune cfg.model on cfg.data into cfg.out; returns the path of the model file written there."""
    check(cfg)
    check_source(cfg, "finetune")

    def prepare(model, resolution, device, log):
        examples = training_examples(cfg, resolution, log=log)
        log(f"fine-tuning on {len(examples)} images of {cfg.dataset_name or cfg.data} at {resolution} px")
        return Training([Stream(examples, stream=0, root=cfg.data)])

    return fit(cfg, "finetune", prepare, draws, log)
