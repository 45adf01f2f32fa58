"""Loading whole checkpoints into minisd.model.StableDiffusion, checked against diffusers' own loaders.

The oracle is diffusers: `StableDiffusionPipeline.from_single_file` (its converter for official files) and
`from_pretrained` (folders). Random official-layout files come from tests/checkpoints.py. Weight comparisons
are exact (torch.equal, or equal SHA-1 of the bytes for the full-size files, so that two 4 GB models never sit in
RAM at once); forward comparisons use fp32 on CPU with max abs error <= 1e-4 x the output's std, the project
tolerance for reordered float32 sums, and show that the comparison can fail.
"""
import dataclasses
import gc
import os
import zlib

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import (SMALL_SD1, SMALL_SD2, diffusers_from_single_file, ldm_state_dict, write_diffusers_config,
                         write_ldm_checkpoint)
from minisd.config import SD15, SD21_V
from minisd.model import StableDiffusion, load_model, save_model
from weights_convert import diffusers as dmap, text
from weights_convert.io import CheckpointError

SMALL = {"sd1": SMALL_SD1, "sd2": SMALL_SD2}


def diffusers_named(model):
    """minisd's weights under diffusers' component names, through weights_convert's maps (views, no copies)."""
    cfg = model.config
    unet = dict(dmap.unet_table(cfg.unet))
    vae = dict(dmap.vae_table(cfg.vae))
    out = {"unet": {dmap.rename(k, unet): v for k, v in model.unet.state_dict().items()}, "vae": {}}
    for k, v in model.vae.state_dict().items():
        name = dmap.rename(k, vae)
        out["vae"][name] = dmap._to_linear(v) if dmap._is_vae_attention_weight(name) else v
    te = text.to_transformers(model.text_encoder.state_dict())
    out["text_encoder"] = {k.removeprefix("text_model."): v for k, v in te.items()}
    return out


def reference_named(pipe):
    return {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}}


