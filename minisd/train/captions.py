"""kohya-ss/sd-scripts' caption tricks, applied to each example's caption each time it is used
(kohya's BaseDataset.process_caption):

    --caption-dropout-rate p      the whole caption becomes "" with probability p: those examples train the
                                  unconditional prediction that classifier-free guidance subtracts
    --shuffle-caption             the caption is comma-separated tags ("sks dog, sitting, grass"), put in a random
                                  order, so no tag learns to depend on its place
    --keep-tokens N               ... except the first N tags, which stay first and in place (the trigger word)
    --caption-tag-dropout-rate p  each tag but the kept ones is left out with probability p

In kohya's order: dropout first (a dropped caption does nothing else); else, with shuffling or tag dropout, the
caption is split at commas, each tag stripped, the kept tags set aside, the rest shuffled, then thinned, and
all joined again with ", ". One difference: empty tags (",," or a trailing comma) are dropped here, where kohya
keeps them as empty strings.

The random numbers come from a generator of the example's own (`caption_generator`), seeded from the generator of
the example's crops and noise (step.example_generator: seeded by (seed, micro-batch k, place j)) without drawing
from it: so the tricks are a pure function of (seed, k, j), a resumed run or another process draws the same ones,
and turning a trick on does not change any example's crop or noise.
"""
import torch

# a multiplier of Knuth's MMIX generator: seeds of neighbouring examples (which differ by 1) land far apart
_MIX = 6364136223846793005


def check(cfg):
    """One-line errors for the tricks' settings (cfg: a train.settings.TrainSettings)."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        p = getattr(cfg, name)
        if not 0 <= p <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {p}")
    if cfg.keep_tokens < 0:
        raise ValueError(f"--keep-tokens must be >= 0, got {cfg.keep_tokens}")


def active(cfg):
    """Whether any trick draws random numbers."""
    return cfg.caption_dropout_rate > 0 or cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0


def caption_generator(example_generator):
    """The example's caption generator, seeded from its example generator's seed (module docstring)."""
    return torch.Generator().manual_seed((example_generator.initial_seed() * _MIX + 1) % 2**63)


def apply(caption, cfg, generator):
    """`caption` after the tricks cfg turns on, drawing from `generator` (module docstring)."""
    if cfg.caption_dropout_rate > 0 and torch.rand(1, generator=generator).item() < cfg.caption_dropout_rate:
        return ""
    if not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
    if cfg.shuffle_caption:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    if cfg.caption_tag_dropout_rate > 0:
        keep = torch.rand(len(rest), generator=generator) >= cfg.caption_tag_dropout_rate
        rest = [t for t, k in zip(rest, keep.tolist()) if k]
    return ", ".join(kept + rest)
