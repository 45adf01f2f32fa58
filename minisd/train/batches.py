"""Where a micro-batch's examples come from: which examples micro-batch k holds is a pure function of
(seed, stream, k), so a resumed run, or another process, sees the same batches.

A Stream is one folder's examples (the finetune folder; DreamBooth's instance or class folder). Each folder is read
in fresh random orders, epoch after epoch (`batch_indices`); an epoch holds each image as many times as its
repeats (kohya's `N_prompt` folders; once in a plain folder). An example's crop, flip and template prompt come from
its own generator (step.example_generator), its caption tricks from a generator seeded from that one
(captions.py). With --cache-latents the VAE encodes each image once, beforehand (`cache_moments`), and batches
carry posterior moments instead of pixels.

With --enable-bucket every micro-batch comes from one bucket (buckets.py), and `bucket_batch` says which: an
epoch cuts each bucket's examples (repeats counted), in a fresh random order, into batches of the micro-batch's
size G, the last one completed from the start of the same order (kohya makes it smaller instead; equal batches
keep the loss's weighting and the processes' equal shares), and visits all the buckets' batches in a random order.
An epoch is therefore sum over buckets of ceil(n_b / G) micro-batches, whatever k, so micro-batch k is found
without replaying the ones before it.

Several processes (torchrun; minisd/distributed.py): --train-batch-size B is per process, as in diffusers, so
micro-batch k holds G = B x W examples for W processes (and an optimizer step G x A, with A micro-batches): the
same G examples as one process with --train-batch-size G, of which rank r takes places r*B .. r*B + B - 1 of each
stream (`take`); with buckets the whole micro-batch of G comes from one bucket, so every rank's share does too.
Each process's loss is the mean over its B examples (DreamBooth: mse(its instances) + w mse(its class examples),
equal halves), so the mean of the W losses and of their gradients, which the loop takes, is the loss and gradient
of the whole batch: W processes with B each give the weights one process gives with B x W.
"""
from dataclasses import dataclass

import torch

from ..controlnet import control_image
from ..images import to_tensor
from . import buckets, captions
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


def _generator(*parts):
    h = 0x9E3779B9                        # not batch_indices' seeds
    for p in parts:
        h = (h * 1_000_003 + p) % 2**63
    return torch.Generator().manual_seed(h)


