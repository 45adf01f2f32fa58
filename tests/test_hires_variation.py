"""Variation seeds and the hires fix (issue 33), against references written here from A1111's source
(modules/rng.py `slerp` and ImageRNG, modules/processing.py sample_hr_pass, modules/sd_samplers_common.py
setup_img2img_steps), composed from minisd's own calls step by step, independently of minisd's code paths.

Tolerances: exact (bit-equal noise, equal pixels) wherever both sides do the same float operations in the same
order on the CPU in fp32 with one thread and plain (not oneDNN-prepared) layers; each parity test also shows
that a plausible mistake (a wrong interpolation mode, A1111's img2img-tab step count, a global slerp) moves the
result by more than 1/255, so the comparison can fail.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minisd import diffusion, samplers
from minisd.cli import main
from minisd.hires import Hires
from minisd.images import parse_a1111_parameters, read_png_parameters, to_pil, to_tensor
from minisd.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread

PROMPT, NEG = "a red circle on a blue background", "blurry"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(None, device="cpu", dtype="fp32", prepack=False, log=lambda *_: None)


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


# -- the references, from A1111's source --------------------------------------------------------------------

def a1111_slerp(val, low, high):
    """modules/rng.py, as A1111 has it (one image's noise (C, H, W))."""
    low_norm = low/torch.norm(low, dim=1, keepdim=True)
    high_norm = high/torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm*high_norm).sum(1)

    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)

    omega = torch.acos(dot)
    so = torch.sin(omega)
    res = (torch.sin((1.0-val)*omega)/so).unsqueeze(1)*low + (torch.sin(val*omega)/so).unsqueeze(1) * high
    return res


def a1111_noise(seed, subseed, strength, shape, before=None):
    """ImageRNG.first() for one image with the CPU RNG: randn(seed, shape), slerped toward randn(subseed, shape).
    before: a draw minisd's convention takes from the seed's generator first (img2img's posterior sample), taken
    from the subseed's too."""
    def randn(s):
        g = torch.Generator().manual_seed(s)
        if before is not None:
            torch.randn(before, generator=g)
        return torch.randn(shape, generator=g)
    noise = randn(seed)
    return noise if not strength else a1111_slerp(strength, noise, randn(subseed))


def a1111_hires(pipe, seed, steps, sampler, strength, scale, mode, hr_steps=0, subseed=None, subseed_strength=0.0):
    """A1111's txt2img with hires fix, one image, composed from minisd's calls: the first pass (minisd's generate),
    the latent upscale (interpolate; mode "lanczos": decode, PIL Lanczos, encode), fresh noise from the same seed
    at the new size, A1111's setup_img2img_steps with the steps given, x = x0 + noise * sigma_sched[0], the
    sampler down sigma_sched with the seed's generator, decode."""
    first = pipe.generate(PROMPT, NEG, steps=steps, sampler=sampler, seed=seed, subseed=subseed,
                          subseed_strength=subseed_strength)
    h, w = (side * scale for side in first.latents.shape[-2:])
    generator = torch.Generator().manual_seed(seed)
    if mode == "lanczos":
        f = 2 ** (len(pipe.model.config.vae.ch_mult) - 1)           # the VAE's factor: A1111's opt_f (8 for SD)
        image = to_pil(pipe.decode(first.latents))[0].resize((w * f, h * f), Image.LANCZOS)
        x0 = pipe._encode(to_tensor([image]), generator)           # minisd's img2img order: the posterior first
        before = (1, 4, h, w)
    else:
        x0 = F.interpolate(first.latents, size=(h, w), mode=mode, antialias=False)
        before = None
    # setup_img2img_steps(p, steps) with steps given (sample_hr_pass always gives them)
    requested = hr_steps or steps
    total = int(requested / min(strength, 0.999))
    t_enc = requested - 1
    plan = pipe.plan(sampler, None, total)
    plan = replace(plan, sigmas=plan.sigmas[total - t_enc - 1:])   # sigma_sched = sigmas[steps - t_enc - 1:]
    noise = torch.randn((1, 4, h, w), generator=generator)
    if subseed_strength:      # the new ImageRNG has the subseeds too
        noise = a1111_slerp(subseed_strength, noise[0], a1111_noise(subseed, None, 0, (4, h, w), before))[None]
    x = x0 + noise * plan.sigmas[0].item()
    cond, uncond = pipe.encode_prompts(PROMPT, NEG)
    latents = pipe._sample(x, plan, cond, uncond, 7.5, samplers.noise_from(generator, (1, 4, h, w)), None, 0.0)
    return to_pil(pipe.decode(latents))


