"""Full fine-tuning and DreamBooth (minisd.train.finetune / dreambooth) are step-for-step equal to a reference built
from diffusers' and torch's own parts (tests/_train_refs.py), on the same random official-layout file.

Models: the small SD1 (eps) and SD2 (v, OpenCLIP-style text tower with a dropped last layer, linear proj_in)
configs of tests/checkpoints.py. Full-size U-Nets take seconds per forward on these 2-core machines and minutes per
training step, so step parity is shown at the small configs: every code path is the same (the configs differ only
in widths and depths; SD1 here at 64 channels, see _train_refs.SD1), and test_pipeline.py already shows the full-size networks equal to diffusers'.

Both sides get the same batch (pixels, captions), VAE posterior noise, noise, offset noise and timesteps (draws
injected through `run(cfg, draws=...)`). Tolerances (fp32 on the CPU; both sides run different kernels for the
same math, so they agree to float rounding, not bit for bit):
  loss              1e-5 relative, every step
  every trained     1e-5 relative (||ours - theirs|| / ||theirs||) after 3 optimizer steps, at lr 1e-4: 3 AdamW
  parameter         steps move each weight by ~3e-4, about 0.5% of its scale (asserted > 0.01% over all of them),
                    so a wrong gradient moves the result by far more than 1e-5 (test_parity_can_fail);
  the update        theta_3 - theta_0 within 2e-3 relative, the sharper check of the same thing: Adam divides
                    each gradient element by its own running magnitude, so elements whose gradient is nearly zero
                    (float noise in both implementations) still take lr-sized steps; measured ~7e-4
In float64 on both sides (test_..._in_float64_...) the rounding that Adam amplifies is ~1e-16, and the loss, every
trained tensor and every update agree within 1e-9 (_train_refs.F64_TOL; measured: loss 3.8e-16, parameters
5.3e-15, updates 1.3e-12, where float32 gives 7.1e-7, 5.1e-6, 1.1e-3): the float32 update differences are rounding.
(Min-SNR is left out there: diffusers' compute_snr casts its weights to float32.)
"""
import os

import pytest
import torch

from _train_refs import LOSS_TOL, PARAM_TOL, SD1, assert_equal, assert_equal_in_float64, model_files, run_pair
from checkpoints import SMALL_SD2
from minisd.train import finetune


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return model_files(tmp_path_factory, SD1, seed=11)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return model_files(tmp_path_factory, SMALL_SD2, seed=12)


# one case per behaviour the issue lists; DreamBooth cases are in test_dreambooth.py

def test_eps_finetune_step_equals_diffusers(tmp_path, sd1):
    assert_equal(run_pair(tmp_path, sd1, finetune))


def test_v_prediction_finetune_step_equals_diffusers(tmp_path, sd2):
    assert_equal(run_pair(tmp_path, sd2, finetune))


def test_training_the_sd2_text_encoder_equals_diffusers(tmp_path, sd2):
    errors = run_pair(tmp_path, sd2, finetune, train_text_encoder=True)
    assert any(k.startswith("text_encoder.") for k in errors["trained"])
    assert_equal(errors)


def test_v_prediction_finetune_with_the_text_encoder_in_float64_equals_diffusers_to_1e_9(tmp_path, sd2):
    errors = run_pair(tmp_path, sd2, finetune, train_text_encoder=True, dtype="float64")
    assert any(k.startswith("text_encoder.") for k in errors["trained"])
    assert errors["ours"]["unet.out.2.weight"].dtype == torch.float64        # the file holds what was trained
    assert_equal_in_float64(errors)


def test_two_learning_rates_and_the_optimizer_flags_equal_diffusers_with_two_groups_to_1e_9(tmp_path, sd2):
    """--unet-lr and --text-encoder-lr (kohya's) as two AdamW groups, each following the schedule from its own rate
    (polynomial with --lr-power 2 after a warmup step), with every Adam setting and the clipping norm away from
    its default: equal in float64 to the reference's two groups (train_dreambooth_lora_sdxl.py's layout)."""
    import json
    errors = run_pair(tmp_path, sd2, finetune, train_text_encoder=True, dtype="float64", unet_lr=3e-4,
                      text_encoder_lr=5e-5, lr_scheduler="polynomial", lr_power=2.0, lr_warmup_steps=1,
                      adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6, adam_weight_decay=0.05, max_grad_norm=0.5)
    assert_equal_in_float64(errors)
    with open(tmp_path / "out" / "train_log.jsonl") as f:
        log = [e for e in map(json.loads, f) if "loss" in e]
    assert [e["lr/text_encoder"] / e["lr"] for e in log[1:]] == pytest.approx([5e-5 / 3e-4] * 2, rel=1e-12)
    assert log[0]["lr"] == 0 and log[1]["lr"] > 0        # the warmup step, then the decay


