"""Local gradient-Lipschitz estimates of a loss and of its Gaussian smoothing.

Zhu et al. (ICML 2023) note that D-SGD descends the smoothed loss
L_Xi(w) = E_{eps ~ N(0, Xi)} L(w + eps), whose gradient is Lipschitz even when L's is not
(ReLU networks are not beta-smooth). These estimators measure that along a trajectory:

    beta_hat(w, r) = ||grad F(w + r u) - grad F(w)|| / r,   u uniform on the unit sphere,

for F = L and for F = L_Xi, reporting the max and the mean over ``num_dirs`` directions. Each
ratio is a lower bound on the local Lipschitz constant within radius r of w; on a quadratic
1/2 w^T A w it is ||A u|| <= ||A||_2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import grad

from dsgd._types import Params
from dsgd.metrics._func import (
    LossFn,
    random_like,
    tree_add,
    tree_detach,
    tree_norm,
    tree_scale,
    tree_zeros_like,
)

# sampler(n, generator) -> n perturbations eps ~ N(0, Sigma), each shaped like the parameters
CovSampler = Callable[[int, "torch.Generator | None"], list[Params]]


class LipschitzEstimate(NamedTuple):
    max: float  # max_u ||grad F(w + r u) - grad F(w)|| / r
    mean: float  # the same ratio averaged over the directions


def isotropic_sampler(params: Params, sigma: float) -> CovSampler:
    """A sampler of eps ~ N(0, sigma^2 I) shaped like ``params`` (random-perturbation SAM)."""

    def sample(n: int, generator: torch.Generator | None = None) -> list[Params]:
        return [tree_scale(random_like(params, generator), sigma) for _ in range(n)]

    return sample


def _unit_dirs(params: Params, num_dirs: int, generator) -> list[Params]:
    dirs = [random_like(params, generator) for _ in range(num_dirs)]
    return [tree_scale(u, 1.0 / tree_norm(u)) for u in dirs]


def _ratios(grad_at: Callable[[Params], Params], params, radius, dirs) -> LipschitzEstimate:
    g0 = grad_at(params)
    r = [
        tree_norm(tree_add(grad_at(tree_add(params, u, alpha=radius)), g0, alpha=-1.0)) / radius
        for u in dirs
    ]
    return LipschitzEstimate(max=max(r), mean=sum(r) / len(r))


def gradient_lipschitz(
    loss_fn: LossFn,
    params: Params,
    radius: float,
    num_dirs: int = 16,
    generator: torch.Generator | None = None,
) -> LipschitzEstimate:
    """``max`` and ``mean`` over random unit u of ``||grad L(w + r u) - grad L(w)|| / r``."""

    def grad_at(w: Params) -> Params:
        return tree_detach(grad(loss_fn)(w))

    return _ratios(grad_at, params, radius, _unit_dirs(params, num_dirs, generator))


def smoothed_gradient_lipschitz(
    loss_fn: LossFn,
    params: Params,
    cov_sampler: CovSampler,
    radius: float,
    num_dirs: int = 16,
    num_samples: int = 32,
    generator: torch.Generator | None = None,
) -> LipschitzEstimate:
    """The same ratio for the smoothed loss L_Sigma(w) = E_{eps ~ N(0, Sigma)} L(w + eps).

    grad L_Sigma(w) is estimated by (1/2K) sum_k [grad L(w + eps_k) + grad L(w - eps_k)] with
    K = ``num_samples`` draws from ``cov_sampler`` (e.g. ``lambda n, g: sample_xi(stacked, n,
    g)`` for Sigma = Xi). The same draws are used at w and at every w + r u (common random
    numbers), so the differences measure the smoothed gradient's change, not Monte Carlo noise.
    """
    eps = cov_sampler(num_samples, generator)
    g = grad(loss_fn)

    def grad_at(w: Params) -> Params:
        acc = tree_zeros_like(w)
        for e in eps:
            acc = tree_add(acc, tree_detach(g(tree_add(w, e))))
            acc = tree_add(acc, tree_detach(g(tree_add(w, e, alpha=-1.0))))
        return tree_scale(acc, 1.0 / (2 * len(eps)))

    return _ratios(grad_at, params, radius, _unit_dirs(params, num_dirs, generator))