def _spy_add_noise(monkeypatch):
    """The noise each diffusion.add_noise call gets (img2img's and the hires pass's starting noise)."""
    seen = []
    original = diffusion.add_noise

    def spy(x0, noise, sigma):
        seen.append(noise.clone())
        return original(x0, noise, sigma)
    monkeypatch.setattr(diffusion, "add_noise", spy)
    return seen


def _spy_start(monkeypatch, pipe):
    """The starting latent x of each sampling run (txt2img: noise * init_sigma)."""
    seen = []
    original = pipe._sample

    def spy(x, plan, *args, **kwargs):
        seen.append((x.clone(), plan))
        return original(x, plan, *args, **kwargs)
    monkeypatch.setattr(pipe, "_sample", spy)
    return seen


# -- variation seeds ------------------------------------------------------------------------------------------

def test_txt2img_starting_noise_is_a1111s_slerp_of_seed_and_subseed_noise(pipe, monkeypatch):
    """A1111's batch: image b has seed 5 + b and subseed 11 + b; each image is slerped on its own (C, H, W)."""
    seen = _spy_start(monkeypatch, pipe)
    result = pipe.generate(PROMPT, steps=2, seed=[5, 6], subseed=11, subseed_strength=0.3)
    assert result.subseeds == [11, 12]
    x, plan = seen[0]
    ref = torch.stack([a1111_noise(s, ss, 0.3, (4, 16, 16)) for s, ss in ((5, 11), (6, 12))]) * plan.init_sigma
    assert torch.equal(x, ref)                                  # exact: the same ops on the same numbers
    # can fail: a slerp over the whole tensor (not A1111's per-column one) or the plain seed noise is far off
    flat = a1111_slerp(0.3, torch.randn(1, 1024, generator=torch.Generator().manual_seed(5)),
                       torch.randn(1, 1024, generator=torch.Generator().manual_seed(11))).reshape(4, 16, 16)
    assert (x[0] - flat * plan.init_sigma).abs().max() > 0.1
    assert (x[0] - a1111_noise(5, None, 0, (4, 16, 16)) * plan.init_sigma).abs().max() > 0.1


def test_img2img_noise_is_slerped_after_the_posterior_draw(pipe, monkeypatch):
    init = pipe.generate(PROMPT, steps=2, seed=1).images[0]
    seen = _spy_add_noise(monkeypatch)
    pipe.img2img(PROMPT, init, strength=0.5, steps=4, seed=7, subseed=9, subseed_strength=0.6)
    assert torch.equal(seen[0], a1111_noise(7, 9, 0.6, (4, 16, 16), before=(1, 4, 16, 16))[None])


def test_strength_0_is_the_seeds_image_and_1_the_subseeds_image(pipe):
    alone = {s: _np(pipe.generate(PROMPT, NEG, steps=3, seed=s).images) for s in (3, 4)}
    zero = pipe.generate(PROMPT, NEG, steps=3, seed=3, subseed=4, subseed_strength=0.0)
    one = pipe.generate(PROMPT, NEG, steps=3, seed=3, subseed=4, subseed_strength=1.0)
    half = pipe.generate(PROMPT, NEG, steps=3, seed=3, subseed=4, subseed_strength=0.5)
    assert np.array_equal(_np(zero.images), alone[3]) and zero.subseeds is None      # nothing to record
    assert np.array_equal(_np(one.images), alone[4]) and one.subseeds == [4]
    assert min(np.abs(_np(half.images) - alone[s]).max() for s in (3, 4)) > 1 / 255    # in between: neither