def test_gradient_accumulation_equals_diffusers(tmp_path, sd1):
    # with a warmup schedule: the rate must follow optimizer steps, not micro-batches
    assert_equal(run_pair(tmp_path, sd1, finetune, accumulation=2, lr_scheduler="constant_with_warmup",
                          lr_warmup_steps=2))


def test_min_snr_weighting_equals_diffusers_on_v(tmp_path, sd2):
    assert_equal(run_pair(tmp_path, sd2, finetune, snr_gamma=5.0))


def test_noise_offset_equals_diffusers(tmp_path, sd1):
    assert_equal(run_pair(tmp_path, sd1, finetune, noise_offset=0.1))


def test_parity_can_fail(tmp_path, sd1):
    """The comparison notices a small error: Min-SNR weighting (gamma 5) on our side only."""
    errors = run_pair(tmp_path, sd1, finetune, snr_gamma=5.0, reference_overrides=dict(snr_gamma=None))
    print(f"[parity-can-fail] loss rel err {errors['loss']:.2e}, param rel err {errors['param']:.2e}")
    assert errors["loss"] > 100 * LOSS_TOL and errors["param"] > 10 * PARAM_TOL


# --- the model file ------------------------------------------------------------------------------------------------

def test_trained_file_gives_the_same_image_in_diffusers_and_minisd(tmp_path, sd1):
    """model.safetensors is the official single-file layout: diffusers' from_single_file reads it and draws the
    image minisd draws from it (2/255, as test_pipeline.py)."""
    import numpy as np
    from _train_refs import image_folder
    from checkpoints import diffusers_from_single_file
    from minisd.pipeline import Pipeline
    ckpt, config = sd1
    data = image_folder(tmp_path / "data", 2, seed=1, captions=["a red circle"])
    cfg = finetune.FinetuneConfig(out=str(tmp_path / "out"), model=str(ckpt), data=str(data), resolution=16,
                                  max_train_steps=2, learning_rate=1e-3, device="cpu")
    out = finetune.run(cfg, log=lambda *_: None)
    prompt = "a red circle on a blue background"
    ours = Pipeline.load(out, device="cpu", dtype="fp32", log=lambda *_: None)
    mine = np.asarray(ours.generate(prompt, steps=3, sampler="euler", schedule="leading", seed=4, width=32,
                                    height=32).images[0], dtype=np.float32) / 255
    before = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=lambda *_: None)
    untrained = np.asarray(before.generate(prompt, steps=3, sampler="euler", schedule="leading", seed=4, width=32,
                                           height=32).images[0], dtype=np.float32) / 255
    import diffusers
    ref = diffusers_from_single_file(out, config, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="leading")
    theirs = ref(prompt, num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(4),
                 width=32, height=32, output_type="np").images[0]
    err, changed = np.abs(mine - theirs).max(), np.abs(mine - untrained).max()
    print(f"[single-file] max abs pixel error {err:.5f}; training changed pixels by up to {changed:.3f}")
    assert changed > 10 / 255, "training must change the image, or the comparison shows nothing about it"
    assert err <= 2 / 255


# --- the command line on the tiny built-in model (64 px; seconds per step) -----------------------------------------

