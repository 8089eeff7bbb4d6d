"""Loss-landscape slices: 1D linear interpolation and 2D filter-normalized random surfaces.

1D (Goodfellow et al. 2015, "Qualitatively characterizing neural network optimization
problems"): L((1 - a) w0 + a w1) over a grid of a, e.g. between a C-SGD and a D-SGD solution.

2D (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"):

    Z[i, k] = L(w + alphas[i] d1 + betas[k] d2)

with d1, d2 Gaussian random directions, filter-normalized: every filter of d (the slice
d[f] along the first axis: an output channel of a conv weight, a row of a linear weight) is
rescaled to the norm of the same filter of w, ``d[f] <- d[f] * ||w[f]|| / (||d[f]|| + 1e-10)``.
Tensors with at most one axis (biases, BatchNorm weight and bias) are zeroed, their code's
``ignore='biasbn'``, or set to w itself with ``ignore_biasbn=False``. This makes slices of
networks with different weight scales comparable.

``loss_fn`` maps one model's parameters {name: shape} to a scalar loss tensor; batches and
buffers live in its closure. It is evaluated under ``torch.no_grad``. The plots are
``dsgd.report.figures.plot_surface`` / ``plot_surfaces`` / ``plot_interpolation``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dsgd._types import Params
from dsgd.treemath import randn, row_scale

LossFn = Callable[[Params], Tensor]


def _as_grid(alphas: Tensor | Sequence[float]) -> Tensor:
    return torch.as_tensor(alphas, dtype=torch.float64).flatten()


@torch.no_grad()
def interpolate(
    loss_fn: LossFn,
    w0: Params,
    w1: Params,
    alphas: Tensor | Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """``L((1 - a) w0 + a w1)`` for each a in ``alphas`` (default 21 points on [0, 1]).

    Returns ``(alphas, losses)``, both (n,) float64. Points outside [0, 1] extrapolate.
    """
    grid = torch.linspace(0, 1, 21, dtype=torch.float64) if alphas is None else _as_grid(alphas)
    losses = torch.empty_like(grid)
    for i, a in enumerate(grid.tolist()):
        # torch.lerp is exact at both ends: w0 + a (w1 - w0) for a < 0.5, else w1 - (1 - a)(w1 - w0)
        w = {k: torch.lerp(w0[k], w1[k], a) for k in w0}
        losses[i] = float(loss_fn(w))
    return grid, losses


def filter_normalize(direction: Params, params: Params, ignore_biasbn: bool = True) -> Params:
    """Li et al. 2018's filter normalization of ``direction`` against ``params`` (new dict)."""
    out = {}
    for k, d in direction.items():
        w = params[k]
        if d.dim() <= 1:  # bias, BatchNorm weight / bias
            out[k] = torch.zeros_like(d) if ignore_biasbn else w.detach().clone()
            continue
        d_norm = d.flatten(1).norm(dim=1)  # (filters,)
        w_norm = w.detach().flatten(1).norm(dim=1)  # (filters,)
        scale = w_norm / (d_norm + 1e-10)
        out[k] = row_scale(d, scale)
    return out


def random_direction(
    params: Params, generator: torch.Generator | None = None, ignore_biasbn: bool = True
) -> Params:
    """A Gaussian direction shaped like ``params``, filter-normalized; drawn in dict order."""
    d = {k: randn(tuple(w.shape), w, generator) for k, w in params.items()}
    return filter_normalize(d, params, ignore_biasbn)


@torch.no_grad()
def surface_2d(
    loss_fn: LossFn,
    params: Params,
    steps: int = 21,
    span: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    directions: tuple[Params, Params] | None = None,
    ignore_biasbn: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``Z[i, k] = L(w + alphas[i] d1 + betas[k] d2)`` on a ``steps`` x ``steps`` grid of
    [-span, span]^2 (Li et al. 2018 use 51 points on [-1, 1]).

    d1 then d2 are drawn from ``generator`` with ``random_direction`` unless ``directions``
    are given. Returns ``(alphas (steps,), betas (steps,), Z (steps, steps))``, float64.
    """
    if directions is None:
        d1 = random_direction(params, generator, ignore_biasbn)
        d2 = random_direction(params, generator, ignore_biasbn)
    else:
        d1, d2 = directions
    alphas = torch.linspace(-span, span, steps, dtype=torch.float64)
    betas = alphas.clone()
    Z = torch.empty(steps, steps, dtype=torch.float64)
    for i, a in enumerate(alphas.tolist()):
        for k, b in enumerate(betas.tolist()):
            w = {n: params[n] + a * d1[n] + b * d2[n] for n in params}
            Z[i, k] = float(loss_fn(w))
    return alphas, betas, Z