def test_cli_records_the_variation_seed_and_a_random_one_remakes_the_image(tmp_path, capsys):
    common = ["generate", PROMPT, "--steps", "2", "--seed", "8", "--subseed-strength", "0.25", "--no-prepack"]
    assert main([*common, "--subseed", "-1", "--out", str(tmp_path / "a.png")]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("subseed ")]
    params = parse_a1111_parameters(read_png_parameters(tmp_path / "a.png"))
    assert printed == [f"subseed {params['Variation seed']}"] and params["Variation seed strength"] == "0.25"
    assert main([*common, "--subseed", params["Variation seed"], "--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)
    assert main(["generate", PROMPT, "--steps", "2", "--out", str(tmp_path / "c.png"), "--no-prepack"]) == 0
    assert "Variation seed" not in read_png_parameters(tmp_path / "c.png")
    capsys.readouterr()
    assert main(["generate", "x", "--subseed-strength", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "subseed strength must be in [0, 1]" in err and len(err.strip().splitlines()) == 1


# -- hires fix -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("upscaler, mode, sampler, hr_steps", [
    ("latent", "bilinear", "dpmpp_2m", 0),
    ("latent-nearest", "nearest", "euler_a", 3),          # an ancestral sampler: its noise is the fresh generator's
    ("lanczos", "lanczos", "dpmpp_2m", 2),
])
def test_hires_fix_equals_a1111s_steps_composed_from_minisd_calls(pipe, upscaler, mode, sampler, hr_steps):
    hires = Hires(scale=2, strength=0.6, upscaler=upscaler, steps=hr_steps)
    ours = pipe.generate(PROMPT, NEG, steps=4, sampler=sampler, seed=21, hires=hires).images
    assert ours[0].size == (128, 128)
    ref = a1111_hires(pipe, 21, 4, sampler, 0.6, 2, mode, hr_steps)
    assert np.array_equal(_np(ours), _np(ref))
    # can fail: another interpolation (A1111's other latent modes) is off by more than 1/255
    other = {"bilinear": "nearest", "nearest": "bilinear", "lanczos": "bilinear"}[mode]
    assert np.abs(_np(ours) - _np(a1111_hires(pipe, 21, 4, sampler, 0.6, 2, other, hr_steps))).max() > 1 / 255


def test_hires_fix_with_a_variation_seed_slerps_the_second_pass_noise_too(pipe):
    hires = Hires(scale=2, strength=0.7, upscaler="latent")
    ours = pipe.generate(PROMPT, NEG, steps=3, seed=2, subseed=30, subseed_strength=0.4, hires=hires).images
    ref = a1111_hires(pipe, 2, 3, "dpmpp_2m", 0.7, 2, "bilinear", subseed=30, subseed_strength=0.4)
    assert np.array_equal(_np(ours), _np(ref))
    plain = a1111_hires(pipe, 2, 3, "dpmpp_2m", 0.7, 2, "bilinear", subseed=30, subseed_strength=0.0)
    assert np.abs(_np(ours) - _np(plain)).max() > 1 / 255


def test_the_second_pass_runs_exactly_hr_steps_steps(pipe):
    """A1111's hires pass runs `Hires steps` steps whatever the strength (not img2img's int(steps * strength))."""
    def count(**hires):
        calls = []
        pipe.generate(PROMPT, steps=4, seed=1, hires=Hires(**hires), callback=lambda i, *_: calls.append(i))
        return calls
    assert count(strength=0.3, steps=3) == list(range(4 + 3))       # numbered on after the first pass's
    assert count(strength=0.5) == list(range(4 + 4))                 # 0: the first pass's steps
    assert Hires(strength=0.3, steps=3).schedule(4) == (10, 3)       # on a schedule of int(3 / 0.3) steps


def test_cli_hires_writes_a1111s_parameters(tmp_path, capsys):
    out = tmp_path / "hr.png"
    assert main(["generate", PROMPT, "--steps", "2", "--seed", "3", "--hr-scale", "2", "--hr-denoising-strength",
                 "0.6", "--hr-upscaler", "latent", "--hr-steps", "3", "--no-prepack", "--out", str(out)]) == 0
    params = parse_a1111_parameters(read_png_parameters(out))
    assert Image.open(out).size == (128, 128) and params["Size"] == "64x64"     # A1111: the first pass's size
    assert (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"],
            params["Denoising strength"]) == ("2", "3", "Latent", "0.6")
    capsys.readouterr()
    for args, message in ((["--hr-upscaler", "lanczos"], "add --enable-hr or --hr-scale"),
                          (["--enable-hr", "--hr-denoising-strength", "0"], "strength must be in (0, 1]"),
                          (["--hr-scale", "1.1"], "multiples of 4")):          # the tiny VAE's factor
        assert main(["generate", "x", "--steps", "1", "--out", str(tmp_path / "x.png"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
