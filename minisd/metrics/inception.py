"""Inception-v3 as FID measures it: the 2015-12-05 TensorFlow graph (Szegedy et al. 2016, "Rethinking the
Inception Architecture"), the network of the original FID code (Heusel et al. 2017, TTUR) and of every FID number
published since.

torchvision's `inception_v3` is a different network (other weights, 1000 classes) and slightly other arithmetic.
pytorch-fid ports the TF graph onto torchvision's skeleton and patches four things, all copied here:
- 1008 classes (the TF graph's ImageNet head has 8 unused classes);
- the 3x3 average pools inside the A, C and first E blocks ignore the zero padding (`count_include_pad=False`),
  as TensorFlow's average pool does;
- the last block (Mixed_7c) pools with a *max* pool, not an average pool: a quirk of that TF graph (the paper
  says average), kept because the features must equal the TF ones;
- BatchNorm eps is 0.001 (TF's default), not PyTorch's 1e-5.

Module names are torchvision's, so the state dict of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the
same names torch-fidelity's and torchmetrics' weights use) loads by name. Outputs: pool3, the 2048 features
after the global average pool (FID, KID), and the 1008 logits of the head (Inception Score).

How an image becomes the 299x299 network input differs between the FID implementations and changes the score:
see resize.py.
"""
import http.client
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from minisd.download import ChecksumError, DownloadError, cache_dir, download as fetch

FILENAME = "pt_inception-2015-12-05-6726825d.pth"
URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FILENAME
# The file's SHA-256 starts with the 8 hex digits at the end of its name: torch.hub's naming rule for checkpoints
# (NAME-<first 8 hex digits of the SHA-256>.pth, checked by download_url_to_file(hash_prefix=...) and
# load_state_dict_from_url(check_hash=True)), which pytorch-fid's release follows. The download is checked
# against this prefix, and a file that does not match is deleted. The full value, as public code that fetches
# this URL pins it and as users of torch-fidelity's copy (weights-inception-2015-12-05-6726825d.pth, 95,628,359
# bytes) list it, agreeing with the prefix, is expected to be
#     6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2
# but no copy of the file was reachable here to confirm it, so only the prefix, which the file's publisher
# chose, is enforced.
SHA256_PREFIX = "6726825d"


class BatchNorm(nn.Module):
    """Inference-only batch norm with TensorFlow's eps. Stored as nn.BatchNorm2d names (weight, bias,
    running_mean, running_var); the checkpoint's `num_batches_tracked` counters are training state and dropped."""

    def __init__(self, channels, eps=0.001):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU: every convolution of the network is one of these."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = BatchNorm(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 stride-1 average pool that, like TensorFlow's, averages only the pixels inside the image (at a border
    the padded zeros are not counted); torchvision counts them (count_include_pad=True)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1, concatenated."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | strided max pool."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e): 7x7 convolutions factorised into 1x7 and 7x1 (paper, section 3.2)."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)],
                         dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c): 3x3 convolutions split into parallel 1x3 and 3x1 (paper, figure 7).
    pool="avg" for Mixed_7b, "max" for Mixed_7c (the TF graph's quirk, see the module docstring)."""

    def __init__(self, c_in, pool):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionV3(nn.Module):
    """(N, 3, 299, 299) network input (resize.py) -> pool3 features (N, 2048). `logits(pool3)` -> (N, 1008)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))       # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                             # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                            # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                             # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                       # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                                     # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)                                                     # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))                                      # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                                # pool3: (N, 2048)

    def logits(self, pool3, bias=True):
        """The 1008 class logits. bias=False gives torch-fidelity's "logits_unbiased", which torch-fidelity and
        torchmetrics feed to the Inception Score: OpenAI's original IS code (Salimans et al. 2016, improved-gan)
        multiplied pool3 by the graph's `softmax/logits/MatMul` weight and never added the bias."""
        return F.linear(pool3, self.fc.weight, self.fc.bias if bias else None)


# ---- weights -------------------------------------------------------------------------------------------------

DROPPED = ".num_batches_tracked"   # BatchNorm's training counter: the only key of the file not loaded


def from_pytorch_fid(state_dict):
    """pytorch-fid's (= torch-fidelity's) state dict -> ours: the same names, less the BatchNorm counters.
    Raises ValueError naming the first unknown, missing or mis-shaped key."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in InceptionV3().state_dict().items()}
    ours = {k: v for k, v in state_dict.items() if not k.endswith(DROPPED)}
    for k, v in ours.items():
        if k not in shapes:
            raise ValueError(f"unknown Inception key {k!r}")
        if v.shape != shapes[k]:
            raise ValueError(f"Inception key {k!r} has shape {tuple(v.shape)}, expected {tuple(shapes[k])}")
    for k in shapes:
        if k not in ours:
            raise ValueError(f"missing Inception key {k!r}")
    return ours


def default_weights_path() -> Path:
    """Where pytorch-fid caches the file: $TORCH_HOME/hub/checkpoints/ (torch.hub's directory)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FILENAME


def load_inception(path=None, download=True, device="cpu") -> InceptionV3:
    """The FID Inception in eval mode. `path` (`--inception-weights FILE`) if given; else pytorch-fid's cached
    file if present; else minisd's cache, fetched there first when `download` is set (and refused unless its
    SHA-256 starts with SHA256_PREFIX)."""
    path = weights_file(path, download)
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(path)
        else:   # a pickled dict of tensors: weights_only refuses anything that would run code
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated download, wrong file: torch/pickle raise many kinds
        raise ValueError(f"cannot read Inception weights {path}: {e}") from None
    model = InceptionV3()
    model.load_state_dict(from_pytorch_fid(state_dict))
    return model.eval().requires_grad_(False).to(device)


def weights_file(path=None, download=True) -> Path:
    """The Inception weights file load_inception reads (fetched first if it must be): what `minisd eval` checks
    before its first image, so that a missing file is not learnt after hours of generating."""
    if path is None:
        candidates = [default_weights_path(), cache_dir() / FILENAME]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            path = _fetch(cache_dir() / FILENAME, candidates, download)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights file {path} does not exist")
    return path


def _fetch(path, candidates, download):
    by_hand = (f"Download\n  {URL}\nand put it at one of\n  " + "\n  ".join(map(str, candidates)) +
               "\n(or pass its path with --inception-weights FILE)")
    if not download:
        raise ValueError(f"no Inception weights found. {by_hand}")
    try:
        return fetch(URL, path, hash_prefix=SHA256_PREFIX)
    except ChecksumError as e:      # the server's file is not the one named: fetching it by hand gives the same
        raise ValueError(f"could not download the Inception weights: {e} Or pass a copy you trust with "
                         f"--inception-weights FILE.") from None
    except (OSError, http.client.HTTPException, DownloadError) as e:   # urllib's errors are OSErrors
        raise ValueError(f"could not download the Inception weights ({e}). {by_hand}") from None
