"""The minisd command line: flags, outputs with A1111 metadata, and clear errors instead of tracebacks."""
import numpy as np
import pytest
from PIL import Image

from checkpoints import SMALL_SD1, write_ldm_checkpoint
from minisd.cli import main
from minisd.images import parse_a1111_parameters, read_png_parameters
from minisd.pipeline import Pipeline


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "small.safetensors"
    write_ldm_checkpoint(path, SMALL_SD1, seed=3)
    return str(path)


def _generate(model_file, out, *extra):
    return main(["generate", "a red circle", "--model", model_file, "--steps", "2", "--width", "32",
                 "--height", "32", "--seed", "42", "--out", str(out), "--device", "cpu", *extra])


def test_generate_writes_a_png_with_a1111_parameters(model_file, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert _generate(model_file, out, "--negative-prompt", "blurry", "--sampler", "Euler a") == 0
    params = parse_a1111_parameters(read_png_parameters(out))
    assert params["Prompt"] == "a red circle" and params["Negative prompt"] == "blurry"
    assert params["Steps"] == "2" and params["Sampler"] == "Euler a" and params["Seed"] == "42"
    assert params["Size"] == "32x32" and params["CFG scale"] == "7.5" and params["Model"] == "small"
    assert "seed 42" in capsys.readouterr().out


@pytest.mark.parametrize("sampler", ["UniPC", "DPM++ 3M SDE Karras", "LCM"])
def test_generate_with_unipc_dpmpp_3m_sde_and_lcm(model_file, tmp_path, sampler):
    out = tmp_path / "img.png"
    assert _generate(model_file, out, "--sampler", sampler, "--cfg", "1") == 0
    params = parse_a1111_parameters(read_png_parameters(out))
    assert params["Sampler"] == sampler.removesuffix(" Karras") and params["Steps"] == "2"


def test_lcm_refuses_more_steps_than_its_grid(model_file, tmp_path, capsys):
    assert _generate(model_file, tmp_path / "img.png", "--sampler", "LCM", "--steps", "51") == 2
    err = capsys.readouterr().err
    assert "lcm schedule has at most 50 steps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "img.png").exists()


def test_same_seed_same_image_and_no_silent_overwrite(model_file, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert _generate(model_file, a) == 0 and _generate(model_file, b) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    before = a.read_bytes()
    assert _generate(model_file, a, "--seed", "43") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert a.read_bytes() == before
    assert _generate(model_file, a, "--seed", "43", "--overwrite") == 0
    assert a.read_bytes() != before


def test_attention_slicing_gives_the_same_image(model_file, tmp_path):
    assert _generate(model_file, tmp_path / "a.png") == 0
    assert _generate(model_file, tmp_path / "b.png", "--attention-slice", "7", "--vae-tile", "8") == 0
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.float32) for n in ("a.png", "b.png"))
    # slicing is exact; the tiled decode (16x16 latents in 8x8 tiles) blends seams, so pixels may move a little
    assert a.shape == b.shape and np.abs(a - b).mean() < 255 * 0.1


def test_batch_size_n_is_seeds_seed_to_seed_plus_n_minus_1_each_as_generated_alone(model_file, tmp_path):
    """A1111's batch: --seed 42 --batch-size 2 writes seed 42's image and seed 43's, each naming its own seed."""
    assert _generate(model_file, tmp_path / "outs", "--batch-size", "2") == 0
    assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["00000-42.png", "00001-43.png"]
    second = tmp_path / "outs" / "00001-43.png"
    assert parse_a1111_parameters(read_png_parameters(second))["Seed"] == "43"
    assert _generate(model_file, tmp_path / "alone.png", "--seed", "43") == 0
    batched, alone = (np.asarray(Image.open(p), dtype=np.int16) for p in (second, tmp_path / "alone.png"))
    # one U-Net call over two images rounds differently in the last bits than over one: at most 1 level of 255
    assert np.abs(batched - alone).max() <= 1
    # and the test would fail under the old semantics (one generator drawing the whole batch, diffusers'): its
    # second image is another image
    pipe = Pipeline.load(model_file, device="cpu", log=lambda *_: None)
    old = pipe.generate("a red circle", steps=2, width=32, height=32, seed=42, batch=2).images[1]
    assert np.abs(np.asarray(old, dtype=np.int16) - alone).max() > 10
    # --batch is the same flag
    assert _generate(model_file, tmp_path / "again", "--batch", "2") == 0
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["00000-42.png", "00001-43.png"]


