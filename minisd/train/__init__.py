"""Training: one loop (loop.py) that every method runs, and what differs between methods.

  loop.py        AdamW, the learning rate, gradient accumulation, mixed precision, an EMA copy, atomic
                 checkpoints and exact resumption; the gradient average over processes under torchrun
  lr.py          learning-rate schedules (diffusers' get_scheduler, plus floors and the tiny recipe's)
  loss.py        the noise-prediction objective, v targets, Min-SNR weights, DreamBooth's prior loss
  data.py        image folders with captions, and diffusers' preprocessing
  common.py      what fine-tuning methods share: settings, the training step, the run folder
  finetune.py    `minisd train finetune`: full fine-tuning on captioned images
  dreambooth.py  `minisd train dreambooth`: one subject, optionally with prior preservation
  cli.py         the `minisd train` command line
"""
