"""The tiny built-in model, measured on the shipped weights: it is SD's architecture at a small config, it draws
what the prompt says (judged by shapes.judge, a non-learned rule), classifier-free guidance is what makes it do so
(a fifth of its training captions are wrong, as web captions are: see tiny.noisy_captions), and deterministic
samplers converge to one another as steps grow."""
import itertools
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from minisd.config import PRESETS, TINY
from minisd.model import tiny_model_path
from minisd.pipeline import Pipeline
from minisd.tiny import shapes
from minisd.tiny.evaluate import adherence, eval_combinations, generate_each
from minisd.train.tiny import noisy_captions
from minisd.train.loss import diffusion_loss

SEEDS = (0, 1)
DEFAULT_CFG = 7.5


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return Pipeline.load(None, device="cpu", log=lambda *_: None)


@pytest.fixture(scope="module")
def train_adherence(pipe):
    return adherence(pipe, eval_combinations(held_out=False), SEEDS, cfg=DEFAULT_CFG)


def test_shipped_file_is_the_tiny_config_in_fp16_under_15_mb():
    path = tiny_model_path()
    assert os.path.dirname(path).endswith(os.path.join("minisd", "assets"))
    assert os.path.getsize(path) <= 15 * 2 ** 20
    with safe_open(path, "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def test_tiny_model_is_sd15_architecture_at_a_small_config(pipe):
    cfg = pipe.model.config
    assert cfg == TINY                                   # incl. the scale factor measured after the VAE phase
    assert type(cfg) is type(PRESETS["sd15"]) and cfg.prediction == "eps" and cfg.image_size == 64
    assert pipe.model.vae.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 16, 16)  # factor 4, as LDM's kl-f4
    assert pipe.model.tokenizer("a red circle").shape == (1, 77)                      # CLIP BPE, 77 tokens


CLAIMED = 0.9        # the model card's adherence at the default cfg (measured 89.4% on seeds 0-3, 93.3% on 0-15)
ALPHA = 0.01         # how unlikely the count must be under the claim before the test calls it a regression


def binomial_cdf(k, n, p):
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def test_binomial_bound_fails_on_a_real_regression():
    """The bound below passes 41 of 52 and fails 40 of 52 (77%) against the 90% claim."""
    assert binomial_cdf(41, 52, CLAIMED) >= ALPHA > binomial_cdf(40, 52, CLAIMED)


def test_default_model_draws_the_prompt_on_training_combinations(train_adherence):
    # 26 combinations covering every colour, shape and background, 2 seeds each, judged exactly right. 52 images
    # measure adherence to +-4 points, and two images flipping on another CPU's arithmetic would fail a fixed 0.9.
    # So the test asks whether the count is consistent with the claim: a one-sided exact binomial test, failing
    # only when P(X <= hits | n, p = CLAIMED) < ALPHA, i.e. at 40 of 52 or fewer.
    n = len(eval_combinations(held_out=False)) * len(SEEDS)
    hits = round(train_adherence * n)
    p_value = binomial_cdf(hits, n, CLAIMED)
    print(f"adherence on training combinations at cfg {DEFAULT_CFG}: {hits}/{n} = {train_adherence:.1%}, "
          f"one-sided p-value against {CLAIMED:.0%}: {p_value:.3f}")
    assert p_value >= ALPHA, f"{hits}/{n} is not consistent with the claimed {CLAIMED:.0%} adherence"


def test_classifier_free_guidance_raises_adherence(pipe, train_adherence):
    # cfg 1 samples the conditional model alone, which reproduces its training captions' mistakes; guidance
    # (Ho & Salimans 2022) weights samples by p(c|x)^(w-1) and removes them. Measured at seeds 0-3: 43.3% vs 89.4%.
    unguided = adherence(pipe, eval_combinations(held_out=False), SEEDS, cfg=1.0)
    print(f"adherence on training combinations: cfg 1.0 {unguided:.1%}, cfg {DEFAULT_CFG} {train_adherence:.1%}")
    assert unguided <= train_adherence - 0.2


HELD_OUT_SEEDS = (0, 1, 2, 3)   # the model card's measure: the 12 held-out prompts x 4 seeds = 48 images
CLAIMED_HELD_OUT = 0.95         # the model card's held-out adherence (issue 35's target; measured: see the card)


@pytest.fixture(scope="module")
def held_out_images(pipe):
    """(combination, image) for the 12 combinations never seen in training, seeds 0-3, at the default cfg; also
    read by test_tiny_edges' frame check."""
    pairs = [(c, s) for c in eval_combinations(held_out=True) for s in HELD_OUT_SEEDS]
    images = generate_each(pipe, [shapes.caption(*c) for c, _ in pairs], [s for _, s in pairs], cfg=DEFAULT_CFG)
    return [(c, image) for (c, _), image in zip(pairs, images)]


def test_binomial_bound_on_held_out_prompts_fails_at_85_percent():
    """At 48 images the bound below passes 42 (87.5%) and fails 41 (85.4%, the 8x8-latent model's figure)."""
    assert binomial_cdf(42, 48, CLAIMED_HELD_OUT) >= ALPHA > binomial_cdf(41, 48, CLAIMED_HELD_OUT)


