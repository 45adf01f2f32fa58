"""What a new user tripped over (issue 33): one clear line instead of a traceback, a line that names the real
problem, files with the permissions a plain open() gives, A1111's seeds, img2img's defaults. Cheap command-line
calls on the tiny built-in model (32 px, 1 step) and the training loop's toy problem."""
import os
import signal

import stat

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.cli import main
from minisd.images import parse_a1111_parameters, read_png_parameters, save_png
from minisd.train.loop import Stopped, TrainConfig, atomic_write, train

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread

TINY = ["--steps", "1", "--width", "32", "--height", "32", "--device", "cpu"]


@pytest.fixture
def junk(tmp_path):
    """A text file given where a model, LoRA or image belongs."""
    path = tmp_path / "notes.txt"
    path.write_text("remember the milk\n")
    return str(path)


def _one_line(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    return err


# --- 3. tracebacks where one line belongs --------------------------------------------------------------------------

def test_a_text_file_as_lora_is_one_line_in_generate_and_merge_lora(junk, tmp_path, capsys):
    assert main(["generate", "x", "--lora", junk, "--out", str(tmp_path / "a.png"), *TINY]) == 2
    _one_line(capsys, "notes.txt: not a checkpoint")
    assert main(["merge-lora", "--model", junk, "--lora", junk, "--out", str(tmp_path / "m.safetensors")]) == 2
    _one_line(capsys, "notes.txt: not a checkpoint")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "m.safetensors").exists()


def test_a_corrupt_init_image_is_one_line(tmp_path, capsys):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["img2img", "x", "--init-image", str(bad), "--out", str(tmp_path / "o.png"), *TINY[:2]]) == 2
    _one_line(capsys, "--init-image", "corrupt.png", "cannot read it as an image")


def _toy():
    from test_train import _toy_problem
    return _toy_problem()


def test_ctrl_c_in_training_stops_after_the_step_with_a_checkpoint(tmp_path):
    """SIGINT is handled like SIGTERM: the step under way finishes, its checkpoint is written, Stopped is raised
    (the command line prints one line and exits 130), and the previous handler is put back."""
    cfg = TrainConfig(steps=12, lr=1e-2, checkpoint_every=5)
    net, loss_fn = _toy()

    def interrupted(k, generator):
        if k == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(k, generator)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as stopped:
        train(net, dict(net.named_parameters()), interrupted, cfg, tmp_path, "toy", log=lambda *_: None)
    assert stopped.value.step == 7 and 128 + stopped.value.signum == 130
    assert "SIGINT after step 7" in str(stopped.value)
    assert torch.load(tmp_path / "toy.ckpt.pt", weights_only=True)["step"] == 7
    assert signal.getsignal(signal.SIGINT) is before


def test_a_sweep_objective_eval_does_not_write_fails_before_the_first_trial(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nobjective = "fdi"\n[trial]\n'
                    'eval = ["python", "-m", "minisd", "eval", "--metrics", "fid,clip", "--out", "{trial_dir}"]\n'
                    'metrics = "metrics.json"\n')
    assert main(["sweep", str(spec)]) == 2
    _one_line(capsys, "'fdi'", "fid, clip, is_std")
    assert not (tmp_path / "s").exists()                    # no study folder, no trial


# --- 4. lines that name the real problem, every flag checked before anything loads ----------------------------------

def test_a_bad_lora_scale_is_named_as_the_scale(junk, tmp_path, capsys):
    lora_file = tmp_path / "style.safetensors"
    lora_file.write_bytes(b"")                               # exists: the error is about the scale, before any read
    assert main(["generate", "x", "--lora", f"{lora_file}:abc", "--out", str(tmp_path / "a.png"), *TINY]) == 2
    _one_line(capsys, "the scale 'abc' is not a number")


def test_a_text_file_as_model_is_not_a_checkpoint(junk, tmp_path, capsys):
    assert main(["generate", "x", "--model", junk, "--out", str(tmp_path / "a.png"), *TINY]) == 2
    err = _one_line(capsys, "notes.txt: not a checkpoint")
    assert "unpickler" not in err


def test_batch_zero_names_the_flag_before_anything_loads(tmp_path, capsys):
    assert main(["generate", "x", "--batch", "0", "--model", str(tmp_path / "nope.safetensors"), *TINY]) == 2
    _one_line(capsys, "--batch-size must be at least 1, got 0")


@pytest.fixture(scope="module")
def uncaptioned(tmp_path_factory):
    from _train_refs import image_folder
    return image_folder(tmp_path_factory.mktemp("uncaptioned"), 2, seed=0)


def test_missing_captions_suggest_what_finetune_takes(uncaptioned, tmp_path, capsys):
    assert main(["train", "finetune", "--data", str(uncaptioned), "--out", str(tmp_path / "run"),
                 "--resolution", "32", "--device", "cpu"]) == 2
    err = _one_line(capsys, "have no caption", "N_prompt")
    assert "give a prompt" not in err
    assert not (tmp_path / "run").exists()


