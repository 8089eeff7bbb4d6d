"""Average-direction SAM: the gradient of the Gaussian-smoothed loss, by Monte Carlo.

Zhu et al. 2023 ("Decentralized SGD and Average-direction SAM are Asymptotically Equivalent",
ICML) show that the averaged D-SGD iterate follows, up to O(||eps||^3) terms,

    w_a <- w_a - lr * E_{eps ~ N(0, Xi)} [ grad L(w_a + eps) ],
    Xi = (1/m) sum_j (w_j - w_a)(w_j - w_a)^T            (consensus covariance).

``AvgSAM`` makes this rule usable directly. For each worker j it returns

    g_j = (1/K) sum_k grad L_j(w_j + eps_{j,k}),   eps_{j,k} ~ N(0, Sigma) independent over j, k,

with ``antithetic`` pairs (+eps, -eps) when asked: these cancel every odd term of the Taylor
expansion, so on a quadratic the estimate is exact for every draw. The step reads like SAM's:
perturb, gradient, restore (implicit: ``params`` is never mutated), update.

Sigma is one of:
  isotropic(sigma)    sigma^2 I: random-perturbation SAM, i.e. low-pass-filter SGD
                      (Bisla et al. 2022, "Low-Pass Filtering SGD for Recovering Flat Optima").
  from_deviations(d)  Xi = (1/n) sum_i d_i d_i^T from deviations d_i = w_i - w_a of a running or
                      recorded D-SGD state (n rows); rank <= n, sampled without forming Xi.
  virtual_workers(m)  the same Xi from the spread of the current m workers' own weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from dsgd._types import Stacked
from dsgd.optim.sam import GradFn
from dsgd.treemath import deviations, randn, sample_xi, smoothed_gradient

__all__ = ["AvgSAM", "Covariance", "FromDeviations", "Isotropic", "VirtualWorkers", "deviations",
           "from_deviations", "isotropic", "sample_low_rank", "virtual_workers"]


def sample_low_rank(devs: Stacked, num: int, generator: torch.Generator | None = None) -> Stacked:
    """``num`` draws of eps ~ N(0, Xi), Xi = (1/n) sum_i d_i d_i^T, as {name: (num, *shape)}.

    ``dsgd.treemath.sample_xi``: eps = sum_i z_i d_i / sqrt(n), z ~ N(0, I_n), one z across
    all dict entries (the joint covariance). ``devs`` are already centred, and centring them
    again changes nothing.
    """
    return sample_xi(devs, num, generator)


class Covariance(Protocol):
    """``sample(params, generator) -> eps`` shaped like params {name: (m, *shape)}, one
    independent draw of N(0, Sigma) per worker row."""

    def sample(self, params: Stacked, generator: torch.Generator | None) -> Stacked: ...


@dataclass(frozen=True)
class Isotropic:
    """Sigma = sigma^2 I."""

    sigma: float

    def __post_init__(self):
        if self.sigma < 0:
            raise ValueError(f"isotropic sigma must be >= 0, got {self.sigma}")

    def sample(self, params: Stacked, generator: torch.Generator | None) -> Stacked:
        return {k: self.sigma * randn(tuple(w.shape), w, generator) for k, w in params.items()}


@dataclass(frozen=True, eq=False)
class FromDeviations:
    """Sigma = Xi = (1/n) sum_i d_i d_i^T for fixed deviations ``devs`` {name: (n, *shape)}."""

    devs: Stacked = field(repr=False)

    def sample(self, params: Stacked, generator: torch.Generator | None) -> Stacked:
        m = next(iter(params.values())).shape[0]
        eps = sample_low_rank(self.devs, m, generator)  # {name: (m, *shape)}
        return {k: eps[k].to(params[k]) for k in params}


@dataclass(frozen=True)
class VirtualWorkers:
    """Sigma = Xi of the current weights: d_j = w_j - w_a computed from ``params`` each step.

    In a D-SGD run this perturbs every worker with the consensus covariance the run itself
    produces. In a centralized run (C-SGD: one model, or m identical copies after exact
    averaging) every d_j is zero, so Xi = 0 and the rule returns the plain gradient: to train a
    single model with D-SGD's smoothing, record deviations from a D-SGD run and use
    ``from_deviations``, or use ``isotropic``.
    """

    m: int

    def sample(self, params: Stacked, generator: torch.Generator | None) -> Stacked:
        m = next(iter(params.values())).shape[0]
        if m != self.m:
            raise ValueError(f"virtual_workers({self.m}) got params with {m} worker rows")
        return FromDeviations(deviations(params)).sample(params, generator)


def isotropic(sigma: float) -> Isotropic:
    """Sigma = sigma^2 I (random-perturbation SAM / low-pass-filter SGD, Bisla et al. 2022)."""
    return Isotropic(sigma)


def from_deviations(devs: Stacked) -> FromDeviations:
    """Sigma = (1/n) sum_i d_i d_i^T from deviations ``devs`` {name: (n, *shape)}.

    ``devs`` must already be centred (``deviations(stacked)`` turns weights into deviations);
    they are detached and kept fixed.
    """
    return FromDeviations({k: v.detach() for k, v in devs.items()})


def virtual_workers(m: int) -> VirtualWorkers:
    """Sigma = consensus covariance of the current m workers' weights (see ``VirtualWorkers``)."""
    if m < 1:
        raise ValueError(f"virtual_workers needs m >= 1, got {m}")
    return VirtualWorkers(m)


@dataclass(frozen=True, eq=False)
class AvgSAM:
    """Average-direction SAM as a gradient rule: g_j = (1/K) sum_k grad L_j(w_j + eps_{j,k}).

    Costs K ``grad_fn`` calls per step (the plain gradient passed in is not reused, so the
    estimate is unbiased for the smoothed loss). With ``antithetic`` the K draws are K/2 pairs
    (+eps, -eps); K must then be even. The mean is accumulated as a running mean, so when every
    draw gives the same gradient (Sigma = 0) it returns exactly that gradient.
    """

    cov: Covariance
    num_samples: int = 2
    antithetic: bool = True

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"AvgSAM num_samples must be >= 1, got {self.num_samples}")
        if self.antithetic and self.num_samples % 2:
            raise ValueError(
                f"AvgSAM with antithetic pairs needs an even num_samples, got {self.num_samples}"
            )

    def __call__(
        self,
        grad_fn: GradFn,
        params: Stacked,
        grads: Stacked,
        *,
        generator: torch.Generator | None = None,
    ) -> Stacked:
        def draws():  # perturb: one draw per worker row, drawn lazily between gradients
            for _ in range(self.num_samples // (2 if self.antithetic else 1)):
                with torch.no_grad():  # left before the yield: the caller computes gradients
                    eps = self.cov.sample(params, generator)
                yield eps

        # gradient at w + eps on the same batch; restore is implicit: params is never mutated,
        # the optimizer updates from w itself
        return smoothed_gradient(grad_fn, params, draws(), antithetic=self.antithetic,
                                 with_se=False).mean