def assert_same_weights(ours, theirs):
    for part in ("unet", "vae", "text_encoder"):
        a, b = ours[part], theirs[part]
        assert a.keys() == b.keys(), (part, sorted(set(a) ^ set(b))[:5])
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (part, k)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Per family: an official single file (with EMA copies), diffusers' pipeline loaded from it, and the
    diffusers folder that pipeline saves."""
    out = {}
    for fam, cfg in SMALL.items():
        d = tmp_path_factory.mktemp(fam)
        ckpt = d / f"{fam}.safetensors"
        write_ldm_checkpoint(ckpt, cfg, seed=0, ema=True)
        write_diffusers_config(d / "config", cfg)
        pipe = diffusers_from_single_file(ckpt, d / "config")
        pipe.save_pretrained(str(d / "folder"), safe_serialization=True)
        out[fam] = dict(cfg=cfg, ckpt=ckpt, pipe=pipe, folder=d / "folder", dir=d, model=load_model(ckpt))
    return out


# ---------------------------------------------------------------------------------------------------------
# the same tensors and the same outputs as diffusers

@pytest.mark.parametrize("fam", ["sd1", "sd2"])
def test_official_file_loads_to_the_tensors_diffusers_loads(small, fam):
    model = small[fam]["model"]         # load_model(the official file)
    assert_same_weights(diffusers_named(model), reference_named(small[fam]["pipe"]))


@pytest.mark.parametrize("fam", ["sd1", "sd2"])
def test_loaded_model_computes_what_diffusers_computes(small, fam):
    model, pipe = small[fam]["model"], small[fam]["pipe"]
    g = torch.Generator().manual_seed(0)
    tokens = model.tokenizer(["a photo of an astronaut riding a horse", "a red cube"])
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ctx = model.text_encoder(tokens)
        ref_ctx = pipe.text_encoder(tokens).last_hidden_state
        eps = model.unet(x, t, ctx)
        ref_eps = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        img = model.vae.decode(x)
        ref_img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample   # minisd's decode unscales
    for ours, ref in ((ctx, ref_ctx), (eps, ref_eps), (img, ref_img)):
        assert (ours - ref).abs().max() <= 1e-4 * ref.std()
    # the comparison can fail: one different token moves the conditioning well past the tolerance
    with torch.no_grad():
        other = model.text_encoder(model.tokenizer(["a photo of an astronaut riding a cow", "a red cube"]))
    assert (other - ref_ctx).abs().max() > 1e-2 * ref_ctx.std()


@pytest.mark.parametrize("fam", ["sd1", "sd2"])
def test_diffusers_folder_loads_the_same_tensors_and_tokenizer(small, fam):
    s = small[fam]
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained(str(s["folder"]), local_files_only=True)  # the folder is valid
    model = load_model(s["folder"])
    assert_same_weights(diffusers_named(model), reference_named(ref))
    assert model.config.prediction == s["cfg"].prediction          # read from scheduler/scheduler_config.json
    assert dataclasses.replace(model.config, name=s["cfg"].name) == s["cfg"]
    prompt = "a photo of an astronaut"
    assert model.tokenizer(prompt)[0].tolist() == ref.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert model.tokenizer.pad_id == (0 if fam == "sd2" else 49407)


def test_diffusers_vae_with_the_older_attention_names_loads(small, tmp_path):
    """Older diffusers VAE files name the mid-block attention query/key/value/proj_attn (diffusers still reads them)."""
    import shutil
    from safetensors.torch import load_file
    folder = tmp_path / "legacy"
    shutil.copytree(small["sd1"]["folder"], folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    renamed = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in renamed
    save_file(renamed, str(path))
    assert_same_model(load_model(folder), small["sd1"]["model"])


# ---------------------------------------------------------------------------------------------------------
# file formats, EMA, dtype

def state(model):
    return {k: v for k, v in model.state_dict().items()}


def assert_same_model(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_ckpt_with_and_without_state_dict_wrapper_loads_like_safetensors(small, tmp_path):
    cfg = SMALL_SD1
    write_ldm_checkpoint(tmp_path / "a.safetensors", cfg, seed=3)
    write_ldm_checkpoint(tmp_path / "a.ckpt", cfg, seed=3, fmt="ckpt")
    write_ldm_checkpoint(tmp_path / "bare.ckpt", cfg, seed=3, fmt="ckpt", wrap=False)
    ref = load_model(tmp_path / "a.safetensors")
    assert_same_model(ref, load_model(tmp_path / "a.ckpt"))
    assert_same_model(ref, load_model(tmp_path / "bare.ckpt"))
    other = small["sd1"]["model"]                     # another seed: the comparison can fail
    assert not torch.equal(ref.unet.state_dict()["out.2.weight"], other.unet.state_dict()["out.2.weight"])


def test_ema_weights_are_used_only_when_asked(small, capsys):
    path = small["sd1"]["ckpt"]
    sd = ldm_state_dict(SMALL_SD1, seed=0, ema=True)
    k = "input_blocks.1.0.in_layers.2.weight"
    plain, ema = small["sd1"]["model"], load_model(path, ema=True)
    assert "U-Net weights: EMA (model_ema.*)" in capsys.readouterr().out
    assert torch.equal(plain.unet.state_dict()[k], sd["model.diffusion_model." + k])
    assert torch.equal(ema.unet.state_dict()[k], sd["model_ema.diffusion_model" + k.replace(".", "")])
    assert not torch.equal(plain.unet.state_dict()[k], ema.unet.state_dict()[k])
    k = "decoder.conv_out.weight"
    assert torch.equal(plain.vae.state_dict()[k], ema.vae.state_dict()[k])     # EMA is for the U-Net only


def test_ema_asked_for_but_absent_says_so_and_uses_the_stored_unet(tmp_path, capsys):
    write_ldm_checkpoint(tmp_path / "noema.safetensors", SMALL_SD1, seed=4)
    a = load_model(tmp_path / "noema.safetensors", ema=True)
    assert "no EMA weights" in capsys.readouterr().out
    assert_same_model(a, load_model(tmp_path / "noema.safetensors"))


def test_dtype_casts_floats_per_tensor(small):
    m = load_model(small["sd2"]["ckpt"], dtype=torch.float16)
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    ref = small["sd2"]["model"]
    assert torch.equal(m.unet.state_dict()["out.2.weight"], ref.unet.state_dict()["out.2.weight"].half())


def test_native_file_saves_and_loads_back_identically(small, tmp_path):
    m = small["sd2"]["model"]
    save_model(m, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert back.config == m.config
    assert_same_model(m, back)


def test_model_is_built_without_memory_then_filled(small):
    m = small["sd1"]["model"]
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    assert isinstance(m, StableDiffusion) and not m.training


# ---------------------------------------------------------------------------------------------------------
# detection: SD1 / SD2, eps / v

def alias(small, fam, name):
    """The family's file under another name (a symlink), in its own folder."""
    d = small[fam]["dir"] / "alias"
    d.mkdir(exist_ok=True)
    p = d / name
    if not p.exists():
        os.symlink(small[fam]["ckpt"], p)
    return p


