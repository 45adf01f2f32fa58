"""Variation seeds (A1111's "Variation seed" and "Variation seed strength"; `--subseed`, `--subseed-strength`).

An image's starting noise, noise(seed), is bent toward a second seed's, noise(subseed), by spherical linear
interpolation: strength 0 is the seed's image, 1 the subseed's, and the values between walk from one to the other
(small strengths give small variations of the same picture). Everything after the starting noise (the sampler's
fresh noise, the VAE posterior sample of img2img) stays the seed's, as in A1111.

noise(subseed) is the draw the subseed itself would start from: a generator seeded with it, taking the same draws
before it as the seed's generator does (img2img first draws the posterior sample; see pipeline.py's noise
convention), so strength 1 gives txt2img exactly the subseed's image.
"""
import random

import torch


def slerp(val, low, high):
    """A1111's slerp (modules/rng.py; modules/processing.py before 1.6), kept exactly, quirks included: the
    tensors are one image's noise (C, H, W), and `dim=1` makes it one slerp per (channel, column) of H values, not
    one over the whole tensor; the near-parallel fallback weighs `low` by val (reversed), which only matters
    when low and high are equal to 4 digits, i.e. seed == subseed."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)                                       # (C, W): cos of each angle
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def subseeds_for(seeds, subseed, strength):
    """One subseed per seed, as A1111 numbers them: image b of a batch gets subseed + b (None: a random subseed);
    a list is taken as it is. None when strength is 0 (no variation: nothing recorded)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"subseed strength must be in [0, 1], got {strength}")
    if strength == 0:
        return None
    if isinstance(subseed, (list, tuple)):
        if len(subseed) != len(seeds):
            raise ValueError(f"one subseed per seed: got {len(subseed)} subseeds and {len(seeds)} seeds")
        return [int(s) for s in subseed]
    base = random.randrange(2 ** 32) if subseed is None or subseed == -1 else int(subseed)
    if base < 0:
        raise ValueError(f"subseed must be >= 0, or -1 for a random one; got {subseed}")
    return [base + b for b in range(len(seeds))]


def mix(noise, subseeds, strength, shape, before=None):
    """The starting noise with a variation seed. noise (B, C, H, W): the seeds' draws, each seed's `shape`
    (n, C, H, W) images in turn; subseed k's draw of `shape` (after a draw shaped `before`, if given) is slerped
    into them image by image."""
    if not subseeds or strength == 0:
        return noise
    drawn = []
    for s in subseeds:
        generator = torch.Generator().manual_seed(s)
        if before is not None:
            torch.randn(before, generator=generator)        # the draw the seed's generator took first
        drawn.append(torch.randn(shape, generator=generator))
    sub = torch.cat(drawn)                                              # (B, C, H, W)
    return torch.stack([slerp(strength, a, b) for a, b in zip(noise, sub)])
