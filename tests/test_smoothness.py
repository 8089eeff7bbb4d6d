"""Local gradient-Lipschitz estimates on a quadratic and on the non-smooth L(w) = sum |w_i|."""

import math

import pytest
import torch

from dsgd.metrics._func import flatten, unflatten
from dsgd.metrics.consensus import sample_xi
from dsgd.metrics.smoothness import (
    gradient_lipschitz,
    isotropic_sampler,
    smoothed_gradient_lipschitz,
)

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quadratic(lam, seed=0):
    """L(w) = 1/2 w^T A w over {"a": (2,), "b": (1,)}, A = Q diag(lam) Q^T."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen(seed), dtype=D))
    a = q @ torch.diag(torch.tensor(lam, dtype=D)) @ q.T
    like = {"a": torch.zeros(2, dtype=D), "b": torch.zeros(1, dtype=D)}
    return (lambda p: 0.5 * flatten(p) @ a @ flatten(p)), a, like


def abs_loss(p):
    return sum(v.abs().sum() for v in p.values())


def test_quadratic_bounded_by_and_close_to_spectral_norm():
    loss_fn, a, like = quadratic([-10.0, 1.0, 0.5])
    w = unflatten(torch.randn(3, generator=gen(1), dtype=D), like)
    est = gradient_lipschitz(loss_fn, w, radius=0.1, num_dirs=500, generator=gen(2))
    top = float(torch.linalg.matrix_norm(a, ord=2))  # 10 = |lambda| of largest magnitude
    assert est.max <= top + 1e-9
    assert est.max > 0.98 * top
    assert est.mean <= est.max
    # ||A u|| does not depend on the radius for a quadratic
    est2 = gradient_lipschitz(loss_fn, w, radius=3.0, num_dirs=500, generator=gen(2))
    assert est2.max == pytest.approx(est.max, rel=1e-9)
    assert est2.mean == pytest.approx(est.mean, rel=1e-9)


def test_smoothing_a_quadratic_changes_nothing():
    loss_fn, _, like = quadratic([4.0, 2.0, 1.0])
    w = unflatten(torch.randn(3, generator=gen(1), dtype=D), like)
    plain = gradient_lipschitz(loss_fn, w, 0.5, num_dirs=20, generator=gen(3))
    smooth = smoothed_gradient_lipschitz(
        loss_fn, w, isotropic_sampler(w, 1.0), 0.5, num_dirs=20, num_samples=3, generator=gen(3)
    )
    # grad is linear, so the common random numbers cancel exactly
    assert smooth.max == pytest.approx(plain.max, rel=1e-9)


def test_abs_loss_smoothed_is_finite_and_much_smaller():
    like = {"a": torch.zeros(4, dtype=D), "b": torch.zeros(2, 2, dtype=D)}
    w = unflatten(1e-3 * torch.randn(8, generator=gen(0), dtype=D), like)  # near the kinks
    sigma, r = 0.5, 0.05
    plain = gradient_lipschitz(abs_loss, w, r, num_dirs=32, generator=gen(1))
    smooth = smoothed_gradient_lipschitz(
        abs_loss, w, isotropic_sampler(w, sigma), r, num_dirs=32, num_samples=128, generator=gen(2)
    )
    # the smoothed loss has Hessian diag(2 phi(w_i / sigma) / sigma) <= 2 phi(0) / sigma = 1.6
    beta = 2 / (sigma * math.sqrt(2 * math.pi))
    assert math.isfinite(smooth.max)
    assert 0.5 * beta < smooth.mean <= smooth.max < 2 * beta
    assert plain.max > 20 * smooth.max  # ~ sqrt(#sign flips) * 2 / r, unbounded as r -> 0
    plain_small = gradient_lipschitz(abs_loss, w, r / 10, num_dirs=32, generator=gen(1))
    assert plain_small.mean > 3 * plain.mean


def test_smoothed_with_consensus_covariance():
    like = {"a": torch.zeros(4, dtype=D), "b": torch.zeros(2, 2, dtype=D)}
    g = gen(5)
    stacked = {}
    for k, v in like.items():  # 8 workers spread 0.5 around an average near the kinks of |w|
        s = 0.5 * torch.randn(8, *v.shape, generator=g, dtype=D)
        stacked[k] = s - s.mean(0) + 1e-3 * torch.randn(v.shape, generator=g, dtype=D)
    w = {k: v.mean(0) for k, v in stacked.items()}
    est = smoothed_gradient_lipschitz(
        abs_loss, w, lambda n, gg: sample_xi(stacked, n, gg), 0.05, 16, 64, gen(6)
    )
    plain = gradient_lipschitz(abs_loss, w, 0.05, 16, gen(6))
    assert math.isfinite(est.max) and est.max < 0.1 * plain.max
