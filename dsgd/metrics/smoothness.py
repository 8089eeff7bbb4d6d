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

from dsgd._types import Params, Stacked
from dsgd.metrics._func import LossFn, batched_grad, random_like, stack_trees, tree_scale
from dsgd.treemath import smoothed_gradient

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


def _unit_dirs(params: Params, num_dirs: int, generator) -> Stacked:
    """num_dirs directions, uniform on the unit sphere of the whole parameter space. (n, *shape)"""
    u = random_like({k: p.expand(num_dirs, *p.shape) for k, p in params.items()}, generator)
    norms = torch.sqrt(sum(v.reshape(num_dirs, -1).pow(2).sum(1) for v in u.values()))  # (n,)
    return {k: v / norms.view(-1, *([1] * (v.dim() - 1))) for k, v in u.items()}


def _ratios(
    grad_at: Callable[[Stacked], Stacked], params: Params, radius: float, dirs: Stacked
) -> LipschitzEstimate:
    g0 = grad_at({k: p.unsqueeze(0) for k, p in params.items()})  # (1, *shape)
    g = grad_at({k: params[k] + radius * u for k, u in dirs.items()})  # (n, *shape)
    n = next(iter(dirs.values())).shape[0]
    sq = sum((g[k] - g0[k]).reshape(n, -1).double().pow(2).sum(1) for k in g)  # (n,)
    r = sq.sqrt() / radius
    return LipschitzEstimate(max=float(r.max()), mean=float(r.mean()))


def gradient_lipschitz(
    loss_fn: LossFn,
    params: Params,
    radius: float,
    num_dirs: int = 16,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
) -> LipschitzEstimate:
    """``max`` and ``mean`` over random unit u of ``||grad L(w + r u) - grad L(w)|| / r``.

    ``vectorize`` is passed to ``batched_grad`` (one vmap over the directions).
    """
    dirs = _unit_dirs(params, num_dirs, generator)
    return _ratios(lambda pts: batched_grad(loss_fn, pts, vectorize), params, radius, dirs)


def smoothed_gradient_lipschitz(
    loss_fn: LossFn,
    params: Params,
    cov_sampler: CovSampler,
    radius: float,
    num_dirs: int = 16,
    num_samples: int = 32,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
) -> LipschitzEstimate:
    """The same ratio for the smoothed loss L_Sigma(w) = E_{eps ~ N(0, Sigma)} L(w + eps).

    grad L_Sigma(w) is estimated by (1/2K) sum_k [grad L(w + eps_k) + grad L(w - eps_k)] with
    K = ``num_samples`` draws from ``cov_sampler`` (e.g. ``lambda n, g: sample_xi(stacked, n,
    g)`` for Sigma = Xi). The same draws are used at w and at every w + r u (common random
    numbers), so the differences measure the smoothed gradient's change, not Monte Carlo noise.
    For a non-smooth L (ReLU, |w|) the K-sample estimate is itself piecewise constant in w, so
    keep ``radius`` well above the scale at which single samples cross a kink (a fair fraction
    of the smoothing std); a smaller radius needs proportionally more samples. The directions
    are drawn from ``generator`` before the samples, so they match ``gradient_lipschitz``'s.
    """
    dirs = _unit_dirs(params, num_dirs, generator)
    eps = stack_trees(cov_sampler(num_samples, generator))  # {name: (K, *shape)}

    draws = [{k: e[i:i + 1] for k, e in eps.items()} for i in range(num_samples)]

    def grad_at(points: Stacked) -> Stacked:  # one vmap over the 2K samples per point
        n = next(iter(points.values())).shape[0]
        return stack_trees([{k: v[0] for k, v in smoothed_gradient(
            lambda pts: batched_grad(loss_fn, pts, vectorize),
            {k: p[i:i + 1] for k, p in points.items()}, draws, together=True,
            with_se=False).mean.items()} for i in range(n)])

    return _ratios(grad_at, params, radius, dirs)
