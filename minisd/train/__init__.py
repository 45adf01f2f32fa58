"""Training: one loop (loop.py) that every method runs, and what differs between methods.

From Python, `run(config)` trains with one method's config and returns the run's Result (below); `minisd train`
is a thin layer over it (minisd/cli/train.py):

    from minisd.train import DreamBoothConfig, run
    result = run(DreamBoothConfig(out="runs/sks", instance_dir="dog/", instance_prompt="a photo of sks dog"))
    result.model, result.last_loss, result.validation      # runs/sks/model.safetensors, ...

Read a method top to bottom as method -> fit -> loop: e.g. dreambooth.py checks its settings and says where its
batches come from; fit.fit loads the model and drives loop.train with step.py's loss on batches.py's batches.

  dreambooth.py  `minisd train dreambooth`: one subject, optionally with prior preservation (DreamBoothConfig)
  finetune.py    `minisd train finetune`: full fine-tuning on captioned images (FinetuneConfig)
  textual_inversion.py  `minisd train textual-inversion`: a new word's vectors (TextualInversionConfig)
  lora.py        `minisd train lora`: a low-rank change of the weights (LoRAConfig)
  controlnet.py  `minisd train controlnet`: a ControlNet, the model frozen (ControlNetConfig)
  settings.py    TrainSettings, what every method's config shares; its checks; the loop's settings it gives
  fit.py         fit: load the model, ask the method what trains, train, write the run folder (model, log, samples)
  batches.py     which examples micro-batch k holds (a pure function of seed, stream, k), crops, cached latents
  buckets.py     kohya's aspect-ratio buckets: the bucket list, each image's bucket, its crop (--enable-bucket)
  captions.py    kohya's caption tricks: dropout, shuffled tags, kept tokens, tag dropout
  step.py        one step's random draws (per example) and its loss on a whole SD model
  loop.py        AdamW, the learning rate, gradient accumulation, mixed precision, an EMA copy, atomic
                 checkpoints and exact resumption; the gradient average over processes under torchrun
  lr.py          learning-rate schedules (diffusers' get_scheduler, plus floors and the tiny recipe's)
  loss.py        the noise-prediction objective, v targets, Min-SNR weights, DreamBooth's prior loss
  control_data.py  a ControlNet's data: images with their conditioning images (NAME.cond.png) and captions
  data.py        image folders (plain, or kohya's N_prompt subfolders) with captions, and diffusers' preprocessing
  hf_dataset.py  Hugging Face datasets as a source of captioned images (--dataset-name; optional `datasets`)
  tiny.py        the tiny built-in model's three-phase recipe from scratch (`minisd train-tiny`)
  tiny_features.py  the tiny world's feature network for FID (`minisd train-tiny-features`)

The command line (`minisd train ...`) is minisd/cli/train.py.
"""
import dataclasses
import json
import os
from dataclasses import dataclass

from . import controlnet, dreambooth, finetune, lora, textual_inversion
from .controlnet import ControlNetConfig
from .dreambooth import DreamBoothConfig
from .finetune import FinetuneConfig
from .lora import LoRAConfig
from .textual_inversion import TextualInversionConfig

# each config to its method; by exact type, since a LoRAConfig is also a DreamBoothConfig (DreamBooth-LoRA)
METHODS = {FinetuneConfig: finetune, DreamBoothConfig: dreambooth, TextualInversionConfig: textual_inversion,
           LoRAConfig: lora, ControlNetConfig: controlnet}


@dataclass(frozen=True)
class Result:
    """A finished run: the files in its folder, and the figures of its result.json."""
    method: str                 # "finetune", "dreambooth", "textual_inversion", "lora" or "controlnet"
    out: str                    # the run folder
    model: str                  # what the method wrote: model.safetensors (or a diffusers folder), the LoRA file,
                                # learned_embeds.safetensors, controlnet.safetensors
    log: str                    # train_log.jsonl: step, loss, lr, seconds of every step
    steps: int                  # optimizer steps in all (a resumed run's included)
    last_loss: float | None     # the loss of the last logged step
    seconds: float              # training and writing what the method writes
    validation: tuple = ()      # the final validation images (samples/step-...png), one per prompt and seed
    processes: int = 1          # under torchrun, the job's


def run(cfg, log=print) -> Result:
    """Train with `cfg` (FinetuneConfig, DreamBoothConfig, TextualInversionConfig, LoRAConfig or ControlNetConfig)
    into cfg.out, as `minisd train METHOD` with the flags of the same names does; returns the run's Result. Settings
    that cannot run are a one-line ValueError before any model is loaded. Under torchrun every process returns the same
    Result, once rank 0 has written the run folder."""
    if type(cfg) not in METHODS:
        raise ValueError(f"minisd.train.run takes one of {', '.join(c.__name__ for c in METHODS)}, got "
                         f"{type(cfg).__name__}")
    METHODS[type(cfg)].run(cfg, log=log)
    with open(os.path.join(cfg.out, "result.json")) as f:
        result = json.load(f)
    names = {f.name for f in dataclasses.fields(Result)}
    return Result(out=cfg.out, log=os.path.join(cfg.out, "train_log.jsonl"),
                  **{k: tuple(v) if k == "validation" else v for k, v in result.items() if k in names})