def bucket_batch(groups, batch_size, k, seed, stream=0):
    """(bucket number, entries) of micro-batch k when every batch comes from one bucket (module docstring).
    groups[b]: the entries of bucket b (example indices, each as many times as its repeats)."""
    counts = [-(-len(g) // batch_size) for g in groups]                  # batches of each bucket per epoch
    epoch, i = divmod(k, sum(counts))
    c = int(torch.randperm(sum(counts), generator=_generator(seed, stream, epoch))[i])
    b = 0
    while c >= counts[b]:                                                # the c-th batch of the epoch's list
        c -= counts[b]
        b += 1
    group = groups[b]
    order = torch.randperm(len(group), generator=_generator(seed, stream, epoch, b + 1)).tolist()
    return b, [group[order[(c * batch_size + j) % len(group)]] for j in range(batch_size)]


@dataclass
class Stream:
    """One source of examples (the finetune folder; DreamBooth's instance or class folder), with each example's
    bucket when buckets are on and its posterior moments when latents are cached."""
    examples: list
    stream: int
    cache: list = None               # [(mean, logvar)] per example, each (4, h, w), when --cache-latents
    buckets: list = None             # [(bucket (w, h), resized (w, h))] per example, with --enable-bucket
    role: str = "data"               # its name in buckets.json: "data", or DreamBooth's "instance" / "class"
    root: str = None                 # the folder its images are in (buckets.json names them relative to it)

    def entries(self):
        """Each example's index, as many times as its repeats: what an epoch holds."""
        return [i for i, e in enumerate(self.examples) for _ in range(e.repeats)]

    def groups(self):
        """The entries of each bucket, the buckets in sorted order."""
        out = {}
        for i in self.entries():
            out.setdefault(self.buckets[i][0], []).append(i)
        return [out[b] for b in sorted(out)]


def micro_batches_per_epoch(source: Stream, size):
    """Micro-batches of `size` examples in one epoch of `source`: ceil(entries / size), or with buckets the sum over
    buckets of ceil(n_b / size) (module docstring)."""
    if source.buckets is None:
        return -(-len(source.entries()) // size)
    return sum(-(-len(g) // size) for g in source.groups())


def micro_batch(source: Stream, size, k, seed):
    """The example indices of the whole micro-batch k (all processes' shares) of `size` examples."""
    entries = source.entries()
    if source.buckets is None:
        return [entries[i] for i in batch_indices(len(entries), size, k, seed, source.stream)]
    return bucket_batch(source.groups(), size, k, seed, source.stream)[1]


def pick_caption(caption, generator):
    """An example's caption; a tuple holds alternatives (textual inversion's template prompts), one drawn per use
    from the example's generator."""
    if isinstance(caption, str):
        return caption
    if generator is None:
        raise ValueError("template prompts need a generator per example")
    return caption[int(torch.randint(len(caption), (1,), generator=generator))]


def take(source: Stream, k, cfg: TrainSettings, resolution, generators=None, world=1, rank=0):
    """(pixels or None, moments or None, captions, hints or None) of this process's share of micro-batch k from
    `source`; generators: one per example of the share (template prompts, crops and flips, caption tricks), or None
    for centre crops without flips, fixed captions and no tricks. hints: a ControlNet's data (examples with a
    conditioning image): those images (B, 3, H, W) RGB in [0, 1], cropped and flipped as their images."""
    b = cfg.train_batch_size
    idx = micro_batch(source, b * world, k, cfg.seed)[rank * b:(rank + 1) * b]
    if generators is None:
        if not cfg.center_crop or cfg.random_flip or captions.active(cfg):
            raise ValueError("random crops and flips, and caption tricks, need a generator per example")
        generators = [None] * len(idx)
    texts = [pick_caption(source.examples[i].caption, g) for i, g in zip(idx, generators)]
    if captions.active(cfg):
        texts = [captions.apply(t, cfg, captions.caption_generator(g)) for t, g in zip(texts, generators)]
    hints = None
    if source.examples[idx[0]].condition is not None:
        # the same crop and flip as the image: the same draws, from a copy of the example's generator as it is now
        copies = [None if g is None else torch.Generator().set_state(g.get_state()) for g in generators]
        hints = torch.cat([control_image(image, *image.size) for image in
                           (preprocess(source, i, resolution, cfg.center_crop, cfg.random_flip, c, condition=True)
                            for i, c in zip(idx, copies))])
    if source.cache is not None:
        return None, tuple(torch.stack([source.cache[i][n] for i in idx]) for n in (0, 1)), texts, hints
    images = [preprocess(source, i, resolution, cfg.center_crop, cfg.random_flip, g) for i, g in zip(idx, generators)]
    return to_tensor(images), None, texts, hints


def preprocess(source: Stream, i, resolution, center_crop=True, random_flip=False, generator=None, condition=False):
    """Example i of `source` (its conditioning image, with condition) as a PIL image of its training size: its
    bucket, or resolution^2."""
    example = source.examples[i]
    image = example.condition_image() if condition else example.image()
    if source.buckets is None:
        return resize_and_crop(image, resolution, center_crop, random_flip, generator)
    return buckets.crop(image, *source.buckets[i], center_crop, random_flip, generator)


@torch.no_grad()
def cache_moments(vae, source: Stream, resolution, device, chunk=8):
    """Posterior (mean, logvar) of every example of `source`, centre-cropped (to its bucket, with buckets),
    encoded once (--cache-latents), `chunk` images of one size at a time."""
    sizes = [None] * len(source.examples) if source.buckets is None else [b for b, _ in source.buckets]
    out = [None] * len(source.examples)
    for size in dict.fromkeys(sizes):                                    # each size, in first-seen order
        members = [i for i, s in enumerate(sizes) if s == size]
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            images = [preprocess(source, i, resolution) for i in part]
            mean, logvar = vae.posterior(to_tensor(images).to(device, vae.quant_conv.weight.dtype))
            at_least_fp32 = torch.promote_types(mean.dtype, torch.float32)
            for i, m, v in zip(part, mean.to(at_least_fp32), logvar.to(at_least_fp32)):
                out[i] = (m, v)
    return out
