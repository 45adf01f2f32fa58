"""Aspect-ratio buckets (--enable-bucket): the bucket list and each image's bucket against kohya's algorithm
(tests/_kohya_buckets.py), batches from one bucket each, buckets.json and the table, a 3:2 photo kept whole,
exact resume, cached latents and DreamBooth's halves in different buckets. (Several processes with buckets:
tests/test_distributed.py.)"""
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

import _kohya_buckets as kohya
from minisd.train import buckets, finetune
from minisd.train.batches import Stream, bucket_batch, micro_batch, take
from minisd.train.data import Example, find_examples
from weights_convert import detect

pytestmark = pytest.mark.usefixtures("one_thread")

# (resolution, min, max, steps): kohya's defaults at SD1.5's and SD2's sizes, and small ones as the tests train
SETTINGS = [(512, 256, 1024, 64), (768, 256, 1024, 64), (512, 320, 960, 32), (64, 32, 128, 16), (80, 32, 128, 8),
            (1024, 256, 2048, 64), (48, 30, 100, 16)]
# 60 sizes: portraits, landscapes, squares, exact bucket sizes, tiny and huge, odd ratios
SIZES = sorted({(w, h) for w, h in itertools.product([17, 50, 64, 96, 333, 512, 640, 768, 1000, 4032], repeat=2)}
               | {(512, 768), (768, 512), (448, 576), (3024, 4032), (1920, 1080), (1080, 1920), (96, 64),
                  (64, 96), (2000, 100), (100, 2000), (101, 77), (577, 433)})


def reference_list(resolution, min_size, max_size, steps):
    lo, hi = kohya.adjust_min_max_bucket_reso_by_steps((resolution, resolution), min_size, max_size, steps)
    return kohya.make_bucket_resolutions((resolution, resolution), lo, hi, steps)


@pytest.mark.parametrize("resolution,min_size,max_size,steps", SETTINGS)
def test_bucket_list_and_each_images_bucket_equal_kohyas(resolution, min_size, max_size, steps):
    lo, hi = buckets.check(resolution, min_size, max_size, steps)
    ours = buckets.resolutions(resolution, lo, hi, steps)
    assert ours == reference_list(resolution, min_size, max_size, steps)
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in ours)
    for no_upscale in (False, True):
        manager = kohya.BucketManager(no_upscale, (resolution, resolution), lo, hi, steps)
        if not no_upscale:
            manager.make_buckets()
        checked = 0
        for w, h in SIZES:
            try:
                ref_bucket, ref_resized, _ = manager.select_bucket(w, h)
            except ZeroDivisionError:             # kohya fails on a side that rounds to 0; we raise (below)
                continue
            if min(ref_bucket) == 0:
                continue
            assert buckets.select(w, h, ours, steps, no_upscale, resolution ** 2) == (ref_bucket, ref_resized), (w, h)
            checked += 1
        assert checked >= 50, checked


def test_the_comparison_can_fail():
    """A resize rounded down instead of kohya's int(x * scale + .5) disagrees with kohya on some of the sizes."""
    ours = buckets.resolutions(512, 256, 1024, 64)
    manager = kohya.BucketManager(False, (512, 512), 256, 1024, 64)
    manager.make_buckets()
    differ = 0
    for w, h in SIZES:
        ref = manager.select_bucket(w, h)[1]
        bucket = buckets.select(w, h, ours, 64)[0]
        scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
        differ += (int(w * scale), int(h * scale)) != ref                     # truncation instead of + .5
    assert differ > 5


