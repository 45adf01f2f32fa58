"""ControlNet training (minisd/train/controlnet.py): 3 optimizer steps equal a reference built from diffusers' parts,
the start from the U-Net equals diffusers' ControlNetModel.from_unet, the conditioning image gets its image's crop
and flip, the written file is what diffusers' ControlNetModel.from_single_file reads, and the command line.

The reference (`reference_controlnet_training`) is diffusers' train_controlnet.py step written out from the parts
that ship (its script is not in the wheel): StableDiffusionPipeline.from_single_file's UNet2DConditionModel,
AutoencoderKL and CLIPTextModel, frozen; ControlNetModel.from_single_file of the same start file minisd trains from;
DDPMScheduler.add_noise; controlnet(noisy, t, text, controlnet_cond=hint) -> the U-Net's
down_block_additional_residuals / mid_block_additional_residual; mse in float32 (.float()); torch.optim.AdamW over
the ControlNet's parameters, clip_grad_norm_, constant rate. Batch (minisd's choice of examples and its hints),
posterior noise, noise and timesteps are injected into both sides, as tests/_train_refs.py does for fine-tuning.

Tolerances: tests/_train_refs.py's (float64: loss, every trained tensor and every update within 1e-9 relative;
float32: loss and tensors 1e-5, updates 2e-3). The start ControlNet has every weight redrawn, zero convolutions
included (test_controlnet._random): at zero ones, the first step moves only the zero convolutions.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _train_refs import (BATCH, F64_TOL, LOSS_TOL, PARAM_TOL, SD1, STEPS, UPDATE_TOL, fixed_draws, model_files)
from checkpoints import diffusers_from_single_file
from minisd.cli import main
from minisd.config import ControlNetConfig as NetworkConfig
from minisd.controlnet import ControlNet, load_controlnet, save_controlnet
from minisd.model import load_model, tiny_model_path
from minisd.train import ControlNetConfig, run
from minisd.train import controlnet as method
from minisd.train.batches import Stream, take
from minisd.train.control_data import find_pairs
from minisd.train.settings import DTYPES
from test_controlnet import _diffusers_controlnet, _factor8, _random
from weights_convert import controlnet as wc

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 64                     # pixels: 8x8 latents for the factor-8 VAE (cldm's hint encoder downsamples by 8)
LR = 1e-4
CFG = dataclasses.replace(_factor8(SD1), name="cn-train")
CAPTIONS = ["a red circle on a blue square", "two green triangles", "a photo of a yellow star"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model file, diffusers config folder, start ControlNet file (1.1 layout, every weight random))."""
    ckpt, config = model_files(tmp_path_factory, CFG, seed=5)
    start = ckpt.parent / "control_v11p_start.safetensors"
    save_controlnet(_random(ControlNet(NetworkConfig.for_model(CFG)), 11), start, "1.1")
    return ckpt, config, start


