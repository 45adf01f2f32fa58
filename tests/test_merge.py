"""`minisd merge`: A1111's Checkpoint Merger (modules/extras.py, run_modelmerger), bit for bit.

The reference below restates run_modelmerger on the raw files, read with safetensors and merged with torch: keys
holding "model" are merged (position_ids skipped), everything else is A's; a 9-channel A merged with 4-channel
B (and C) merges the first 4 input channels of the U-Net's input conv and keeps the rest of A's. Where A1111
computes in the files' dtype, minisd computes in float32 and rounds once to the output dtype (stated in
minisd/merge.py); the reference does the same, so equality is exact (torch.equal on every tensor, dtypes too).
Small configs (tests/checkpoints.py): the merge is per tensor, the size changes nothing but the time.
"""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import SMALL_SD1, SMALL_SD2, write_ldm_checkpoint
from minisd.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def reference(a, b, c, alpha, dtype=None):
    """run_modelmerger's loop over A's keys: weighted sum (c None) or add difference, in float32."""
    formula = ((lambda x, y, z: (1 - alpha) * x + alpha * y) if c is None
               else (lambda x, y, z: x + alpha * (y - z)))
    out = {}
    for k, t in a.items():
        if "model" not in k or k.endswith("position_ids"):
            out[k] = t
            continue
        x, y = t.float(), b[k].float()
        z = None if c is None else c[k].float()
        if x.shape != y.shape:                   # inpainting A: only B's 4 input channels are merged
            merged = x.clone()
            merged[:, :4] = formula(x[:, :4], y, z)
        else:
            merged = formula(x, y, z)
        out[k] = merged.to(dtype or t.dtype)
    return out