def test_sd1_and_sd2_are_told_apart_by_their_text_encoder_keys(small, capsys):
    one, two = load_model(small["sd1"]["ckpt"]), load_model(small["sd2"]["ckpt"])   # loaded again: printing
    out = capsys.readouterr().out
    assert "SD1 (OpenAI CLIP" in out and "SD2 (OpenCLIP-H" in out
    assert one.config.text.activation == "quick_gelu" and one.config.text.pad_id == 49407
    assert two.config.text.activation == "gelu" and two.config.text.pad_id == 0
    assert two.config.unet.use_linear_in_transformer and two.config.unet.num_head_channels == 64


def test_prediction_defaults_to_eps_and_says_so(small, capsys):
    assert small["sd1"]["model"].config.prediction == "eps"
    assert load_model(alias(small, "sd2", "plain-sd2.safetensors")).config.prediction == "eps"
    assert "eps-prediction (default)" in capsys.readouterr().out


def test_prediction_argument_is_used_when_no_config_says(small):
    assert load_model(small["sd1"]["ckpt"], prediction="v").config.prediction == "v"


def test_sd2_file_named_768_is_guessed_v_and_the_guess_is_printed(small, capsys):
    for name in ("v2-1_768-ema-pruned.safetensors", "sd21-v.safetensors"):
        m = load_model(alias(small, "sd2", name))
        assert m.config.prediction == "v" and m.config.image_size == 768
        assert "GUESSING v-prediction" in capsys.readouterr().out
    # an SD1 file is never guessed
    assert load_model(alias(small, "sd1", "sd15-768.safetensors")).config.prediction == "eps"


def test_ldm_yaml_beside_the_file_wins_over_the_argument(small, capsys):
    p = alias(small, "sd2", "mymodel.safetensors")
    p.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n    image_size: 96\n')
    m = load_model(p, prediction="eps")
    assert m.config.prediction == "v" and m.config.image_size == 768
    assert "mymodel.yaml says v-prediction" in capsys.readouterr().out
    p.with_suffix(".yaml").write_text("model:\n  params:\n    image_size: 64\n")   # no parameterization: eps
    assert load_model(p, prediction="v").config.prediction == "eps"


def test_diffusers_scheduler_config_decides_the_prediction(small):
    assert load_model(small["sd2"]["folder"], prediction="eps").config.prediction == "v"
    assert load_model(small["sd1"]["folder"]).config.prediction == "eps"


# ---------------------------------------------------------------------------------------------------------
# clear errors

@pytest.fixture(scope="module")
def sd1_tensors():
    return ldm_state_dict(SMALL_SD1, seed=5)


def _write(tmp_path, name, sd):
    save_file(sd, str(tmp_path / name))
    return tmp_path / name


