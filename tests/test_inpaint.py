"""Inpainting equals diffusers' StableDiffusionInpaintPipeline on the same official-layout files, seeds and masks:
9-channel inpainting files (SD1, SD2) and an ordinary 4-channel file (the blend at every step); the pixel-side
steps (mask blur, composite, only-masked box, fill, outpainting canvas) equal A1111's / diffusers' code.

Tolerance: max abs pixel difference <= 2/255 in [0, 1], fp32 on CPU (the issue's figure, as tests/test_pipeline.py).
Each parity test also runs diffusers with the mask inverted (or the masked image's latent wrong) and asserts that
our image is then far from it: the comparison can fail on exactly the thing it checks.
"""
import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from checkpoints import SMALL_SD1, SMALL_SD2, build_pair
from minisd import inpaint

TOL = 2 / 255
PROMPT = "a red circle on a blue background"
NEG = "blurry"

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


def _nine(cfg):
    return dataclasses.replace(cfg, name=cfg.name + "-inpainting", unet=dataclasses.replace(cfg.unet, in_channels=9))


def _build(tmp_path_factory, cfg, seed):
    """(ours, diffusers' StableDiffusionInpaintPipeline, the folder) of one random official-layout file."""
    ours, base, d = build_pair(tmp_path_factory, cfg, seed)
    ref = diffusers.StableDiffusionInpaintPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    ref.sd_scheduler_config = base.sd_scheduler_config
    return ours, ref, d


@pytest.fixture(scope="module")
def sd1_nine(tmp_path_factory):
    return _build(tmp_path_factory, _nine(SMALL_SD1), seed=3)


@pytest.fixture(scope="module")
def sd2_nine(tmp_path_factory):
    return _build(tmp_path_factory, _nine(SMALL_SD2), seed=4)


@pytest.fixture(scope="module")
def sd1_plain(tmp_path_factory):
    return _build(tmp_path_factory, SMALL_SD1, seed=5)


def _image(w=40, h=32):
    """A picture with structure everywhere: gradients and a disc."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 3)], -1)
    a[(x - 12) ** 2 + (y - 14) ** 2 < 40] = (230, 30, 20)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _mask(w=40, h=32, box=(18, 6, 34, 22)):
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def _diffusers(ref, image, mask, strength, sampler_cls, steps, seed, **kw):
    ref.scheduler = sampler_cls.from_config(ref.sd_scheduler_config, timestep_spacing="leading")
    return ref(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEG,
               num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
               output_type="pil", **kw).images


def _check_parity(mine, theirs, wrong):
    err = np.abs(_np(mine) - _np(theirs)).max()
    err_wrong = np.abs(_np(mine) - _np(wrong)).max()
    print(f"[parity] max abs pixel error {err:.5f}; against the wrong mask {err_wrong:.3f}")
    assert err <= TOL, f"max abs pixel error {err:.4f}"
    assert err_wrong > 10 * TOL, f"the comparison cannot see a wrong mask ({err_wrong:.4f})"


# (fixture, strength, sampler, diffusers scheduler): the 9-channel files at strength 1 (pure noise) and below,
# an ancestral sampler (its draws follow the VAE samples' in the generator), SD2's v-prediction, and the blend
CASES = [("sd1_nine", 1.0, "euler", "EulerDiscreteScheduler"),
         ("sd1_nine", 0.75, "euler_a", "EulerAncestralDiscreteScheduler"),
         ("sd2_nine", 1.0, "euler", "EulerDiscreteScheduler"),
         ("sd1_plain", 0.8, "euler_a", "EulerAncestralDiscreteScheduler"),
         ("sd1_plain", 1.0, "euler", "EulerDiscreteScheduler")]


@pytest.mark.parametrize("model,strength,sampler,scheduler", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_inpaint_equals_diffusers(request, model, strength, sampler, scheduler):
    ours, ref, _ = request.getfixturevalue(model)
    image, mask = _image(), _mask()
    mine = ours.inpaint(PROMPT, image, mask, strength, NEG, steps=5, sampler=sampler, schedule="leading", seed=7,
                        mask_blur=0, composite=False).images
    kw = dict(width=40, height=32)
    theirs = _diffusers(ref, image, mask, strength, getattr(diffusers, scheduler), 5, 7, **kw)
    wrong = _diffusers(ref, image, ImageOps.invert(mask), strength, getattr(diffusers, scheduler), 5, 7, **kw)
    _check_parity(mine, theirs, wrong)
    if ours.model.config.unet.in_channels == 9:
        # the masked image's latent matters as much: diffusers given the latent of the unmasked image
        right = ours.inpaint(PROMPT, image, mask, strength, NEG, steps=5, sampler=sampler, schedule="leading",
                             seed=7, mask_blur=0, composite=False)
        assert np.array_equal(_np(right.images), _np(mine))     # and the same seed gives the same image
        latent = ref.vae.encode(torch.from_numpy(_np([image])).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        unmasked = _diffusers(ref, image, mask, strength, getattr(diffusers, scheduler), 5, 7,
                              masked_image_latents=latent * ref.vae.config.scaling_factor, **kw)
        assert np.abs(_np(mine) - _np(unmasked)).max() > 10 * TOL


def test_only_masked_equals_diffusers_padding_mask_crop(sd1_nine):
    """A1111's "inpaint only masked" is diffusers' padding_mask_crop: the box around the mask plus the padding,
    grown to the processing size's aspect ratio, inpainted at that size, pasted back under the original."""
    ours, ref, _ = sd1_nine
    image, mask = _image(48, 40), _mask(48, 40, (26, 14, 38, 22))
    mine = ours.inpaint(PROMPT, image, mask, 1.0, NEG, steps=4, sampler="euler", schedule="leading", seed=2,
                        mask_blur=0, only_masked=True, padding=4, width=24, height=24).images
    kw = dict(width=24, height=24, padding_mask_crop=4)
    theirs = _diffusers(ref, image, mask, 1.0, diffusers.EulerDiscreteScheduler, 4, 2, **kw)
    moved = _mask(48, 40, (6, 14, 18, 22))     # a mask elsewhere: another crop
    wrong = _diffusers(ref, image, moved, 1.0, diffusers.EulerDiscreteScheduler, 4, 2, **kw)
    assert mine[0].size == (48, 40)
    _check_parity(mine, theirs, wrong)


