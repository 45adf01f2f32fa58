"""Where a micro-batch's examples come from: which examples micro-batch k holds is a pure function of
(seed, stream, k), so a resumed run, or another process, sees the same batches.

A Stream is one folder's examples (the finetune folder; DreamBooth's instance or class folder). Each folder is read
in fresh random orders, epoch after epoch (`batch_indices`); an example's crop, flip and template prompt come from
its own generator (step.example_generator). With --cache-latents the VAE encodes each image once, beforehand
(`cache_moments`), and batches carry posterior moments instead of pixels.

Several processes (torchrun; minisd/distributed.py): --train-batch-size B is per process, as in diffusers, so
micro-batch k holds G = B x W examples for W processes (and an optimizer step G x A, with A micro-batches): the
same G examples as one process with --train-batch-size G, of which rank r takes places r*B .. r*B + B - 1 of each
stream (`take`). Each process's loss is the mean over its B examples (DreamBooth: mse(its instances) + w mse(its
class examples), equal halves), so the mean of the W losses and of their gradients, which the loop takes, is the
loss and gradient of the whole batch: W processes with B each give the weights one process gives with B x W.
"""
from dataclasses import dataclass

import torch

from ..images import to_tensor
from .data import resize_and_crop
from .settings import TrainSettings


def batch_indices(n, batch_size, k, seed, stream=0):
    """Examples of micro-batch k: epochs of a fresh permutation each (sampling without replacement, as a shuffled
    DataLoader does), position p = k * batch_size + j in the endless sequence of epochs."""
    out = []
    for p in range(k * batch_size, (k + 1) * batch_size):
        epoch, i = divmod(p, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7 + stream))
        out.append(int(order[i]))
    return out


@dataclass
class Stream:
    """One source of examples (the finetune folder; DreamBooth's instance or class folder), with its
    posterior moments when latents are cached."""
    examples: list
    stream: int
    cache: tuple = None              # (mean, logvar), each (N, 4, h, w), when --cache-latents


def pick_caption(caption, generator):
    """An example's caption; a tuple holds alternatives (textual inversion's template prompts), one drawn per use
    from the example's generator."""
    if isinstance(caption, str):
        return caption
    if generator is None:
        raise ValueError("template prompts need a generator per example")
    return caption[int(torch.randint(len(caption), (1,), generator=generator))]


def take(source: Stream, k, cfg: TrainSettings, resolution, generators=None, world=1, rank=0):
    """(pixels or None, moments or None, captions) of this process's share of micro-batch k from `source`;
    generators: one per example of the share (template prompts, crops and flips), or None for centre crops
    without flips and fixed captions."""
    b = cfg.train_batch_size
    idx = batch_indices(len(source.examples), b * world, k, cfg.seed, source.stream)[rank * b:(rank + 1) * b]
    if generators is None:
        if not cfg.center_crop or cfg.random_flip:
            raise ValueError("random crops and flips need a generator per example")
        generators = [None] * len(idx)
    captions = [pick_caption(source.examples[i].caption, g) for i, g in zip(idx, generators)]
    if source.cache is not None:
        return None, (source.cache[0][idx], source.cache[1][idx]), captions
    images = [resize_and_crop(source.examples[i].image(), resolution, cfg.center_crop, cfg.random_flip, g)
              for i, g in zip(idx, generators)]
    return to_tensor(images), None, captions


@torch.no_grad()
def cache_moments(vae, examples, resolution, device, chunk=8):
    """Posterior (mean, logvar) of every example, centre-cropped, encoded once (--cache-latents)."""
    means, logvars = [], []
    for start in range(0, len(examples), chunk):
        images = [resize_and_crop(e.image(), resolution) for e in examples[start:start + chunk]]
        mean, logvar = vae.posterior(to_tensor(images).to(device, vae.quant_conv.weight.dtype))
        at_least_fp32 = torch.promote_types(mean.dtype, torch.float32)
        means.append(mean.to(at_least_fp32))
        logvars.append(logvar.to(at_least_fp32))
    return torch.cat(means), torch.cat(logvars)
