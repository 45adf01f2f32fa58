r"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs"), as torchmetrics computes it.

    IS = exp( E_x KL(p(y|x) || p(y)) ),   p(y) = E_x p(y|x)

p(y|x) is the softmax of Inception's 1008 logits *without* the head's bias ("logits_unbiased", see
InceptionV3.logits: OpenAI's original code did not add it). The images are split into `splits` groups
(torch.chunk: sizes ceil(N / splits), the last group smaller), IS is computed per group with that group's p(y),
and the result is the mean and the standard deviation (n-1 denominator, torch.std) over groups.

Which image lands in which group changes the result. torchmetrics' InceptionScore.compute shuffles the features
with torch.randperm(N) from torch's *global* generator, so its value depends on torch's global seed at compute
time; pass `generator` here for a reproducible split (torch.manual_seed(s) before torchmetrics' compute and
generator=torch.Generator().manual_seed(s) here draw the same permutation). Others differ: OpenAI's code and
torch-fidelity split in input order, and take numpy's std (n denominator).
"""
import torch

from .inception import load_inception
from .resize import to_inception_input


def inception_score(logits, splits=10, generator=None):
    """(N, 1008) unbiased logits -> (mean, std) of the per-split IS, float64 Python floats."""
    logits = torch.as_tensor(logits).double()
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"expected logits (N, classes) with N >= splits={splits}, got {tuple(logits.shape)}")
    logits = logits[torch.randperm(logits.shape[0], generator=generator)]
    scores = []
    for group in logits.chunk(splits, dim=0):
        log_p_yx = group.log_softmax(dim=1)                                      # log p(y|x)
        log_p_y = log_p_yx.exp().mean(dim=0, keepdim=True).log()                 # log p(y), this split's marginal
        kl = (log_p_yx.exp() * (log_p_yx - log_p_y)).sum(dim=1)                  # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std())


@torch.no_grad()
def inception_logits(images, model, batch_size=50, resize="torchmetrics", device="cpu"):
    """uint8 images (N, 3, H, W) -> (N, 1008) unbiased logits, float64 (resize: see resize.py; torchmetrics'
    IS uses its own "torchmetrics" mode)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_inception_input(images[start:start + batch_size], resize).to(device)
        out.append(model.logits(model(x), bias=False).double().cpu())
    return torch.cat(out)


def inception_score_of_images(images, model=None, splits=10, generator=None, batch_size=50, resize="torchmetrics",
                              device="cpu", weights=None):
    model = model or load_inception(weights, device=device)
    return inception_score(inception_logits(images, model, batch_size, resize, device), splits, generator)