def pair_folder(path, n=3, size=(72, 64), seed=0):
    """n random images (72x64: resized and cropped to RES) with random conditioning images and captions."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        g = np.random.default_rng([seed, i])
        Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
        edges = (g.random((size[1] // 8, size[0] // 8)) > 0.6).astype(np.uint8) * 255   # blocky, like a hint
        Image.fromarray(np.stack([edges] * 3, -1)).resize(size, Image.NEAREST).save(path / f"{i:02d}.cond.png")
        (path / f"{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return path


def _float64_schedule(scheduler):
    """DDPMScheduler computes its schedule in float32; a float64 reference computes scaled_linear in float64
    (as tests/_train_refs.reference_training does)."""
    c = scheduler.config
    assert c.beta_schedule == "scaled_linear", c.beta_schedule
    scheduler.betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps,
                                     dtype=torch.float64) ** 2
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


def reference_controlnet_training(pipe, controlnet, batches, draws, steps, lr, max_grad_norm=1.0,
                                  weight_decay=1e-2, zero_hints=False, drop_mid=False):
    """Train `controlnet` (diffusers' ControlNetModel) beside pipe's frozen networks for `steps` steps, as
    train_controlnet.py does; returns each step's loss. batches[k] = (pixels in [-1, 1], captions, hints in
    [0, 1]). zero_hints / drop_mid: a wrong reference (no conditioning; no middle residual), to show the
    comparison catches it."""
    from diffusers import DDPMScheduler
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    dtype = unet.dtype
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if dtype == torch.float64:
        _float64_schedule(scheduler)
    for net in (unet, vae, text_encoder):
        net.requires_grad_(False)
    controlnet.train()
    params = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for k in range(steps):
        pixels, captions, hints = batches[k]
        d = draws[k]
        with torch.no_grad():
            dist = vae.encode(pixels.to(dtype)).latent_dist
            latents = (dist.mean + dist.std * d.posterior.to(dtype)) * vae.config.scaling_factor
        noise, t = d.noise.to(dtype), d.timesteps
        noisy = scheduler.add_noise(latents, noise, t)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        cond = torch.zeros_like(hints) if zero_hints else hints
        down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=cond.to(dtype),
                               return_dict=False)
        pred = unet(noisy, t, hidden, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid * 0 if drop_mid else mid).sample
        loss = F.mse_loss(pred.float() if dtype != torch.float64 else pred, noise.to(pred.dtype))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_pair(tmp_path, model, dtype="float64", wrongs=({},)):
    """Train with minisd, and with the reference from the same start, data and draws once per `wrongs` (arguments
    of reference_controlnet_training, {}: the right reference); returns the errors against each."""
    ckpt, config, start = model
    data = pair_folder(tmp_path / "data")
    cfg = ControlNetConfig(out=str(tmp_path / "out"), data=str(data), model=str(ckpt), controlnet=str(start),
                           resolution=RES, train_batch_size=BATCH, max_train_steps=STEPS, learning_rate=LR,
                           center_crop=True, device="cpu", checkpointing_steps=100, dtype=dtype)
    draws = fixed_draws(STEPS, BATCH, latent_size=RES // 8)
    out = method.run(cfg, draws=lambda k, places, shape: draws[k], log=lambda *_: None)
    with open(tmp_path / "out" / "train_log.jsonl") as f:
        ours_losses = [e["loss"] for e in map(json.loads, f) if "loss" in e]
    ours = load_controlnet(out, load_model(str(ckpt), verbose=False).config, torch.float64).state_dict()

    stream = Stream(find_pairs(str(data), RES, log=lambda *_: None), 0)
    batches = [(p, c, h) for p, _, c, h in (take(stream, k, cfg, RES, None) for k in range(STEPS))]
    first = load_controlnet(start, load_model(str(ckpt), verbose=False).config, torch.float64).state_dict()
    ours = {k: v.double() for k, v in ours.items()}
    return [compare(ours, ours_losses, first, ckpt, config, start, batches, draws, dtype, tmp_path / f"ref{i}", w)
            for i, w in enumerate(wrongs)]


def compare(ours, ours_losses, first, ckpt, config, start, batches, draws, dtype, folder, wrong):
    pipe = diffusers_from_single_file(ckpt, config, torch_dtype=DTYPES[dtype])
    ccfg = NetworkConfig.for_model(CFG)
    reference = _diffusers_controlnet(start, ccfg, folder).to(DTYPES[dtype])
    theirs_losses = reference_controlnet_training(pipe, reference, batches, draws, STEPS, LR, **wrong)
    theirs = {k: v.double() for k, v in wc.from_diffusers(reference.state_dict(), ccfg).items()}
    assert ours.keys() == theirs.keys()
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(ours_losses, theirs_losses))
    param_err = max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs)
    update_err = max(((ours[k] - theirs[k]).norm() / (theirs[k] - first[k]).norm()).item() for k in theirs)
    moved = min((theirs[k] - first[k]).norm().item() for k in theirs)
    print(f"[controlnet parity {dtype}{' ' + str(wrong) if wrong else ''}] losses {ours_losses} vs "
          f"{theirs_losses}: rel err {loss_err:.2e}; params {param_err:.2e}, updates {update_err:.2e}")
    assert len(ours_losses) == STEPS and moved > 0, "a tensor of the ControlNet did not move"
    return dict(loss=loss_err, param=param_err, update=update_err)


def test_three_steps_equal_diffusers_parts_in_float64(model, tmp_path):
    errors, = run_pair(tmp_path, model)
    assert errors["loss"] <= F64_TOL and errors["param"] <= F64_TOL and errors["update"] <= F64_TOL, errors


def test_three_steps_equal_diffusers_parts_in_float32(model, tmp_path):
    errors, = run_pair(tmp_path, model, "float32")
    assert errors["loss"] <= LOSS_TOL and errors["param"] <= PARAM_TOL and errors["update"] <= UPDATE_TOL, errors


def test_the_parity_comparison_catches_a_missing_hint_or_residual(model, tmp_path):
    """The same comparison against a reference without the conditioning, or without the middle residual, fails
    by far: the hint and the residuals matter to the result."""
    for errors in run_pair(tmp_path, model, wrongs=(dict(zero_hints=True), dict(drop_mid=True))):
        assert errors["loss"] > 1e3 * F64_TOL and errors["update"] > 1e3 * F64_TOL, errors


def test_start_from_the_unet_equals_controlnetmodel_from_unet(model):
    """No --controlnet: the U-Net's encoder weights and zero convolutions, as diffusers' ControlNetModel.from_unet
    (the hint encoder's random init aside: its last conv is zero in both)."""
    from diffusers import ControlNetModel
    from minisd.train.controlnet import initial_controlnet
    ckpt, config, _ = model
    ours_model = load_model(str(ckpt), verbose=False)
    cfg = ControlNetConfig(out="unused")
    net = initial_controlnet(ours_model, cfg, log=lambda *_: None)
    pipe = diffusers_from_single_file(ckpt, config)
    theirs = wc.from_diffusers(ControlNetModel.from_unet(pipe.unet).state_dict(), net.cfg)
    ours = net.state_dict()
    assert ours.keys() == theirs.keys()
    random_init = [k for k in ours if k.startswith("input_hint_block.") and not k.startswith("input_hint_block.14")]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in random_init)
    assert not any(ours[k].any() for k in ours if k.startswith(("zero_convs.", "middle_block_out.",
                                                                 "input_hint_block.14")))
    again = initial_controlnet(ours_model, cfg, log=lambda *_: None).state_dict()      # --seed fixes the init
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def test_conditioning_image_gets_the_image_crop_and_flip(tmp_path):
    """With random crops and flips, a conditioning image equal to its image comes out as the image does."""
    from minisd.train.step import example_generator
    data = pair_folder(tmp_path / "d", n=4, size=(96, 64))
    for i in range(4):                             # the image itself as its condition
        Image.open(data / f"{i:02d}.png").save(data / f"{i:02d}.cond.png")
    stream = Stream(find_pairs(str(data), 32, log=lambda *_: None), 0)
    cfg = ControlNetConfig(out="unused", train_batch_size=2, random_flip=True, center_crop=False)
    flips = set()
    for k in range(6):
        pixels, _, _, hints = take(stream, k, cfg, 32, [example_generator(0, k, j) for j in range(2)])
        assert hints.shape == pixels.shape and 0 <= hints.min() and hints.max() <= 1
        assert (hints * 2 - 1 - pixels).abs().max() < 1e-6
        flips.add(tuple(pixels[:, 0, 0, 0].tolist()))
    assert len(flips) > 1