def test_held_out_combinations_are_drawn_as_prompted(held_out_images):
    # Combinations never seen in training (shapes.all_combinations): the world's colour, shape and background
    # words recombined. The same one-sided binomial test as above, against the card's 95%.
    hits = sum(shapes.judge(image) == c for c, image in held_out_images)
    n = len(held_out_images)
    p_value = binomial_cdf(hits, n, CLAIMED_HELD_OUT)
    print(f"adherence on the 12 held-out combinations at cfg {DEFAULT_CFG}: {hits}/{n} = {hits / n:.1%}, "
          f"one-sided p-value against {CLAIMED_HELD_OUT:.0%}: {p_value:.3f}")
    assert p_value >= ALPHA, f"{hits}/{n} is not consistent with the claimed {CLAIMED_HELD_OUT:.0%} adherence"


def test_generated_held_out_images_have_no_edge_frame(held_out_images):
    # Issue 35: every background pixel of the outermost two-pixel ring (shapes.edge_deviation: beyond 2 px of the
    # shape the judge reads) is within 12/255 of the background colour the judge reads, and the judge no longer
    # skips that ring. The 8x8-latent model before its phase-4 decoder: 48 of 48 over 12 (mean 54/255).
    deviation = [shapes.edge_deviation(image) for _, image in held_out_images]
    worst = int(np.argmax(deviation))
    print(f"edge ring of the held-out images: max {max(deviation):.0f}/255, mean {np.mean(deviation):.1f}")
    assert max(deviation) <= 12, f"{' '.join(held_out_images[worst][0])}: {max(deviation):.0f}/255 off at the edge"


def test_images_generated_in_batches_are_each_pair_generated_alone_in_order(pipe):
    # the evaluation helpers draw their images batch_size pairs per call; 5 pairs in batches of 2 end on a short one
    prompts = [shapes.caption(*c) for c in eval_combinations(held_out=True)[:5]]
    seeds = [3, 4, 5, 6, 7]
    images = generate_each(pipe, prompts, seeds, batch_size=2, steps=6)
    alone = [pipe.generate(p, seed=s, steps=6).images[0] for p, s in zip(prompts, seeds)]
    pixels = lambda image: torch.from_numpy(np.asarray(image, dtype=np.int16))
    assert len(images) == len(alone)
    for a, b in zip(images, alone):
        # a batched U-Net call rounds differently in the last bits: at most one level of 255 after decoding
        assert (pixels(a) - pixels(b)).abs().max() <= 1
    # and the comparison can fail: the images out of order are other images
    assert all((pixels(a) - pixels(b)).abs().max() > 10 for a, b in zip(images, alone[1:]))


def test_deterministic_samplers_agree_more_as_steps_grow(pipe):
    prompt = "a yellow square on a black background"
    names = ("euler", "heun", "dpmpp_2m", "lms")

    def spread(steps):
        latents = [pipe.generate(prompt, sampler=s, steps=steps, seed=3).latents for s in names]
        return max((a - b).abs().mean().item() for a, b in itertools.combinations(latents, 2))

    coarse, fine = spread(8), spread(40)
    print(f"largest mean |difference| between samplers: {coarse:.4f} at 8 steps, {fine:.4f} at 40 steps")
    assert fine < 0.5 * coarse


def test_generate_without_model_writes_the_prompted_image_offline(tmp_path):
    from minisd.cli import main
    out = tmp_path / "tiny.png"
    # seed 1: the shipped model draws this prompt red at seeds 1-4, 6 and 7, yellow at 0 and orange at 5 (its misses,
    # measured by the adherence tests above, are mostly a red drawn yellow); this test is about the offline path
    assert main(["generate", "a red circle on a blue background", "--seed", "1", "--out", str(out)]) == 0
    from PIL import Image
    assert shapes.judge(Image.open(out)) == ("red", "circle", "blue")


def test_diffusion_loss_is_a_pure_function_of_the_step_generator(pipe):
    # what exact resumption rests on: the same generator state gives the same t, noise and loss
    model = pipe.model
    alphas_cumprod = pipe.alphas_cumprod.float()
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenizer(["a red circle on a blue background"] * 4)
    with torch.no_grad():
        a = diffusion_loss(model, x0, tokens, torch.Generator().manual_seed(5), alphas_cumprod)
        b = diffusion_loss(model, x0, tokens, torch.Generator().manual_seed(5), alphas_cumprod)
        c = diffusion_loss(model, x0, tokens, torch.Generator().manual_seed(6), alphas_cumprod)
    assert a == b and a != c


def test_noisy_captions_are_a_fixed_fraction_each_wrong_in_one_attribute():
    captions = [shapes.sample(1, i).text for i in range(2000)]
    noisy = noisy_captions(captions, 0.2, seed=0)
    assert noisy == noisy_captions(captions, 0.2, seed=0) and noisy_captions(captions, 0.0, seed=0) == captions
    wrong = [(a.split(), b.split()) for a, b in zip(captions, noisy) if a != b]
    assert 0.17 < len(wrong) / len(captions) < 0.23
    assert all(sum(x != y for x, y in zip(a, b)) == 1 for a, b in wrong)


def test_pipeline_decode_records_no_autograd_graph(pipe):
    # the weights require grad (a loaded model can be fine-tuned); decoding for display must not build a graph
    assert next(pipe.model.vae.parameters()).requires_grad
    assert not pipe.decode(torch.randn(1, 4, 16, 16)).requires_grad
