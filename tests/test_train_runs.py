"""Training runs as users manage them (issue 31): live curves (--report-to), snapshots and checkpoints kept, two
learning rates and the optimizer flags, --num-train-epochs, and what a run does when it is stopped (SIGTERM,
SIGUSR1), diverges (a non-finite loss) or cannot write (disk full, a diffusers folder included), and the example
command lines of diffusers' READMEs, pasted and run.

The command-line runs are on the tiny built-in model at 32 px, 3 steps, one thread; the loop's own behaviour is
shown on a toy problem (tests/test_train.py's) in milliseconds. The two-group parity against diffusers is in
test_finetune.py (it shares that file's model).
"""
import dataclasses
import errno
import importlib
import json
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_refs import image_folder
from minisd.cli import main
from minisd.cli.train import NOT_SUPPORTED, ours
from minisd.train import fit as fit_mod, loop
from minisd.train.loop import NonFiniteLoss, Stopped, TrainConfig, WriteFailed, train
from weights_convert import detect

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _messages(capsys):
    """The lines minisd printed to stderr (not the progress bar's)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("minisd:")]


def _state(path):
    return detect.read(str(path), verbose=False).state


def _command(data, out, *extra):
    """The run every command-line test here makes (or continues): finetune with the text encoder at its own rate,
    an EMA of the weights, a snapshot every step (the newest 2 kept), a checkpoint every step (the newest 2 kept),
    validation images at steps 2 and 3, TensorBoard."""
    return ["train", "finetune", "--data", str(data), "--out", str(out), "--resolution", "32", "--max-train-steps",
            "3", "--learning-rate", "1e-4", "--train-text-encoder", "--text-encoder-lr", "2e-5", "--device", "cpu",
            "--use-ema", "--report-to", "tensorboard", "--save-model-steps", "1", "--save-last-n", "2",
            "--checkpointing-steps", "1", "--checkpoints-total-limit", "2", "--validation-prompt", "a red circle", "--validation-steps", "2",
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data"), 2, seed=2, captions=["a red circle", "a blue square"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """One uninterrupted run of _command: its folder."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert main(_command(data, out)) == 0
    return out


# --- 1. live curves ------------------------------------------------------------------------------------------------

def _tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "logs" / "finetune"), size_guidance={"scalars": 0, "images": 0})
    return events.Reload()


def test_tensorboard_reads_back_every_logged_loss_and_rate_of_train_log(straight):
    log = [e for e in _lines(straight / "train_log.jsonl") if "loss" in e]
    events = _tensorboard(straight)
    assert {"loss", "lr", "lr/text_encoder", "seconds"} <= set(events.Tags()["scalars"])
    for tag in ("loss", "lr", "lr/text_encoder", "seconds"):
        read = [(s.step, s.value) for s in events.Scalars(tag)]
        # event files hold float32: each value is the log's, rounded once to float32
        assert read == [(e["step"], float(np.float32(e[tag]))) for e in log], tag
    assert [e["lr/text_encoder"] for e in log] == [2e-5] * 3 and [e["lr"] for e in log] == [1e-4] * 3
    assert len({e["loss"] for e in log}) == 3


def _png(path_or_bytes):
    import io
    from PIL import Image
    with Image.open(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes) as image:
        return np.asarray(image.convert("RGB"))


def test_tensorboard_shows_the_validation_images_of_each_validation_step(straight):
    events = _tensorboard(straight)
    images = events.Images("validation/0")
    assert [i.step for i in images] == [2, 3]
    for i in images:                     # PNG in the event file: the pixels of the sample, exactly
        assert np.array_equal(_png(i.encoded_image_string), _png(straight / "samples" / f"step-{i.step:06d}-0.png"))
    assert [e["step"] for e in _lines(straight / "train_log.jsonl") if "validation" in e] == [2]   # 3: result.json


def _wandb_records(run_folder):
    """The records of an offline wandb run, as (type, wandb_internal_pb2.Record): its .wandb file is a
    LevelDB-style log (7-byte file header; 32 KiB blocks of records with a 7-byte header: crc32, length, type 1
    full / 2 first / 3 middle / 4 last) of Record messages, read here with the client's own protobuf classes (the
    client's Python reader, wandb.sdk.internal.datastore, is gone from wandb 0.2x's Go-core releases)."""
    from wandb.proto import wandb_internal_pb2
    (path,) = Path(run_folder).glob("run-*.wandb")
    data, pos, part, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            records.append((record.WhichOneof("record_type"), record))
    return records


