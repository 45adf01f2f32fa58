"""ControlNet: its files in every official layout, its residuals equal to diffusers' ControlNetModel, and
txt2img / img2img with ControlNets equal to diffusers' StableDiffusionControlNet(Img2Img)Pipeline.

References: diffusers' ControlNetModel (random weights at the real SD 1.5 / 2.1 configs for the residuals; at the
small test configs for the pipelines), loaded by diffusers' own single-file converter (from_single_file) from the
ControlNet 1.1 file minisd wrote. Tolerances: residuals within 1e-4 of their largest magnitude (fp32 rounding of
~20 layers, measured ~1e-6); images <= 2/255 (test_pipeline.py's figure). Every ControlNet weight is redrawn,
the zero convolutions included: at their real init (zero) any ControlNet adds nothing and every comparison passes.
"""
import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import SMALL_SD1, SMALL_SD2, _Draw, build_pair
from minisd.cli import main
from minisd.config import SD15, SD21_V, ControlNetConfig, VAEConfig
from minisd.controlnet import Control, ControlNet, load_controlnet, save_controlnet
from minisd.images import parse_a1111_parameters, read_png_parameters
from weights_convert import controlnet as wc

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 2 / 255
REL = 1e-4
PROMPT = "a red circle on a blue background"
NEG = "blurry"
SIZE = 64                       # pixels: 8x8 latents for the factor-8 VAE below


def _factor8(cfg):
    """The small test config with a VAE that downsamples by 8, as SD's: the hint encoder is then cldm's fixed
    8-conv stack, the layout diffusers' single-file converter assumes (input_hint_block.14 is its last conv)."""
    return dataclasses.replace(cfg, name=cfg.name + "-f8", vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1))


# At plain N(0, 1/fan_in) the hint encoder's 8 convs with SiLU between them shrink the hint ~20x (its features'
# std 0.05 against the latents' ~0.9 after input_blocks.0): the control image would hardly move the image and a
# broken hint encoder would pass the pipeline tests. Its convs are drawn 1.6x larger (std ~1, as a trained one's).
HINT_GAIN = 1.6


def _random(net, seed):
    """Every weight redrawn (weights ~ N(0, 1/fan_in), biases and gains as checkpoints._Draw), zero convs too."""
    draw = _Draw(seed, pool=2 ** 22)
    gain = lambda k, v: HINT_GAIN if k.startswith("input_hint_block.") and v.dim() == 4 else 1.0
    net.load_state_dict({k: draw.like(k, v.shape) * gain(k, v) for k, v in net.state_dict().items()})
    return net


def _diffusers_controlnet(path, cfg, folder):
    """diffusers' own reading of a ControlNet 1.1 file (its config written beside, so nothing downloads)."""
    from diffusers import ControlNetModel
    folder.mkdir(exist_ok=True)
    import json
    (folder / "config.json").write_text(json.dumps(wc.config_json(cfg)))
    return ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True).eval()


