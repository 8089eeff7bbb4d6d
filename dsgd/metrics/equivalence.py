"""D-SGD / average-direction SAM equivalence as a measurement (Zhu et al., ICML 2023).

At a D-SGD state (w_1, ..., w_m), with w_a the average, d_j = w_j - w_a, Xi = (1/m) sum d_j d_j^T,
the averaged model moves along g_dsgd; the theorem compares it with three directions:

    g_dsgd  = (1/m) sum_j grad L(w_j)                         what D-SGD's average follows
    g_sgd   = grad L(w_a)                                     C-SGD at the average
    g_adsam = E_{eps ~ N(0, Xi)} grad L(w_a + eps)            average-direction SAM
    g_2nd   = grad L(w_a) + grad_w [(1/2) Tr(H(w) Xi)]        its second-order expansion

Taylor-expanding g_dsgd around w_a: the first-order term vanishes (sum_j d_j = 0), the
second-order term is grad (1/2) Tr(H Xi), so g_dsgd - g_2nd = O(||d||^3) while
g_dsgd - g_sgd = O(||d||^2). Shrinking all deviations by c shrinks the residual against g_2nd by
~c^3 and against g_sgd by ~c^2. (For a mini-batch loss the statement holds in expectation; here
``loss_fn`` is whatever loss is passed, typically a fixed full or large batch.)

g_adsam is a Monte Carlo estimate. An antithetic pair (+eps, -eps) cancels the odd Taylor
terms, but what it keeps, g_sgd + (1/2) L3[eps, eps, .] + O(eps^4), still fluctuates at
O(||d||^2) around g_2nd, so with K pairs the estimate's noise is O(||d||^2 / sqrt(K)): the same
order as res_sgd, above the O(||d||^3) residual it is meant to show. ``control_variate=True``
subtracts (1/2) L3[eps_k, eps_k, .] from every pair and adds back its exact mean
grad (1/2) Tr(H Xi) = g_reg: the estimate is unchanged in expectation and its noise is
O(||d||^4 / sqrt(K)), below the residual. ``res_adsam_noise`` is that noise (the norm of the
estimate's standard error, relative to ||g_dsgd||), reported beside every residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad

from dsgd._types import Params, Stacked
from dsgd.metrics._func import LossFn, batched_grad, tree_add, tree_detach, tree_norm
from dsgd.metrics.consensus import average, consensus_distance, deviations
from dsgd.metrics.hessian import grad_xi_weighted_trace, third_directional
from dsgd.treemath import sample_xi, smoothed_gradient


@dataclass(frozen=True)
class Decomposition:
    """The four update directions at one D-SGD state and how far each is from g_dsgd.

    ``res_x = ||g_dsgd - g_x|| / ||g_dsgd||`` (global Euclidean norms over all parameters).
    ``g_reg = grad (1/2) Tr(H Xi)`` is the sharpness-regularization term, g_2nd = g_sgd + g_reg.
    ``res_adsam_noise`` is the Monte Carlo standard error of g_adsam relative to ||g_dsgd||:
    a res_adsam below about twice it is the estimator's noise, not D-SGD's.
    """

    g_dsgd: Params
    g_sgd: Params
    g_adsam: Params
    g_2nd: Params
    g_reg: Params
    res_sgd: float
    res_adsam: float
    res_2nd: float
    consensus_distance: float
    num_samples: int
    res_adsam_noise: float = float("nan")
    control_variate: bool = False

    def summary(self) -> dict[str, float]:
        """The scalars, ready to log as one JSON line."""
        return {
            "consensus_distance": self.consensus_distance,
            "res_sgd": self.res_sgd,
            "res_adsam": self.res_adsam,
            "res_adsam_noise": self.res_adsam_noise,
            "res_2nd": self.res_2nd,
            "norm_g_dsgd": tree_norm(self.g_dsgd),
            "norm_g_reg": tree_norm(self.g_reg),
        }


def adsam_estimate(
    loss_fn: LossFn,
    w_a: Params,
    stacked: Stacked,
    num_samples: int,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
    control_variate: bool = False,
    g_reg: Params | None = None,
) -> tuple[Params, Params]:
    """Monte Carlo ``E_{eps ~ N(0, Xi)} grad L(w_a + eps)`` from ``num_samples`` antithetic
    pairs, and the standard error of each entry: ``(estimate, se)``.

    ``control_variate`` subtracts (1/2) L3[eps_k, eps_k, .] per pair and adds its exact mean
    ``g_reg`` = grad (1/2) Tr(H Xi) (computed if not given); see the module docstring.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    eps = sample_xi(stacked, num_samples, generator)  # {name: (K, *shape)}
    draws = [{k: e[i:i + 1] for k, e in eps.items()} for i in range(num_samples)]
    control = control_mean = None
    if control_variate:
        third = third_directional(loss_fn, w_a, eps, vectorize, chunk_size)  # (K, *shape)
        control = [{k: 0.5 * t[i:i + 1] for k, t in third.items()} for i in range(num_samples)]
        reg = g_reg if g_reg is not None else grad_xi_weighted_trace(
            loss_fn, w_a, deviations(stacked), vectorize, chunk_size)
        control_mean = {k: v.unsqueeze(0) for k, v in reg.items()}
    est = smoothed_gradient(
        lambda pts: batched_grad(loss_fn, pts, vectorize, chunk_size),
        {k: v.unsqueeze(0) for k, v in w_a.items()}, draws, together=True, control=control,
        control_mean=control_mean)
    return {k: v[0] for k, v in est.mean.items()}, {k: v[0] for k, v in est.se.items()}


