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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad

from dsgd._types import Params, Stacked
from dsgd.metrics._func import LossFn, batched_grad, tree_add, tree_detach, tree_norm
from dsgd.metrics.consensus import average, consensus_distance, deviations, sample_xi_stacked
from dsgd.metrics.hessian import grad_xi_weighted_trace


@dataclass(frozen=True)
class Decomposition:
    """The four update directions at one D-SGD state and how far each is from g_dsgd.

    ``res_x = ||g_dsgd - g_x|| / ||g_dsgd||`` (global Euclidean norms over all parameters).
    ``g_reg = grad (1/2) Tr(H Xi)`` is the sharpness-regularization term, g_2nd = g_sgd + g_reg.
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

    def summary(self) -> dict[str, float]:
        """The scalars, ready to log as one JSON line."""
        return {
            "consensus_distance": self.consensus_distance,
            "res_sgd": self.res_sgd,
            "res_adsam": self.res_adsam,
            "res_2nd": self.res_2nd,
            "norm_g_dsgd": tree_norm(self.g_dsgd),
            "norm_g_reg": tree_norm(self.g_reg),
        }


def adsam_gradient(
    loss_fn: LossFn,
    w_a: Params,
    stacked: Stacked,
    num_samples: int,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> Params:
    """Monte Carlo ``E_{eps ~ N(0, Xi)} grad L(w_a + eps)`` with antithetic pairs.

    ``num_samples`` draws eps_k (see ``sample_xi``), each used as +eps_k and -eps_k, so 2K
    gradient evaluations; the odd-order terms of the Taylor expansion cancel exactly in every
    pair, which removes the O(||eps||) noise term of the plain estimator.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    eps = sample_xi_stacked(stacked, num_samples, generator)  # {name: (K, *shape)}
    points = {k: torch.cat([w_a[k] + e, w_a[k] - e]) for k, e in eps.items()}  # (2K, *shape)
    return {k: g.mean(0) for k, g in batched_grad(loss_fn, points, vectorize, chunk_size).items()}


def decompose(
    loss_fn: LossFn,
    stacked: Stacked,
    *,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> Decomposition:
    """Measure Zhu et al. (ICML 2023)'s main theorem at the state ``{name: (m, *shape)}``.

    Costs m gradients (g_dsgd), 1 (g_sgd), 2 * num_samples (g_adsam, antithetic) and m
    third-order directional derivatives (g_reg). See the module docstring for the definitions.
    ``vectorize``/``chunk_size`` go to ``batched_grad`` (vmap over workers and samples).
    """
    w_a = average(stacked)
    devs = deviations(stacked)

    per_worker = batched_grad(loss_fn, stacked, vectorize, chunk_size)  # {name: (m, *shape)}
    g_dsgd = {k: g.mean(0) for k, g in per_worker.items()}
    g_sgd = tree_detach(grad(loss_fn)(w_a))
    g_adsam = adsam_gradient(loss_fn, w_a, stacked, num_samples, generator, vectorize, chunk_size)
    g_reg = grad_xi_weighted_trace(loss_fn, w_a, devs)
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
    )
