"""sd-webui-controlnet's API on `minisd serve --controlnet-dir`, driven by webuiapi's ControlNetUnit (a test
oracle): a unit's image equals `minisd generate --controlnet` / `minisd inpaint --controlnet` with the same settings
bit for bit, PNG parameters ("ControlNet 0") included; the listings answer as the extension's; a unit minisd cannot
run exactly is a 422 with one line. The model is the tiny one with a ControlNet built for it (random weights, 1.1
layout), so the whole file runs in seconds."""
import math

import numpy as np
import pytest
import requests
import torch
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("fastapi")

from minisd.cli import main  # noqa: E402
from minisd.controls import legacy_hash  # noqa: E402
from minisd.config import TINY, ControlNetConfig  # noqa: E402
from minisd.controlnet import ControlNet, save_controlnet  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from minisd.serve import start_in_thread  # noqa: E402
from minisd.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on a blue background"
SIZE = 64


def _random_controlnet(seed):
    """Every weight ~ N(0, 1/fan_in), biases N(0, 0.1), zero convs included: a ControlNet that acts strongly."""
    g = torch.Generator().manual_seed(seed)
    net = ControlNet(ControlNetConfig.for_model(TINY))
    with torch.no_grad():
        for p in net.parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 100
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return net


def _photo(seed, size=(80, 72)):
    """A blocky random RGB picture of another size than the output (canny finds edges; the pipelines resize)."""
    small = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.NEAREST)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    save_controlnet(_random_controlnet(0), folder / "control_tiny.safetensors", "1.1")
    (folder / "notes.txt").write_text("not a ControlNet")
    return folder


@pytest.fixture(scope="module")
def server(one_thread, folder):
    app = create_app({"minisd-tiny": None}, prepack=False, controlnet_dir=str(folder), log=lambda *_: None)
    srv, url = start_in_thread(app)
    yield url
    srv.should_exit = True


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1")


def units(*units):
    """webuiapi's keyword arguments for `units`. Its txt2img / img2img write the units into their default
    `alwayson_scripts={}`, which Python shares between calls: a fresh dict each call keeps them from leaking into
    the next request (here, or in another test file run by the same process)."""
    return dict(controlnet_units=list(units), alwayson_scripts={})


def pixels(image):
    return np.asarray(image.convert("RGB"))


def test_the_listings_answer_as_sd_webui_controlnet(api, folder):
    assert api.controlnet_model_list() == [f"control_tiny [{legacy_hash(folder / 'control_tiny.safetensors')}]"]
    assert api.controlnet_module_list() == ["none", "canny", "openpose"]
    assert api.controlnet_version() == 2


def test_txt2img_with_a_canny_unit_equals_minisd_generate_controlnet(api, folder, tmp_path, capsys):
    """webuiapi's unit (canny 50/150, weight 0.8, guidance 0.1..0.9) and the command with the same flags give
    the same bytes and PNG parameters; the edges come back after the image, as sd-webui-controlnet appends them."""
    photo = _photo(1)
    photo.save(tmp_path / "photo.png")
    model = api.controlnet_model_list()[0]
    unit = webuiapi.ControlNetUnit(image=photo, module="canny", model=model, weight=0.8, resize_mode="Just Resize",
                                   threshold_a=50, threshold_b=150, guidance_start=0.1, guidance_end=0.9)
    settings = dict(prompt=PROMPT, seed=5, steps=6, sampler_name="Euler a", cfg_scale=7, width=SIZE, height=SIZE)
    reply = api.txt2img(**settings, **units(unit))
    assert main(["generate", PROMPT, "--seed", "5", "--steps", "6", "--sampler", "Euler a", "--cfg", "7",
                 "--width", str(SIZE), "--height", str(SIZE), "--emphasis", "--no-prepack",
                 "--controlnet", str(folder / "control_tiny.safetensors"), "--control-image",
                 str(tmp_path / "photo.png"), "--control-preprocess", "canny", "--canny-low", "50", "--canny-high",
                 "150", "--control-scale", "0.8", "--control-start", "0.1", "--control-end", "0.9",
                 "--out", str(tmp_path / "out.png")]) == 0
    expected = Image.open(tmp_path / "out.png")
    assert len(reply.images) == 2
    assert np.array_equal(pixels(reply.images[0]), pixels(expected))
    assert reply.images[0].info["parameters"] == expected.info["parameters"]
    assert f"Module: canny, Model: {model}, Weight: 0.8" in expected.info["parameters"]
    from minisd.annotators.canny import canny
    edges = canny(photo, low=50, high=150).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
    assert np.array_equal(pixels(reply.images[1]), pixels(edges))
    # the comparison can fail: without the unit the image differs (the ControlNet acts)
    plain = api.txt2img(**settings, **units())
    assert not np.array_equal(pixels(plain.image), pixels(reply.images[0]))