def _wandb_history(run_folder):
    """The history rows ({key: value}) of an offline wandb run."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for kind, r in _wandb_records(run_folder) if kind == "history"]


def _wandb_config(run_folder):
    """The run's config as wandb.init got it (the run record), with later updates (config records)."""
    config = {}
    for kind, r in _wandb_records(run_folder):
        for item in r.run.config.update if kind == "run" else r.config.update if kind == "config" else ():
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def test_a_wandb_run_offline_holds_the_losses_the_images_and_the_config_of_the_run(tmp_path, data, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    out = tmp_path / "run"
    assert main(["train", "finetune", "--data", str(data), "--out", str(out), "--resolution", "32",
                 "--max-train-steps", "2", "--device", "cpu", "--report-to", "wandb",
                 "--tracker-project-name", "runs-test", "--validation-prompt", "a red circle",
                 "--validation-prompt", "a blue square", "--validation-steps", "1"]) == 0
    (folder,) = (out / "wandb").glob("offline-run-*")
    history = _wandb_history(folder)
    log = [e for e in _lines(out / "train_log.jsonl") if "loss" in e]
    assert [(row["_step"], row["loss"], row["lr"]) for row in history if "loss" in row] == [
        (e["step"], e["loss"], e["lr"]) for e in log]
    # the validation images of steps 1 and 2 (the last), each prompt's with its caption, the samples' pixels
    shown = [(row["_step"], row["validation/captions"], row["validation/filenames"]) for row in history
             if "validation/filenames" in row]
    assert [(step, captions) for step, captions, _ in shown] == [(1, ["a red circle", "a blue square"]),
                                                                 (2, ["a red circle", "a blue square"])]
    for step, _, files in shown:
        for i, name in enumerate(files):
            assert np.array_equal(_png(folder / "files" / name), _png(out / "samples" / f"step-{step:06d}-{i}.png"))
    # the config: the run's settings, as args.json holds them
    config = {k: v for k, v in _wandb_config(folder).items() if not k.startswith("_")}
    assert config == json.loads((out / "args.json").read_text())
    assert config["validation_prompts"] == ["a red circle", "a blue square"] and config["max_train_steps"] == 2


def test_a_missing_tracker_is_one_line_naming_the_pip_command(tmp_path, data, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert main(["train", "finetune", "--data", str(data), "--out", str(tmp_path / "o"), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "minisd[wandb]"' in err[0], err


# --- 2. snapshots and checkpoints kept -----------------------------------------------------------------------------

def test_snapshots_hold_the_weights_of_their_step_and_only_the_newest_are_kept(straight):
    assert sorted(p.name for p in straight.glob("model-step*")) == ["model-step000002.safetensors",
                                                                    "model-step000003.safetensors"]
    snapshots = [e for e in _lines(straight / "train_log.jsonl") if "snapshot" in e]
    assert [e["step"] for e in snapshots] == [1, 2, 3]        # listed as written; step 1's deleted since
    # the snapshot of step 2 holds the EMA weights the (kept) checkpoint of step 2 holds, in the official layout
    ckpt = torch.load(straight / "checkpoints" / "finetune-step000002.ckpt.pt", weights_only=True)
    snapshot = _state(straight / "model-step000002.safetensors")
    assert any(k.startswith("text_encoder.") for k in ckpt["ema"])
    assert all(torch.equal(snapshot[k], v) for k, v in ckpt["ema"].items())
    assert not torch.equal(ckpt["ema"]["unet.out.2.weight"], ckpt["params"]["unet.out.2.weight"])
    final = _state(straight / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in _state(straight / "model-step000003.safetensors").items())
    assert not torch.equal(final["unet.out.2.weight"], snapshot["unet.out.2.weight"])


def test_checkpoints_total_limit_keeps_the_newest_resumable_checkpoints(straight):
    folder = straight / "checkpoints"
    assert sorted(os.listdir(folder)) == ["finetune-step000002.ckpt.pt", "finetune.ckpt.pt"]
    assert torch.load(folder / "finetune.ckpt.pt", weights_only=True)["step"] == 3
    assert torch.load(folder / "finetune-step000002.ckpt.pt", weights_only=True)["step"] == 2


# --- 3. optimizer flags and epochs ---------------------------------------------------------------------------------

def test_the_optimizer_flags_fill_the_loops_settings():
    from minisd.cli import build_parser
    from minisd.cli.train import config_from_args
    from minisd.train.settings import train_config
    args = build_parser().parse_args(["train", "lora", "--data", "d", "--out", "o", "--adam-beta1", "0.8",
                                      "--adam-beta2", "0.95", "--adam-weight-decay", "0.1", "--adam-epsilon", "1e-6",
                                      "--max-grad-norm", "0", "--use-ema", "--ema-decay", "0.99",
                                      "--lr-scheduler", "polynomial", "--lr-power", "2", "--unet-lr", "3e-4",
                                      "--text-encoder-lr", "1e-5", "--train-text-encoder"])
    cfg = config_from_args(args)
    t = train_config(cfg, "lora_te_")
    assert (t.betas, t.weight_decay, t.adam_eps, t.grad_clip, t.ema_decay, t.lr_power, t.lr) == (
        (0.8, 0.95), 0.1, 1e-6, 0.0, 0.99, 2.0, 3e-4)
    assert t.lr_scales == (("lora_te_", 1e-5 / 3e-4, "text_encoder"),)
    assert cfg.max_train_steps == 400                         # the method's default when neither is given


def test_num_train_epochs_gives_the_steps_diffusers_computes(capsys):
    from minisd.cli import build_parser
    from minisd.cli.train import config_from_args
    from minisd.train.batches import Stream
    from minisd.train.dreambooth import DreamBoothConfig
    lines = []
    cfg = DreamBoothConfig(out="o", num_train_epochs=3, train_batch_size=2, gradient_accumulation_steps=2)
    streams = [Stream(list(range(5)), 0), Stream(list(range(9)), 1)]     # entries() only counts the examples
    for s in streams:
        s.examples = [type("E", (), {"repeats": 1})() for _ in s.examples]
    steps = fit_mod.epochs_to_steps(cfg, streams, lines.append).max_train_steps
    # diffusers: len(dataset) = max(instances, class images) with prior preservation; len(dataloader) =
    # ceil(len / batch); num_update_steps_per_epoch = ceil(len(dataloader) / accumulation); x epochs
    assert steps == 3 * -(-(-(-9 // 2)) // 2) == 9
    assert "9 steps" in lines[0]
    args = build_parser().parse_args(["train", "finetune", "--data", "d", "--out", "o", "--num-train-epochs", "2",
                                      "--max-train-steps", "7"])
    cfg = config_from_args(args)
    assert (cfg.max_train_steps, cfg.num_train_epochs) == (7, None)     # as diffusers: the steps win, and it says so
    assert "wins over --num-train-epochs" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--text-encoder-lr", "1e-5"], "--text-encoder-lr is the rate of the text encoder"),
    (["--save-last-n", "2"], "give that too"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1)"),
    (["--lr-power", "2"], "does not use lr_power"),
    (["--checkpoints-total-limit", "0"], "--checkpoints-total-limit must be >= 1"),
])
def test_bad_settings_are_one_line_before_training(tmp_path, data, capsys, args, message):
    assert main(["train", "finetune", "--data", str(data), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


# --- 5. stopped, diverged, disk full -------------------------------------------------------------------------------

def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_resumed_run_ends_bit_identical(
        tmp_path, data, straight, monkeypatch, capsys):
    """SIGTERM arrives during step 2 (sent from inside its loss): the step finishes, the checkpoint of step 2 is
    written, one line names --resume, the status is 128 + 15; resumed, the run ends with the straight run's bits,
    and TensorBoard's curves hold each step once."""
    calls = []
    step_loss = fit_mod.step_loss

    def loss_sending_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_loss(*args, **kwargs)
    monkeypatch.setattr(fit_mod, "step_loss", loss_sending_sigterm)
    out = tmp_path / "stopped"
    assert main(_command(data, out)) == 128 + signal.SIGTERM
    err = _messages(capsys)
    assert len(err) == 1 and "SIGTERM after step 2" in err[0] and "--resume" in err[0], err
    assert torch.load(out / "checkpoints" / "finetune.ckpt.pt", weights_only=True)["step"] == 2
    assert not (out / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL          # the handler is put back

    monkeypatch.setattr(fit_mod, "step_loss", step_loss)
    assert main(_command(data, out, "--resume")) == 0
    a, b = _state(straight / "model.safetensors"), _state(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in _lines(out / "train_log.jsonl") if "loss" in e] == [1, 2, 3]
    assert [s.step for s in _tensorboard(out).Scalars("loss")] == [1, 2, 3]

    # then a write that fails (disk full) is one line, and the model file there stays whole
    def full_disk(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fit_mod, "write_safetensors", full_disk)
    before = (out / "model.safetensors").read_bytes()
    assert main(["train", "finetune", "--data", str(data), "--out", str(out), "--resolution", "32",
                 "--max-train-steps", "4", "--learning-rate", "1e-4", "--train-text-encoder", "--device", "cpu",
                 "--text-encoder-lr", "2e-5", "--resume"]) == 2
    err = _messages(capsys)
    assert len(err) == 1 and "No space left on device" in err[0] and "model.safetensors" in err[0], err
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(out.glob("*.tmp"))


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_diffusers_folder_is_replaced_whole_or_not_at_all(tmp_path, data, monkeypatch, capsys):
    """--save-format diffusers: the folder OUT/model of a 1-step run; the resumed run's write fails (disk full in
    its second weights file): one line, the previous folder is as it was, byte for byte, and nothing temporary is
    left; resumed again, the new folder takes its place whole."""
    from weights_convert import diffusers as diffusers_layout
    out = tmp_path / "run"

    def command(steps, *extra):
        return ["train", "finetune", "--data", str(data), "--out", str(out), "--resolution", "32", "--device", "cpu",
                "--learning-rate", "1e-4", "--save-format", "diffusers", "--max-train-steps", str(steps), *extra]
    assert main(command(1)) == 0
    before = _files(out / "model")
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= before.keys()

    write_safetensors, calls = diffusers_layout.write_safetensors, []

    def full_disk(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_safetensors(path, *args, **kwargs)
    monkeypatch.setattr(diffusers_layout, "write_safetensors", full_disk)
    capsys.readouterr()
    assert main(command(2, "--resume")) == 2
    err = _messages(capsys)
    assert len(err) == 1 and "No space left on device" in err[0] and str(out / "model") in err[0], err
    assert len(calls) == 2 and _files(out / "model") == before
    assert not [n for n in os.listdir(out) if n.startswith(".model.")]       # .model.new.XXXX, .model.old.XXXX

    monkeypatch.setattr(diffusers_layout, "write_safetensors", write_safetensors)
    assert main(command(2, "--resume")) == 0
    after = _files(out / "model")
    assert after.keys() == before.keys() and after != before
    assert not [n for n in os.listdir(out) if n.startswith(".model.")]       # .model.new.XXXX, .model.old.XXXX
    ckpt = torch.load(out / "checkpoints" / "finetune.ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and torch.equal(_state(out / "model")["unet.out.2.weight"],
                                             ckpt["params"]["unet.out.2.weight"])


def _toy():
    from test_train import _toy_problem
    return _toy_problem()


@pytest.mark.parametrize("command, module, function", [
    ("train-tiny", "minisd.train.tiny", "train_tiny"),
    ("train-tiny-controlnet", "minisd.train.tiny_controlnet", "train_tiny_controlnet")])
def test_a_stopped_tiny_recipe_says_to_run_the_same_command_which_has_no_resume_flag(
        tmp_path, monkeypatch, capsys, command, module, function):
    """The tiny recipes pick up their folder's checkpoints by themselves: the stop line must not name --resume,
    which these commands refuse (argparse); the status is 128 + 15, without a traceback."""
    def stopped(*args, **kwargs):
        raise Stopped(signal.SIGTERM, 7, str(tmp_path / "unet.ckpt.pt"))
    monkeypatch.setattr(importlib.import_module(module), function, stopped)
    assert main([command, "--out", str(tmp_path)]) == 128 + signal.SIGTERM
    err = _messages(capsys)
    assert len(err) == 1 and "SIGTERM after step 7" in err[0] and "run the same command to continue" in err[0], err
    assert "--resume" not in err[0]


def test_sigusr1_in_the_loop_stops_with_a_checkpoint_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=12, lr=1e-2, checkpoint_every=5)
    net, loss_fn = _toy()
    straight = train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path / "a", "toy", log=lambda *_: None)
    net, loss_fn = _toy()

    def signalled(k, generator):
        if k == 6:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss_fn(k, generator)
    with pytest.raises(Stopped) as stopped:
        train(net, dict(net.named_parameters()), signalled, cfg, tmp_path / "b", "toy", log=lambda *_: None)
    assert stopped.value.step == 7 and stopped.value.signum == signal.SIGUSR1
    assert torch.load(tmp_path / "b" / "toy.ckpt.pt", weights_only=True)["step"] == 7
    net, loss_fn = _toy()
    resumed = train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path / "b", "toy", log=lambda *_: None)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2)
    net, loss_fn = _toy()

    def diverging(k, generator):
        loss = loss_fn(k, generator)
        return loss * float("nan") if k == 4 else loss
    with pytest.raises(NonFiniteLoss, match=r"the loss of step 5 is nan.*toy\.ckpt\.pt, is of step 4"):
        train(net, dict(net.named_parameters()), diverging, cfg, tmp_path, "toy", log=lambda *_: None)
    params = torch.load(tmp_path / "toy.ckpt.pt", weights_only=True)["params"]
    assert all(torch.isfinite(p).all() for p in params.values())
    assert all(torch.isfinite(p).all() for p in net.parameters())      # the optimizer never used it


def test_fp16_steps_the_loss_scaler_skips_are_logged_not_fatal(tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, checkpoint_every=10, mixed_precision="fp16", ema_decay=0)
    net, loss_fn = _toy()

    def overflowing(k, generator):
        loss = loss_fn(k, generator)
        return loss * float("inf") if k == 1 else loss
    train(net, dict(net.named_parameters()), overflowing, cfg, tmp_path, "toy", log=lambda *_: None,
          log_path=tmp_path / "log.jsonl")
    # (the first step may overflow too: the scaler starts at 2^16, which it halves until the gradients fit fp16)
    assert [e.get("skipped", False) for e in _lines(tmp_path / "log.jsonl")][1:] == [True, False, False]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=4, lr=1e-2, checkpoint_every=2)
    net, loss_fn = _toy()
    save = torch.save
    calls = []

    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 2:
            save(obj, f)                  # most of it, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(obj, f)
    monkeypatch.setattr(loop.torch, "save", full_disk)
    with pytest.raises(WriteFailed, match=r"could not write .*toy\.ckpt\.pt: No space left on device"):
        train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path, "toy", log=lambda *_: None)
    assert os.listdir(tmp_path) == ["toy.ckpt.pt"]
    assert torch.load(tmp_path / "toy.ckpt.pt", weights_only=True)["step"] == 2


# --- 2. choosing a snapshot: minisd eval over several models -------------------------------------------------------

def test_eval_scores_every_snapshot_in_a_row_of_its_own_and_names_the_best(tmp_path, straight, capsys):
    from minisd.tiny import shapes
    (tmp_path / "prompts.txt").write_text("a red circle on a blue background\na green square on a yellow background\n")
    shapes.write_image_folder(tmp_path / "real", 8, seed=1)
    common = ["eval", "--prompts", str(tmp_path / "prompts.txt"), "--num-images", "2", "--steps", "2",
              "--features", "tiny", "--ref", str(tmp_path / "real"), "--metrics", "fid,adherence", "--device", "cpu"]
    pattern = str(straight / "model-step*.safetensors")
    assert main([*common, "--model", pattern, "--out", str(tmp_path / "all")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    snapshots = [str(straight / f"model-step{s:06d}.safetensors") for s in (2, 3)]
    table = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert [row["model"] for row in table["candidates"]] == snapshots and table["metric"] == "fid"
    assert [line.split()[0] for line in lines[-3:-1]] == snapshots                     # one row each, in order
    for line, row in zip(lines[-3:-1], table["candidates"]):
        assert line.split()[1:] == [f"fid={row['fid']:.6f}", f"adherence={row['adherence']:.6f}"]
    best = min(table["candidates"], key=lambda row: row["fid"])["model"]
    assert lines[-1] == f"best={best}" and table["best"] == best

    # each snapshot's images are its own, and its row is what evaluating it alone gives
    assert main([*common, "--model", snapshots[1], "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert (alone["fid"], alone["adherence"]) == (table["candidates"][1]["fid"], table["candidates"][1]["adherence"])
    names = sorted(p.name for p in (tmp_path / "alone" / "images").iterdir())
    for name in names:
        assert ((tmp_path / "all" / "model-step000003" / "images" / name).read_bytes()
                == (tmp_path / "alone" / "images" / name).read_bytes())
    assert any((tmp_path / "all" / "model-step000002" / "images" / name).read_bytes()
               != (tmp_path / "alone" / "images" / name).read_bytes() for name in names)


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_torchrun_job_stops_every_process_after_the_same_step(tmp_path, data):
    """Two processes under torchrun; SIGTERM to one of them once the first checkpoint is written: both stop after
    the same step (one checkpoint, one line naming --resume, a non-zero status), and the job resumed with torchrun
    ends bit-identical to an uninterrupted two-process job."""
    import subprocess
    import sys
    import time
    from test_distributed import ENV, ROOT

    def command(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "minisd",
                "train", "finetune", "--data", str(data), "--out", str(out), "--resolution", "32",
                "--max-train-steps", "12", "--learning-rate", "1e-4", "--checkpointing-steps", "1", "--device", "cpu",
                *extra]
    subprocess.run(command(tmp_path / "straight"), env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=600)
    out = tmp_path / "stopped"
    ckpt = out / "checkpoints" / "finetune.ckpt.pt"
    job = subprocess.Popen(command(out), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ckpt.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = [int(p) for t in Path(f"/proc/{job.pid}/task").iterdir()
               for p in (t / "children").read_text().split()]
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("minisd: stopped by SIGTERM")]
    assert len(lines) == 1 and "--resume" in lines[0], err[-2000:]
    step = torch.load(ckpt, weights_only=True)["step"]
    assert f"after step {step};" in lines[0] and 1 <= step < 12, (step, lines)
    subprocess.run(command(out, "--resume"), env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=600)
    a, b = _state(tmp_path / "straight" / "model.safetensors"), _state(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    print(f"[sigterm] one of two processes signalled; both stopped after step {step}; resumed bit-identical")


# --- 4. LoRA with gradient checkpointing ---------------------------------------------------------------------------

def test_lora_with_gradient_checkpointing_has_the_gradients_of_the_step_without_it():
    """U-Net and text encoder, both checkpointed: the factors' gradients with W' installed (what `minisd train lora
    --gradient-checkpointing` does) equal those without checkpointing within 1e-6 relative; checkpointing through
    functional_call, which puts W back before the recomputation, does not (the comparison can fail)."""
    from minisd import lora
    from minisd.diffusion import alphas_cumprod_from_betas, scaled_linear_betas
    from minisd.model import load_model, tiny_model_path
    from minisd.train import lora as lora_train
    from minisd.train.step import draw, install, step_loss, uninstall
    model = load_model(tiny_model_path(), verbose=False).requires_grad_(False)
    n_params = len(list(model.parameters()))
    mc = model.config
    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas(mc.beta_start, mc.beta_end, mc.num_timesteps))
    cfg = lora_train.LoRAConfig(out="x", train_text_encoder=True, rank=2, alpha=4.0)
    g = torch.Generator().manual_seed(1)
    params = {}
    for name, f in lora_train.initial_factors(mc, cfg, torch.Generator().manual_seed(0)).items():
        params[f"{name}.down"] = torch.nn.Parameter(f.down)
        params[f"{name}.up"] = torch.nn.Parameter(0.01 * torch.randn(f.up.shape, generator=g))   # both get gradients
    factors = {n[:-5]: lora.Factors(params[n], params[n[:-5] + ".up"], cfg.alpha)
               for n in params if n.endswith(".down")}
    assert any(n.startswith("lora_te_") for n in factors)
    moments = (torch.randn(2, 4, 8, 8, generator=g), torch.full((2, 4, 8, 8), -3.0))
    tokens = model.tokenizer(["a red circle on a blue background", "two green squares"])
    d = draw(g, (2, 4, 8, 8), mc.num_timesteps)

    def gradients(checkpointing, installed_w):
        model.train()
        model.unet.gradient_checkpointing = model.text_encoder.gradient_checkpointing = checkpointing
        for p in params.values():
            p.grad = None
        merged, installed = lora_train.merged_weights(model, factors), {}
        if installed_w:
            install(model, merged, installed)
        step_loss(model, None, moments, tokens, d, alphas_cumprod, cfg, None,
                  replaced=None if installed_w else merged).backward()
        uninstall(model, installed)
        return {k: p.grad.clone() for k, p in params.items()}

    def error(a, b):
        return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)
    plain = gradients(False, False)
    assert error(plain, gradients(True, True)) <= 1e-6
    try:                          # recomputed with W: torch's checkpoint notices other values, or other gradients
        wrong = error(plain, gradients(True, False))
    except torch.utils.checkpoint.CheckpointError:
        wrong = float("inf")
    assert wrong > 1e-3
    assert all(isinstance(p, torch.nn.Parameter) for _, p in model.named_parameters())
    assert len(list(model.parameters())) == n_params                   # every W back in place


def test_train_lora_with_gradient_checkpointing_writes_the_lora_of_the_run_without_it(tmp_path, data):
    """Two steps with the text encoder and a validation image between them (W' taken out and put back)."""
    from safetensors.torch import load_file

    def lora_file(out, *extra):
        assert main(["train", "lora", "--data", str(data), "--out", str(tmp_path / out), "--resolution", "32",
                     "--max-train-steps", "2", "--train-text-encoder", "--device", "cpu", "--validation-prompt",
                     "a red circle", "--validation-steps", "1", *extra]) == 0
        return load_file(str(tmp_path / out / f"{out}.safetensors"))
    plain, checkpointed = lora_file("plain"), lora_file("checkpointed", "--gradient-checkpointing")
    assert plain.keys() == checkpointed.keys()
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert all(plain[k].any() for k in ups)                       # it trained (up starts at zero)
    err = max(((plain[k] - checkpointed[k]).norm() / plain[k].norm().clamp_min(1e-30)).item() for k in plain)
    assert err <= 1e-6, err


# --- 6. command lines pasted from diffusers' READMEs ---------------------------------------------------------------

# The example command lines of diffusers' READMEs (examples/dreambooth, text_to_image, textual_inversion; 0.3x), as
# users copy them: verbatim but for the paths, which are $-variables here. A user runs one with minisd by putting
# `minisd train METHOD` in place of `accelerate launch SCRIPT.py` (accelerate's own flags, here --mixed_precision,
# are minisd train's flags too: they stay). The test then swaps the numbers the tiny model cannot afford (TINY).
README = {
    "dreambooth": """accelerate launch train_dreambooth.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=5e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=400 \\
  --push_to_hub""",
    "dreambooth-prior-preservation": """accelerate launch train_dreambooth.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=5e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --num_class_images=200 \\
  --max_train_steps=800 \\
  --push_to_hub""",
    "text-to-image": """accelerate launch --mixed_precision="fp16"  train_text_to_image.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --dataset_name=$dataset_name \\
  --use_ema \\
  --resolution=512 --center_crop --random_flip \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --gradient_checkpointing \\
  --max_train_steps=15000 \\
  --learning_rate=1e-05 \\
  --max_grad_norm=1 \\
  --lr_scheduler="constant" --lr_warmup_steps=0 \\
  --output_dir="sd-naruto-model\"""",
    "text-to-image-folder": """accelerate launch --mixed_precision="fp16" train_text_to_image.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$TRAIN_DIR \\
  --use_ema \\
  --resolution=512 --center_crop --random_flip \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --gradient_checkpointing \\
  --max_train_steps=15000 \\
  --learning_rate=1e-05 \\
  --max_grad_norm=1 \\
  --lr_scheduler="constant" --lr_warmup_steps=0 \\
  --output_dir="sd-naruto-model\"""",
    "textual-inversion": """accelerate launch textual_inversion.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATA_DIR \\
  --learnable_property="object" \\
  --placeholder_token="<cat-toy>" \\
  --initializer_token="toy" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --max_train_steps=3000 \\
  --learning_rate=5.0e-04 \\
  --scale_lr \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --push_to_hub \\
  --output_dir="textual_inversion_cat\"""",
    "dreambooth-lora": """accelerate launch train_dreambooth_lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --checkpointing_steps=100 \\
  --learning_rate=1e-4 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=50 \\
  --seed="0" \\
  --push_to_hub""",
}
SCRIPTS = {"train_dreambooth.py": "dreambooth", "train_text_to_image.py": "finetune",
           "textual_inversion.py": "textual-inversion", "train_dreambooth_lora.py": "lora"}
# the flags of each command that minisd refuses (one line each), which the user then deletes
REFUSED = {"dreambooth": ["--push_to_hub"], "dreambooth-prior-preservation": ["--push_to_hub"],
           "text-to-image": [], "text-to-image-folder": [], "textual-inversion": ["--push_to_hub"],
           "dreambooth-lora": ["--validation_epochs", "--push_to_hub"]}
# the same runs in minisd's own spelling (before the swaps of TINY), $OUT the output folder
OURS = {
    "dreambooth": "--model $MODEL --instance-dir $INSTANCE --out $OUT --instance-prompt 'a photo of sks dog' "
                  "--resolution 512 --train-batch-size 1 --gradient-accumulation-steps 1 --learning-rate 5e-6 "
                  "--lr-scheduler constant --lr-warmup-steps 0 --max-train-steps 400",
    "dreambooth-prior-preservation":
        "--model $MODEL --instance-dir $INSTANCE --class-dir $CLASS --out $OUT --with-prior-preservation "
        "--class-prompt 'a photo of dog' "
        "--prior-loss-weight 1.0 --instance-prompt 'a photo of sks dog' --resolution 512 --train-batch-size 1 "
        "--gradient-accumulation-steps 1 --learning-rate 5e-6 --lr-scheduler constant --lr-warmup-steps 0 "
        "--num-class-images 200 --max-train-steps 800",
    "text-to-image": "--model $MODEL --dataset-name $DATASET --mixed-precision fp16 --use-ema --resolution 512 "
                     "--center-crop --random-flip --train-batch-size 1 --gradient-accumulation-steps 4 "
                     "--gradient-checkpointing --max-train-steps 15000 --learning-rate 1e-05 --max-grad-norm 1 "
                     "--lr-scheduler constant --lr-warmup-steps 0 --out $OUT",
    "text-to-image-folder": "--model $MODEL --data $TRAIN --mixed-precision fp16 --use-ema --resolution 512 "
                            "--center-crop --random-flip --train-batch-size 1 --gradient-accumulation-steps 4 "
                            "--gradient-checkpointing --max-train-steps 15000 --learning-rate 1e-05 "
                            "--max-grad-norm 1 --lr-scheduler constant --lr-warmup-steps 0 --out $OUT",
    "textual-inversion": "--model $MODEL --data $DATA --learnable-property object --token '<cat-toy>' "
                         "--init-token toy --resolution 512 --train-batch-size 1 --gradient-accumulation-steps 4 "
                         "--max-train-steps 3000 --learning-rate 5.0e-04 --scale-lr --lr-scheduler constant "
                         "--lr-warmup-steps 0 --out $OUT",
    "dreambooth-lora": "--model $MODEL --instance-dir $INSTANCE --out $OUT --instance-prompt 'a photo of sks dog' "
                       "--resolution 512 --train-batch-size 1 --gradient-accumulation-steps 1 "
                       "--checkpointing-steps 100 --learning-rate 1e-4 --report-to wandb --lr-scheduler constant "
                       "--lr-warmup-steps 0 --max-train-steps 500 --validation-prompt 'A photo of sks dog in a bucket' "
                       "--seed 0",
}
# the numbers swapped for the tiny model on the CPU: 32 px (the README's 512 px costs minutes), 2 steps, 2 class
# images; gradient accumulation is left as pasted (4 micro-batches a step for text-to-image and textual inversion)
TINY = {"resolution": "32", "max_train_steps": "2", "num_class_images": "2"}
# what each run writes into its folder besides args.json, result.json, train_log.jsonl and checkpoints/
WRITES = {"dreambooth": "model.safetensors", "finetune": "model.safetensors",
          "textual-inversion": "learned_embeds.safetensors cat-toy.safetensors", "lora": "out.safetensors"}


def _as_minisd(command):
    """`accelerate launch [its flags] SCRIPT.py FLAGS` -> `train METHOD [its flags] FLAGS`: the user's edit."""
    import shlex
    words = shlex.split(command.replace("\\\n", " "))            # the shell's line continuations, then its words
    script = next(w for w in words if w.endswith(".py"))
    at = words.index(script)
    assert words[:2] == ["accelerate", "launch"]
    return ["train", SCRIPTS[script], *words[2:at], *words[at + 1:]]


def _swap(words, paths, numbers):
    """$-variables -> paths, and the values of the flags in `numbers` (either spelling) swapped."""
    out, swap = [], {f"--{k}": v for k, v in numbers.items()} | {f"--{k.replace('_', '-')}": v
                                                                  for k, v in numbers.items()}
    for w in words:
        for variable in sorted(paths, key=len, reverse=True):      # $DATASET before $DATA
            w = w.replace(variable, paths[variable])
        flag = w.split("=", 1)[0]
        if flag in swap and "=" in w:
            w = f"{flag}={swap[flag]}"
        elif out and out[-1] in swap:
            w = swap[out[-1]]
        out.append(w)
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "text-to-image-folder" else n
                                  for n in README])          # the folder variant: one flag apart from the one before
def test_a_command_pasted_from_diffusers_readme_runs_and_gives_the_config_of_ours(name, tmp_path, data, capsys,
                                                                                  monkeypatch):
    """The pasted command (the flags minisd refuses, one line each, then deleted) trains 2 steps of the tiny model,
    writes its files, and its args.json is the config of the same run spelled minisd's way."""
    import shlex
    from minisd.cli import build_parser
    from minisd.cli.train import config_from_args
    from minisd.model import tiny_model_path
    for variable, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                            "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                            "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(variable, str(value))
    monkeypatch.chdir(tmp_path)                     # --output_dir="sd-naruto-model" is relative, as in the README
    dataset = image_folder(tmp_path / "dataset", 2, seed=3)  # diffusers' ImageFolder: metadata.jsonl's text column
    (dataset / "metadata.jsonl").write_text('{"file_name": "00.png", "text": "a red circle"}\n'
                                            '{"file_name": "01.png", "text": "a blue square"}\n')
    cat_toy = image_folder(tmp_path / "cat-toy", 2, seed=4)      # textual inversion: no captions, templates
    paths = {"$MODEL_NAME": str(tiny_model_path()), "$INSTANCE_DIR": str(data), "$CLASS_DIR": "class-images",
             "$OUTPUT_DIR": "out", "$TRAIN_DIR": str(data), "$DATA_DIR": str(cat_toy), "$dataset_name": str(dataset)}
    pasted = _swap(_as_minisd(README[name]), paths, TINY)
    method = pasted[1]

    if REFUSED[name]:                               # refused before anything is read or written
        with pytest.raises(SystemExit) as refused:
            main(pasted)
        assert refused.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"minisd: error: {flag} is not supported: {NOT_SUPPORTED[ours(flag)]}" for flag in REFUSED[name]]
        assert sorted(os.listdir(tmp_path)) == ["cat-toy", "dataset"]
    run = [w for w in pasted if w.split("=", 1)[0] not in REFUSED[name]]
    assert main(run) == 0
    out = tmp_path / json.loads(next(tmp_path.glob("*/args.json")).read_text())["out"]

    written = {"args.json", "result.json", "train_log.jsonl", "checkpoints", *WRITES[method].split()}
    assert written <= set(os.listdir(out)), sorted(os.listdir(out))
    assert [e["step"] for e in _lines(out / "train_log.jsonl") if "loss" in e] == [1, 2]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and Path(result["model"]).name == WRITES[method].split()[0]
    if "--class_data_dir=class-images" in run:
        assert len(list((tmp_path / "class-images").glob("*.png"))) == 2
    if "--report_to=wandb" in run:
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))

    ours_paths = {"$MODEL": str(tiny_model_path()), "$INSTANCE": str(data), "$CLASS": "class-images",
                  "$OUT": str(out.relative_to(tmp_path)), "$TRAIN": str(data), "$DATA": str(cat_toy),
                  "$DATASET": str(dataset)}
    spelled = ["train", method, *_swap(shlex.split(OURS[name]), ours_paths, TINY)]
    mine = config_from_args(build_parser().parse_args(spelled))
    args = json.loads((out / "args.json").read_text())
    assert (args.pop("method"), args.pop("processes")) == (method.replace("-", "_"), 1)
    assert args == json.loads(json.dumps(dataclasses.asdict(mine)))
    changed = config_from_args(build_parser().parse_args([*spelled, "--seed", "7"]))
    assert args != json.loads(json.dumps(dataclasses.asdict(changed)))       # the comparison can fail
