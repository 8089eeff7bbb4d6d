"""dsgd.treemath: the smoothed gradient against closed forms, and the layering it exists for
(optim and metrics both build on it; optim imports no metric)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from dsgd.treemath import row_norm, row_scale, sample_xi, smoothed_gradient

D = torch.float64


def test_smoothed_gradient_of_a_cubic_is_exact_per_antithetic_pair_and_se_is_the_spread():
    # grad of sum w^4 / 4 is w^3; a pair gives w^3 + 3 w eps^2, so with draws +-1 known the
    # mean and its standard error are closed forms
    w = {"a": torch.tensor([[1.0, 2.0]], dtype=D)}
    draws = [{"a": torch.tensor([[1.0, 0.0]], dtype=D)}, {"a": torch.tensor([[0.0, 1.0]],
                                                                            dtype=D)}]
    est = smoothed_gradient(lambda p: {"a": p["a"] ** 3}, w, draws)
    pairs = torch.tensor([[1 + 3, 8.0], [1.0, 8 + 6]], dtype=D)  # (K, P)
    assert torch.allclose(est.mean["a"][0], pairs.mean(0))
    assert torch.allclose(est.se["a"][0], pairs.std(0) / 2 ** 0.5)
    together = smoothed_gradient(lambda p: {"a": p["a"] ** 3}, w, draws, together=True)
    assert torch.allclose(together.mean["a"], est.mean["a"])
    assert smoothed_gradient(lambda p: {"a": p["a"] ** 3}, w, draws, with_se=False).se is None


def test_zero_perturbation_returns_the_gradient_exactly():
    w = {"a": torch.randn(3, 4)}
    zero = [{"a": torch.zeros(3, 4)}] * 3
    est = smoothed_gradient(lambda p: {"a": torch.sin(p["a"])}, w, zero)
    assert torch.equal(est.mean["a"], torch.sin(w["a"]))
    assert torch.equal(est.se["a"], torch.zeros(3, 4))


def test_sample_xi_has_covariance_xi_and_row_helpers():
    g = torch.Generator().manual_seed(0)
    stacked = {"a": torch.randn(4, 3, generator=g, dtype=D)}
    d = stacked["a"] - stacked["a"].mean(0)
    eps = sample_xi(stacked, 200_000, torch.Generator().manual_seed(1))["a"]
    assert torch.allclose(eps.T @ eps / len(eps), d.T @ d / 4, atol=2e-2)
    x = {"a": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "b": torch.zeros(2, 1)}
    assert torch.equal(row_norm(x), torch.tensor([5.0, 1.0]))
    assert torch.equal(row_scale(x["a"], torch.tensor([2.0, 0.5])),
                       torch.tensor([[6.0, 8.0], [0.0, 0.5]]))


def test_optim_does_not_import_metrics():
    code = ("import sys, dsgd.optim; bad = [m for m in sys.modules if m.startswith("
            "'dsgd.metrics')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