# ---------------------------------------------------------------------------------------------------------------
# the pixel-side steps, against references written here from A1111's and diffusers' code


def _a1111_overlay(result, original, mask):
    """A1111's processing.py: the overlay image is the original pasted onto a transparent RGBa canvas through the
    inverted mask, converted to RGBA; apply_overlay alpha-composites it over the result."""
    overlay = Image.new("RGBa", original.size)
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = result.convert("RGBA")
    out.alpha_composite(overlay.convert("RGBA"))
    return out.convert("RGB")


def test_composite_is_a1111_overlay():
    result = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    original = _image()
    mask = inpaint.blur(_mask(), 4)
    mine = np.asarray(inpaint.composite(result, original, mask), dtype=int)
    ref = np.asarray(_a1111_overlay(result, original, mask), dtype=int)
    assert np.abs(mine - ref).max() <= 1          # PIL's 8-bit premultiplied arithmetic rounds differently
    m = np.asarray(mask)
    assert np.array_equal(mine[m == 0], np.asarray(original)[m == 0])      # outside the blurred mask: the original
    assert np.array_equal(mine[m == 255], np.asarray(result)[m == 255])    # inside: the result
    assert 0 < (m > 0).sum() - (np.asarray(_mask()) > 0).sum()             # the blur widened the mask (sanity)
    # the check can fail: a composite through the unblurred mask is off by far more than the rounding
    hard = np.asarray(_a1111_overlay(result, original, _mask()), dtype=int)
    assert np.abs(mine - hard).max() > 50


@pytest.mark.parametrize("radius", [1, 4, 7.5])
def test_mask_blur_is_a1111s_cv2_gaussian(radius):
    import cv2
    mask = _mask(40, 32, (10, 5, 25, 20))
    k = 2 * int(2.5 * radius + 0.5) + 1
    a = cv2.GaussianBlur(np.array(mask), (k, 1), radius)          # A1111: x, then y, each on 8-bit images
    a = cv2.GaussianBlur(a, (1, k), radius)
    mine = np.asarray(inpaint.blur(mask, radius), dtype=int)
    # cv2's 8-bit path uses fixed-point taps: up to 2 levels apart for kernels over ~40 taps, 1 below
    assert np.abs(mine - a.astype(int)).max() <= 2
    assert np.abs(mine - np.asarray(mask, dtype=int)).max() > 60     # it did blur


@pytest.mark.parametrize("box,size,pad", [((18, 6, 34, 22), (32, 32), 4), ((1, 2, 5, 30), (64, 32), 8),
                                          ((30, 20, 40, 32), (16, 48), 0), ((0, 0, 40, 3), (32, 32), 32)])
def test_crop_region_is_diffusers(box, size, pad):
    from diffusers.image_processor import VaeImageProcessor
    mask = _mask(40, 32, box)
    assert inpaint.crop_region(mask, *size, pad) == VaeImageProcessor.get_crop_region(mask, *size, pad=pad)


