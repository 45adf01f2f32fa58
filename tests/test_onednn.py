"""minisd.fast.onednn: a network prepared for oneDNN inference computes what the plain one does, refuses to be
saved or loaded into, restores exactly, lays each conv weight out for the shape it is called with, and is only
prepared where the Pipeline owns the model and its own prepared call was measured faster than its plain one.

Tolerance: max abs difference <= 1e-5 x the output's largest magnitude (fp32 on CPU; oneDNN and MKL sum the
products in different orders, nothing else differs).
"""
import copy

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import SMALL_SD1, SMALL_SD2, write_ldm_checkpoint
from minisd import fast
from minisd.fast import onednn
from minisd.clip import TextEncoder
from minisd.pipeline import Pipeline
from minisd.unet import UNet

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN")


def _random(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _close(a, b):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * b.abs().max().item(), f"max abs error {err:.3g}"


@pytest.mark.parametrize("cfg", [SMALL_SD1, SMALL_SD2], ids=["sd1", "sd2"])
def test_prepared_unet_and_text_encoder_compute_the_same(cfg):
    unet, text = _random(UNet(cfg.unet), 0), _random(TextEncoder(cfg.text), 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.unet.in_channels, 16, 24, generator=g)      # not square: the padding and strides
    t = torch.tensor([10.0, 700.5])
    tokens = torch.randint(0, cfg.text.vocab_size, (2, 77), generator=g)
    with torch.no_grad():
        context = text(tokens)
        want = unet(x, t, context)
        p_unet, p_text = onednn.prepare(copy.deepcopy(unet)), onednn.prepare(copy.deepcopy(text))
        assert not any(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in p_unet.modules())
        _close(p_text(tokens), context)
        _close(p_unet(x, t, context), want)


def test_restore_gives_back_the_same_state_dict_and_output():
    unet = _random(UNet(SMALL_SD1.unet), 3)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, SMALL_SD1.unet.context_dim)
    with torch.no_grad():
        want = unet(x, t, c)
        onednn.prepare(unet)
        assert onednn.is_prepared(unet)
        assert set(unet.state_dict()) == set(before)       # every key is still there (the conv weights opaque)
        onednn.restore(unet)
        assert not onednn.is_prepared(unet)
        after = unet.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert torch.equal(unet(x, t, c), want)          # the plain layers again, the same values
    unet.load_state_dict(before)                          # and an ordinary module again


def test_saving_or_loading_a_prepared_network_fails_loudly_not_silently():
    unet = onednn.prepare(_random(UNet(SMALL_SD1.unet), 4))
    plain = _random(UNet(SMALL_SD1.unet), 4).state_dict()
    with pytest.raises(RuntimeError):
        unet.load_state_dict(plain)                       # an opaque oneDNN weight cannot be overwritten
    with pytest.raises(ValueError):
        save_file(dict(unet.state_dict()), "/dev/null")   # nor written out as if it were plain


def _clock(*durations):
    """A clock for MeasuredChoice whose timed calls last `durations` seconds, in order."""
    ticks = iter([x for d in durations for x in (0.0, d)])
    return lambda: next(ticks)


def test_pipeline_load_prepares_the_unet_as_it_runs_and_a_handed_in_model_stays_plain(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ckpt, SMALL_SD1, seed=5)
    loaded = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=lambda *_: None)
    assert isinstance(loaded.unet_call, fast.MeasuredChoice)
    assert not onednn.is_prepared(loaded.model.unet)         # nothing is decided before the U-Net runs
    loaded.unet_call.clock = _clock(2.0, 1.0)                 # as measured on a machine where prepared is faster
    a = loaded.generate("a red circle", steps=3, seed=0, width=64, height=64)
    assert loaded.unet_call.choice == "prepared" and onednn.is_prepared(loaded.model.unet)
    assert not onednn.is_prepared(loaded.model.text_encoder)  # the text encoder stays plain

    # a model handed in (it may be in training) is left as it is; a prepared one is restored first
    plain = Pipeline(loaded.model, device="cpu", dtype=torch.float32, log=lambda *_: None)
    assert not onednn.is_prepared(loaded.model.unet) and not onednn.is_prepared(loaded.model.text_encoder)
    b = plain.generate("a red circle", steps=3, seed=0, width=64, height=64)
    assert not onednn.is_prepared(loaded.model.unet) and not onednn.is_prepared(loaded.model.text_encoder)
    _close(a.latents, b.latents)