def test_img2img_with_a_mask_and_guess_mode_equals_minisd_inpaint_controlnet(api, folder, tmp_path, capsys):
    """Inpainting (webuiapi's "Only masked") with a unit in "ControlNet is more important" (guess mode), module
    none, the image sent as a raw request field: `minisd inpaint --controlnet --guess-mode`."""
    init = Pipeline.load(None, prepack=False, log=lambda *_: None).generate(
        "a yellow triangle on a black background", seed=3, steps=4).images[0]
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    _photo(2).save(tmp_path / "hint.png")
    unit = webuiapi.ControlNetUnit(image=_photo(2), model="control_tiny", weight=1.2, resize_mode="Just Resize",
                                   control_mode=2)
    reply = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=11, steps=8, denoising_strength=0.9,
                        sampler_name="Euler", cfg_scale=5, width=SIZE, height=SIZE, inpaint_full_res_padding=8,
                        **units(unit))
    assert main(["inpaint", PROMPT, "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "--strength", "0.9", "--seed", "11", "--steps", "8", "--sampler", "Euler", "--cfg", "5",
                 "--masked-content", "fill", "--only-masked", "--padding", "8", "--width", str(SIZE),
                 "--height", str(SIZE), "--emphasis", "--no-prepack", "--controlnet",
                 str(folder / "control_tiny.safetensors"), "--control-image", str(tmp_path / "hint.png"),
                 "--control-scale", "1.2", "--guess-mode", "--out", str(tmp_path / "out.png")]) == 0
    expected = Image.open(tmp_path / "out.png")
    assert np.array_equal(pixels(reply.images[0]), pixels(expected))
    assert reply.images[0].info["parameters"] == expected.info["parameters"]
    assert "Control Mode: ControlNet is more important" in expected.info["parameters"]
    # the comparison can fail: a disabled unit changes the image
    unit.enabled = False
    off = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=11, steps=8, denoising_strength=0.9,
                      sampler_name="Euler", cfg_scale=5, width=SIZE, height=SIZE, inpaint_full_res_padding=8,
                      **units(unit))
    assert len(off.images) == 1 and not np.array_equal(pixels(off.image), pixels(reply.images[0]))


UNIT = {"image": "PNG", "model": "control_tiny", "resize_mode": "Just Resize"}


@pytest.mark.parametrize("unit,says", [
    ({"model": "control_other"}, "controlnet unit 0: model: no ControlNet named 'control_other'"),
    ({"model": "../control_tiny"}, "no ControlNet named '../control_tiny'"),
    ({"model": "control_tiny [00000000]"}, "no ControlNet named 'control_tiny [00000000]'"),
    ({"module": "openpose_full"}, "module 'openpose_full' is not supported (it draws hands or faces"),
    ({"module": "depth"}, "module 'depth' is not supported; modules: none, canny, openpose"),
    ({"image": "not an image!"}, "image: not a base64-encoded image"),
    ({"image": None}, "image: send the condition image as base64"),
    ({"control_mode": "My prompt is more important"}, "control_mode 'My prompt is more important' is not supported"),
    ({"control_mode": [2]}, "control_mode [2] is not supported"),
    ({"resize_mode": "Resize and Fill"}, "resize_mode 'Resize and Fill' is not supported"),
    ({"guidance_start": 0.5, "guidance_end": 0.5}, "need start < end"),
    ({"weight": 3}, "weight=3 is out of range: 0..2"),
    ({"module": "canny", "threshold_a": 0.5}, "canny's thresholds are whole numbers 1..255"),
    ({"module": "canny", "processor_res": 768}, "processor_res 768 is not supported"),
    ({"module": "canny", "pixel_perfect": True}, "pixel_perfect true is not supported"),
    ({"loopback": True}, "loopback=True is not supported"),
    ({"colour": "red"}, "unknown field 'colour'"),
])
def test_a_unit_minisd_cannot_run_exactly_is_422_with_one_line(server, unit, says):
    png = webuiapi.raw_b64_img(_photo(3))
    body = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE,
            "alwayson_scripts": {"controlnet": {"args": [{**UNIT, "image": png} | unit]}}}
    reply = requests.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=30)
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert says in detail and "\n" not in detail


def test_other_extensions_are_422(server):
    body = {"prompt": "x", "steps": 1, "alwayson_scripts": {"ADetailer": {"args": []}}}
    reply = requests.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=30)
    assert reply.status_code == 422 and "alwayson_scripts.ADetailer: not supported" in reply.json()["detail"]


def test_a_missing_controlnet_dir_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("it served"))    # never block on a port
    assert main(["serve", "--controlnet-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minisd: error: --controlnet-dir") and "no such folder" in err and err.count("\n") == 1
