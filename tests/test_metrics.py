"""minisd.metrics computes what the reference metric implementations compute, with random weights (offline).

Inception: a random state dict in pytorch-fid's layout, saved as pt_inception-2015-12-05-6726825d.pth under a
temporary $TORCH_HOME/hub/checkpoints, is what pytorch-fid, torch-fidelity, torchmetrics and minisd all load.
Random init would make a weak test (tiny or exploding activations, BatchNorm that does nothing), so convs are
He-normal, BatchNorm gains/biases are random, and the running statistics are set from one batch of images in
train mode: every BatchNorm then standardises real activations and pool3 features are O(1).

Tolerances, with reasons:
- pool3 / logits: max abs error <= 1e-5 x max |reference| (fp32 on CPU; the implementations differ only in
  summation order, e.g. mean over H, W vs AdaptiveAvgPool2d; measured ~1e-7 relative);
- FID: relative 1e-4 (float64 statistics of fp32 features; the references' matrix square roots differ from each
  other at this level on rank-deficient covariances: scipy's sqrtm / eigvals of a non-symmetric product);
- IS: relative 1e-5 (torchmetrics works in fp32, minisd in float64);
- CLIP: max abs error <= 1e-4 x embedding std, as in tests/test_clip.py (fp32, fused q/k/v, SDPA).
Each comparison also checks that a plausible mistake (another resize, the bias in the logits, another split)
moves the result far beyond its tolerance.
"""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minisd import cli
from minisd.metrics import fid as fid_mod
from minisd.metrics.inception import FILENAME, InceptionV3, from_pytorch_fid, load_inception
from minisd.metrics.inception_score import inception_logits, inception_score
from minisd.metrics.resize import to_inception_input

REL = 1e-5       # pool3 and logits, x max |reference|
FID_REL = 1e-4


def rel_err(ours, ref):
    ours, ref = torch.as_tensor(np.asarray(ours), dtype=torch.float64), torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------------------------------ fixtures ---

def pytorch_fid_skeleton():
    """pytorch_fid.inception.fid_inception_v3() without its download: torchvision's inception_v3 (no init)
    with pytorch-fid's FID blocks swapped in, exactly as that function does it."""
    from pytorch_fid.inception import (FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2,
                                       _inception_v3)
    m = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
    m.Mixed_5b, m.Mixed_5c, m.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    m.Mixed_6b, m.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    m.Mixed_6d, m.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    m.Mixed_7b, m.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    return m