def assert_bit_equal(path, expected):
    got = load_file(str(path))
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _fine_tuned(sd, seed):
    """Another model of the same architecture: every weight moved by noise (schedule buffers and ids kept)."""
    g = torch.Generator().manual_seed(seed)
    moved = lambda t: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(t.dtype)
    return {k: moved(t) if "model" in k and t.is_floating_point() else t for k, t in sd.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A, B, C: SD1 fp32; a9: A with a 9-channel input conv (inpainting); a2, b2: SD2 fp16; b_folder: B's
    weights converted by diffusers (from_single_file + save_pretrained)."""
    from checkpoints import diffusers_from_single_file, write_diffusers_config
    d = tmp_path_factory.mktemp("merge")
    f = {name: d / f"{name}.safetensors" for name in ("a", "b", "c", "a9", "a2", "b2")}
    a = write_ldm_checkpoint(f["a"], SMALL_SD1, seed=0)
    write_ldm_checkpoint(f["b"], SMALL_SD1, seed=1)
    save_file(_fine_tuned(a, 2), str(f["c"]))
    conv = a[INPUT_CONV]
    extra = torch.randn((conv.shape[0], 5, *conv.shape[2:]), generator=torch.Generator().manual_seed(3)) * conv.std()
    save_file({**a, INPUT_CONV: torch.cat([conv, extra], dim=1)}, str(f["a9"]))
    a2 = write_ldm_checkpoint(f["a2"], SMALL_SD2, seed=4, dtype=torch.float16)
    save_file(_fine_tuned(a2, 5), str(f["b2"]))
    f["b_folder"] = write_diffusers_config(d / "b_diffusers", SMALL_SD1)
    diffusers_from_single_file(f["b"], f["b_folder"]).save_pretrained(str(f["b_folder"]), safe_serialization=True)
    return f


def merge(tmp_path, *args):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, args), "--out", str(out)]) == 0
    assert not (tmp_path / "merged.safetensors.partial").exists()
    return out


def test_weighted_sum_equals_a1111_bit_for_bit_in_fp32(files, tmp_path):
    a, b = (load_file(str(files[k])) for k in "ab")
    before = files["a"].read_bytes(), files["b"].read_bytes()
    out = merge(tmp_path, files["a"], files["b"], "--method", "weighted-sum", "--alpha", "0.3")
    assert_bit_equal(out, reference(a, b, None, 0.3))
    assert (files["a"].read_bytes(), files["b"].read_bytes()) == before          # inputs untouched


def test_add_difference_equals_a1111_bit_for_bit_in_fp16(files, tmp_path):
    a, b, c = (load_file(str(files[k])) for k in "abc")
    out = merge(tmp_path, files["a"], files["b"], files["c"], "--method", "add-difference", "--alpha", "0.7",
                "--dtype", "fp16")
    assert_bit_equal(out, reference(a, b, c, 0.7, torch.float16))


def test_alpha_weighs_b_not_a(files, tmp_path):
    """alpha 0 gives A, alpha 1 gives B: an alpha applied to the wrong side swaps them."""
    a, b = (load_file(str(files[k])) for k in "ab")
    for alpha, expected in (("0", a), ("1", b)):
        out = merge(tmp_path, files["a"], files["b"], "--alpha", alpha, "--overwrite")
        got = load_file(str(out))
        assert torch.equal(got[INPUT_CONV], expected[INPUT_CONV])
        assert torch.equal(got["first_stage_model.decoder.conv_out.weight"],
                           expected["first_stage_model.decoder.conv_out.weight"])
    assert not torch.equal(a[INPUT_CONV], b[INPUT_CONV])                  # the check can fail


def test_a_diffusers_folder_merges_as_its_single_file(files, tmp_path):
    """B given as a diffusers folder (converted from B's file by diffusers) gives the bits B's file gives."""
    a, b, c = (load_file(str(files[k])) for k in "abc")
    out = merge(tmp_path, files["a"], files["b_folder"], files["c"], "--method", "add-difference", "--alpha", "0.5")
    assert_bit_equal(out, reference(a, b, c, 0.5))


def test_sd2_fp16_files_keep_fp16_and_are_computed_in_fp32(files, tmp_path):
    a, b = (load_file(str(files[k])) for k in ("a2", "b2"))
    out = merge(tmp_path, files["a2"], files["b2"], "--alpha", "0.45")
    assert_bit_equal(out, reference(a, b, None, 0.45))
    assert load_file(str(out))[INPUT_CONV].dtype == torch.float16


def test_inpainting_a_keeps_its_extra_input_channels(files, tmp_path):
    a, b, c = (load_file(str(files[k])) for k in ("a9", "b", "c"))
    out = merge(tmp_path, files["a9"], files["b"], files["c"], "--method", "add-difference", "--alpha", "1")
    assert_bit_equal(out, reference(a, b, c, 1.0))
    conv = load_file(str(out))[INPUT_CONV]
    assert conv.shape[1] == 9 and torch.equal(conv[:, 4:], a[INPUT_CONV][:, 4:])
    assert not torch.equal(conv[:, :4], a[INPUT_CONV][:, :4])
    from weights_convert import detect
    assert detect.read(str(out), verbose=False).config.unet.in_channels == 9       # minisd reads it back


def _error(capsys, *args):
    capsys.readouterr()
    assert main(["merge", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minisd: error: ") and err.count("\n") == 1, err
    return err


def test_errors_name_the_problem(files, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    b = load_file(str(files["b"]))
    del b["first_stage_model.decoder.conv_out.bias"]
    save_file(b, str(tmp_path / "b_missing.safetensors"))
    err = _error(capsys, files["a"], tmp_path / "b_missing.safetensors", "--alpha", "0.5", "--out", out)
    assert "'first_stage_model.decoder.conv_out.bias'" in err and "missing" in err

    b = load_file(str(files["b"]))
    b["model.diffusion_model.out.2.bias"] = b["model.diffusion_model.out.2.bias"][:2]
    save_file(b, str(tmp_path / "b_shape.safetensors"))
    err = _error(capsys, files["a"], tmp_path / "b_shape.safetensors", "--alpha", "0.5", "--out", out)
    assert "'model.diffusion_model.out.2.bias' has shape (4,)" in err

    err = _error(capsys, files["a"], files["a2"], "--alpha", "0.5", "--out", out)
    assert "SD1" in err and "SD2" in err and "cond_stage_model.model" in err
    err = _error(capsys, files["b"], files["a9"], files["c"], "--method", "add-difference", "--alpha", "1",
                 "--out", out)
    assert f"'{INPUT_CONV}'" in err and "must be A" in err
    assert "merges 3 checkpoints" in _error(capsys, files["a"], files["b"], "--method", "add-difference",
                                            "--alpha", "1", "--out", out)
    assert "one of the inputs" in _error(capsys, files["a"], files["b"], "--alpha", "1", "--out", files["b"],
                                         "--overwrite")
    assert not out.exists()