def test_unknown_layout_is_an_error(tmp_path):
    p = _write(tmp_path, "x.safetensors", {"foo.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*'foo.weight'"):
        load_model(p)
    with pytest.raises(CheckpointError, match="not a diffusers model"):
        load_model(tmp_path)


def test_missing_unet_tensor_is_named(sd1_tensors, tmp_path):
    sd = {k: v for k, v in sd1_tensors.items() if k != "model.diffusion_model.middle_block.1.proj_out.weight"}
    with pytest.raises(CheckpointError, match=r"missing.*'unet.middle_block.1.proj_out.weight'"):
        load_model(_write(tmp_path, "m.safetensors", sd))


def test_unexpected_tensor_is_named(sd1_tensors, tmp_path):
    sd = {**sd1_tensors, "model.diffusion_model.middle_block.1.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected.*'model.diffusion_model.middle_block.1.extra.weight'"):
        load_model(_write(tmp_path, "u.safetensors", sd))
    sd = {**sd1_tensors, "some_other_model.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="unexpected key 'some_other_model.weight'"):
        load_model(_write(tmp_path, "o.safetensors", sd))


def test_misshaped_tensor_is_named(sd1_tensors, tmp_path):
    k = "first_stage_model.decoder.mid.attn_1.q.weight"
    sd = {**sd1_tensors, k: sd1_tensors[k][:, :, 0, 0]}       # a diffusers-shaped (linear) weight in an LDM file
    with pytest.raises(CheckpointError, match=f"mis-shaped tensor 'vae.decoder.mid.attn_1.q.weight' \\('{k}'"):
        load_model(_write(tmp_path, "s.safetensors", sd))


def test_truncated_file_is_a_clear_error_at_load(small, tmp_path):
    data = small["sd1"]["ckpt"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.safetensors")


# ---------------------------------------------------------------------------------------------------------
# full-size SD1.5 and SD2.1 files, written once per session and deleted after. In float16 (2.1 and 2.6 GB; the
# layout is the same as fp32's, and bench/load_memory.py loads a 4.3 GB fp32 one) to halve the disk traffic.
# Tensors are compared by CRC-32 of their bytes (with name, shape, dtype), so two models are never in RAM at
# once; a chance collision is ~2^-32 per tensor.

def digests(named):
    return {k: (tuple(v.shape), v.dtype, zlib.crc32(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
            for k, v in named.items()}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    files = {}
    for cfg, dtype, name in ((SD15, torch.float16, "v1-5-random.safetensors"),
                             (SD21_V, torch.float16, "v2-1_768-random.safetensors")):
        write_ldm_checkpoint(d / name, cfg, seed=0, dtype=dtype, views=True)   # the state dict is dropped at once
        write_diffusers_config(d / (cfg.name + "-config"), cfg)
        files[cfg.name] = (d / name, d / (cfg.name + "-config"), dtype)
        gc.collect()
    yield files
    for path, _, _ in files.values():
        path.unlink()


@pytest.mark.parametrize("preset", [SD15, SD21_V], ids=["sd15", "sd21"])
def test_full_size_file_loads_to_the_tensors_diffusers_loads(full_size, preset, capsys):
    path, config, dtype = full_size[preset.name]
    model = load_model(path, dtype=dtype)
    assert model.config == preset                      # detected: SD1.5 / SD2.1-v (guessed v from "768")
    out = capsys.readouterr().out
    assert ("GUESSING v-prediction" in out) == (preset is SD21_V)
    ours = {part: digests(t) for part, t in diffusers_named(model).items()}
    del model
    gc.collect()
    pipe = diffusers_from_single_file(path, config, torch_dtype=dtype)
    theirs = {part: digests(t) for part, t in reference_named(pipe).items()}
    del pipe
    gc.collect()
    for part in ours:
        assert ours[part].keys() == theirs[part].keys(), part
        bad = [k for k in ours[part] if ours[part][k] != theirs[part][k]]
        assert not bad, (part, bad[:3])