def test_a_prepared_network_refuses_autograd_instead_of_giving_wrong_gradients():
    unet = onednn.prepare(_random(UNet(SMALL_SD1.unet), 6))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, SMALL_SD1.unet.context_dim)
    with pytest.raises(RuntimeError, match="no_grad"):
        unet(x, t, c)                    # its Linear layers share the trainable Parameters
    with torch.no_grad():
        unet(x, t, c)


@pytest.mark.parametrize("plain_s, prepared_s, choice", [(1.0, 4.0, "plain"), (2.0, 1.0, "prepared")])
def test_the_unet_runs_prepared_only_if_its_own_calls_measured_faster_so_and_computes_the_same(
        tmp_path, monkeypatch, plain_s, prepared_s, choice):
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ckpt, SMALL_SD1, seed=7)
    want = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", prepack=False,
                         log=lambda *_: None).generate("a red circle", steps=5, seed=0, width=64, height=64).latents

    calls = []
    forward = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    messages = []
    pipe = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=messages.append)
    pipe.unet_call.clock = _clock(plain_s, prepared_s)       # the first U-Net call plain, the third prepared
    got = pipe.generate("a red circle", steps=5, seed=0, width=64, height=64).latents
    assert len(calls) == 5                                     # the measuring costs no U-Net call of its own
    assert pipe.unet_call.choice == choice
    assert onednn.is_prepared(pipe.model.unet) == (choice == "prepared")
    assert f"U-Net call {plain_s:.3f} s plain, {prepared_s:.3f} s prepared: {choice}" in "\n".join(messages)
    _close(got, want)


def test_a_conv_is_laid_out_at_its_first_call_and_again_only_for_a_new_shape():
    conv = torch.nn.Conv2d(64, 32, 3, padding=1).eval()
    prepared = onednn.Conv2d(conv)
    assert prepared.laid_out_for is None and prepared.weight.is_mkldnn     # opaque from the start (no saving)
    with torch.no_grad():
        for shape in [(2, 64, 16, 16), (2, 64, 16, 16), (1, 64, 8, 12)]:
            x = torch.randn(shape)
            _close(prepared(x), conv(x))
            assert prepared.laid_out_for == list(shape)
        _close(prepared.to_conv().weight, conv.weight)


@pytest.mark.parametrize("cin, cout, k, side", [(1280, 1280, 3, 2), (960, 320, 1, 16)],
                         ids=["3x3-on-2x2", "1x1-on-16x16"])
def test_a_prepared_conv_reorders_no_weight_at_its_second_call(capfd, cin, cout, k, side):
    # The slowdown of the audit: a weight laid out for an 8x8 map, called on the U-Net's 2x2 one, was reordered
    # into the layout that map wants at every call (on AVX2 by oneDNN's generic loop, 1280x1280x3x3 -> seconds).
    # oneDNN's verbose log names every primitive it runs: after the first call only the convolution may run.
    # (Which shapes a stale layout hurts depends on the CPU: on an AVX-512 EPYC the 1x1 case, on AVX2 the 3x3 one.)
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).eval()
    prepared = onednn.Conv2d(conv)
    x = torch.randn(2, cin, side, side)
    with torch.no_grad():
        want = conv(x)
        prepared(x)                                       # lays the weight out for this shape
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            got = prepared(x)
        log = [line for line in capfd.readouterr().out.splitlines() if ",primitive,exec," in line]
    assert any(",convolution," in line for line in log), "no oneDNN log captured: the check could not fail"
    assert not [line for line in log if ",reorder," in line], "\n".join(log)
    _close(got, want)