def adsam_gradient(
    loss_fn: LossFn,
    w_a: Params,
    stacked: Stacked,
    num_samples: int,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> Params:
    """Monte Carlo ``E_{eps~N(0,Xi)} grad L(w_a + eps)`` with antithetic pairs.

    ``num_samples`` draws eps_k (see ``sample_xi``), each used as +eps_k and -eps_k, so 2K
    gradient evaluations; the odd-order terms of the Taylor expansion cancel exactly in every
    pair, which removes the O(||eps||) noise term of the plain estimator.
    """
    return adsam_estimate(loss_fn, w_a, stacked, num_samples, generator, vectorize,
                          chunk_size)[0]


def decompose(
    loss_fn: LossFn,
    stacked: Stacked,
    *,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
    control_variate: bool = False,
) -> Decomposition:
    """Measure Zhu et al. (ICML 2023)'s main theorem at the state ``{name: (m, *shape)}``.

    Costs m gradients (g_dsgd), 1 (g_sgd), 2 * num_samples (g_adsam, antithetic) and m
    third-order directional derivatives (g_reg), plus num_samples more with
    ``control_variate``. See the module docstring for the definitions and the noise.
    ``vectorize``/``chunk_size`` go to ``batched_grad`` (vmap over workers and samples).
    """
    w_a = average(stacked)
    devs = deviations(stacked)

    per_worker = batched_grad(loss_fn, stacked, vectorize, chunk_size)  # {name: (m, *shape)}
    g_dsgd = {k: g.mean(0) for k, g in per_worker.items()}
    g_sgd = tree_detach(grad(loss_fn)(w_a))
    g_reg = grad_xi_weighted_trace(loss_fn, w_a, devs)
    g_adsam, se = adsam_estimate(loss_fn, w_a, stacked, num_samples, generator, vectorize,
                                 chunk_size, control_variate, g_reg)
    g_2nd = tree_add(g_sgd, g_reg)

    scale = tree_norm(g_dsgd)
    scale = scale if scale > 0 else float("nan")

    def res(g: Params) -> float:
        return tree_norm(tree_add(g_dsgd, g, alpha=-1.0)) / scale

    return Decomposition(
        g_dsgd=g_dsgd,
        g_sgd=g_sgd,
        g_adsam=g_adsam,
        g_2nd=g_2nd,
        g_reg=g_reg,
        res_sgd=res(g_sgd),
        res_adsam=res(g_adsam),
        res_2nd=res(g_2nd),
        consensus_distance=consensus_distance(stacked),
        num_samples=num_samples,
        res_adsam_noise=tree_norm(se) / scale,
        control_variate=control_variate,
    )
