"""The key maps and conversions of weights_convert/: every map checked in both directions against the reference
modules' own names and shapes, conversions checked to be lossless, bad files rejected with a clear error.

Reference names/shapes come from the reference classes built on the meta device (tests/checkpoints.py); random
files from the same factory. Equality here is exact (torch.equal): a conversion moves tensors, it computes
nothing.
"""
import dataclasses
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import (SMALL_SD1, SMALL_SD2, reference_diffusers_unet, reference_diffusers_vae, reference_unet,
                         reference_vae, schedule_buffers as reference_schedule, write_ldm_checkpoint)
from minisd import cli as minisd_cli
from minisd.config import SD15, SD21_V
from weights_convert import diffusers as dmap, ldm
from weights_convert.io import CheckpointError, SafetensorsFile, Tensors, read_checkpoint, write_safetensors
from weights_convert.native import config_from_json, config_to_json

CONFIGS = [SMALL_SD1, SMALL_SD2, SD15, SD21_V]
cli = lambda argv: minisd_cli.main(["convert", *argv])      # noqa: E731  (`minisd convert ...`)
ids = [c.name for c in CONFIGS]


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# diffusers <-> LDM maps (the U-Net and VAE tables), both directions, every key and shape

@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_unet_table_maps_every_ldm_key_onto_diffusers_with_the_same_shape(cfg):
    ours, theirs = shapes(reference_unet(cfg)), shapes(reference_diffusers_unet(cfg))
    table = dict(dmap.unet_table(cfg.unet))
    mapped = {dmap.rename(k, table): s for k, s in ours.items()}
    assert mapped == theirs


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_unet_table_maps_every_diffusers_key_back_onto_ldm(cfg):
    ours, theirs = shapes(reference_unet(cfg)), shapes(reference_diffusers_unet(cfg))
    inverse = {d: l for l, d in dmap.unet_table(cfg.unet)}
    assert {dmap.rename(k, inverse): s for k, s in theirs.items()} == ours


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_vae_table_maps_both_ways_with_the_mid_attention_reshaped(cfg):
    ours, theirs = shapes(reference_vae(cfg)), shapes(reference_diffusers_vae(cfg))
    table = dict(dmap.vae_table(cfg.vae))
    inverse = {d: l for l, d in table.items()}

    def to_diffusers(k, s):
        name = dmap.rename(k, table)
        return name, tuple(dmap._to_linear(torch.empty(s, device="meta")).shape) \
            if dmap._is_vae_attention_weight(name) else s

    assert dict(to_diffusers(k, s) for k, s in ours.items()) == theirs
    back = {dmap.rename(k, inverse) for k in theirs}
    assert back == set(ours)
    # the 1x1 convs really are 4-D on the LDM side and 2-D on the diffusers side (the reshape is needed)
    assert len(ours["encoder.mid.attn_1.q.weight"]) == 4
    assert len(theirs["encoder.mid_block.attentions.0.to_q.weight"]) == 2


def test_rename_names_the_unknown_key():
    with pytest.raises(KeyError, match="input_blocks.99.0.foo"):
        dmap.rename("input_blocks.99.0.foo", dict(dmap.unet_table(SMALL_SD1.unet)))


def test_unet_table_depends_on_the_config():
    # the same LDM key lands elsewhere when the number of res blocks per level changes
    one = dict(dmap.unet_table(SMALL_SD2.unet))
    two = dict(dmap.unet_table(SMALL_SD1.unet))
    assert dmap.rename("output_blocks.2.0.in_layers.0.weight", one) == "up_blocks.1.resnets.0.norm1.weight"
    assert dmap.rename("output_blocks.2.0.in_layers.0.weight", two) == "up_blocks.0.resnets.2.norm1.weight"


def test_diffusers_configs_round_trip():
    for cfg in CONFIGS:
        assert dmap.unet_config_from_json(dmap.unet_config_json(cfg.unet, cfg.image_size)) == cfg.unet
        assert dmap.vae_config_from_json(dmap.vae_config_json(cfg.vae, cfg.image_size)) == cfg.vae
        assert dmap.text_config_from_json(dmap.text_config_json(cfg.text, cfg.text.pad_id),
                                          cfg.text.pad_id) == cfg.text


