"""Training from Python (issue 31, section 7): `minisd.train.run(config)` with a method's config dataclass trains
as `minisd train METHOD` with the flags of the same names does, and returns the run's Result (its paths and the
figures of result.json); settings that cannot run are one-line errors before any model is loaded. And
`minisd train-tiny --report-to`: the recipe's four phases as one tracker run.

One DreamBooth run each way, on the tiny built-in model at 32 px, 2 steps, one thread; the tiny recipe 2 steps a
phase.
"""
import argparse
import json

import numpy as np
import pytest
from safetensors import safe_open

from _train_refs import image_folder
from minisd.cli import main
from minisd.model import tiny_model_path
from minisd.train import DreamBoothConfig, FinetuneConfig, LoRAConfig, Result, TextualInversionConfig, fit, run
from weights_convert import detect

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread

PROMPT = "a photo of sks square"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data"), 2, seed=3)


def _config(data, out):
    """The run both ways make: DreamBooth with the text encoder trained and one validation image at the end."""
    return DreamBoothConfig(out=str(out), instance_dir=str(data), instance_prompt=PROMPT, resolution=32,
                            max_train_steps=2, learning_rate=1e-3, train_text_encoder=True, device="cpu",
                            validation_prompts=("a sks square",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, one_thread):
    """(Result of the API's run, folder of the command line's run of the same settings)."""
    root = tmp_path_factory.mktemp("runs")
    result = run(_config(data, root / "api"), log=lambda *_: None)
    assert main(["train", "dreambooth", "--instance-dir", str(data), "--instance-prompt", PROMPT, "--resolution", "32",
                 "--max-train-steps", "2", "--learning-rate", "1e-3", "--train-text-encoder", "--device", "cpu",
                 "--validation-prompt", "a sks square", "--out", str(root / "cli")]) == 0
    return result, root / "cli"


def test_a_run_through_the_api_and_through_minisd_train_write_bit_identical_weights(runs):
    result, cli = runs
    api, by_cli = (detect.read(str(p), verbose=False).state for p in (result.model, cli / "model.safetensors"))
    assert api.keys() == by_cli.keys()
    assert [k for k in api if not api[k].equal(by_cli[k])] == []                    # names what differs, if any
    # the metadata too, but for what is each run's own: its times, its session id, its output folder's name
    own = ("ss_session_id", "ss_training_started_at", "ss_training_finished_at", "modelspec.date",
           "ss_output_name", "modelspec.title", "minisd_args")
    meta_api, meta_cli = (safe_open(str(p), "pt").metadata() for p in (result.model, cli / "model.safetensors"))
    assert {k: v for k, v in meta_api.items() if k not in own} == {k: v for k, v in meta_cli.items() if k not in own}
    assert len(meta_api) > len(own)
    # the comparison can fail: training moved the weights away from the tiny model's
    trained = detect.read(result.model, verbose=False).state
    start = detect.read(str(tiny_model_path()), verbose=False).state
    assert not all(trained[k].equal(start[k].to(trained[k].dtype)) for k in start if k in trained)
    images = [open(p, "rb").read() for p in result.validation]
    assert images == [(cli / "samples" / p.rsplit("/", 1)[1]).read_bytes() for p in result.validation]


def test_the_result_holds_the_run_folders_paths_and_the_figures_of_result_json(runs):
    result, _ = runs
    out = result.out
    with open(f"{out}/result.json") as f:
        written = json.load(f)
    with open(f"{out}/train_log.jsonl") as f:
        losses = [e["loss"] for e in map(json.loads, f) if "loss" in e]
    assert isinstance(result, Result) and result.method == "dreambooth"
    assert result.model == f"{out}/model.safetensors" == written["model"]
    assert result.log == f"{out}/train_log.jsonl"
    assert result.steps == 2 == len(losses) and result.last_loss == losses[-1]
    assert result.seconds == written["seconds"] > 0 and result.processes == 1
    assert result.validation == (f"{out}/samples/step-000002-0.png",) == tuple(written["validation"])


def _no_load(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("cfg, message", [
    (DreamBoothConfig(out="o", instance_dir="d", instance_prompt="p", max_train_steps="10"),
     r"^DreamBoothConfig.max_train_steps must be int, got '10'$"),
    (FinetuneConfig(out="o", data="d", use_ema=1), r"^FinetuneConfig.use_ema must be bool, got 1$"),
    (FinetuneConfig(out="o", data="d", train_batch_size=True),
     r"^FinetuneConfig.train_batch_size must be int, got True$"),
    (FinetuneConfig(out="o", data="d", resolution=64.0), r"^FinetuneConfig.resolution must be int or None, got 64.0$"),
    (FinetuneConfig(out="o", data="d", validation_prompts="a cat"),
     r"^FinetuneConfig.validation_prompts must be tuple, got 'a cat'$"),
    (TextualInversionConfig(out="", data="d", token="<w>", init_token="red"), r"^the run needs --out DIR"),
    (LoRAConfig(out="o", data="d", rank=0), r"^--rank must be >= 1, got 0$"),
    (FinetuneConfig(out="o", data="d", learning_rate=1, max_train_steps=0), r"^--max-train-steps must be >= 1"),
])
def test_a_bad_config_value_is_a_one_line_error_before_any_model_loads(cfg, message, monkeypatch):
    monkeypatch.setattr(fit, "load", _no_load)
    with pytest.raises(ValueError, match=message):
        run(cfg)


def test_run_takes_only_a_methods_config(monkeypatch):
    from minisd.train.settings import TrainSettings
    monkeypatch.setattr(fit, "load", _no_load)
    with pytest.raises(ValueError, match=r"^minisd.train.run takes one of FinetuneConfig, DreamBoothConfig, "
                                         r"TextualInversionConfig, LoRAConfig, ControlNetConfig, got TrainSettings$"):
        run(TrainSettings(out="o"))


def test_train_tiny_reports_each_phases_loss_and_lr_at_the_recipes_step(tmp_path, monkeypatch):
    """TensorBoard gets every step's loss and lr the loop gave the progress bar, as vae/..., decoder/... and
    unet/..., the phases one after another on the step axis."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from minisd.cli.train import add_train_tiny
    from minisd.train import tiny
    seen = []
    real = tiny._Progress.__call__

    def spy(self, step, loss, lr):
        seen.append((self.phase, step, loss, lr))
        return real(self, step, loss, lr)
    monkeypatch.setattr(tiny._Progress, "__call__", spy)
    recipe = tiny.Recipe(vae_steps=2, vae_batch=2, decoder_steps=2, bank_size=4, steps=2, batch=2, edge_steps=2)
    tiny.train_tiny(str(tmp_path), recipe, log=lambda *_: None, report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "logs" / "tiny"), size_guidance={"scalars": 0}).Reload()
    first = {"vae": 0, "decoder": 2, "unet": 4, "edges": 6}
    for key in ("loss", "lr"):
        expected = {(f"{phase}/{key}", first[phase] + step + 1): {"loss": loss, "lr": lr}[key]
                    for phase, step, loss, lr in seen}
        logged = {(tag, s.step): s.value for tag in events.Tags()["scalars"] if tag.endswith("/" + key)
                  for s in events.Scalars(tag)}
        assert logged.keys() == expected.keys() and len(logged) == 8
        # TensorBoard stores float32: equal to the float32 rounding of the loop's numbers
        assert all(logged[k] == np.float32(v) for k, v in expected.items())
    parser = argparse.ArgumentParser()
    add_train_tiny(parser)
    assert parser.parse_args(["--out", "o", "--report-to", "wandb"]).report_to == "wandb"