def make_images(seed, n, h, w):
    """Varied uint8 images: smooth random colour fields at several scales plus noise, so features differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        scale = [2, 4, 8, 16][i % 4]
        field = torch.rand(1, 3, scale, scale, generator=g)
        field = torch.nn.functional.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)[0]
        field = field + 0.15 * (i % 3) * torch.randn(3, h, w, generator=g)
        out.append((field.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A random FID Inception in pytorch-fid's layout, as $TORCH_HOME/hub/checkpoints/<pytorch-fid's name>."""
    home = tmp_path_factory.mktemp("torch_home")
    g = torch.Generator().manual_seed(0)
    model = pytorch_fid_skeleton()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight"):                       # He init keeps ReLU activations O(1)
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2 / p[0].numel()))
            elif name.endswith("bn.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bn.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name == "fc.weight":                              # logits O(1): no float32 softmax underflow
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            elif name == "fc.bias":
                p.copy_(torch.randn(p.shape, generator=g))
        for m in model.modules():                                  # running stats := one batch's statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        model.train()
        calibration = to_inception_input(make_images(99, 4, 96, 96), "pytorch-fid")
        model(calibration)
        # the head: features are positive with a large common mean, which would give every image the same
        # softmax (IS = 1); weights orthogonal to the mean feature and scaled make logits vary O(1) per image
        net = InceptionV3()
        net.load_state_dict(from_pytorch_fid(model.state_dict()))
        pool3 = net.eval()(calibration)
        direction = pool3.mean(0) / pool3.mean(0).norm()
        w = model.fc.weight - (model.fc.weight @ direction)[:, None] * direction
        model.fc.weight.copy_(w * 2 / (pool3 @ w.T).std(0).mean())
    path = home / "hub" / "checkpoints" / FILENAME
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def weights(torch_home):
    return torch_home / "hub" / "checkpoints" / FILENAME


@pytest.fixture(scope="module")
def ours(torch_home):
    return load_inception()          # found by the default rule: $TORCH_HOME/hub/checkpoints


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two small folders (fewer images than 2048 features: rank-deficient covariances). A is upsampled to 299,
    B downsampled, where the resize modes differ most."""
    root = tmp_path_factory.mktemp("images")
    return write_folder(root / "a", make_images(1, 4, 64, 64)), write_folder(root / "b", make_images(2, 3, 400, 320))


def folder_images(folder):
    return torch.stack([fid_mod.read_image(p) for p in fid_mod.image_files(folder)])


@pytest.fixture(scope="module")
def pytorch_fid_model(torch_home):
    from pytorch_fid.inception import InceptionV3
    return InceptionV3([3]).eval()        # loads the file from $TORCH_HOME: no download


# --------------------------------------------------------------------------------------- Inception pool3 ---

def test_pool3_matches_pytorch_fid(ours, pytorch_fid_model, folders):
    batches = [folder_images(folders[0])[:2], folder_images(folders[1])[:1]]     # upsampled and downsampled
    with torch.no_grad():
        ref = torch.cat([pytorch_fid_model(x.float() / 255)[0].flatten(1) for x in batches])
        mine = ours(to_inception_input([im for x in batches for im in x], "pytorch-fid"))
    err = rel_err(mine, ref)
    print(f"pool3 vs pytorch-fid: max rel err {err:.2e}, feature mean {ref.mean():.3f} std {ref.std():.3f}")
    assert ref.std() > 0.1 and err <= REL
    with torch.no_grad():   # could fail: the "tensorflow" resize is a different input
        assert rel_err(ours(to_inception_input(batches[1], "tensorflow")), ref[-1:]) > 100 * REL


def test_clean_resize_matches_clean_fid_then_same_network(ours, pytorch_fid_model, folders):
    """clean-fid's resizer (PIL bicubic per float channel) and normalisation (x - 128) / 128, fed to pytorch-fid's
    network without its own resize/normalisation (clean-fid's TorchScript graph holds the same weights)."""
    from cleanfid.resize import build_resizer
    images = folder_images(folders[1])[:1]
    resized = torch.stack([torch.from_numpy(build_resizer("clean")(im.permute(1, 2, 0).numpy())).permute(2, 0, 1)
                           for im in images])
    x = to_inception_input(images, "clean")
    assert torch.equal(x, (resized - 128) / 128)
    net = pytorch_fid_model
    net.resize_input = net.normalize_input = False      # (restored below)
    try:
        with torch.no_grad():
            ref = net(x)[0].flatten(1)
            err = rel_err(ours(x), ref)
    finally:
        net.resize_input = net.normalize_input = True
    print(f"pool3 (clean) vs pytorch-fid network: max rel err {err:.2e}")
    assert err <= REL


def test_pool3_and_logits_match_torch_fidelity(ours, weights, folders):
    """torch-fidelity's extractor: TF1 bilinear resize on uint8 values, (x-128)/128, pool3, logits with and
    without the bias (its "logits_unbiased" feeds the Inception Score)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                      feature_extractor_weights_path=str(weights))
    images = folder_images(folders[0])[:2]
    with torch.no_grad():
        pool3, unbiased, logits = ref(images)
        mine = ours(to_inception_input(images, "tensorflow"))
        errs = [rel_err(mine, pool3), rel_err(ours.logits(mine, bias=False), unbiased),
                rel_err(ours.logits(mine), logits)]
    print(f"vs torch-fidelity: pool3 {errs[0]:.2e}, logits_unbiased {errs[1]:.2e}, logits {errs[2]:.2e}")
    assert max(errs) <= REL
    assert rel_err(ours.logits(mine, bias=True), unbiased) > 100 * REL    # could fail: the bias matters


# ------------------------------------------------------------------------------------------------- FID ---
# A 2048x2048 float64 eigendecomposition takes 5-20 s on these 2-core machines (scipy's sqrtm and torchmetrics'
# non-symmetric eigvals 30-70 s), so the default run checks the two halves of FID separately: the statistics
# (mu, sigma) at 2048 features against each reference, and the distance formula on smaller rank-deficient and
# full-rank covariances against each reference's own formula. The end-to-end FIDs at 2048 are marked slow.

@pytest.fixture(scope="module")
def stats_a(ours, folders):
    return fid_mod.statistics(folders[0], ours)


def test_statistics_match_pytorch_fid(stats_a, pytorch_fid_model, folders):
    from pytorch_fid.fid_score import calculate_activation_statistics
    m, s = calculate_activation_statistics(fid_mod.image_files(folders[0]), pytorch_fid_model, 50, 2048, "cpu",
                                           num_workers=0)
    errs = rel_err(stats_a[0], m), rel_err(stats_a[1], s)
    print(f"statistics vs pytorch-fid: mu {errs[0]:.2e}, sigma {errs[1]:.2e}")
    assert errs[0] <= REL and errs[1] <= 10 * REL      # sigma: products of two features, errors add


def test_statistics_match_torchmetrics(ours, weights, folders):
    """torchmetrics keeps running sums (its metric states); its compute turns them into mu and sigma this way."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    images = folder_images(folders[1])
    metric.update(images, real=True)
    n = metric.real_features_num_samples
    mu = (metric.real_features_sum / n).unsqueeze(0)
    sigma = (metric.real_features_cov_sum - n * mu.T.mm(mu)) / (n - 1)
    mine = fid_mod.statistics(images, ours, resize="torchmetrics")
    errs = rel_err(mine[0], mu[0]), rel_err(mine[1], sigma)
    print(f"statistics vs torchmetrics: mu {errs[0]:.2e}, sigma {errs[1]:.2e}")
    assert errs[0] <= REL and errs[1] <= 10 * REL
    # could fail: at these downscaled images pytorch-fid's input (no antialiasing) is far from torchmetrics'
    assert rel_err(to_inception_input(images, "pytorch-fid"), to_inception_input(images, "torchmetrics")) > 0.01


def exact_trace_sqrt(x1, x2):
    """Tr((S1 S2)^{1/2}) from the features: S = A^T A / (n-1) with A centred, and the nonzero eigenvalues of
    S1 S2 are the squared singular values of A1 A2^T / sqrt((n1-1)(n2-1)): no rank-deficient matrix involved."""
    a1, a2 = x1 - x1.mean(0), x2 - x2.mean(0)
    return torch.linalg.svdvals(a1 @ a2.T).sum() / math.sqrt((len(x1) - 1) * (len(x2) - 1))


def random_features(n1, n2, d):
    g = torch.Generator().manual_seed(n1 + d)
    x1 = torch.rand(n1, d, generator=g, dtype=torch.float64) * 2
    x2 = torch.rand(n2, d, generator=g, dtype=torch.float64) * 2 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    return x1, x2


def check_frechet_distance(x1, x2, references=True):
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import _compute_fid
    (mu1, s1), (mu2, s2) = fid_mod.moments(x1), fid_mod.moments(x2)
    mine = fid_mod.frechet_distance(mu1, s1, mu2, s2)
    refs = {"exact": ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * exact_trace_sqrt(x1, x2)).item()}
    if references:
        refs["pytorch-fid"] = calculate_frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
        refs["torchmetrics"] = _compute_fid(mu1, s1, mu2, s2).item()
    errs = {k: abs(mine - v) / abs(v) for k, v in refs.items()}
    print(f"n={len(x1)},{len(x2)} d={x1.shape[1]}: fid {mine:.8f}; rel errs "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert errs["exact"] <= 1e-9 and max(errs.values()) <= FID_REL
    return mine


@pytest.mark.parametrize("n1, n2, d", [(10, 12, 256), (300, 400, 64)])   # rank-deficient; full rank
def test_frechet_distance_matches_references(n1, n2, d):
    check_frechet_distance(*random_features(n1, n2, d))


def test_frechet_distance_without_the_eigenvalue_cutoff_would_be_off():
    """Could fail: on rank-deficient covariances, square roots of the rounding-noise eigenvalues add up."""
    x1, x2 = random_features(10, 12, 256)
    (_, s1), (_, s2) = fid_mod.moments(x1), fid_mod.moments(x2)
    lam, v = torch.linalg.eigh(s1)
    sqrt1 = (v * lam.clamp(min=0).sqrt()) @ v.T
    naive = torch.linalg.eigvalsh(sqrt1 @ s2 @ sqrt1).clamp(min=0).sqrt().sum()
    exact = exact_trace_sqrt(x1, x2)
    assert abs(fid_mod.trace_sqrt_product(s1, s2) - exact) <= 1e-10 * exact < abs(naive - exact)


@pytest.mark.slow
def test_frechet_distance_at_2048_rank_deficient_matches_references():
    """~2 min: scipy's sqrtm and torchmetrics' eigvals at 2048."""
    check_frechet_distance(*random_features(10, 12, 2048))


def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = fid_mod.moments(random_features(10, 12, 256)[0])
    assert abs(fid_mod.frechet_distance(mu, sigma, mu, sigma)) <= 1e-9 * sigma.trace().item()


@pytest.mark.slow
def test_fid_matches_pytorch_fid_on_folders(ours, folders):
    from pytorch_fid.fid_score import calculate_fid_given_paths
    a, b = map(str, folders)
    ref = calculate_fid_given_paths([a, b], batch_size=50, device="cpu", dims=2048, num_workers=0)
    mine = fid_mod.fid(a, b, model=ours)
    print(f"FID vs pytorch-fid: {mine:.6f} vs {ref:.6f}, rel err {abs(mine - ref) / ref:.2e}")
    assert abs(mine - ref) <= FID_REL * ref


@pytest.mark.slow
def test_fid_matches_torchmetrics(ours, weights, folders):
    """torchmetrics' FrechetInceptionDistance with the same weights file: its default antialiased bilinear
    resize on uint8 values is minisd's "torchmetrics" mode."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    real, fake = folder_images(folders[0]), folder_images(folders[1])
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ref = metric.compute().item()
    mine = fid_mod.fid(real, fake, model=ours, resize="torchmetrics")
    print(f"FID vs torchmetrics: {mine:.6f} vs {ref:.6f}, rel err {abs(mine - ref) / ref:.2e}")
    assert abs(mine - ref) <= FID_REL * ref


def test_npz_files_are_pytorch_fids_format(stats_a, pytorch_fid_model, folders, tmp_path):
    from pytorch_fid.fid_score import compute_statistics_of_path
    assert cli.main(["fid", str(folders[0]), "--save-stats", str(tmp_path / "ours.npz")]) == 0
    m, s = compute_statistics_of_path(str(tmp_path / "ours.npz"), pytorch_fid_model, 50, 2048, "cpu")
    assert m.dtype == s.dtype == np.float64 and m.shape == (2048,) and s.shape == (2048, 2048)
    assert np.array_equal(m, stats_a[0].numpy()) and np.array_equal(s, stats_a[1].numpy())
    np.savez_compressed(tmp_path / "ref.npz", mu=m, sigma=s)          # how pytorch-fid's --save-stats writes
    mu, sigma = fid_mod.load_stats(tmp_path / "ref.npz")
    assert torch.equal(mu, stats_a[0]) and torch.equal(sigma, stats_a[1])


def test_cli_prints_fid_last(tmp_path, capsys):
    """On two small .npz files (no network, small covariances): the line a script greps for."""
    x1, x2 = random_features(10, 12, 32)
    fid_mod.save_stats(tmp_path / "a.npz", *fid_mod.moments(x1))
    fid_mod.save_stats(tmp_path / "b.npz", *fid_mod.moments(x2))
    assert cli.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    expected = check_frechet_distance(x1, x2, references=False)
    assert last.startswith("fid=") and abs(float(last[4:]) - expected) <= 1e-6 * expected


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "exists"])
def test_cli_errors_are_one_line(case, tmp_path, capsys, torch_home):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    (tmp_path / "out.npz").write_bytes(b"")
    argv = {"missing": [str(tmp_path / "nope"), str(tmp_path / "empty")],
            "empty": [str(tmp_path / "empty"), str(bad)],
            "unreadable": [str(bad), str(bad)],
            "exists": [str(bad), "--save-stats", str(tmp_path / "out.npz")]}[case]
    assert cli.main(["fid", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(err)
    assert len(err) == 1 and err[0].startswith("minisd: error: ")


def test_missing_weights_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="pytorch-fid/releases/download.*" + FILENAME + "(.|\n)*" + "torch"):
        load_inception(download=False)


def test_state_dict_errors_name_the_key(weights):
    from minisd.metrics.inception import from_pytorch_fid
    sd = torch.load(weights, weights_only=True)
    with pytest.raises(ValueError, match="missing Inception key 'fc.bias'"):
        from_pytorch_fid({k: v for k, v in sd.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match="unknown Inception key 'AuxLogits.fc.weight'"):
        from_pytorch_fid({**sd, "AuxLogits.fc.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------- Inception Score ---

def test_inception_score_matches_torchmetrics(ours, weights, folders):
    """torchmetrics' InceptionScore with the same file (its NoTrainInceptionV3, passed as the module because
    the string form always downloads) and the same permutation: torch.manual_seed before its compute, the same
    seed in a Generator here."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                             feature_extractor_weights_path=str(weights))
    images = [folder_images(folders[0])]     # 4 images, 2 splits (torchmetrics' default 10 needs >= 10)
    metric = InceptionScore(feature=net, splits=2)
    for batch in images:
        metric.update(batch)
    torch.manual_seed(123)
    ref_mean, ref_std = (t.item() for t in metric.compute())
    logits = inception_logits([im for batch in images for im in batch], ours, resize="torchmetrics")
    mean, std = inception_score(logits, splits=2, generator=torch.Generator().manual_seed(123))
    print(f"IS vs torchmetrics: {mean:.6f} +- {std:.6f} vs {ref_mean:.6f} +- {ref_std:.6f}")
    assert abs(mean - ref_mean) <= REL * ref_mean and abs(std - ref_std) <= REL * ref_mean
    assert ref_mean > 1.05                                                  # not the trivial IS of 1
    other = inception_score(logits, splits=2, generator=torch.Generator().manual_seed(7))   # could fail
    assert abs(other[0] - ref_mean) > 100 * REL * ref_mean or abs(other[1] - ref_std) > 100 * REL * ref_mean


# ------------------------------------------------------------------------------------------------ CLIP score ---
# A reduced config by default (ViT: 224 px, patch 14, width 128, 2 layers, head width 64; text: width 128,
# 2 layers): the same code paths as ViT-L/14, whose full-size run is the slow test below.

from minisd.config import SD1_TEXT, TextConfig                                      # noqa: E402
from minisd.metrics.clip_image import VIT_L_14, VisionConfig          # noqa: E402
from minisd.metrics.clip_score import clip_score, clip_scores, load_clip, preprocess  # noqa: E402

SMALL_VISION = VisionConfig(width=128, layers=2, heads=2, embed_dim=64)
SMALL_TEXT = TextConfig(width=128, layers=2, heads=2, source_layers=2)
CAPTIONS = ["a photograph of an astronaut riding a horse", "a red circle on a blue background",
            "a cat", "4k, highly detailed, trending on artstation"]


def redraw_(module, seed):
    """Every parameter at a sane scale (inits zero some biases, which would hide a swapped bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def hf_clip(vision, text, seed):
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=4 * text.width,
                         num_hidden_layers=text.layers, num_attention_heads=text.heads, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=vision.width, intermediate_size=4 * vision.width,
                           num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
                           image_size=vision.image_size, patch_size=vision.patch_size, hidden_act="quick_gelu"),
        projection_dim=vision.embed_dim)
    with torch.device("meta"):
        model = CLIPModel(config)
    model = model.to_empty(device="cpu")
    for name, buf in model.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return redraw_(model, seed)


def hf_processor(pil_backend):
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer
    import json
    import tempfile
    from minisd.tokenizer import Tokenizer
    t = Tokenizer()          # vocab.json and merges.txt as the hub's CLIP tokenizer folders hold them
    vocab = json.dumps(t.encoder, ensure_ascii=False)
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in sorted(t.bpe_ranks, key=t.bpe_ranks.get))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            f.write(vocab)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write(merges)
        tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                                  pad_token="<|endoftext|>", model_max_length=77)
    images = CLIPImageProcessorPil() if pil_backend else CLIPImageProcessor()
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


class Features(torch.nn.Module):
    """transformers >= 5's get_*_features return an output object whose pooler_output is the projected embedding;
    torchmetrics 1.9 expects the tensor itself (and fails on .norm). This unwraps it and changes nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids, attention_mask).pooler_output