def _control_image(seed, size=(80, 72)):
    """A blocky random RGB image of another size than the output (the pipelines resize it)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.NEAREST)


def _setup(tmp_path_factory, cfg, seed, n_controlnets):
    ours, ref, d = build_pair(tmp_path_factory, _factor8(cfg), seed)
    ccfg = ControlNetConfig.for_model(ours.model.config)
    files, nets, refs = [], [], []
    for i in range(n_controlnets):
        path = d / f"control_v11p_{i}.safetensors"
        save_controlnet(_random(ControlNet(ccfg), seed + 10 + i), path, "1.1")
        files.append(path)
        nets.append(load_controlnet(path, ours.model.config))
        refs.append(_diffusers_controlnet(path, ccfg, d / f"cn_config_{i}"))
    return ours, ref, files, nets, refs


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _setup(tmp_path_factory, SMALL_SD1, 1, 2)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return _setup(tmp_path_factory, SMALL_SD2, 2, 1)


# ---------------------------------------------------------------------------------------------------------------
# files

@pytest.mark.parametrize("cfg", [SD15, SD21_V], ids=["sd15", "sd21"])
def test_key_maps_equal_diffusers_conversion_at_the_real_configs(cfg):
    """Our 1.0 layout, converted by diffusers' single-file code, names the same tensors our diffusers map does,
    and those are exactly ControlNetModel's keys and shapes (meta tensors: names and shapes only)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    ccfg = ControlNetConfig.for_model(cfg)
    config = {k: v for k, v in wc.config_json(ccfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref, ours = ControlNetModel(**config), ControlNet(ccfg)
    state = ours.state_dict()
    theirs = convert_controlnet_checkpoint(wc.to_ldm(state, "1.0"), dict(config))
    mine = wc.to_diffusers(state, ccfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mine.items()} == expected
    assert set(theirs) == set(mine) and all(theirs[k] is mine[k] for k in mine)
    assert wc.from_diffusers(mine, ccfg).keys() == state.keys()
    assert wc.from_ldm(wc.to_ldm(state, "1.0")).keys() == state.keys()
    assert len(state) == 340                       # 1.1's control_v11p_sd15_canny.pth has 340 tensors


def test_every_layout_loads_the_same_controlnet(sd1, tmp_path):
    """1.0 (.pth, beside the SD model's keys), 1.1 fp16 (.safetensors), the diffusers folder diffusers writes and
    the one minisd writes (which diffusers reads back) give one network."""
    from diffusers import ControlNetModel
    ours, _, files, nets, refs = sd1
    net = nets[0]
    state = net.state_dict()
    pth = tmp_path / "control_sd15_test.pth"
    torch.save({**wc.to_ldm(state, "1.0"), "model.diffusion_model.out.2.bias": torch.zeros(4)}, pth)
    fp16 = tmp_path / "control_v11p_sd15_test_fp16.safetensors"
    half = ControlNet(net.cfg)
    half.load_state_dict(state)
    save_controlnet(half.half(), fp16, "1.1")
    folder = tmp_path / "diffusers_cn"
    save_controlnet(net, folder, "diffusers")
    theirs = ControlNetModel.from_pretrained(str(folder)).state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in wc.to_diffusers(state, net.cfg).items())
    saved_by_diffusers = tmp_path / "saved_by_diffusers"
    refs[0].save_pretrained(str(saved_by_diffusers))
    cfg = ours.model.config
    for path, tol in ((pth, 0), (folder, 0), (saved_by_diffusers, 0), (fp16, 1e-3)):
        other = load_controlnet(path, cfg).state_dict()
        assert other.keys() == state.keys()
        assert all(torch.allclose(other[k], state[k], atol=tol, rtol=tol) for k in state), path
    with pytest.raises(ValueError, match="unexpected ControlNet key"):
        wc.from_diffusers({"controlnet_cond_embedding.conv_in.weight": 0, "nonsense.weight": 0}, net.cfg)


def test_a_controlnet_that_does_not_fit_the_model_is_a_one_line_error(sd1, sd2):
    sd1_model, sd2_files = sd1[0].model.config, sd2[2]
    with pytest.raises(ValueError, match=r"encoder .* does not fit the model's U-Net") as e:
        load_controlnet(sd2_files[0], sd1_model)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not fit"):
        Control(sd2[3][0], _control_image(0)).check(sd1_model)
    # an SD 2.1 ControlNet on SD 1.5: told by the text width, before any weight is read
    with pytest.raises(ValueError, match="1024-wide text encoder, this model's is 768-wide"):
        wc.check_fits(ControlNetConfig.for_model(SD21_V), SD15)


# ---------------------------------------------------------------------------------------------------------------
# the network

def _full_pair(cfg, seed):
    """Our ControlNet and diffusers' at a real config, sharing one set of random tensors (no init, no copy)."""
    from diffusers import ControlNetModel
    ccfg = ControlNetConfig.for_model(cfg)
    with torch.device("meta"):
        ours = ControlNet(ccfg)
        ref = ControlNetModel(**{k: v for k, v in wc.config_json(ccfg).items() if not k.startswith("_")})
    draw = _Draw(seed)
    state = {k: draw.like(k, v.shape) for k, v in ours.state_dict().items()}
    ours.load_state_dict(state, assign=True)
    ref.load_state_dict(wc.to_diffusers(state, ccfg), assign=True)
    return ours.eval(), ref.eval()


def _relative(ours, theirs):
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("cfg", [SD15, SD21_V], ids=["sd15", "sd21"])
def test_residuals_equal_diffusers_controlnetmodel_at_the_real_config(cfg):
    ours, ref = _full_pair(cfg, seed=5)
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, 3, 128, 128, generator=g)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([801.0, 35.5])
    with torch.no_grad():
        for scale, guess in ((0.7, False), (1.3, True)):
            down, mid = ref(x, t, context, hint, conditioning_scale=scale, guess_mode=guess, return_dict=False)
            expected = [*down, mid]
            mine, mine_mid = ours(x, t, context, hint, scale, guess_mode=guess)
            assert len(mine) == len(down) == 12
            assert _relative([*mine, mine_mid], expected) <= REL
    # the check could fail: a wrong scale, a missing residual, a hint that does not enter
    with torch.no_grad():
        down, mid = ref(x, t, context, hint, conditioning_scale=0.7, return_dict=False)
        d, m = ours(x, t, context, hint, 0.7 * 1.001)
        assert _relative([*d, m], [*down, mid]) > REL
        d, m = ours(x, t, context, hint, 0.7)
        assert _relative([*d[:5], torch.zeros_like(d[5]), *d[6:], m], [*down, mid]) > REL
        d, m = ours(x, t, context, torch.zeros_like(hint), 0.7)
        assert _relative([*d, m], [*down, mid]) > REL


