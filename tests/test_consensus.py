"""Consensus statistics against hand-computed values and the explicitly formed Xi."""

import math

import pytest
import torch

from dsgd.metrics._func import flatten_stacked
from dsgd.metrics.consensus import (
    average,
    consensus_distance,
    consensus_spectrum,
    deviations,
    per_layer_consensus,
    sample_xi,
)

D = torch.float64


def random_stack(m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(m, 3, 2, generator=g, dtype=D),
        "b": torch.randn(m, 4, generator=g, dtype=D),
    }


def explicit_xi(stacked):
    x = flatten_stacked(stacked)  # (m, P)
    d = x - x.mean(0)
    return d.T @ d / x.shape[0]  # (P, P)


def test_hand_made_two_workers():
    # w_1 = (1, 0), w_2 = (3, 2): w_a = (2, 1), d = +-(1, 1), Tr Xi = (2 + 2) / 2 = 2
    s = {"a": torch.tensor([[1.0], [3.0]], dtype=D), "b": torch.tensor([[0.0], [2.0]], dtype=D)}
    assert average(s)["a"].item() == 2.0 and average(s)["b"].item() == 1.0
    assert torch.equal(deviations(s)["a"], torch.tensor([[-1.0], [1.0]], dtype=D))
    assert consensus_distance(s) == pytest.approx(2.0)  # 1/m, not 1/(m-1)
    assert per_layer_consensus(s) == pytest.approx({"a": 1.0, "b": 1.0})
    # Xi = [[1, 1], [1, 1]]: eigenvalues 2 and 0
    assert torch.allclose(consensus_spectrum(s, 2), torch.tensor([2.0, 0.0], dtype=D))


def test_identical_workers_have_zero_consensus():
    s = {"w": torch.ones(4, 7, dtype=D) * 3.0}
    assert consensus_distance(s) == 0.0
    assert torch.all(consensus_spectrum(s, 3) == 0)


def test_per_layer_sums_to_total_and_matches_trace():
    s = random_stack()
    total = consensus_distance(s)
    assert sum(per_layer_consensus(s).values()) == pytest.approx(total, rel=1e-12)
    assert total == pytest.approx(float(torch.trace(explicit_xi(s))), rel=1e-12)


def test_deviations_sum_to_zero():
    d = deviations(random_stack())
    for v in d.values():
        assert torch.allclose(v.sum(0), torch.zeros_like(v[0]), atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_spectrum_matches_eigvalsh_of_explicit_xi(k):
    s = random_stack(m=5)
    want = torch.linalg.eigvalsh(explicit_xi(s)).flip(0)[:k].clamp_min(0)
    got = consensus_spectrum(s, k)
    assert got.shape == (k,)
    assert torch.allclose(got, want, atol=1e-10)
    if k == 5:  # rank <= m - 1
        assert got[-1] == pytest.approx(0.0, abs=1e-12)


def test_spectrum_rejects_bad_k():
    with pytest.raises(ValueError):
        consensus_spectrum(random_stack(), 0)
    with pytest.raises(ValueError):
        consensus_spectrum(random_stack(), 11)  # P = 10


def test_sample_xi_covariance_converges_to_xi():
    s = random_stack(m=4)
    xi = explicit_xi(s)
    n = 40_000
    eps = sample_xi(s, n, torch.Generator().manual_seed(1))
    assert len(eps) == n and eps[0]["w"].shape == (3, 2)
    e = torch.stack([torch.cat([x["w"].reshape(-1), x["b"]]) for x in eps])  # (n, P)
    cov = e.T @ e / n  # mean is exactly 0 in expectation
    # entrywise CLT: Var(e_a e_b) = Xi_aa Xi_bb + Xi_ab^2 for a Gaussian
    sd = torch.sqrt((torch.outer(xi.diag(), xi.diag()) + xi**2) / n)
    assert torch.all((cov - xi).abs() <= 5 * sd + 1e-12)
    assert e.mean(0).abs().max() < 5 * math.sqrt(float(xi.diag().max()) / n)


def test_sample_xi_lies_in_span_of_deviations_and_is_reproducible():
    s = random_stack(m=3)  # rank 2 in a 10-dim space
    a = sample_xi(s, 5, torch.Generator().manual_seed(7))
    b = sample_xi(s, 5, torch.Generator().manual_seed(7))
    assert all(torch.equal(x["w"], y["w"]) for x, y in zip(a, b, strict=True))
    d = flatten_stacked(deviations(s))  # (m, P)
    q, _ = torch.linalg.qr(d.T)  # (P, m), orthonormal basis of the span
    for x in a:
        v = torch.cat([x["w"].reshape(-1), x["b"]])
        assert torch.allclose(q @ (q.T @ v), v, atol=1e-10)
