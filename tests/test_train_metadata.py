"""Trained files carry their run in the safetensors header, as kohya's sd-scripts write it (minisd/train/metadata.py),
read back here with safetensors' own reader (safe_open(...).metadata()); and minisd still loads each file."""
import json

from safetensors import safe_open

from _train_refs import image_folder
from minisd import embeddings, lora
from minisd.config import SD15, SD21_BASE, SD21_V, TINY
from minisd.model import load_model
from minisd.train import finetune, textual_inversion
from minisd.train import lora as train_lora
from minisd.train.metadata import base_model_version

QUIET = dict(log=lambda *_: None)


def header(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def check_run(meta, out, method, step, lr, images):
    """The keys every trained file has, against what the run was asked (and its args.json)."""
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"     # the tiny model is SD1-like
    assert meta["ss_sd_model_name"] == "minisd-tiny.safetensors"
    assert meta["ss_output_name"] == out.name and meta["modelspec.title"] == out.name
    assert meta["ss_learning_rate"] == str(lr)
    assert meta["ss_max_train_steps"] == "2" and meta["ss_steps"] == str(step)
    assert meta["ss_num_train_images"] == str(images)
    assert meta["minisd_method"] == method
    assert json.loads(meta["minisd_args"]) == json.loads((out / "args.json").read_text())
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == "32x32" and meta["ss_resolution"] == "(32, 32)"


def test_a_fine_tuned_model_and_its_snapshot_carry_the_run(tmp_path):
    data = image_folder(tmp_path / "data", 3, seed=1, captions=["a red circle", "a blue square", "two stars"])
    out = tmp_path / "my-finetune"
    cfg = finetune.FinetuneConfig(out=str(out), data=str(data), max_train_steps=2, learning_rate=1e-4,
                                  save_model_steps=1, resolution=32, device="cpu")
    path = finetune.run(cfg, **QUIET)
    meta = header(path)
    check_run(meta, out, "finetune", 2, 1e-4, 3)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert "minisd_config" in meta                                  # what minisd itself keeps there
    check_run(header(out / "model-step000001.safetensors"), out, "finetune", 1, 1e-4, 3)
    load_model(path, verbose=False)                                 # the ss_ keys do not disturb loading


def test_a_lora_carries_the_run_and_its_network(tmp_path):
    data = image_folder(tmp_path / "data", 2, seed=2, captions=["a red circle"])
    out = tmp_path / "my-lora"
    cfg = train_lora.LoRAConfig(out=str(out), data=str(data), max_train_steps=2, learning_rate=1e-2, rank=4,
                                alpha=2, resolution=32, device="cpu")
    path = train_lora.run(cfg, **QUIET)
    meta = header(path)
    check_run(meta, out, "lora", 2, 1e-2, 2)
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4",
                                                                                              "2")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert lora.read(path, TINY).layers


def test_both_embedding_files_carry_the_run(tmp_path):
    data = image_folder(tmp_path / "data", 2, seed=3)
    out = tmp_path / "my-word"
    cfg = textual_inversion.TextualInversionConfig(out=str(out), data=str(data), token="<w>", init_token="red",
                                                   max_train_steps=2, learning_rate=1e-3, resolution=32,
                                                   device="cpu")
    path = textual_inversion.run(cfg, **QUIET)
    for file in (path, out / "w.safetensors"):
        meta = header(file)
        check_run(meta, out, "textual_inversion", 2, 1e-3, 2)
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
        assert embeddings.read(file)[1].shape == (1, 64)


def test_base_model_version_is_kohyas():
    # sd-scripts' model_util.get_model_version_str_for_sd1_sd2: "sd" + "_v2" or "_v1" + "_v" for v-prediction
    assert [base_model_version(c) for c in (SD15, SD21_BASE, SD21_V)] == ["sd_v1", "sd_v2", "sd_v2_v"]