def test_kohyas_crop_of_a_resized_image_is_ours():
    """Centred: kohya's (excess) // 2 on each side; random: our offsets, put into kohya's crop, give our pixels."""
    rng = np.random.default_rng(0)
    for (w, h), bucket in [((75, 50), (64, 48)), ((50, 75), (48, 64)), ((64, 64), (64, 64)), ((67, 48), (64, 48))]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = np.asarray(buckets.crop(image, bucket, (w, h), center_crop=True))
        assert np.array_equal(ours, kohya.trim(np.asarray(image), bucket))
        g = torch.Generator().manual_seed(3)
        ours = np.asarray(buckets.crop(image, bucket, (w, h), center_crop=False, generator=g))
        g = torch.Generator().manual_seed(3)
        offsets = [int(torch.randint(0, e + 1, (1,), generator=g)) if e > 0 else None
                   for e in (w - bucket[0], h - bucket[1])]
        assert np.array_equal(ours, kohya.trim(np.asarray(image), bucket, True, offsets))


@pytest.mark.parametrize("args,message", [
    ((64, 32, 128, 12), "--bucket-reso-steps must be a positive multiple of 8"),
    ((64, 96, 128, 16), "must lie between --min-bucket-reso 96 and --max-bucket-reso 128"),
    ((256, 32, 128, 16), "must lie between"),
])
def test_bad_bucket_settings_are_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message):
        buckets.check(*args)


def test_an_image_too_small_for_no_upscale_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"tiny.png \(12 x 40\) is too small for --bucket-no-upscale"):
        buckets.assign([Example("tiny.png", "c", size=(12, 40))], 64, 32, 128, 16, no_upscale=True)


def stream_of(sizes, repeats=None, stream=0):
    examples = [Example(f"{i}.png", f"c{i}", (repeats or [1] * len(sizes))[i], size)
                for i, size in enumerate(sizes)]
    return Stream(examples, stream, buckets=buckets.assign(examples, 64, 32, 128, 16))