def _lines(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_flag_runs_and_the_run_folder_holds_what_the_issue_lists(tmp_path):
    """One DreamBooth run that sets nearly every flag at once (bf16, checkpointing, EMA, Min-SNR, ...), then one
    fine-tuning run with the rest (fp16 with a loss scaler, cached latents, a diffusers folder, --resume without a
    checkpoint); both models then load in `minisd generate`."""
    import json

    from _train_refs import image_folder
    from minisd.cli import main
    from minisd.train.loop import TrainConfig
    from minisd.train.lr import learning_rate
    instance = image_folder(tmp_path / "instance", 2, seed=1)
    out = tmp_path / "db"
    torch.set_num_threads(2)                                   # --threads 1 below sets it back (the fixture's 1)
    assert main(["train", "dreambooth", "--instance-dir", str(instance), "--instance-prompt", "a photo of sks circle",
                 "--class-prompt", "a red circle", "--class-dir", str(tmp_path / "class"), "--num-class-images", "1",
                 "--prior-loss-weight", "0.5", "--out", str(out), "--resolution", "64",
                 "--train-batch-size", "1", "--gradient-accumulation-steps", "2", "--max-train-steps", "3",
                 "--learning-rate", "1e-4", "--lr-scheduler", "cosine_with_restarts", "--lr-warmup-steps", "1",
                 "--lr-cycles", "2", "--lr-min-ratio", "0.1", "--seed", "3", "--train-text-encoder",
                 "--mixed-precision", "bf16", "--gradient-checkpointing", "--use-ema", "--snr-gamma", "5",
                 "--noise-offset", "0.05", "--random-flip", "--checkpointing-steps", "1",
                 "--validation-prompt", "a red circle", "--validation-prompt", "a blue square",
                 "--validation-steps", "2", "--device", "cpu", "--save-format", "single_file", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    log = [e for e in _lines(out / "train_log.jsonl") if "loss" in e]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(set(e) >= {"step", "loss", "lr", "seconds"} for e in log)
    assert all(0 < e["loss"] < 10 for e in log)                # bf16 autocast trains, no inf/nan
    schedule = TrainConfig(steps=3, lr=1e-4, lr_schedule="cosine_with_restarts", warmup_steps=1, cycles=2,
                           min_lr_ratio=0.1)
    assert [e["lr"] for e in log] == [learning_rate(i, schedule) for i in range(3)]   # the rate each step used
    assert sorted(os.listdir(out / "samples")) == ["step-000002-0.png", "step-000002-1.png",
                                                   "step-000003-0.png", "step-000003-1.png"]
    assert json.loads((out / "args.json").read_text())["snr_gamma"] == 5.0
    assert json.loads((out / "result.json").read_text())["last_loss"] == log[-1]["loss"]
    assert len(os.listdir(tmp_path / "class")) == 1
    # --use-ema: the file holds the EMA weights the checkpoint kept, not the last weights
    ckpt = torch.load(out / "checkpoints" / "dreambooth.ckpt.pt", weights_only=True)
    from weights_convert import detect
    saved = detect.read(str(out / "model.safetensors"), verbose=False).state
    k = "unet.out.2.weight"
    assert torch.equal(saved[k], ckpt["ema"][k]) and not torch.equal(saved[k], ckpt["params"][k])

    data = image_folder(tmp_path / "data", 2, seed=2, captions=["a red circle", "a blue square"])
    out2 = tmp_path / "ft"
    assert main(["train", "finetune", "--data", str(data), "--out", str(out2), "--max-train-steps", "2",
                 "--center-crop", "--cache-latents", "--mixed-precision", "fp16", "--save-format", "diffusers",
                 "--resume", "--device", "cpu"]) == 0
    assert os.path.isfile(out2 / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(0 < e["loss"] < 10 for e in _lines(out2 / "train_log.jsonl"))   # fp16 + loss scaler: finite
    for model in (out / "model.safetensors", out2 / "model"):
        assert main(["generate", "a red circle", "--model", str(model), "--steps", "2", "--seed", "1",
                     "--out", str(tmp_path / f"{model.name}.png"), "--device", "cpu"]) == 0


@pytest.mark.parametrize("args,message", [
    (["--use-8bit-adam"], "CUDA only"),
    (["--cache-latents"], "needs --center-crop"),
    (["--gradient-accumulation-steps", "0"], "must be >= 1"),
    (["--lr-scheduler", "constant", "--lr-warmup-steps", "10"], "does not use warmup_steps"),
    (["--snr-gamma", "0"], "--snr-gamma must be > 0"),
])
def test_command_line_errors_are_one_line_before_training(tmp_path, capsys, args, message):
    from _train_refs import image_folder
    from minisd.cli import main
    data = image_folder(tmp_path / "data", 1, seed=2, captions=["a red circle"])
    assert main(["train", "finetune", "--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_run_refuses_an_out_folder_with_a_checkpoint_unless_resumed(tmp_path):
    from _train_refs import image_folder
    data = image_folder(tmp_path / "data", 1, seed=2, captions=["a red circle"])
    cfg = finetune.FinetuneConfig(out=str(tmp_path / "out"), data=str(data), max_train_steps=1, device="cpu")
    finetune.run(cfg, log=lambda *_: None)
    with pytest.raises(ValueError, match="pass --resume"):
        finetune.run(cfg, log=lambda *_: None)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing activations in the backward pass changes memory, not arithmetic (U-Net and text encoder)."""
    from minisd.model import load_model, tiny_model_path
    model = load_model(tiny_model_path(), verbose=False).train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    tokens = model.tokenizer(["a red circle", "two blue squares"])

    def grads(on):
        model.zero_grad()
        model.unet.gradient_checkpointing = model.text_encoder.gradient_checkpointing = on
        model.unet(x, t, model.text_encoder(tokens)).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any(k.startswith("text_encoder.") for k in plain)
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_a_run_killed_after_a_checkpoint_and_resumed_ends_bit_identical(tmp_path):
    """kill -9 once the first checkpoint is on disk, --resume, and the weights equal an uninterrupted run's bit for
    bit (tiny model; both runs in fresh processes with one thread, like the interrupted one)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from _train_refs import image_folder
    from weights_convert import detect
    data = image_folder(tmp_path / "data", 3, seed=2, captions=["a red circle", "a blue square", "two stars"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]

    def command(out, *extra):
        return [sys.executable, "-m", "minisd", "train", "finetune", "--data", str(data), "--out", str(out),
                "--max-train-steps", "24", "--checkpointing-steps", "4", "--random-flip", "--train-batch-size", "2",
                "--learning-rate", "1e-4", "--lr-scheduler", "cosine", "--use-ema", "--device", "cpu", *extra]

    subprocess.run(command(tmp_path / "straight"), env=env, cwd=root, check=True, capture_output=True)
    out = tmp_path / "killed"
    ckpt = out / "checkpoints" / "finetune.ckpt.pt"
    run = subprocess.Popen(command(out), env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 4 <= step < 24 and not (out / "model.safetensors").exists(), f"killed at step {step}: too late to test"
    subprocess.run(command(out, "--resume"), env=env, cwd=root, check=True, capture_output=True)

    straight = detect.read(str(tmp_path / "straight" / "model.safetensors"), verbose=False).state
    resumed = detect.read(str(out / "model.safetensors"), verbose=False).state
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    start = detect.read(str(root / "minisd" / "assets" / "minisd-tiny.safetensors"), verbose=False).state
    assert not torch.equal(straight["unet.out.2.weight"], start["unet.out.2.weight"].float())   # it trained
    steps = [e["step"] for e in _lines(out / "train_log.jsonl")]
    assert steps == list(range(1, 25)), "the log holds each step once, the redone ones not twice"
    print(f"[resume] killed after the checkpoint of step {step}, resumed; 24 steps bit-identical")


@pytest.mark.parametrize("warmup, same", [("diffusers", True), ("ldm", False)])
def test_use_ema_averages_as_diffusers_ema_model(warmup, same):
    # `--use-ema` of minisd train follows diffusers' EMAModel (the first update copies, then n / (9 + n) up to the
    # decay); the tiny recipe keeps LDM's LitEma warm-up, (1 + n) / (10 + n), which this comparison tells apart
    from diffusers.training_utils import EMAModel
    from minisd.train.finetune import FinetuneConfig
    from minisd.train.settings import train_config
    from minisd.train.loop import EMA

    assert train_config(FinetuneConfig(out="x", use_ema=True)).ema_warmup == "diffusers"
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(5, 3, generator=g)), "b": torch.nn.Parameter(torch.randn(7, generator=g))}
    ours, ref = EMA(params, decay=0.9, warmup=warmup), EMAModel(list(params.values()), decay=0.9)
    for _ in range(30):                                   # past the warm-up: the decay reaches its cap 0.9
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g))
        ours.update(params)
        ref.step(list(params.values()))
        err = max((ours.shadow[k] - s).abs().max().item() for k, s in zip(params, ref.shadow_params))
        assert (err <= 1e-6) == same, f"update {ours.num_updates}: max difference {err:.3g}"