def test_diffusers_unet_config_matches_the_reference_class_config():
    for cfg in CONFIGS:
        ref = dict(reference_diffusers_unet(cfg).config)
        ours = dmap.unet_config_json(cfg.unet, cfg.image_size)
        for k in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                  "cross_attention_dim", "attention_head_dim", "use_linear_projection", "sample_size"):
            assert (list(ref[k]) if isinstance(ref[k], (list, tuple)) else ref[k]) == ours[k], k


# ---------------------------------------------------------------------------------------------------------
# LDM single file: config inference, schedule buffers

@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_config_is_read_off_the_shapes_of_an_ldm_state_dict(cfg):
    meta = {"model.diffusion_model." + k: v for k, v in reference_unet(cfg).state_dict().items()}
    meta.update({"first_stage_model." + k: v for k, v in reference_vae(cfg).state_dict().items()})
    meta.update(_meta_text(cfg))
    meta.update(reference_schedule(cfg))
    got = ldm.infer_config(Tensors(meta), name=cfg.name, prediction=cfg.prediction, image_size=cfg.image_size)
    assert got == cfg


def _meta_text(cfg):
    from checkpoints import SD1_PREFIX, SD2_PREFIX, is_sd2, reference_text
    sd = reference_text(cfg).state_dict()
    if is_sd2(cfg):
        return {SD2_PREFIX + k: v for k, v in sd.items() if not k.startswith("visual.")}
    return {SD1_PREFIX + k: v for k, v in sd.items()}


def test_schedule_buffers_equal_ldm_register_schedule():
    ours, ref = ldm.schedule_buffers(SD15), reference_schedule(SD15)
    assert ours.keys() == ref.keys()
    for k in ref:   # both are float64 formulas rounded to float32 once
        assert torch.allclose(ours[k], ref[k], rtol=1e-6, atol=0), k


def test_ema_key_drops_the_dots_as_litema_does():
    assert ldm.ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_config_json_round_trip():
    for cfg in CONFIGS:
        assert config_from_json(config_to_json(cfg)) == cfg


# ---------------------------------------------------------------------------------------------------------
# lossless round trips through the CLI

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    out = {}
    for cfg in (SMALL_SD1, SMALL_SD2):
        out[cfg.name] = d / f"{cfg.name}.safetensors"
        write_ldm_checkpoint(out[cfg.name], cfg, seed=1, ema=True)
        out[cfg.name + ".ckpt"] = d / f"{cfg.name}.ckpt"
        write_ldm_checkpoint(out[cfg.name + ".ckpt"], cfg, seed=2, fmt="ckpt")
    return out


def load_all(path):
    t = read_checkpoint(path)
    return {k: t[k] for k in t}


def assert_identical(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["small-sd1", "small-sd2", "small-sd1.ckpt", "small-sd2.ckpt"])
def test_ldm_to_minisd_to_ldm_gives_back_every_tensor(files, tmp_path, name):
    src = files[name]
    assert cli([str(src), str(tmp_path / "m.safetensors"), "--to", "minisd"]) == 0
    assert cli([str(tmp_path / "m.safetensors"), str(tmp_path / "back.safetensors"), "--to", "ldm"]) == 0
    assert_identical(load_all(src), load_all(tmp_path / "back.safetensors"))


def test_ldm_to_minisd_with_ema_keeps_the_non_ema_unet_and_writes_both_back(files, tmp_path):
    src = files["small-sd1"]
    assert cli([str(src), str(tmp_path / "m.safetensors"), "--to", "minisd", "--ema"]) == 0
    m = load_all(tmp_path / "m.safetensors")
    orig = load_all(src)
    k = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(m["unet." + k], orig[ldm.ema_key(k)])
    assert not torch.equal(m["unet." + k], orig["model.diffusion_model." + k])   # the EMA copy differs
    assert torch.equal(m["extra.model.diffusion_model." + k], orig["model.diffusion_model." + k])
    assert cli([str(tmp_path / "m.safetensors"), str(tmp_path / "back.ckpt"), "--to", "ldm"]) == 0
    assert_identical(orig, load_all(tmp_path / "back.ckpt"))