@pytest.fixture(scope="module")
def small_clip():
    hf = hf_clip(SMALL_VISION, SMALL_TEXT, seed=7)   # pairs of both signs, positive mean
    return hf, load_clip(hf.state_dict(), SMALL_VISION, SMALL_TEXT)


def clip_images():
    """Two at 224 px on the short side (no resize), two downscaled with odd crop margins."""
    return [*make_images(5, 2, 224, 300), *make_images(6, 2, 263, 301)]


def test_clip_preprocess_matches_transformers_processors():
    from_pil = hf_processor(pil_backend=True).image_processor
    default = hf_processor(pil_backend=False).image_processor          # torchvision, transformers >= 5's default
    images = clip_images()
    mine = preprocess(images)
    ref_pil = from_pil(images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")["pixel_values"]
    ref_tv = default(images=images, return_tensors="pt")["pixel_values"]
    err_pil, err_tv = (mine - ref_pil).abs().max().item(), (mine - ref_tv).abs().max().item()
    err_tv_224 = (mine[:2] - ref_tv[:2]).abs().max().item()
    print(f"CLIP pixels: vs PIL processor {err_pil:.1e}, vs torchvision processor {err_tv:.3f} "
          f"(224 px: {err_tv_224:.1e})")
    assert err_pil <= 1e-5 and err_tv_224 <= 1e-5       # float32 rounding of (x/255 - mean)/std
    assert err_tv <= 2.5 / 255 / min((0.26862954, 0.26130258, 0.27577711))   # <= 2 levels of uint8 (see docstring)


def test_clip_score_matches_torchmetrics(small_clip):
    """torchmetrics' CLIPScore given the model and processor (its callable form: no hub name, no download), with
    transformers' PIL image processor: equal per pair and in the final clamped mean."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    hf, ours = small_clip
    processor = hf_processor(pil_backend=True)
    images = clip_images()
    ref_pairs, _ = _clip_score_update(images, CAPTIONS, Features(hf), processor)
    mine = clip_scores(images, CAPTIONS, ours)
    metric = CLIPScore(model_name_or_path=lambda: (Features(hf), processor))
    metric.update(images, CAPTIONS)
    ref = metric.compute().item()
    err = (mine - ref_pairs).abs().max().item()
    print(f"CLIP score pairs {mine.tolist()} vs {ref_pairs.tolist()}: max err {err:.1e}; score {ref:.4f}")
    assert err <= 1e-3                                 # 100 x cos: 1e-5 relative of a unit vector, x 100
    assert abs(clip_score(images, CAPTIONS, ours) - ref) <= 1e-3
    assert ref > 1 and (ref_pairs < 0).any()           # a clamp per pair (the paper's) would give another score:
    assert abs(ref_pairs.clamp(min=0).mean().item() - ref) > 1000 * 1e-3


def test_image_tower_matches_transformers_and_open_clip():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    ref = CLIP(embed_dim=64, quick_gelu=True,
               vision_cfg=CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=14, image_size=224),
               text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))
    ref = redraw_(ref, seed=4)
    ours = load_clip(ref.state_dict(), SMALL_VISION, SMALL_TEXT)
    pixels = preprocess(clip_images())
    tokens = open_clip.tokenize(CAPTIONS)            # pads with 0: the EOS (49407) is still the argmax
    with torch.no_grad():
        image_ref, image = ref.encode_image(pixels), ours.encode_image(pixels)
        text_ref, text = ref.encode_text(tokens), ours.encode_text(tokens)
    for what, a, b in (("image", image, image_ref), ("text", text, text_ref)):
        err = (a - b).abs().max().item()
        print(f"open_clip {what} embedding: max err {err:.1e}, std {b.std():.3f}")
        assert err <= 1e-4 * b.std()


def test_clip_key_map_errors_name_the_key(small_clip):
    hf, _ = small_clip
    sd = hf.state_dict()
    with pytest.raises(ValueError, match="missing key 'vision_model.encoder.layers.1.self_attn.k_proj.weight'"):
        load_clip({k: v for k, v in sd.items() if k != "vision_model.encoder.layers.1.self_attn.k_proj.weight"},
                  SMALL_VISION, SMALL_TEXT)
    with pytest.raises(ValueError, match="unknown key 'vision_model.extra'"):
        load_clip({**sd, "vision_model.extra": torch.zeros(1)}, SMALL_VISION, SMALL_TEXT)
    with pytest.raises(ValueError, match="image-tower key '(conv1.weight|positional_embedding)' has shape"):
        load_clip(sd, VisionConfig(width=128, layers=2, heads=2, embed_dim=64, patch_size=16), SMALL_TEXT)


@pytest.mark.slow
def test_clip_score_matches_torchmetrics_at_vit_l_14():
    """The real ViT-L/14 configuration (random weights, ~430M parameters): ~1 min on two cores."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    hf = hf_clip(VIT_L_14, SD1_TEXT, seed=5)
    ours = load_clip(hf.state_dict())
    processor = hf_processor(pil_backend=True)
    images = clip_images()[1:3]
    ref_pairs, _ = _clip_score_update(images, CAPTIONS[:2], Features(hf), processor)
    mine = clip_scores(images, CAPTIONS[:2], ours)
    print(f"ViT-L/14 pairs {mine.tolist()} vs {ref_pairs.tolist()}")
    assert (mine - ref_pairs).abs().max() <= 1e-3
