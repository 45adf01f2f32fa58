"""The readable attention path and the SDPA fast path compute the same function."""
import pytest
import torch

from minisd.attention import attention


@pytest.mark.parametrize("causal", [False, True])
def test_math_and_sdpa_paths_agree(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 77, 8 * 40, generator=g) for _ in range(3))
    slow = attention(q, k, v, heads=8, causal=causal, fast=False)
    fast = attention(q, k, v, heads=8, causal=causal, fast=True)
    # both are fp32 softmax(QK^T/sqrt(d))V; only summation order differs
    assert (slow - fast).abs().max() <= 1e-5 * slow.std()


def test_cross_attention_shapes_and_causality():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 16, 64, generator=g)
    k, v = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    assert attention(q, k, v, heads=2).shape == (1, 16, 64)
    # causal: changing a later token must not change earlier outputs, and must change its own
    x = torch.randn(1, 6, 32, generator=g)
    y = x.clone()
    y[0, 4] += 1.0
    a, b = (attention(t, t, t, heads=4, causal=True, fast=False) for t in (x, y))
    assert torch.equal(a[0, :4], b[0, :4])
    assert not torch.allclose(a[0, 4], b[0, 4])
