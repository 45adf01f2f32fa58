"""`minisd serve` driven by A1111's own client, webuiapi (a test oracle): the images it returns equal `minisd
generate`'s / `minisd img2img`'s for the same settings and seed bit for bit, progress and interrupt work, requests
the server cannot serve are a 422 (or 401) with one line and the server keeps serving, and 50 requests from 10
concurrent clients all come back, each image its own seed's."""
import base64
import io
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageFilter

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("fastapi")

from minisd import lora  # noqa: E402
from minisd.cli import main  # noqa: E402
from minisd.config import TINY  # noqa: E402
from minisd.images import read_png_parameters  # noqa: E402
from minisd.model import tiny_model_path  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from minisd.serve import start_in_thread  # noqa: E402
from minisd.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A second model file (the tiny weights under another name) and a LoRA folder with one LoRA, "shapes"."""
    folder = tmp_path_factory.mktemp("serve")
    copy = folder / "tiny-copy.safetensors"
    shutil.copy(tiny_model_path(), copy)
    (folder / "loras").mkdir()
    # a LoRA for the tiny model, random factors on its default targets: large enough to show in the image
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, layer in lora.targets(TINY).items():
        out_f, in_f, *k = layer.shape
        down = torch.randn(4, in_f, *k, generator=g) / (in_f * int(np.prod(k or [1]))) ** 0.5
        factors[name] = lora.Factors(down, torch.randn(out_f, 4, *[1] * len(k), generator=g) * 0.15, 4.0)
    lora.save_kohya(folder / "loras" / "shapes.safetensors", factors)
    return folder


@pytest.fixture(scope="module")
def server(one_thread, folder):
    """The tiny model served on a free loopback port; a second listed model for the model switch; plain layers
    (--no-prepack) so that bytes compare."""
    app = create_app({"minisd-tiny": None, "tiny-copy": str(folder / "tiny-copy.safetensors")}, prepack=False,
                     lora_dir=str(folder / "loras"), log=lambda *_: None)
    srv, url = start_in_thread(app)
    yield url
    srv.should_exit = True


@pytest.fixture(scope="module")
def api(server):
    host, port = server.split("//")[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


@pytest.fixture(scope="module")
def pipe(one_thread):
    return Pipeline.load(None, prepack=False, log=lambda *_: None)


def _png64(size=(64, 64)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG64 = _png64()


def pixels(image):
    return np.asarray(image.convert("RGB"))


def test_txt2img_equals_minisd_generate_bit_for_bit(api, tmp_path, capsys):
    reply = api.txt2img(prompt=PROMPT, negative_prompt="green", seed=7, steps=6, sampler_name="Euler a",
                        cfg_scale=7, width=64, height=64, batch_size=2)
    assert main(["generate", PROMPT, "--negative-prompt", "green", "--seed", "7", "--steps", "6", "--sampler",
                 "Euler a", "--cfg", "7", "--width", "64", "--height", "64", "--batch-size", "2", "--emphasis",
                 "--no-prepack", "--out", str(tmp_path) + "/"]) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert len(reply.images) == len(files) == 2
    for served, path in zip(reply.images, files):
        assert np.array_equal(pixels(served), pixels(Image.open(path)))
        assert served.info["parameters"] == read_png_parameters(path)     # the PNG's A1111 chunk, too
    assert reply.info["all_seeds"] == [7, 8]
    # the comparison can fail: another seed's image differs
    assert not np.array_equal(pixels(reply.images[0]), pixels(reply.images[1]))


def test_img2img_equals_minisd_img2img_bit_for_bit(api, pipe, tmp_path, capsys):
    init = pipe.generate("a yellow triangle on a black background", seed=3, steps=4).images[0]
    init.save(tmp_path / "init.png")
    reply = api.img2img(images=[init], prompt=PROMPT, seed=11, steps=8, denoising_strength=0.6,
                        sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5, width=64, height=64)
    assert main(["img2img", PROMPT, "--init-image", str(tmp_path / "init.png"), "--strength", "0.6", "--seed", "11",
                 "--steps", "8", "--sampler", "DPM++ 2M Karras", "--cfg", "5", "--emphasis", "--no-prepack",
                 "--out", str(tmp_path / "out.png")]) == 0
    expected = Image.open(tmp_path / "out.png")
    assert np.array_equal(pixels(reply.images[0]), pixels(expected))
    assert reply.images[0].info["parameters"] == expected.info["parameters"]
    assert not np.array_equal(pixels(reply.images[0]), pixels(init))


def test_img2img_with_a_mask_equals_minisd_inpaint_bit_for_bit(api, pipe, tmp_path, capsys):
    """A1111's inpainting through its API (webuiapi's defaults: "Only masked", masked content "fill", blur 4) is
    `minisd inpaint` with the same settings; the PNG parameters carry the mask settings."""
    init = pipe.generate("a yellow triangle on a black background", seed=3, steps=4).images[0]
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    reply = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=11, steps=8, denoising_strength=0.9,
                        sampler_name="Euler", cfg_scale=5, width=64, height=64, inpaint_full_res_padding=8)
    assert main(["inpaint", PROMPT, "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "--strength", "0.9", "--seed", "11", "--steps", "8", "--sampler", "Euler", "--cfg", "5",
                 "--masked-content", "fill", "--only-masked", "--padding", "8", "--width", "64", "--height", "64",
                 "--emphasis", "--no-prepack", "--out", str(tmp_path / "out.png")]) == 0
    expected = Image.open(tmp_path / "out.png")
    assert np.array_equal(pixels(reply.images[0]), pixels(expected))
    assert reply.images[0].info["parameters"] == expected.info["parameters"]
    assert "Inpaint area: Only masked" in expected.info["parameters"]
    inside, outside = pixels(reply.images[0]) != pixels(init), np.asarray(mask) == 0
    assert inside.any() and not inside[outside & (np.asarray(mask.filter(ImageFilter.MaxFilter(25))) == 0)].any()


def test_a_listed_lora_in_the_prompt_equals_minisd_generate_with_lora_dir(api, server, folder, tmp_path, capsys):
    prompt = PROMPT + " <lora:shapes:0.7>"
    reply = api.txt2img(prompt=prompt, seed=9, steps=4, sampler_name="Euler", width=64, height=64)
    assert requests.get(f"{server}/sdapi/v1/loras", timeout=30).json()[0]["path"] == "shapes"   # no server path
    assert main(["generate", prompt, "--seed", "9", "--steps", "4", "--sampler", "Euler", "--cfg", "7", "--lora-dir",
                 str(folder / "loras"),
                 "--emphasis", "--no-prepack", "--out", str(tmp_path / "lora.png")]) == 0
    assert np.array_equal(pixels(reply.images[0]), pixels(Image.open(tmp_path / "lora.png")))
    plain = api.txt2img(prompt=PROMPT, seed=9, steps=4, sampler_name="Euler", width=64, height=64)
    assert not np.array_equal(pixels(reply.images[0]), pixels(plain.images[0]))     # the LoRA shows


def test_progress_then_interrupt_stops_after_the_step(api):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=api.txt2img(prompt=PROMPT, seed=1, steps=150,
                                                                         width=64, height=64)))
    thread.start()
    for _ in range(2000):
        state = api.get_progress()
        if state["state"]["sampling_step"] >= 3 and state["current_image"]:
            break
        threading.Event().wait(0.01)
    assert state["state"]["sampling_steps"] == 150
    assert 0 < state["progress"] < 1 and state["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(state["current_image"])))
    assert preview.size == (64, 64)                   # the tiny model's preview: its VAE decode
    api.interrupt()
    thread.join(timeout=60)
    reply = result["r"]
    assert reply.info["interrupted"] is True and len(reply.images) == 1
    assert api.get_progress()["state"]["sampling_steps"] == 0       # idle again: the job ended long before 150
    # the server keeps serving
    assert api.txt2img(prompt=PROMPT, seed=2, steps=2, width=64, height=64).info["interrupted"] is False


@pytest.mark.parametrize("endpoint, body, says", [
    ("txt2img", {"prompt": "x", "width": 4096}, "width=4096 is out of range: 1..2048"),
    ("txt2img", {"prompt": "x", "steps": 1000}, "steps=1000 is out of range: 1..150"),
    ("txt2img", {"prompt": "x", "batch_size": 8, "n_iter": 4}, "batch_size * n_iter=32 is out of range: 1..16"),
    ("txt2img", {"prompt": "x", "cfg_scale": 1e6}, "cfg_scale=1000000.0 is out of range: 0..100"),
    ("txt2img", {"prompt": "x", "seed": -5}, "seed=-5 is out of range: -1 (a random seed) or 0.."),
    ("txt2img", {"prompt": "x", "sampler_name": "Euler z"}, "unknown sampler 'Euler z'"),
    ("txt2img", {"prompt": "x", "scheduler": "Beta"}, "unknown scheduler 'Beta'"),
    ("txt2img", {"prompt": "x", "restore_faces": True}, "restore_faces=true is not supported"),
    ("txt2img", {"prompt": "x", "enable_hr": True}, "enable_hr=true is not supported by minisd serve (hires fix)"),
    ("txt2img", {"prompt": "x", "colour": "red"}, "unknown field 'colour'"),
    ("txt2img", {"prompt": "x", "steps": "many"}, "steps: Input should be a valid integer"),
    ("txt2img", {"prompt": "x", "sampler_name": "DPM++ 2M", "s_churn": 0.5}, "takes no churn"),
    ("txt2img", {"prompt": "x <lora:../../etc/passwd:1>"}, "no LoRA of that name"),
    ("txt2img", {"prompt": "x", "alwayson_scripts": {"controlnet": {"args": [{"model": "canny", "image": PNG64}]}}},
     "no ControlNet named 'canny' (this server has none: --controlnet-dir)"),
    ("txt2img", {"prompt": "x", "width": 62, "steps": 1}, "width must be a positive multiple of 4"),
    ("img2img", {"prompt": "x", "init_images": ["not an image!"]}, "init_images[0]: not a base64-encoded image"),
    ("img2img", {"prompt": "x", "init_images": [base64.b64encode(b"GIF89a-no").decode()]}, "not a base64-encoded"),
    ("img2img", {"prompt": "x", "init_images": [PNG64], "mask": "AAAA"}, "mask: not a base64-encoded image"),
    ("img2img", {"prompt": "x", "init_images": [PNG64], "mask": PNG64, "inpainting_fill": 3}, "inpainting_fill=3"),
    ("options", {"sd_model_checkpoint": "../tiny-copy.safetensors"}, "no model named"),
    ("options", {"sd_model_checkpoint": "/etc/passwd"}, "no model named"),
    ("options", {"sd_vae": "x"}, "option 'sd_vae' is not supported"),
])
def test_bad_requests_are_422_with_one_line(server, endpoint, body, says):
    reply = requests.post(f"{server}/sdapi/v1/{endpoint}", json=body, timeout=30)
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert says in detail and "\n" not in detail


def test_malformed_body_is_422_and_the_server_keeps_serving(server, api):
    for data in ("{not json", "[1, 2]", ""):
        reply = requests.post(f"{server}/sdapi/v1/txt2img", data=data, timeout=30,
                              headers={"Content-Type": "application/json"})
        assert reply.status_code == 422 and "\n" not in reply.json()["detail"], reply.text
    assert len(api.txt2img(prompt=PROMPT, seed=1, steps=1, width=64, height=64).images) == 1


def test_listings_and_the_model_switch(api, server):
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in api.get_samplers()}
    assert [m["title"] for m in api.get_sd_models()] == ["minisd-tiny", "tiny-copy"]
    assert [entry["name"] for entry in api.get_loras()] == ["shapes"]
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_options()["sd_model_checkpoint"] == "minisd-tiny"
    api.set_options({"sd_model_checkpoint": "tiny-copy"})
    try:
        assert api.get_options()["sd_model_checkpoint"] == "tiny-copy"
        reply = api.txt2img(prompt=PROMPT, seed=1, steps=1, width=64, height=64)
        assert "Model: tiny-copy" in reply.images[0].info["parameters"]
    finally:
        api.set_options({"sd_model_checkpoint": "minisd-tiny"})
    assert api.get_options()["sd_model_checkpoint"] == "minisd-tiny"


def test_api_key_is_required_and_compared(tmp_path):
    app = create_app({"minisd-tiny": None}, prepack=False, api_key="s3cret", log=lambda *_: None)
    srv, url = start_in_thread(app)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!"}):
            reply = requests.get(f"{url}/sdapi/v1/samplers", headers=headers, timeout=30)
            assert reply.status_code == 401 and reply.json()["detail"] == "missing or wrong API key"
        assert requests.get(f"{url}/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"},
                            timeout=30).status_code == 200
        assert requests.get(f"{url}/", timeout=30).status_code == 200          # the page holds no secret
        host, port = url.split("//")[1].split(":")                              # A1111 clients: Basic auth
        client = webuiapi.WebUIApi(host=host, port=int(port), username="me", password="s3cret")
        assert client.get_options()["sd_model_checkpoint"] == "minisd-tiny"
    finally:
        srv.should_exit = True


def test_serve_on_another_host_needs_an_api_key(capsys, monkeypatch):
    monkeypatch.delenv("MINISD_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "minisd: error: --host 0.0.0.0 makes the server reachable from other machines: give --api-key" in \
        capsys.readouterr().err


def test_50_requests_from_10_clients_each_get_their_own_seed(server, pipe):
    """One job at a time behind a FIFO queue: none lost, none mixed up. Ten seeds, five requests each, Euler a
    (its noise is drawn per step, so a mixed-up generator would show)."""
    seeds = range(100, 110)
    expected = {s: pixels(pipe.generate(PROMPT, seed=[s], steps=3, sampler="euler_a", cfg=7.5, emphasis=True,
                                        width=64, height=64).images[0]) for s in seeds}
    assert len({e.tobytes() for e in expected.values()}) == 10

    def client(k):
        replies = []
        with requests.Session() as session:
            for j in range(5):
                seed = 100 + (k + j) % 10
                body = dict(prompt=PROMPT, seed=seed, steps=3, sampler_name="Euler a", width=64, height=64)
                r = session.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=120)
                replies.append((seed, r.status_code, r.json()))
        return replies
    with ThreadPoolExecutor(10) as pool:
        replies = [r for rs in pool.map(client, range(10)) for r in rs]
    assert len(replies) == 50 and all(status == 200 for _, status, _ in replies)
    for seed, _, body in replies:
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        assert np.array_equal(pixels(image), expected[seed]), seed


def test_attention_maps_are_the_unets_cross_attention(server, pipe):
    """The page's word maps equal the maps computed as tutorials/05_unet.py does: a forward hook (here, in the
    test) on every cross-attention layer recomputes softmax(Q K^T / sqrt(d)) of the conditional half from the
    layer's own projections, averaged over heads, scaled to the latent grid, summed over layers and steps."""
    import torch
    import torch.nn.functional as F
    from einops import rearrange

    from minisd.unet import BasicTransformerBlock
    body = dict(prompt=PROMPT, seed=4, steps=3, sampler_name="Euler", width=64, height=64)
    reply = requests.post(f"{server}/minisd/v1/attention", json=body, timeout=60).json()
    total = torch.zeros(77, 16, 16)                              # the latent grid of 64 px: factor 4

    def record(attn, inputs, output):
        x, text = inputs
        q = rearrange(attn.to_q(x[-1:]), "b n (h d) -> b h n d", h=attn.heads)
        k = rearrange(attn.to_k(text[-1:]), "b n (h d) -> b h n d", h=attn.heads)
        probs = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1).mean(1)[0]      # (h*w, 77)
        side = int(probs.shape[0] ** 0.5)
        grid = rearrange(probs, "(y x) n -> n y x", y=side)[None]
        total.add_(F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)[0])
    hooks = [m.attn2.register_forward_hook(record) for m in pipe.model.unet.modules()
             if isinstance(m, BasicTransformerBlock)]
    try:
        pipe.generate(PROMPT, seed=[4], steps=3, sampler="euler", cfg=7.5, width=64, height=64)
    finally:
        for hook in hooks:
            hook.remove()
    words = [w["text"] for w in reply["words"]]
    assert words == PROMPT.split()
    for j, word in enumerate(reply["words"], start=1):        # token 0 is <|startoftext|>
        # float32 sums of the same terms in another order: 1e-5 of maps of size ~3 layers x 3 steps
        torch.testing.assert_close(torch.tensor(word["map"]), total[j], atol=1e-5, rtol=1e-5)
    red, blue = (torch.tensor(reply["words"][words.index(w)]["map"]) for w in ("red", "blue"))
    assert (red - blue).abs().max() > 1e-2                    # the maps tell words apart: the check can fail