def test_minisd_to_ldm_to_minisd_is_identical(files, tmp_path):
    cli([str(files["small-sd2"]), str(tmp_path / "a.safetensors"), "--to", "minisd"])
    cli([str(tmp_path / "a.safetensors"), str(tmp_path / "b.ckpt"), "--to", "ldm"])
    cli([str(tmp_path / "b.ckpt"), str(tmp_path / "c.safetensors"), "--to", "minisd", "--prediction", "v"])
    assert_identical(load_all(tmp_path / "a.safetensors"), load_all(tmp_path / "c.safetensors"))


@pytest.mark.parametrize("name", ["small-sd1", "small-sd2"])
def test_minisd_to_diffusers_to_minisd_is_identical(files, tmp_path, name, capsys):
    cli([str(files[name]), str(tmp_path / "a.safetensors"), "--to", "minisd", "--prediction", "v"])
    assert cli([str(tmp_path / "a.safetensors"), str(tmp_path / "folder"), "--to", "diffusers"]) == 0
    assert "has no place for the" in capsys.readouterr().out     # extras are dropped, and we say so
    from diffusers import StableDiffusionPipeline     # the folder is a valid diffusers model, offline
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "folder"), local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert cli([str(tmp_path / "folder"), str(tmp_path / "c.safetensors"), "--to", "minisd"]) == 0
    a, c = load_all(tmp_path / "a.safetensors"), load_all(tmp_path / "c.safetensors")
    a = {k: v for k, v in a.items() if not k.startswith("extra.")}
    assert_identical(a, c)
    meta = lambda p: config_from_json(SafetensorsFile(p).metadata["config"])
    # the same config; its name follows the file name ("folder") as for any non-preset model
    assert meta(tmp_path / "a.safetensors") == dataclasses.replace(meta(tmp_path / "c.safetensors"), name=name)