def test_every_micro_batch_is_one_bucket_and_an_epoch_holds_every_example_its_repeats():
    sizes = [(96, 64), (64, 96), (64, 64), (100, 70), (70, 100), (128, 32), (64, 64), (90, 60), (40, 40)]
    repeats = [1, 2, 3, 1, 1, 2, 1, 1, 1]
    s = stream_of(sizes, repeats)
    groups = s.groups()
    assert len(groups) >= 4 and sum(map(len, groups)) == sum(repeats)
    size = 2
    per_epoch = sum(-(-len(g) // size) for g in groups)
    for epoch in range(3):
        seen = []
        for k in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            b, entries = bucket_batch(groups, size, k, seed=5)
            assert len({s.buckets[i][0] for i in entries}) == 1 and entries == micro_batch(s, size, k, 5)
            assert all(i in groups[b] for i in entries)
            seen += entries
        for i, r in enumerate(repeats):          # each example its repeats times, plus at most a batch's fill
            assert r <= seen.count(i) <= r + size - 1
        assert len(seen) == per_epoch * size
    # a pure function of (seed, stream, k): the same again, and another seed or stream orders otherwise
    first = [micro_batch(s, size, k, 5) for k in range(12)]
    assert first == [micro_batch(s, size, k, 5) for k in range(12)]
    assert first != [micro_batch(s, size, k, 6) for k in range(12)]
    assert first != [micro_batch(stream_of(sizes, repeats, stream=1), size, k, 5) for k in range(12)]


def pattern_image(path, w, h):
    """Grey noise with a 2-pixel red column at the left edge and a blue one at the right."""
    a = np.random.default_rng(0).integers(100, 160, (h, w, 3), dtype=np.uint8)
    a[:, :2] = (255, 0, 0)
    a[:, -2:] = (0, 0, 255)
    Image.fromarray(a).save(path)
    return a


def quiet(*_):
    pass


def test_a_3_by_2_photo_trains_whole_in_a_3_by_2_bucket_and_the_square_crop_cuts_its_edges(tmp_path, monkeypatch):
    """One training step of a 96 x 64 photo at resolution 80 (area 6400: the bucket 96 x 64 is in the list): the
    pixels the VAE encodes are the photo's own, both edge columns included; the square centre crop loses them."""
    from minisd.train import fit
    (tmp_path / "data").mkdir()
    photo = pattern_image(tmp_path / "data" / "photo.png", 96, 64)
    (tmp_path / "data" / "photo.txt").write_text("a photo")
    seen = []
    real = fit.step_loss

    def spy(model, pixels, *args, **kwargs):
        seen.append(pixels.clone())
        return real(model, pixels, *args, **kwargs)
    monkeypatch.setattr(fit, "step_loss", spy)

    def train(out, *flags):
        cfg = finetune.FinetuneConfig(out=str(tmp_path / out), data=str(tmp_path / "data"), resolution=80,
                                      max_train_steps=1, center_crop=True, device="cpu", min_bucket_reso=32,
                                      max_bucket_reso=128, bucket_reso_steps=8, **dict(flags))
        finetune.run(cfg, log=quiet)
        return ((seen[-1][0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()

    bucketed = train("bucket", ("enable_bucket", True))
    assert bucketed.shape == (64, 96, 3) and np.array_equal(bucketed, photo)          # every pixel, edges too
    assert json.loads((tmp_path / "bucket" / "buckets.json").read_text()) == {"data": {"photo.png": [96, 64]}}
    square = train("square")
    assert square.shape == (80, 80, 3)
    red = (square[:, :, 0] > 200) & (square[:, :, 2] < 60)
    blue = (square[:, :, 2] > 200) & (square[:, :, 0] < 60)
    assert not red.any() and not blue.any()                                  # the centre crop cut both edges


def test_cache_latents_with_buckets_trains_what_encoding_every_step_trains(tmp_path):
    """--cache-latents encodes each image once at its bucket's size: the weights equal a run that encodes every
    step, bit for bit (float32; 2 steps move them by ~1e-3)."""
    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(48, 32), (32, 48), (40, 40), (50, 30), (30, 50)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(["a red circle", "a blue square"][i % 2])

    def train(out, cache):
        cfg = finetune.FinetuneConfig(out=str(tmp_path / out), data=str(data), resolution=32, max_train_steps=2,
                                      train_batch_size=2, center_crop=True, cache_latents=cache, device="cpu",
                                      enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64,
                                      bucket_reso_steps=16, learning_rate=1e-4)
        return detect.read(finetune.run(cfg, log=quiet), verbose=False).state
    cached, encoded = train("cached", True), train("encoded", False)
    start = detect.read(str(_tiny()), verbose=False).state
    k = "unet.out.2.weight"
    err = max(((cached[n] - encoded[n]).norm() / encoded[n].norm()).item() for n in encoded if n.startswith("unet."))
    moved = ((encoded[k] - start[k].float()).norm() / encoded[k].norm()).item()
    print(f"[cache] max rel err {err:.1e}, moved {moved:.1e}")
    assert err == 0 and moved > 1e-4


def _tiny():
    from minisd.model import tiny_model_path
    return tiny_model_path()


def test_dreambooth_halves_in_different_buckets_give_the_loss_of_the_stacked_halves(tmp_path):
    """When the instance and class batches land in different buckets, fit.fit computes each half on its own:
    mse(inst) + w mse(class) from two calls equals the one call on the stacked batch where both fit (float64,
    1e-12), so the separate path is the loss the parity tests check."""
    from minisd.diffusion import alphas_cumprod_from_betas, scaled_linear_betas
    from minisd.model import load_model
    from minisd.train.step import concat_draws, draw, example_generator, step_loss
    model = load_model(_tiny(), dtype=torch.float64, verbose=False)
    mc = model.config
    abar = alphas_cumprod_from_betas(scaled_linear_betas(mc.beta_start, mc.beta_end, mc.num_timesteps))
    cfg = finetune.FinetuneConfig(out="x", snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 16, 24, generator=g, dtype=torch.float64) * 2 - 1
    f = 2 ** (len(mc.vae.ch_mult) - 1)                                   # the VAE's downsampling factor
    d = concat_draws([draw(example_generator(0, 0, j), (1, 4, 16 // f, 24 // f), 1000) for j in range(4)])
    tokens = model.tokenizer(["a red circle", "sks circle", "a circle", "a blue circle"])

    def half(sl):
        part = type(d)(d.posterior[sl], d.noise[sl], None, d.timesteps[sl])
        return step_loss(model, pixels[sl], None, tokens[sl], part, abar, cfg, None)
    with torch.no_grad():
        stacked = step_loss(model, pixels, None, tokens, d, abar, cfg, 2, prior_loss_weight=0.7)
        apart = half(slice(0, 2)) + 0.7 * half(slice(2, 4))
        wrong = half(slice(0, 2)) + half(slice(2, 4))
    assert abs(stacked.item() - apart.item()) <= 1e-12 * abs(stacked.item())
    assert abs(stacked.item() - wrong.item()) > 1e-4 * abs(stacked.item())


def test_take_gives_each_bucket_its_size_and_a_table_counts_repeats(tmp_path):
    (tmp_path / "3_wide").mkdir()
    (tmp_path / "1_tall").mkdir()
    for i in range(2):
        Image.new("RGB", (90, 60), (i, 0, 0)).save(tmp_path / "3_wide" / f"{i}.png")
    Image.new("RGB", (60, 90)).save(tmp_path / "1_tall" / "t.png")
    examples = find_examples(tmp_path, 64, log=quiet)
    assigned = buckets.assign(examples, 64, 32, 128, 16)
    assert buckets.table(examples, assigned) == ["     bucket  images  per epoch", "    48 x 80       1          1",
                                                 "    80 x 48       2          6"]
    s = Stream(examples, 0, buckets=assigned)
    cfg = finetune.FinetuneConfig(out="x", center_crop=True, train_batch_size=2)
    shapes = {tuple(take(s, k, cfg, 64)[0].shape) for k in range(8)}
    assert shapes == {(2, 3, 48, 80), (2, 3, 80, 48)}


def test_halves_in_different_buckets_are_weighted_by_the_prior_loss_weight_in_a_run(tmp_path, monkeypatch):
    """fit.fit's two ways, seen through a stand-in loss: one call on the stacked batch (same bucket: 100) or the
    instance call + w x the class call (1 + 0.25 x 1), the logged loss of each step one or the other, both used."""
    from minisd.train import dreambooth, fit
    for i, (w, h) in enumerate([(48, 32), (32, 32)]):
        (tmp_path / "inst").mkdir(exist_ok=True)
        Image.new("RGB", (w, h)).save(tmp_path / "inst" / f"{i}.png")
    for i, (w, h) in enumerate([(32, 48), (32, 32)]):
        (tmp_path / "reg").mkdir(exist_ok=True)
        Image.new("RGB", (w, h)).save(tmp_path / "reg" / f"{i}.png")
    sizes = []

    def stand_in(model, pixels, moments, tokens, d, abar, cfg, n_instance, *args):
        sizes.append(tuple(pixels.shape))
        return torch.tensor(1.0 if n_instance is None else 100.0, requires_grad=True)
    monkeypatch.setattr(fit, "step_loss", stand_in)
    cfg = dreambooth.DreamBoothConfig(out=str(tmp_path / "out"), instance_dir=str(tmp_path / "inst"),
                                      instance_prompt="sks", class_prompt="a thing", reg_data_dir=str(tmp_path / "reg"),
                                      prior_loss_weight=0.25, resolution=32, max_train_steps=8, center_crop=True,
                                      device="cpu", enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64,
                                      bucket_reso_steps=8)
    dreambooth.run(cfg, log=quiet)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "out" / "train_log.jsonl")]
    assert set(losses) == {100.0, 1.25}, losses
    assert {s[0] for s in sizes} == {1, 2}                   # halves of 1 apart, or both stacked