def test_fill_paints_the_masked_area_with_the_colours_around_it():
    image = Image.new("RGB", (40, 32), (200, 40, 10))
    image.paste((0, 0, 255), (18, 6, 34, 22))         # the masked part: blue, to be painted over
    out = np.asarray(inpaint.fill(image, _mask()), dtype=int)
    # the blue is gone: what is left is the 8-bit rounding of PIL's premultiplied blurs, composited 11 times
    assert np.abs(out[14, 26] - (200, 40, 10)).max() <= 5
    assert np.array_equal(np.asarray(inpaint.fill(image, Image.new("L", (40, 32), 0))), np.asarray(image))


def test_extend_adds_edge_coloured_sides_and_masks_them():
    image = _image()
    canvas, mask = inpaint.extend(image, left=16, right=8, top=0, bottom=8)
    a, m = np.asarray(canvas), np.asarray(mask)
    assert canvas.size == (64, 40) and mask.size == (64, 40)
    assert np.array_equal(a[:32, 16:56], np.asarray(image))
    assert np.array_equal(a[5, :16], np.repeat(np.asarray(image)[5, :1], 16, 0))      # the left edge repeated
    assert (m[:32, 16:56] == 0).all() and (m[:, :16] == 255).all() and (m[32:] == 255).all()
    assert inpaint.parse_extend("left=128, right=64") == dict(left=128, right=64, top=0, bottom=0)
    for bad in ("left=100", "sideways=8", "left=-8", "", "left"):
        with pytest.raises(ValueError, match="--extend"):
            inpaint.parse_extend(bad)


# ---------------------------------------------------------------------------------------------------------------
# the results and the errors a user sees


def test_composite_keeps_every_pixel_outside_the_blurred_mask_and_any_mask_mode_works(sd1_plain):
    ours, _, _ = sd1_plain
    image = _image()
    rgba = Image.new("RGBA", (80, 64), (0, 0, 0, 0))       # a transparent layer with an opaque stroke, 2x the size
    rgba.paste((255, 255, 255, 255), (36, 12, 68, 44))
    out = ours.inpaint(PROMPT, image, rgba, 0.8, steps=3, seed=1, mask_blur=2).images[0]
    m = np.asarray(inpaint.prepare_mask(rgba, (40, 32), blur_radius=2))
    assert np.array_equal(np.asarray(out)[m == 0], np.asarray(image)[m == 0])
    assert np.abs(np.asarray(out, dtype=int)[m == 255] - np.asarray(image, dtype=int)[m == 255]).max() > 30
    inverted = ours.inpaint(PROMPT, image, _mask(), 0.8, steps=3, seed=1, mask_blur=0, invert_mask=True).images[0]
    white = np.asarray(_mask()) == 255          # inverted: the white part is kept
    assert np.array_equal(np.asarray(inverted)[white], np.asarray(image)[white])


def test_only_masked_changes_nothing_outside_its_box(sd1_plain):
    ours, _, _ = sd1_plain
    image, mask = _image(), _mask()
    out = np.asarray(ours.inpaint(PROMPT, image, mask, 0.8, steps=2, seed=1, only_masked=True, padding=2, width=16,
                                  height=16, composite=False).images[0], dtype=int)
    x1, y1, x2, y2 = inpaint.crop_region(inpaint.blur(mask, 4), 16, 16, 2)
    outside = np.ones(out.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], np.asarray(image, dtype=int)[outside])
    assert np.abs(out[~outside] - np.asarray(image, dtype=int)[~outside]).max() > 30


def test_bad_inputs_are_one_line_errors(sd1_plain):
    ours, _, _ = sd1_plain
    image = _image()
    with pytest.raises(ValueError, match="all black"):
        ours.inpaint(PROMPT, image, Image.new("L", (40, 32), 0), steps=2, seed=1)
    with pytest.raises(ValueError, match="all black"):
        ours.inpaint(PROMPT, image, Image.new("RGB", (40, 32), "white"), steps=2, seed=1, invert_mask=True)
    with pytest.raises(ValueError, match="masked_content"):
        ours.inpaint(PROMPT, image, _mask(), steps=2, seed=1, masked_content="nothing")
    with pytest.raises(ValueError, match="strength"):
        ours.inpaint(PROMPT, image, _mask(), 0.1, steps=2, seed=1)


def test_masked_content_and_seed_lists(sd1_plain):
    ours, _, _ = sd1_plain
    image, mask = _image(), _mask()
    runs = {c: ours.inpaint(PROMPT, image, mask, 0.5, steps=4, seed=3, mask_blur=0, masked_content=c)
            for c in inpaint.MASKED_CONTENT}
    assert all(not torch.equal(runs["original"].latents, r.latents) for c, r in runs.items() if c != "original")
    both = ours.inpaint(PROMPT, image, mask, 0.5, steps=4, seed=[3, 4], mask_blur=0)
    assert torch.equal(both.latents[:1], runs["original"].latents) and both.seeds == [3, 4]


