r"""Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule").

Each image set is summarised by the mean mu and covariance S of its Inception pool3 features (inception.py), and
the FID is the Fréchet (2-Wasserstein) distance between the two Gaussians with those moments:

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

S1 S2 is not symmetric, but it is similar to the symmetric PSD matrix M = S1^{1/2} S2 S1^{1/2}
(S1^{1/2} (S1 S2) S1^{-1/2} = M where S1 is invertible, and by continuity the eigenvalues agree everywhere), so
Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). Both steps are symmetric eigendecompositions (eigh), which are
backward stable: every computed eigenvalue is within ~eps |M| of a true one. With fewer images than 2048
features the covariances are rank-deficient and most true eigenvalues are exactly 0; computed, they come out as
rounding noise +-eps |M|, whose square roots (~1e-8 |M|^{1/2} each, for ~2000 of them) would add a spurious
positive term. So eigenvalues below the rounding level n eps lambda_max (numpy.linalg.matrix_rank's tolerance)
count as 0. scipy's sqrtm, which pytorch-fid uses, works on the non-symmetric product and can return complex
noise; torchmetrics takes the real part of the square roots of its eigenvalues. All of it in float64.

The statistics file is pytorch-fid's `.npz` with arrays `mu` (2048,) and `sigma` (2048, 2048), covariance with
the n-1 denominator (numpy.cov).

`--features tiny` swaps Inception for the tiny world's own classifier (tiny_features.py): the same distance over
its 128 pooled features, for images of coloured shapes. Its values are on their own scale, comparable only with
other tiny-feature FIDs (and its `.npz` files hold (128,) / (128, 128) statistics).

    minisd fid DIR_OR_NPZ DIR_OR_NPZ [--resize pytorch-fid|clean|torchmetrics|tensorflow] [--batch-size 50]
               [--device cpu] [--inception-weights FILE] [--features inception|tiny]
    minisd fid DIR --save-stats ref.npz
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .inception import load_inception
from .resize import to_inception_input
from .tiny_features import TinyFeatures, load_tiny_features

FEATURES = ("inception", "tiny")

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}   # pytorch-fid's


def image_files(folder):
    """The images in `folder` (not its subfolders), sorted. pytorch-fid globs the lowercase extensions only;
    here the extension's case does not matter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images" + ("" if folder.exists() else " (it does not exist)"))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def as_uint8(image):
    """A PIL image -> uint8 RGB tensor (3, H, W), what activations() takes (PIL .convert("RGB"), as pytorch-fid)."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def read_image(path):
    """An image file -> uint8 RGB tensor (3, H, W), as pytorch-fid reads it."""
    try:
        with Image.open(path) as image:
            return as_uint8(image)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def load_network(features="inception", weights=None, device="cpu"):
    """The feature network: "inception" (weights: see inception.load_inception) or "tiny" (weights: the shipped
    file unless a path is given)."""
    if features == "inception":
        return load_inception(weights, device=device)
    if features == "tiny":
        return load_tiny_features(weights, device=device)
    raise ValueError(f"unknown features {features!r}; valid: {', '.join(FEATURES)}")


def network_input(model, batch, resize):
    """What the network reads: Inception's 299x299 input made by the `resize` rule (resize.py), or the tiny
    network's own 64x64 input (the resize rule does not apply to it)."""
    if isinstance(model, TinyFeatures):
        return model.input(batch)
    return to_inception_input(batch, resize)


@torch.no_grad()
def activations(images, model, batch_size=50, resize="pytorch-fid", device="cpu"):
    """Inception pool3 features (N, 2048), or the tiny network's (N, 128), float64 on the CPU. `images`: a folder,
    a list of image files, uint8 images (N, 3, H, W), or a list of uint8 (3, H, W)."""
    if isinstance(images, (str, Path)):
        images = image_files(images)
    elif isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    if len(images) == 0:
        raise ValueError("no images given")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    features = []
    for start in range(0, len(images), batch_size):
        batch = [read_image(i) if isinstance(i, (str, Path)) else i for i in images[start:start + batch_size]]
        x = network_input(model, batch, resize).to(device)
        features.append(model(x).double().cpu())
    return torch.cat(features)


def moments(features):
    """(N, D) features -> mean (D,) and covariance (D, D) with the n-1 denominator, float64 (numpy.cov's)."""
    features = torch.as_tensor(features, dtype=torch.float64)
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images to estimate a covariance, got {features.shape[0]}")
    mu = features.mean(dim=0)
    centred = features - mu
    return mu, centred.T @ centred / (features.shape[0] - 1)


def statistics(source, model=None, batch_size=50, resize="pytorch-fid", device="cpu"):
    """(mu, sigma) of a pytorch-fid `.npz` file, or of the features of a folder / images (see activations)."""
    if isinstance(source, (str, Path)) and str(source).endswith(".npz"):
        return load_stats(source)
    return moments(activations(source, model, batch_size, resize, device))


def load_stats(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"statistics file {path} does not exist")
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a FID statistics file with arrays 'mu' and 'sigma' ({e})") from None
    return torch.from_numpy(mu).double(), torch.from_numpy(sigma).double()


def save_stats(path, mu, sigma):
    """Write pytorch-fid's format (np.savez_compressed with `mu` and `sigma`)."""
    np.savez_compressed(path, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))


def _eigvalsh_psd(m):
    """Eigenvalues of a symmetric PSD matrix, those below the rounding level set to 0 (see module docstring)."""
    lam = torch.linalg.eigvalsh((m + m.T) / 2)
    tol = lam.abs().max() * m.shape[0] * torch.finfo(m.dtype).eps
    return torch.where(lam > tol, lam, torch.zeros_like(lam))


def trace_sqrt_product(sigma1, sigma2):
    """Tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})) for covariances S1, S2."""
    lam, v = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    tol = lam.abs().max() * lam.shape[0] * torch.finfo(lam.dtype).eps
    sqrt1 = (v * torch.where(lam > tol, lam, torch.zeros_like(lam)).sqrt()) @ v.T    # S1^{1/2}
    return _eigvalsh_psd(sqrt1 @ sigma2 @ sqrt1).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}), in float64; a Python float."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}")
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2))


def fid_from_stats(stats1, stats2):
    return frechet_distance(*stats1, *stats2)


def fid(a, b, model=None, batch_size=50, resize="pytorch-fid", device="cpu", weights=None, features="inception"):
    """FID between two image sets, each a folder, a pytorch-fid `.npz`, or uint8 images. `model` (a loaded
    network) overrides `features` and `weights`."""
    # read the .npz files and list the folders first: a wrong path fails before the network is loaded
    sources = [load_stats(s) if isinstance(s, (str, Path)) and str(s).endswith(".npz") else
               image_files(s) if isinstance(s, (str, Path)) else s for s in (a, b)]
    stats = []
    for source in sources:
        if not isinstance(source, tuple):
            model = model or load_network(features, weights, device)
            source = moments(activations(source, model, batch_size, resize, device))
        stats.append(source)
    return fid_from_stats(*stats)
