"""Gradient rules: which gradient the optimizer sees. SAM (Foret et al. 2021) and ASAM.

The engine computes every worker's mini-batch gradient with ``grad_fn`` (the batch is fixed
inside the closure) and hands it, with the weights, to a gradient rule; the rule returns the
gradient the optimizer's ``update`` consumes. A rule never mutates ``params``.

SAM, per worker j with weights w_j and mini-batch gradient g_j = grad L_j(w_j):

    e_j       = rho * T_j^2 g_j / ||T_j g_j||     (first step: ascend to the worst nearby point)
    g_sam_j   = grad L_j(w_j + e_j)               (gradient at the perturbed point, same batch)
    w_j      <- mix(w)_j - lr * g_sam_j           (restore w_j, then the optimizer's update)

T_j = I for SAM (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization") and T_j = |w_j| elementwise for ASAM (Kwon et al. 2021, "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning"; their T_w = |w| + eta with eta = 0
here). The norm runs over all of worker j's parameters (every dict entry of row j), never over
all workers: each worker perturbs its own weights as a single-model SAM would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from dsgd._types import Stacked
from dsgd.treemath import add, row_norm, row_scale

GradFn = Callable[[Stacked], Stacked]  # stacked weights -> each worker's own mini-batch gradient


class GradientRule(Protocol):
    """``rule(grad_fn, params, grads, generator=g) -> grads_for_optimizer``.

    ``grads = grad_fn(params)`` is already computed; a rule may call ``grad_fn`` again at other
    points (same mini-batches) and must not mutate ``params``.
    """

    def __call__(
        self,
        grad_fn: GradFn,
        params: Stacked,  # {name: (m, *shape)}
        grads: Stacked,  # {name: (m, *shape)}
        *,
        generator: torch.Generator | None = None,
    ) -> Stacked: ...


@dataclass(frozen=True)
class SAM:
    """SAM (Foret et al. 2021), or ASAM (Kwon et al. 2021) when ``adaptive``; see module doc.

    Costs one extra ``grad_fn`` call per step. ``rho = 0`` returns the plain gradient without
    that call. ``eps`` guards the division when a worker's gradient is zero.
    """

    rho: float
    adaptive: bool = False
    eps: float = 1e-12

    def __post_init__(self):
        if self.rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {self.rho}")

    @torch.no_grad()
    def perturbation(self, params: Stacked, grads: Stacked) -> Stacked:
        """``e_j = rho * T_j^2 g_j / ||T_j g_j||`` with T_j = I (SAM) or |w_j| (ASAM)."""
        if self.adaptive:
            tg = {k: params[k].abs() * grads[k] for k in grads}  # T g, {name: (m, *shape)}
        else:
            tg = grads
        scale = self.rho / (row_norm(tg) + self.eps)  # (m,)
        if self.adaptive:
            # T^2 g = |w| * (T g)
            return {k: row_scale(params[k].abs() * tg[k], scale) for k in grads}
        return {k: row_scale(grads[k], scale) for k in grads}

    def __call__(
        self,
        grad_fn: GradFn,
        params: Stacked,
        grads: Stacked,
        *,
        generator: torch.Generator | None = None,
    ) -> Stacked:
        if self.rho == 0:
            return grads
        e = self.perturbation(params, grads)  # first step: ascend
        g_sam = grad_fn(add(params, e))  # gradient at the perturbed point, same mini-batch
        # Restore is implicit: `params` was never mutated (w + e is a new dict), so the optimizer
        # applies g_sam at the original weights w, as the paper's second step does.
        return g_sam