def test_img2img_and_save_steps(model_file, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 4)) * 255).astype(np.uint8), "RGBA").save(init)
    steps_dir = tmp_path / "steps"
    code = main(["img2img", "a blue square", "--model", model_file, "--init-image", str(init), "--strength", "0.5",
                 "--steps", "4", "--seed", "1", "--out", str(tmp_path / "x.png"), "--save-steps", str(steps_dir)])
    assert code == 0
    assert parse_a1111_parameters(read_png_parameters(tmp_path / "x.png"))["Denoising strength"] == "0.5"
    assert len(list(steps_dir.iterdir())) == 2           # int(4 * 0.5) steps ran, one preview each


def test_churn_flags_reach_the_sampler_and_plms_runs(model_file, tmp_path):
    assert _generate(model_file, tmp_path / "plain.png", "--sampler", "euler") == 0
    assert _generate(model_file, tmp_path / "churn.png", "--sampler", "euler", "--s-churn", "1.0",
                     "--s-tmin", "0.05", "--s-noise", "1.003") == 0
    plain, churned = (np.asarray(Image.open(tmp_path / n)) for n in ("plain.png", "churn.png"))
    assert not np.array_equal(plain, churned)           # the churn noise changed the path
    assert _generate(model_file, tmp_path / "plms.png", "--sampler", "PLMS") == 0
    assert parse_a1111_parameters(read_png_parameters(tmp_path / "plms.png"))["Sampler"] == "PLMS"


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "euler b"], "unknown sampler"),
    (["--sampler", "euler_a", "--s-churn", "1"], "takes no churn"),
    (["--sampler", "euler", "--eta", "0.5"], "takes no eta"),
    (["--width", "33"], "multiple of"),
    (["--steps", "0"], "steps must be a positive integer"),
])
def test_bad_input_is_one_clear_line(model_file, tmp_path, capsys, extra, message):
    assert _generate(model_file, tmp_path / "e.png", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "euler b"], "unknown sampler"),
    (["--sampler", "euler", "--eta", "0.5"], "takes no eta"),
    (["--sampler", "euler_a", "--s-churn", "1"], "takes no churn"),
    (["--sampler", "Euler Karras", "--schedule", "exponential"], "asks for the karras schedule"),
])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_bad_sampling_settings_fail_before_the_model_loads(tmp_path, capsys, command, extra, message):
    # the model file does not exist: the error names the settings, so they were checked before any load
    args = ["x"] if command == "generate" else ["--prompts", str(tmp_path / "p.txt"), "--num-images", "1",
                                                  "--out", str(tmp_path / "run")]
    assert main([command, *args, "--model", str(tmp_path / "nope.safetensors"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "nope" not in err and len(err.strip().splitlines()) == 1


def test_eval_schedule_has_the_same_choices_as_generate(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--prompts", "p.txt", "--num-images", "1", "--out", str(tmp_path), "--schedule", "cosine"])
    assert "invalid choice: 'cosine'" in capsys.readouterr().err


def test_bad_strength_and_missing_or_broken_checkpoint(model_file, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(init)
    assert main(["img2img", "x", "--model", model_file, "--init-image", str(init), "--strength", "1.5"]) == 2
    assert "strength must be in [0, 1]" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(model_file, "rb").read()[:5000])
    assert main(["generate", "x", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "Traceback" not in err