def test_fp16_casts_the_model_weights_only(files, tmp_path):
    cli([str(files["small-sd1"]), str(tmp_path / "h.safetensors"), "--to", "minisd", "--fp16"])
    m = load_all(tmp_path / "h.safetensors")
    assert m["unet.out.2.weight"].dtype == torch.float16
    assert m["extra.alphas_cumprod"].dtype == torch.float32       # schedule buffers keep their precision
    assert m["extra.cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    orig = load_all(files["small-sd1"])
    assert torch.equal(m["unet.out.2.weight"], orig["model.diffusion_model.out.2.weight"].half())


def test_convert_runs_as_a_command(files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "minisd", "convert", str(files["small-sd1"]),
                        str(tmp_path / "x.safetensors"), "--to", "minisd"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "original LDM single file" in r.stdout and "wrote" in r.stdout


def test_cli_reports_a_bad_file_without_a_traceback(tmp_path, capsys):
    assert cli([str(tmp_path / "nope.safetensors"), str(tmp_path / "y.safetensors"), "--to", "minisd"]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# file I/O and clear errors

def test_streamed_safetensors_are_read_by_the_safetensors_library(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2).half(), "d": torch.randn(4).bfloat16(),
         "s": torch.tensor(2.5)}
    write_safetensors(tmp_path / "x.safetensors", t, {"k": "v"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert_identical(t, {k: f.get_tensor(k) for k in f.keys()})
    save_file(t, str(tmp_path / "y.safetensors"))
    assert_identical(t, load_all(tmp_path / "y.safetensors"))


def test_truncated_safetensors_is_a_clear_error(files, tmp_path):
    data = files["small-sd1"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        read_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
        read_checkpoint(tmp_path / "head.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json here!!")
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_truncated_ckpt_is_a_clear_error(files, tmp_path):
    data = files["small-sd1.ckpt"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(tmp_path / "cut.ckpt")


class Evil:
    pass


def test_ckpt_with_arbitrary_objects_is_refused(tmp_path):
    """An unknown class is refused even when it would do nothing: only a short list of known classes loads."""
    torch.save({"state_dict": {"a": torch.zeros(1)}, "obj": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"refusing to load: .*'test_weights_convert\.Evil'"):
        read_checkpoint(tmp_path / "evil.ckpt")


# ---------------------------------------------------------------------------------------------------------
# .ckpt files from training (PyTorch Lightning): more than tensors, loaded without running anything

def pickled_as(monkeypatch, full_name, obj):
    """Make `obj` pickle as the global `full_name` (a class of a package we do not install, e.g. Lightning):
    a stand-in module in sys.modules while the test runs. Only torch.save needs it; reading imports nothing."""
    module_name, name = full_name.rsplit(".", 1)
    obj.__module__, obj.__qualname__ = module_name, name
    parts = module_name.split(".")
    for parent in (".".join(parts[:i]) for i in range(1, len(parts))):   # pickle imports the parents first
        if parent not in sys.modules:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module_name, types.SimpleNamespace(**{name: obj}))
    return obj


def write_lightning_ckpt(path, monkeypatch, state_dict):
    """What a PyTorch Lightning 1.x training run of LDM saves: the weights plus loop counters, versions, numpy
    scalars, and callback state keyed by the callback's class (an instance too, as some versions pickle)."""
    ModelCheckpoint = pickled_as(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                                 type("ModelCheckpoint", (), {}))
    callback = ModelCheckpoint()
    callback.dirpath, callback.monitor = "logs/checkpoints", "val/loss_simple_ema"
    numpy2_scalar = pickled_as(monkeypatch, "numpy._core.multiarray.scalar", lambda dtype, data: None)

    class Numpy2Float:   # a float64 as numpy 2 pickles it (numpy 1 is installed here)
        def __reduce__(self):
            return numpy2_scalar, (np.dtype("float64"), np.float64(0.25).tobytes())

    torch.save({"epoch": 6, "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2",
                "state_dict": state_dict,
                "callbacks": {ModelCheckpoint: {"monitor": "val/loss_simple_ema", "best_model_score": None,
                                                "best_model_path": "", "kth_value": torch.tensor(float("inf"))}},
                "checkpoint_callback": callback, "loss": np.float32(0.125), "lr": Numpy2Float(),
                "torch_version": torch.torch_version.TorchVersion("1.12.1"),
                "optimizer_states": [], "lr_schedulers": []}, str(path))
    monkeypatch.undo()   # the reader has no Lightning and no fake numpy 2 to fall back on


def test_lightning_ckpt_loads_with_its_tensors_exact(tmp_path, monkeypatch):
    weights = {"model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3),
               "model.diffusion_model.out.2.bias": torch.randn(4).half(),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
               "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32)}
    write_lightning_ckpt(tmp_path / "last.ckpt", monkeypatch, weights)
    with pytest.raises(Exception):   # sanity: the file is more than torch's weights_only loader accepts
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    allowed = set(torch.serialization.get_safe_globals())
    loaded = read_checkpoint(tmp_path / "last.ckpt")
    assert_identical(weights, dict(loaded))
    assert loaded.metadata == {"epoch": "6", "global_step": "470000", "pytorch-lightning_version": "1.4.2",
                               "loss": "0.125", "lr": "0.25", "torch_version": "1.12.1"}
    assert "pytorch_lightning.callbacks.model_checkpoint" not in sys.modules   # nothing was imported
    assert set(torch.serialization.get_safe_globals()) == allowed   # torch's allowlist was widened for one call


# the name each call is pickled under (protocol 2, torch.save's): os.system is posix.system, and Python 3 writes
# subprocess under its Python 2 name "commands" (a plain unpickler maps it back)
@pytest.mark.parametrize("payload", ["posix.system", "builtins.eval", "commands.Popen"])
def test_ckpt_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "PWNED"
    call = {"posix.system": (os.system, (f"touch {marker}",)),
            "builtins.eval": (eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",)),
            "commands.Popen": (subprocess.Popen, (["touch", str(marker)],))}[payload]

    class Payload:
        def __reduce__(self):
            return call

    torch.save({"state_dict": {"a": torch.zeros(1)}, "global_step": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/evil\.ckpt: refusing to load: .*'{payload}'[^\n]*$"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    # sanity: the payload is live; an unrestricted unpickler runs it (never do this on a downloaded file)
    obj = torch.load(tmp_path / "evil.ckpt", weights_only=False)
    if payload == "commands.Popen":
        obj["global_step"].wait()
    assert marker.exists()