def test_centre_crop_hint_equals_diffusers_conditioning_transform(tmp_path):
    """diffusers' train_controlnet.py conditioning_image_transforms: Resize(res, bilinear), CenterCrop(res),
    ToTensor() (RGB in [0, 1])."""
    from torchvision import transforms
    data = pair_folder(tmp_path / "d", n=2, size=(72, 64))
    stream = Stream(find_pairs(str(data), 32, log=lambda *_: None), 0)
    cfg = ControlNetConfig(out="unused", train_batch_size=2, center_crop=True)
    _, _, _, hints = take(stream, 0, cfg, 32)
    t = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
                            transforms.CenterCrop(32), transforms.ToTensor()])
    order = [e.condition for e in stream.examples]
    expected = [t(Image.open(p).convert("RGB")) for p in order]
    assert any(torch.equal(hints[0], e) for e in expected) and any(torch.equal(hints[1], e) for e in expected)


# ---------------------------------------------------------------------------------------------------------------
# the command line, on the tiny built-in model

def test_cli_end_to_end_on_the_tiny_model(tmp_path, capsys):
    """`minisd train controlnet` from the U-Net's encoder: OUT/controlnet.safetensors, in the 1.1 layout. The tiny
    VAE downsamples by 4, so the hint block has two stride-2 convolutions, not cldm's three, and its last conv is
    input_hint_block.10, not .14; diffusers' single-file reader assumes .14 (single_file_utils
    .convert_controlnet_checkpoint), so diffusers reads the same training written with --save-format diffusers
    (ControlNetModel.from_pretrained) instead: the runs are deterministic, so both files hold the same weights, and
    the network minisd loads from the 1.1 file must give diffusers' residuals."""
    data = pair_folder(tmp_path / "data", n=2, size=(64, 64))
    command = ["train", "controlnet", "--data", str(data), "--max-train-steps", "2", "--learning-rate", "1e-3",
               "--random-flip", "--device", "cpu", "--seed", "1"]
    out = tmp_path / "out"
    assert main(command + ["--out", str(out), "--validation-prompt", CAPTIONS[0],
                           "--validation-image", str(data / "00.cond.png")]) == 0
    path = out / "controlnet.safetensors"
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "controlnet" and result["model"] == str(path) and result["steps"] == 2
    assert [os.path.basename(p) for p in result["validation"]] == ["step-000002-0.png"]
    from minisd.model import locate
    config = load_model(locate(None, lambda *_: None)[0], verbose=False).config
    net = load_controlnet(str(path), config)
    from safetensors.torch import load_file
    keys = set(load_file(str(path)))
    last = 2 * (2 * len(net.cfg.hint_channels) - 1)       # the hint block's last conv: 14 at SD's factor 8, 10 at 4
    assert f"input_hint_block.{last}.weight" in keys and "zero_convs.0.0.weight" in keys and len(keys) == len(net.state_dict())
    assert net.zero_convs[0][0].weight.any(), "the zero convolutions did not train"

    assert main(command + ["--out", str(tmp_path / "folder"), "--save-format", "diffusers"]) == 0
    from diffusers import ControlNetModel
    ref = ControlNetModel.from_pretrained(str(tmp_path / "folder" / "controlnet"), local_files_only=True).eval()
    factor = 2 ** (len(config.vae.ch_mult) - 1)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 64 // factor, 64 // factor, generator=g), torch.tensor([500])
    context, hint = torch.randn(1, 77, config.unet.context_dim, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        down, mid = net(x, t, context, hint)
        ref_down, ref_mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    for a, b in zip(down + [mid], list(ref_down) + [ref_mid], strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() and b.abs().max() > 0


@pytest.mark.parametrize("setup, message", [
    ("no-cond", "have no conditioning image (first: 01.png, which needs 01.cond.png beside it)"),
    ("orphan", "is a conditioning image without its image"),
    ("text-encoder", "--train-text-encoder: only the ControlNet trains"),
    ("validation", "--validation-prompt needs --validation-image"),
])
def test_bad_data_or_flags_are_one_line(tmp_path, capsys, setup, message):
    data = pair_folder(tmp_path / "data", n=2, size=(64, 64))
    extra = []
    if setup == "no-cond":
        (data / "01.cond.png").unlink()
    elif setup == "orphan":
        (data / "01.png").unlink()
    elif setup == "text-encoder":
        extra = ["--train-text-encoder"]
    else:
        extra = ["--validation-prompt", "a circle"]
    code = main(["train", "controlnet", "--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_diffusers_metadata_columns_are_read(tmp_path):
    """metadata.jsonl with train_controlnet.py's columns (image, conditioning_image, text) gives the same
    examples as NAME.png + NAME.cond.png + NAME.txt."""
    data = pair_folder(tmp_path / "d", n=2, size=(64, 64))
    plain = find_pairs(str(data), 32, log=lambda *_: None)
    other = tmp_path / "m"
    other.mkdir()
    rows = []
    for i, e in enumerate(plain):
        Image.open(e.path).save(other / f"img{i}.png")
        Image.open(e.condition).save(other / f"edges{i}.png")
        rows.append(json.dumps({"image": f"img{i}.png", "conditioning_image": f"edges{i}.png", "text": e.caption}))
    (other / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    read = find_pairs(str(other), 32, log=lambda *_: None)
    assert [(e.caption, e.size, os.path.basename(e.condition)) for e in read] == \
        [(e.caption, e.size, f"edges{i}.png") for i, e in enumerate(plain)]
    (other / "metadata.jsonl").write_text(json.dumps({"image": "img0.png", "conditioning_image": "nope.png",
                                                      "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="nope.png .*is not a readable conditioning image"):
        find_pairs(str(other), 32, log=lambda *_: None)


def test_tiny_canny_data_and_its_score_on_the_true_pictures(tmp_path):
    """The tiny canny recipe's data (minisd/tiny/canny.py) is a folder `minisd train controlnet` reads, and its
    score reads the true pictures as right: each shape's mask against its own edge map's filled region has
    IoU >= 0.8 (measured min 0.88 over 96 maps) with the colours read right; against another map's edges (a
    shape elsewhere) it fails."""
    from minisd.tiny import canny
    canny.write_canny_folder(tmp_path / "d", 3, seed=0)
    examples = find_pairs(str(tmp_path / "d"), 64, log=lambda *_: None)
    assert [e.caption for e in examples] == [canny.canny_sample(0, i)[0].text for i in range(3)]
    maps = [canny.canny_sample(1000, i) for i in range(24)]
    for s, edges in maps:
        iou, right = canny.judge_pair(s.image, edges, s.colour, s.background)
        assert iou >= 0.8 and right, (s.text, iou, right)
    elsewhere = [canny.judge_pair(s.image, maps[i - 1][1], s.colour, s.background)[0] for i, (s, _) in
                 enumerate(maps)]
    assert sum(v < 0.8 for v in elsewhere) >= 20, elsewhere


def test_controlnet_tiny_canny_resolves_offline_to_the_shipped_file(tmp_path):
    """`--controlnet tiny-canny` is minisd/assets/minisd-tiny-canny.safetensors: generate with it on the tiny model
    from a shape's picture (canny preprocessing), offline, and the PNG names it as sd-webui-controlnet does."""
    from minisd.controls import NAMED, resolve
    from minisd.images import parse_a1111_parameters, read_png_parameters
    from minisd.tiny import canny
    assert resolve("tiny-canny") == str(NAMED["tiny-canny"]) and NAMED["tiny-canny"].is_file()
    s, _ = canny.canny_sample(1000, 0)
    s.image.save(tmp_path / "shape.png")
    assert main(["generate", s.text, "--steps", "2", "--seed", "1", "--device", "cpu", "--out",
                 str(tmp_path / "out.png"), "--controlnet", "tiny-canny", "--control-image", str(tmp_path / "shape.png"),
                 "--control-preprocess", "canny"]) == 0
    params = parse_a1111_parameters(read_png_parameters(tmp_path / "out.png"))
    assert params["ControlNet 0"].startswith("Module: canny, Model: minisd-tiny-canny [")


def test_cli_save_format_diffusers_writes_a_controlnetmodel_folder(tmp_path):
    """--save-format diffusers: OUT/controlnet, which diffusers' ControlNetModel.from_pretrained reads into the
    same tensors as minisd's reader."""
    from diffusers import ControlNetModel
    data = pair_folder(tmp_path / "data", n=2, size=(64, 64))
    out = tmp_path / "out"
    assert main(["train", "controlnet", "--data", str(data), "--out", str(out), "--max-train-steps", "1",
                 "--learning-rate", "1e-3", "--device", "cpu", "--save-format", "diffusers"]) == 0
    from minisd.model import locate
    config = load_model(locate(None, lambda *_: None)[0], verbose=False).config
    ours = load_controlnet(str(out / "controlnet"), config)
    theirs = wc.from_diffusers(ControlNetModel.from_pretrained(str(out / "controlnet")).state_dict(), ours.cfg)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    assert ours.zero_convs[0][0].weight.any()


def test_gradient_checkpointing_trains_the_same_controlnet(tmp_path):
    """--gradient-checkpointing recomputes the U-Net's and the ControlNet's blocks in the backward pass: the same
    weights after 2 steps (within float32 rounding of a recomputed forward, 1e-6 relative)."""
    from safetensors.torch import load_file
    data = pair_folder(tmp_path / "data", n=2, size=(64, 64))
    runs = {}
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / ("gc" if flag else "plain")
        assert main(["train", "controlnet", "--data", str(data), "--out", str(out), "--max-train-steps", "2",
                     "--learning-rate", "1e-3", "--device", "cpu", *flag]) == 0
        runs[bool(flag)] = load_file(str(out / "controlnet.safetensors"))
    start = load_file(str(tmp_path / "plain" / "controlnet.safetensors"))
    for k, v in runs[False].items():
        assert (runs[True][k] - v).norm() <= 1e-6 * v.norm() + 1e-12, k
    assert any(v.any() for k, v in start.items() if k.startswith("zero_convs."))


def test_train_tiny_controlnet_runs_the_recipe_end_to_end(tmp_path, capsys):
    """`minisd train-tiny-controlnet` at a toy size (8 pictures, 2 steps, 2 held-out maps): the data, the run,
    the shipped-layout file and report.json are written, and the file loads as a ControlNet of the tiny model."""
    out = tmp_path / "recipe"
    assert main(["train-tiny-controlnet", "--out", str(out), "--images", "8", "--steps", "2", "--batch", "2",
                 "--eval-maps", "2", "--lr-scheduler", "linear", "--eval-cfg", "3"]) == 0
    assert len(list((out / "data").glob("*.cond.png"))) == 8
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["steps"] == 2 and report["recipe"]["images"] == 8
    assert report["recipe"]["lr_scheduler"] == "linear" and report["recipe"]["eval_cfg"] == 3.0
    shipped = out / "minisd-tiny-canny.safetensors"
    assert 0.0 <= report["mean_iou"] <= 1.0 and report["bytes"] == os.path.getsize(shipped)
    load_controlnet(str(shipped), load_model(str(tiny_model_path()), verbose=False).config)     # fits the model
    assert "held-out edge maps" in capsys.readouterr().out
    # a bad schedule is one line from the parser, before any picture is written
    with pytest.raises(SystemExit) as e:
        main(["train-tiny-controlnet", "--out", str(tmp_path / "bad"), "--lr-scheduler", "cosin"])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
    assert "invalid choice: 'cosin'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# --dataset-name: a Hugging Face dataset with train_controlnet.py's columns (hf_dataset.py)

def pair_dataset(folder, path, columns=("image", "conditioning_image", "text")):
    """The pictures, conditioning images and captions of pair_folder's `folder` as a Dataset of stored bytes
    (fill50k's layout, under `columns`), written by save_to_disk to `path`."""
    import datasets
    examples = find_pairs(str(folder), 32, log=lambda *_: None)
    image, condition, text = columns
    features = datasets.Features({image: datasets.Image(), condition: datasets.Image(),
                                  text: datasets.Value("string")})
    datasets.Dataset.from_dict({image: [{"bytes": open(e.path, "rb").read(), "path": None} for e in examples],
                                condition: [{"bytes": open(e.condition, "rb").read(), "path": None} for e in examples],
                                text: [e.caption for e in examples]}, features=features).save_to_disk(str(path))
    return path


def test_a_dataset_gives_the_batches_of_the_folder(tmp_path):
    """--dataset-name's rows, each with its conditioning image, make the batches the folder of the same pictures
    makes: the same pixels, captions and hints (exactly), with random crops and flips."""
    pytest.importorskip("datasets")
    from minisd.train.hf_dataset import dataset_examples
    from minisd.train.step import example_generator
    data = pair_folder(tmp_path / "d", n=3, size=(72, 64))
    saved = pair_dataset(data, tmp_path / "saved")
    cfg = ControlNetConfig(out="unused", dataset_name=str(saved), train_batch_size=2, random_flip=True,
                           center_crop=False)
    streams = [Stream(find_pairs(str(data), 32, log=lambda *_: None), 0),
               Stream(dataset_examples(cfg, 32, log=lambda *_: None, condition_column="conditioning_image"), 0)]
    assert [e.condition for e in streams[1].examples] == [f"{saved} row {i} conditioning_image" for i in range(3)]
    for k in range(4):
        (pixels, _, texts, hints), (p2, _, t2, h2) = (
            take(s, k, cfg, 32, [example_generator(0, k, j) for j in range(2)]) for s in streams)
        assert texts == t2 and torch.equal(pixels, p2) and torch.equal(hints, h2)
        assert not torch.equal(hints * 2 - 1, pixels)          # the hints are the conditioning images


def test_cli_on_a_dataset_trains_what_the_folder_trains(tmp_path):
    """`minisd train controlnet --dataset-name` (other column names, given by their flags) writes the very
    weights the folder's run writes (2 steps, tiny model, random flips)."""
    pytest.importorskip("datasets")
    from safetensors.torch import load_file
    data = pair_folder(tmp_path / "data", n=2, size=(64, 64))
    saved = pair_dataset(data, tmp_path / "saved", ("picture", "edges", "caption"))
    runs = {}
    for name, source in (("folder", ["--data", str(data)]),
                         ("dataset", ["--dataset-name", str(saved), "--image-column", "picture",
                                      "--conditioning-image-column", "edges", "--caption-column", "caption"])):
        assert main(["train", "controlnet", *source, "--out", str(tmp_path / name), "--max-train-steps", "2",
                     "--learning-rate", "1e-3", "--random-flip", "--device", "cpu", "--seed", "1"]) == 0
        runs[name] = load_file(str(tmp_path / name / "controlnet.safetensors"))
    assert runs["folder"].keys() == runs["dataset"].keys()
    assert all(torch.equal(v, runs["dataset"][k]) for k, v in runs["folder"].items())
    assert any(v.any() for k, v in runs["folder"].items() if k.startswith("zero_convs."))


@pytest.mark.parametrize("flags, message", [
    (["--conditioning-image-column", "edges"],
     "has no column 'edges' (--conditioning-image-column); its columns: image, conditioning_image, text"),
    (["--conditioning-image-column", "text"], "column 'text' of {saved} holds Value('string'), not images "
                                              "(--conditioning-image-column); its columns: image, conditioning_image, text"),
    (["--caption-column", "caption"], "has no column 'caption' (--caption-column); its columns: image, "
                                      "conditioning_image, text"),
    (["--data", "{data}"], "--data and --dataset-name are different sources of images; give one"),
    ([], "{saved} row 1 is not a readable conditioning image (column 'conditioning_image') (its stored bytes"),
])
def test_bad_datasets_are_one_line(tmp_path, capsys, flags, message):
    datasets = pytest.importorskip("datasets")
    data = pair_folder(tmp_path / "data", n=2, size=(64, 64))
    saved = pair_dataset(data, tmp_path / "saved")
    if not flags:                                  # row 1's conditioning image is not an image
        table = datasets.load_from_disk(str(saved)).cast_column("conditioning_image", datasets.Image(decode=False))
        rows = table.to_dict()
        rows["conditioning_image"][1] = {"bytes": b"\x89PNG not really", "path": None}
        saved = tmp_path / "broken"
        datasets.Dataset.from_dict(rows, features=table.features).save_to_disk(str(saved))
    names = {"saved": str(saved), "data": str(data)}
    out = tmp_path / "out"
    capsys.readouterr()                            # save_to_disk's progress bars
    code = main(["train", "controlnet", "--dataset-name", str(saved), "--out", str(out), "--device", "cpu",
                 *(f.format(**names) for f in flags)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(**names) in err[0], err
    assert not out.exists()