# ---------------------------------------------------------------------------------------------------------------
# 9-channel files in every layout, and the command line


def test_nine_channel_files_are_detected_in_every_layout(sd1_nine, sd2_nine, tmp_path):
    """sd-v1-5-inpainting.ckpt, 512-inpainting-ema.safetensors and their diffusers folders: the input conv's 9
    channels make the config, and every U-Net tensor is the file's (the folder: written by diffusers itself)."""
    from safetensors.torch import load_file
    from weights_convert import detect
    for (ours, ref, d), name in ((sd1_nine, "sd1"), (sd2_nine, "sd2")):
        single = d / "model.safetensors"
        ckpt = tmp_path / f"{name}-inpainting.ckpt"
        torch.save({"state_dict": load_file(single), "global_step": 0}, ckpt)
        (tmp_path / f"{name}-inpainting.yaml").write_text((d / "model.yaml").read_text())    # eps or v: its yaml
        folder = tmp_path / f"{name}-diffusers"
        ref.save_pretrained(folder)
        expected = ours.model.unet.state_dict()
        for path in (single, ckpt, folder):
            found = detect.read(str(path), verbose=False)
            assert found.config.unet.in_channels == 9 and found.config.unet == ours.model.config.unet, path
            assert found.config.prediction == ours.model.config.prediction
            for key, value in expected.items():
                assert torch.equal(found.state["unet." + key], value), (path, key)
        assert expected["input_blocks.0.0.weight"].shape[1] == 9
        logs = []
        detect.read(str(single), log=logs.append)
        assert "inpainting (9 input channels)" in logs[-1]
        with pytest.raises(ValueError, match="is an inpainting model"):      # txt2img needs a 4-channel U-Net
            ours.generate(PROMPT, steps=1, seed=1, width=16, height=16)


def test_cli_inpaint_writes_the_library_image_with_the_mask_settings(sd1_nine, tmp_path):
    from minisd.cli import main
    from minisd.images import parse_a1111_parameters, read_png_parameters
    ours, _, d = sd1_nine
    _image().save(tmp_path / "in.png")
    _mask().convert("RGB").save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["inpaint", PROMPT, "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--model", str(d / "model.safetensors"), "--steps", "3", "--seed", "5", "--strength", "0.75",
                 "--only-masked", "--padding", "4", "--width", "24", "--height", "24", "--device", "cpu",
                 "--no-prepack", "--out", str(out)]) == 0
    params = parse_a1111_parameters(read_png_parameters(out))
    assert params["Mask blur"] == "4" and params["Inpaint area"] == "Only masked"
    assert params["Masked area padding"] == "4" and params["Denoising strength"] == "0.75"
    assert params["Size"] == "40x32" and params["Seed"] == "5" and "Mask mode" not in params
    lib = ours.inpaint(PROMPT, _image(), _mask(), 0.75, steps=3, seed=5, only_masked=True, padding=4, width=24,
                       height=24).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(lib))


def test_cli_outpaint_extends_the_canvas_and_keeps_the_picture(sd1_plain, tmp_path, capsys):
    from minisd.cli import main
    _, _, d = sd1_plain
    _image().save(tmp_path / "in.png")
    out = tmp_path / "wide.png"
    common = ["--init-image", str(tmp_path / "in.png"), "--model", str(d / "model.safetensors"), "--steps", "2",
              "--seed", "1", "--device", "cpu", "--no-prepack"]
    assert main(["outpaint", PROMPT, *common, "--extend", "left=8,bottom=8", "--mask-blur", "1",
                 "--out", str(out)]) == 0
    wide = np.asarray(Image.open(out).convert("RGB"))
    assert wide.shape == (40, 48, 3)
    # the original, outside the seam's blur (3 px for a blur of 1), is untouched; the new strip is painted
    assert np.array_equal(wide[:29, 11:], np.asarray(_image())[:29, 3:])
    assert params_of(out)["Masked content"] == "fill"
    Image.new("L", (40, 32), 255).save(tmp_path / "small-mask.png")
    for extra, message in ((["--extend", "left=8", "--mask", str(tmp_path / "small-mask.png")], "after --extend"),
                           (["--extend", "left=12"], "multiple of 8"),
                           (["--extend", "left=8", "--strength", "0"], "--strength")):
        capsys.readouterr()
        assert main(["outpaint", PROMPT, *common, *extra, "--out", str(tmp_path / "e.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def params_of(path):
    from minisd.images import parse_a1111_parameters, read_png_parameters
    return parse_a1111_parameters(read_png_parameters(path))
