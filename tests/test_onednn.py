"""minisd.fast.onednn: a network prepared for oneDNN inference computes what the plain one does, refuses to be
saved or loaded into, restores exactly, and is only prepared where the Pipeline owns the model.

Tolerance: max abs difference <= 1e-5 x the output's largest magnitude (fp32 on CPU; oneDNN and MKL sum the
products in different orders, nothing else differs).
"""
import copy

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import SMALL_SD1, SMALL_SD2, write_ldm_checkpoint
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


def test_pipeline_load_prepares_and_a_handed_in_model_stays_plain(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ckpt, SMALL_SD1, seed=5)
    fast = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=lambda *_: None)
    assert onednn.is_prepared(fast.model.unet) and onednn.is_prepared(fast.model.text_encoder)
    a = fast.generate("a red circle", steps=3, seed=0, width=64, height=64)

    # a model handed in (it may be in training) is left as it is; a prepared one is restored first
    plain = Pipeline(fast.model, device="cpu", dtype=torch.float32, log=lambda *_: None)
    assert not onednn.is_prepared(fast.model.unet) and not onednn.is_prepared(fast.model.text_encoder)
    b = plain.generate("a red circle", steps=3, seed=0, width=64, height=64)
    assert not onednn.is_prepared(fast.model.unet) and not onednn.is_prepared(fast.model.text_encoder)
    _close(a.latents, b.latents)


def test_a_prepared_network_refuses_autograd_instead_of_giving_wrong_gradients():
    unet = onednn.prepare(_random(UNet(SMALL_SD1.unet), 6))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, SMALL_SD1.unet.context_dim)
    with pytest.raises(RuntimeError, match="no_grad"):
        unet(x, t, c)                    # its Linear layers share the trainable Parameters
    with torch.no_grad():
        unet(x, t, c)