def test_a_negative_learning_rate_fails_before_loading_and_leaves_no_run_folder(uncaptioned, tmp_path, capsys):
    assert main(["train", "finetune", "--data", str(uncaptioned), "--out", str(tmp_path / "run"),
                 "--resolution", "32", "--device", "cpu", "--learning-rate", "-1"]) == 2
    _one_line(capsys, "--learning-rate must be > 0, got -1")
    assert not (tmp_path / "run").exists()


# --- 6. files written atomically get the mode a plain open() gives -----------------------------------------------

def _writers():
    from minisd.annotators.openpose import Keypoints, write_keypoints
    from minisd.cli.caption import write_atomic
    return {
        "save_png (images)": lambda p: save_png(Image.new("RGB", (8, 8)), p, "x"),
        "atomic_write (models, checkpoints)": lambda p: atomic_write(str(p), lambda t: open(t, "wb").write(b"1")),
        "caption's write_atomic": lambda p: write_atomic(p, "a caption"),
        "write_keypoints": lambda p: write_keypoints(str(p), Keypoints((), 8, 8)),
    }


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writers_give_the_mode_of_a_plain_open(tmp_path, mask):
    previous = os.umask(mask)
    try:
        open(tmp_path / "plain", "w").close()
        for name, write in _writers().items():
            write(tmp_path / name)
    finally:
        os.umask(previous)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~mask and want != 0o600          # the comparison can fail: mkstemp gives 0600
    assert {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) for name in _writers()} == \
        {name: oct(want) for name in _writers()}


# --- 11-13. seeds and img2img as A1111 has them ------------------------------------------------------------------

def _printed_seed(capsys):
    return int(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("seed "))[5:])


def test_seed_minus_one_is_a_random_seed_printed_recorded_and_reproducible(tmp_path, capsys):
    assert main(["generate", "a red circle", "--seed", "-1", "--out", str(tmp_path / "a.png"), *TINY]) == 0
    seed = _printed_seed(capsys)
    assert seed >= 0 and parse_a1111_parameters(read_png_parameters(tmp_path / "a.png"))["Seed"] == str(seed)
    assert main(["generate", "a red circle", "--seed", str(seed), "--out", str(tmp_path / "b.png"), *TINY]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)
    capsys.readouterr()
    assert main(["generate", "x", "--seed", "-2", "--out", str(tmp_path / "c.png"), *TINY]) == 2
    _one_line(capsys, "--seed must be >= 0, or -1")