# ---------------------------------------------------------------------------------------------------------------
# the pipelines

def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def _reference(ref, controlnets, img2img=False):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline
    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    parts = {k: v for k, v in ref.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = cls(**parts, controlnet=controlnets if len(controlnets) > 1 else controlnets[0], safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.sd_scheduler_config,
                                                                  timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _txt2img_pair(setup, which, scales, starts, ends, guess=False, steps=5, seed=7):
    ours, ref, _, nets, refs = setup
    images = [_control_image(10 + i) for i in which]
    controls = [Control(nets[i], im, s, a, b, guess) for i, im, s, a, b in zip(which, images, scales, starts, ends)]
    mine = ours.generate(PROMPT, NEG, steps, 7.5, "euler", "linspace", seed=seed, width=SIZE, height=SIZE,
                         controls=controls).images
    one = len(which) == 1
    theirs = _reference(ref, [refs[i] for i in which])(
        PROMPT, images[0] if one else images, negative_prompt=NEG, num_inference_steps=steps, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed), width=SIZE, height=SIZE, output_type="np",
        controlnet_conditioning_scale=scales[0] if one else scales, guess_mode=guess,
        control_guidance_start=starts[0] if one else starts, control_guidance_end=ends[0] if one else ends).images
    return _np(mine), theirs


def _assert_close(mine, theirs):
    err = np.abs(mine - theirs).max()
    print(f"[parity] max abs pixel error {err:.5f}, image std {theirs.std():.3f}")
    assert err <= TOL, f"max abs pixel error {err:.4f} (image std {theirs.std():.3f})"


def test_one_controlnet_with_scale_start_end_equals_diffusers(sd1):
    mine, theirs = _txt2img_pair(sd1, [0], [0.7], [0.1], [0.8])
    _assert_close(mine, theirs)
    # the check could fail: the same run without the ControlNet, or with it over all steps, is another image
    ours = sd1[0]
    plain = _np(ours.generate(PROMPT, NEG, 5, 7.5, "euler", "linspace", seed=7, width=SIZE, height=SIZE).images)
    assert np.abs(plain - theirs).max() > 10 * TOL
    always = _np(ours.generate(PROMPT, NEG, 5, 7.5, "euler", "linspace", seed=7, width=SIZE, height=SIZE,
                               controls=[Control(sd1[3][0], _control_image(10), 0.7)]).images)
    assert np.abs(always - theirs).max() > 10 * TOL


def test_two_controlnets_equal_diffusers_multicontrolnet(sd1):
    mine, theirs = _txt2img_pair(sd1, [0, 1], [0.7, 1.2], [0.0, 0.2], [1.0, 0.9])
    _assert_close(mine, theirs)


def test_guess_mode_equals_diffusers(sd1):
    mine, theirs = _txt2img_pair(sd1, [1], [1.0], [0.0], [1.0], guess=True)
    _assert_close(mine, theirs)


def test_sd21_v_with_an_sd2_controlnet_equals_diffusers(sd2):
    mine, theirs = _txt2img_pair(sd2, [0], [0.8], [0.0], [1.0])
    _assert_close(mine, theirs)


def test_img2img_with_a_controlnet_equals_diffusers(sd1):
    ours, ref, _, nets, refs = sd1
    init, control = _control_image(3, (SIZE, SIZE)), _control_image(4)
    mine = _np(ours.img2img(PROMPT, init, 0.6, NEG, 5, 7.5, "euler", "linspace", seed=9,
                            controls=[Control(nets[0], control, 0.9)]).images)
    # diffusers' img2img ControlNet pipeline takes the control image's own size unless told the output size
    theirs = _reference(ref, [refs[0]], img2img=True)(
        PROMPT, init, control, strength=0.6, negative_prompt=NEG, num_inference_steps=5, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(9), width=SIZE, height=SIZE, output_type="np",
        controlnet_conditioning_scale=0.9).images
    _assert_close(mine, theirs)


# ---------------------------------------------------------------------------------------------------------------
# the command line

def _cli(setup, tmp_path, *extra):
    model = str(setup[2][0].parent / "model.safetensors")
    return main(["generate", PROMPT, "--model", model, "--steps", "2", "--width", str(SIZE), "--height", str(SIZE),
                 "--seed", "1", "--device", "cpu", "--no-prepack", "--out", str(tmp_path / "out.png"), *extra])


def test_cli_records_each_controlnet_as_sd_webui_controlnet_does(sd1, tmp_path):
    _control_image(5).save(tmp_path / "edges.png")
    files = sd1[2]
    assert _cli(sd1, tmp_path, "--controlnet", str(files[0]), "--control-image", str(tmp_path / "edges.png"),
                "--controlnet", str(files[1]), "--control-image", str(tmp_path / "edges.png"),
                "--control-scale", "0.7", "--control-scale", "1.1", "--control-start", "0.1",
                "--control-end", "0.8") == 0
    params = parse_a1111_parameters(read_png_parameters(tmp_path / "out.png"))
    assert params["ControlNet 0"].startswith("Module: none, Model: control_v11p_0 [")
    assert "Weight: 0.7, Resize Mode: Just Resize, Guidance Start: 0.1, Guidance End: 0.8" in params["ControlNet 0"]
    assert "Weight: 1.1" in params["ControlNet 1"]


def test_cli_canny_preprocessing(sd1, tmp_path):
    pytest.importorskip("minisd.annotators.canny")
    _control_image(5).save(tmp_path / "photo.png")
    assert _cli(sd1, tmp_path, "--controlnet", str(sd1[2][0]), "--control-image", str(tmp_path / "photo.png"),
                "--control-preprocess", "canny", "--canny-low", "50", "--canny-high", "150") == 0
    params = parse_a1111_parameters(read_png_parameters(tmp_path / "out.png"))
    assert "Module: canny" in params["ControlNet 0"] and "Threshold A: 50, Threshold B: 150" in params["ControlNet 0"]


@pytest.mark.parametrize("extra,message", [
    (["--control-image", "IMG"], "1 --controlnet and 2 --control-image"),
    (["--control-scale", "1", "--control-scale", "2"], "--control-scale is given 2 times for 1 --controlnet"),
    (["--control-start", "0.9", "--control-end", "0.5"], "need 0 <= start < end <= 1"),
])
def test_cli_control_flag_errors(sd1, tmp_path, capsys, extra, message):
    _control_image(5).save(tmp_path / "img.png")
    extra = [str(tmp_path / "img.png") if e == "IMG" else e for e in extra]
    assert _cli(sd1, tmp_path, "--controlnet", str(sd1[2][0]), "--control-image", str(tmp_path / "img.png"),
                *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("minisd: error:") and message in err and err.count("\n") == 1


def test_cli_unreadable_control_image_is_a_one_line_error(sd1, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert _cli(sd1, tmp_path, "--controlnet", str(sd1[2][0]), "--control-image", str(tmp_path / "broken.png")) == 2
    err = capsys.readouterr().err
    assert "--control-image" in err and "cannot read it as an image" in err and err.count("\n") == 1


def test_cli_controlnet_of_another_family_is_a_one_line_error(sd1, sd2, tmp_path, capsys):
    _control_image(5).save(tmp_path / "img.png")
    assert _cli(sd1, tmp_path, "--controlnet", str(sd2[2][0]), "--control-image", str(tmp_path / "img.png")) == 2
    err = capsys.readouterr().err
    assert err.startswith("minisd: error:") and "ControlNet" in err and err.count("\n") == 1


def test_inpainting_with_a_controlnet_equals_diffusers(sd1):
    """ControlNet in inpainting, on an ordinary (4-channel) model: the ControlNet reads the blended latent the U-Net
    reads, as diffusers' StableDiffusionControlNetInpaintPipeline does (minisd without its composite and blur)."""
    from diffusers import StableDiffusionControlNetInpaintPipeline
    from PIL import ImageOps
    ours, ref, _, nets, refs = sd1
    init, control = _control_image(3, (SIZE, SIZE)), _control_image(5)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))
    mine = _np(ours.inpaint(PROMPT, init, mask, 0.8, NEG, 5, 7.5, "euler", "linspace", seed=9, mask_blur=0,
                            composite=False, controls=[Control(nets[0], control, 0.9)]).images)
    parts = {k: v for k, v in ref.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = StableDiffusionControlNetInpaintPipeline(**parts, controlnet=refs[0], safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.sd_scheduler_config,
                                                                  timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)

    def theirs(mask_image, scale):
        return pipe(PROMPT, init, mask_image, control, strength=0.8, negative_prompt=NEG, num_inference_steps=5,
                    guidance_scale=7.5, generator=torch.Generator().manual_seed(9), width=SIZE, height=SIZE,
                    output_type="np", controlnet_conditioning_scale=scale).images
    _assert_close(mine, theirs(mask, 0.9))
    # the check could fail: another ControlNet scale, or the mask inverted, is another image
    assert np.abs(mine - theirs(mask, 0.3)).max() > 10 * TOL
    assert np.abs(mine - theirs(ImageOps.invert(mask), 0.9)).max() > 10 * TOL


# ---------------------------------------------------------------------------------------------------------------
# the oneDNN-prepared path (minisd/fast): a ControlNet runs prepared when the U-Net does, and is given back plain

@pytest.mark.parametrize("choice", ["prepared", None], ids=["chosen-before", "measured-on-this-run"])
def test_prepared_layers_with_a_controlnet_equal_diffusers_and_the_controlnet_comes_back_plain(sd1, choice):
    """Pipeline.load(prepack=True) on the CPU: with the U-Net's choice already "prepared" (forced here), the
    ControlNet runs prepared during the run; with no choice made yet, the choice is measured on the controlled call
    and kept for the U-Net. Either way the image equals diffusers' and the ControlNet is plain afterwards, its
    weights bit for bit, in the same Parameter objects."""
    from minisd import fast
    from minisd.pipeline import Pipeline
    ours, _, files, nets, _ = sd1
    pipe = Pipeline.load(str(files[0].parent / "model.safetensors"), device="cpu", dtype="fp32",
                         log=lambda *_: None, prepack=True)
    if not isinstance(pipe.unet_call, fast.MeasuredChoice):
        pytest.skip("no oneDNN in this PyTorch build")
    if choice == "prepared":
        fast.onednn.prepare(pipe.model.unet)
        pipe.unet_call.choice = "prepared"
    net = nets[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    seen = []
    image = _control_image(10)
    mine = _np(pipe.generate(PROMPT, NEG, 5, 7.5, "euler", "linspace", seed=7, width=SIZE, height=SIZE,
                             controls=[Control(net, image, 0.7, 0.1, 0.8)],
                             callback=lambda *_: seen.append(fast.onednn.is_prepared(net))).images)
    _, theirs = _txt2img_pair(sd1, [0], [0.7], [0.1], [0.8])
    _assert_close(mine, theirs)
    if choice == "prepared":
        assert all(seen), seen                          # prepared at every step
    else:
        assert pipe.unet_call.choice in ("prepared", "plain")          # measured on the controlled call, kept
        assert fast.onednn.is_prepared(pipe.model.unet) == (pipe.unet_call.choice == "prepared")
    assert not fast.onednn.is_prepared(net)
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # the very Parameter objects (an optimizer holding them still holds the network's)
    assert all(p is params[k] for k, p in net.named_parameters())
