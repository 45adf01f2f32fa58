"""Training: one loop (loop.py) that every method runs, and what differs between methods.

  loop.py   AdamW, the learning rate, an EMA copy, atomic checkpoints and exact resumption
  lr.py     learning-rate schedules (warmup, cosine with restarts)
  loss.py   the noise-prediction objective of latent diffusion
"""