def test_img2img_strength_defaults_to_075_and_width_height_resize_the_init_image(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(init)
    assert main(["img2img", "x", "--init-image", str(init), "--width", "32", "--height", "48", "--steps", "4",
                 "--seed", "1", "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 0
    params = parse_a1111_parameters(read_png_parameters(tmp_path / "o.png"))
    assert params["Denoising strength"] == "0.75" and params["Size"] == "32x48"
    assert Image.open(tmp_path / "o.png").size == (32, 48)
    assert init.stat().st_size and Image.open(init).size == (40, 24)         # the user's file is untouched


# --- 9. checkpoints at the defaults: every N that fits and the last step, each one logged -------------------------

def test_a_checkpoint_is_written_at_the_last_step_even_past_n_and_each_is_logged(tmp_path):
    """The defaults (checkpoint every 500 steps, 400 steps) in small: every 5 steps, 4 steps."""
    net, loss_fn = _toy()
    lines = []
    train(net, dict(net.named_parameters()), loss_fn, TrainConfig(steps=4, lr=1e-2, checkpoint_every=5), tmp_path,
          "toy", log=lines.append)
    assert torch.load(tmp_path / "toy.ckpt.pt", weights_only=True)["step"] == 4
    net, loss_fn = _toy()
    lines = []
    train(net, dict(net.named_parameters()), loss_fn, TrainConfig(steps=12, lr=1e-2, checkpoint_every=5),
          tmp_path / "b", "toy", log=lines.append)
    assert [line.split(" written")[0] for line in lines if line.startswith("checkpoint")] == \
        ["checkpoint of step 5", "checkpoint of step 10", "checkpoint of step 12"]


# --- 10. one run at a time in a run folder -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    from _train_refs import image_folder
    return image_folder(tmp_path_factory.mktemp("captioned"), 2, seed=0, captions=["a red circle"])


def test_a_second_run_into_a_busy_out_is_one_line_naming_the_first_process(captioned, tmp_path, capsys):
    from minisd.folder_lock import folder_lock
    out = tmp_path / "run"
    with folder_lock(out, "training run"):                 # the first run, as far as the lock can tell
        assert main(["train", "finetune", "--data", str(captioned), "--out", str(out), "--resolution", "32",
                     "--max-train-steps", "1", "--device", "cpu"]) == 2
        assert sorted(p.name for p in out.iterdir()) == [".lock"]       # the second wrote nothing
    _one_line(capsys, f"in use by another training run (process {os.getpid()})")


def test_a_run_rejected_after_taking_the_lock_leaves_no_folder(junk, captioned, tmp_path, capsys):
    assert main(["train", "finetune", "--data", str(captioned), "--out", str(tmp_path / "run"), "--model", junk,
                 "--resolution", "32", "--device", "cpu"]) == 2
    _one_line(capsys, "not a checkpoint")
    assert not (tmp_path / "run").exists()


# --- 7. the LoRAs an image used are in its PNG parameters, as A1111 writes them ------------------------------------

def _a1111_lora_hash(path):
    """A1111's modules/hashes.py addnet_hash_safetensors, written from its source: sha256 of what follows the
    8-byte header length and the header, first 12 hex digits (its shorthash)."""
    import hashlib
    data = open(path, "rb").read()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_a_lora_flag_is_recorded_as_a_prompt_tag_and_a_hash_and_the_tag_remakes_the_image(tmp_path):
    from test_lora import random_lora
    from minisd import lora
    from minisd.config import TINY as TINY_CONFIG
    (tmp_path / "loras").mkdir()
    path = tmp_path / "loras" / "arcane.safetensors"
    lora.save_kohya(path, random_lora(TINY_CONFIG, seed=3))
    assert main(["generate", "a red circle", "--lora", f"{path}:0.8", "--seed", "5", "--out",
                 str(tmp_path / "flag.png"), *TINY]) == 0
    params = parse_a1111_parameters(read_png_parameters(tmp_path / "flag.png"))
    assert params["Prompt"] == "a red circle <lora:arcane:0.8>"
    assert params["Lora hashes"] == f"arcane: {_a1111_lora_hash(path)}"
    # the recorded prompt, given back with the LoRA folder (as A1111 reads it), makes the same image
    assert main(["generate", params["Prompt"], "--lora-dir", str(tmp_path / "loras"), "--seed", "5", "--out",
                 str(tmp_path / "tag.png"), *TINY]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("flag.png", "tag.png"))
    assert np.abs(a - b).max() <= 1          # merged once vs per prompt: the last bits of the weights may differ
    assert main(["generate", "a red circle", "--seed", "5", "--out", str(tmp_path / "base.png"), *TINY]) == 0
    base = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.int16)
    assert np.abs(a - base).max() > 10       # the LoRA shows: the equality above could fail


# --- 5. eval finds the metrics' weights before its first image --------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--metrics", "clip"], "the clip metric needs --clip-weights"),
    (["--metrics", "clip", "--clip-weights", "nope.safetensors"], "--clip-weights nope.safetensors: no such file"),
    (["--metrics", "is", "--inception-weights", "nope.pth"], "Inception weights file nope.pth does not exist"),
])
def test_eval_checks_the_metrics_weights_before_the_first_image(tmp_path, capsys, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["eval", "--prompts", str(prompts), "--num-images", "1", "--out", str(tmp_path / "run"),
                 *TINY, *extra]) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "run" / "images").exists()


# --- 8, 14. help texts and --version -------------------------------------------------------------------------------

def _help(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())            # argparse's line wrapping undone


def test_train_help_shows_defaults_and_each_methods_own_output(capsys):
    finetune = _help(capsys, "train", "finetune")
    assert "--train-batch-size TRAIN_BATCH_SIZE (default: 1)" in finetune
    assert "--checkpointing-steps CHECKPOINTING_STEPS write the resumable checkpoint every N steps, and always at " \
           "the last step (default: 500)" in finetune
    assert "(default: None)" not in finetune and "(default: False)" not in finetune
    assert "run folder: model.safetensors" in finetune
    assert "model.safetensors" not in _help(capsys, "train", "lora").split("--out OUT")[1].split("--model")[0]
    ti = _help(capsys, "train", "textual-inversion")
    assert "learned_embeds.safetensors" in ti and "--save-format" not in ti


def test_textual_inversion_refuses_save_format_which_it_would_ignore(tmp_path, capsys):
    """It always writes both files (diffusers' learned_embeds and A1111's), so the flag would change nothing."""
    with pytest.raises(SystemExit) as e:
        main(["train", "textual-inversion", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--token", "<t>",
              "--init-token", "toy", "--save-format", "diffusers"])
    assert e.value.code == 2
    _one_line(capsys, "--save-format is not supported: minisd train textual-inversion has no such flag")


def test_version_is_the_packages(capsys):
    import tomllib
    from pathlib import Path
    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minisd {version}"


# --- 1. threads -----------------------------------------------------------------------------------------------------

def test_generate_takes_threads_and_runs_the_tiny_model_on_one_by_default(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["generate", "x", "--seed", "1", "--out", str(tmp_path / "a.png"), *TINY]) == 0
        assert torch.get_num_threads() == 1
        # --threads is set before anything loads (a missing LoRA then stops the run before it costs anything)
        assert main(["generate", "x", "--threads", "2", "--lora", str(tmp_path / "nope.safetensors"), *TINY]) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
