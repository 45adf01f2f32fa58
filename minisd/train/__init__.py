"""Training: one loop (loop.py) that every method runs, and what differs between methods.

Read a method top to bottom as method -> run -> loop: e.g. dreambooth.py checks its settings and says where its
batches come from; run.fit loads the model and drives loop.train with step.py's loss on batches.py's batches.

  dreambooth.py  `minisd train dreambooth`: one subject, optionally with prior preservation (DreamBoothConfig)
  finetune.py    `minisd train finetune`: full fine-tuning on captioned images (FinetuneConfig)
  textual_inversion.py  `minisd train textual-inversion`: a new word's vectors (TextualInversionConfig)
  lora.py        `minisd train lora`: a low-rank change of the weights (LoRAConfig)
  settings.py    TrainSettings, what every method's config shares; its checks; the loop's settings it gives
  run.py         fit: load the model, ask the method what trains, train, write the run folder (model, log, samples)
  batches.py     which examples micro-batch k holds (a pure function of seed, stream, k), crops, cached latents
  buckets.py     kohya's aspect-ratio buckets: the bucket list, each image's bucket, its crop (--enable-bucket)
  captions.py    kohya's caption tricks: dropout, shuffled tags, kept tokens, tag dropout
  step.py        one step's random draws (per example) and its loss on a whole SD model
  loop.py        AdamW, the learning rate, gradient accumulation, mixed precision, an EMA copy, atomic
                 checkpoints and exact resumption; the gradient average over processes under torchrun
  lr.py          learning-rate schedules (diffusers' get_scheduler, plus floors and the tiny recipe's)
  loss.py        the noise-prediction objective, v targets, Min-SNR weights, DreamBooth's prior loss
  data.py        image folders (plain, or kohya's N_prompt subfolders) with captions, and diffusers' preprocessing
  hf_dataset.py  Hugging Face datasets as a source of captioned images (--dataset-name; optional `datasets`)
  tiny.py        the tiny built-in model's three-phase recipe from scratch (`minisd train-tiny`)
  tiny_features.py  the tiny world's feature network for FID (`minisd train-tiny-features`)

The command line (`minisd train ...`) is minisd/cli/train.py.
"""
