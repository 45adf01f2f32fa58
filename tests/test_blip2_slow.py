"""BLIP-2 end to end at full size (tests/test_blip2.py's model: ViT-g, the Q-Former, OPT-2.7B's width with 2
layers), through `.caption()` from the pictures, at minisd caption's default lengths (max_length 75, min_length 5),
for greedy and 3 beams with and without a prompt, on 4 pictures: the captions equal transformers' decoded ones.
Slow (282 s of one core measured, 6.4 GB: the ViT-g runs once per decoding on our side), in its own module: the
default module's fixture holds its 5.5 GB model until that module ends, and this one builds another."""
import gc

import pytest

from _blip2_refs import reference_blip2, reference_config, save_folder
from _blip_refs import pictures
from minisd.caption import blip2
from test_blip2 import DECODINGS, Reference

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_captions_equal_transformers_end_to_end_at_the_default_lengths(tmp_path):
    ref = reference_blip2(reference_config(), seed=1)
    save_folder(ref, tmp_path, max_shard_size="2GB")
    images = pictures(4, seed=3)
    expected = Reference(ref, tmp_path, images, DECODINGS, max_length=75, min_length=5)
    del ref
    gc.collect()
    ours = blip2.load_blip2(tmp_path)
    for prompt, beams in DECODINGS:
        assert ours.caption(images, prompt, num_beams=beams) == expected.captions[prompt, beams], (prompt, beams)
