"""Arithmetic on trees of tensors, the N(0, Xi) sampler and the average-direction gradient.

A tree is a dict of tensors with the same keys: ``Params`` {name: shape} for one model,
``Stacked`` {name: (n, *shape)} for n rows (workers, samples, points). Everything here is plain
tensor maths with no model, optimizer or metric behind it, so ``dsgd.optim`` and
``dsgd.metrics`` both build on it without importing each other.

The average-direction (Gaussian-smoothed) gradient of Zhu et al. (ICML 2023),

    g_Sigma(w) = E_{eps ~ N(0, Sigma)} grad L(w + eps),

is estimated once, by ``smoothed_gradient``, for SAM-style training (``dsgd.optim.avg_sam``),
the decomposition of D-SGD's direction (``dsgd.metrics.equivalence``) and the smoothness
probes (``dsgd.metrics.smoothness``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from dsgd._types import Params, Stacked


def add(a: Params, b: Params, alpha: float = 1.0) -> Params:
    """``a + alpha * b`` entrywise, as a new dict."""
    return {k: a[k].add(b[k], alpha=alpha) for k in a}


def scale(a: Params, c: float) -> Params:
    return {k: c * a[k] for k in a}


def dot(a: Params, b: Params) -> Tensor:
    """``<a, b>`` over all entries (a 0-dim tensor)."""
    return sum((a[k] * b[k]).sum() for k in a)


def norm(a: Params) -> float:
    """Global Euclidean norm ``||a||`` over all entries (accumulated in float64)."""
    return float(torch.sqrt(sum(a[k].double().pow(2).sum() for k in a)))


def detach(a: Params) -> Params:
    return {k: v.detach() for k, v in a.items()}


def row_norm(tensors: Stacked) -> Tensor:
    """``||x_j||`` over all entries of row j: returns (n,)."""
    sq = sum(t.flatten(1).pow(2).sum(1) for t in tensors.values())  # (n,)
    return sq.sqrt()


def row_scale(t: Tensor, s: Tensor) -> Tensor:
    """``t[j] * s[j]`` for t (n, *shape) and s (n,)."""
    return t * s.view(-1, *([1] * (t.dim() - 1)))


def randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws on the generator's device (``like``'s without one), moved to
    ``like``'s device and dtype, so a seeded generator gives the same draws on every device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(
        like.device)


def random_like(params: Params, generator: torch.Generator | None, kind: str = "normal") -> Params:
    """A random tree shaped as ``params``: ``kind`` is ``"normal"`` or ``"rademacher"`` (+-1).

    Draws on the generator's device (CPU by default) and moves the result to the parameters'.
    """
    gdev = generator.device if generator is not None else torch.device("cpu")
    out = {}
    for k, p in params.items():
        if kind == "normal":
            r = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=gdev)
        elif kind == "rademacher":
            r = torch.randint(0, 2, p.shape, generator=generator, device=gdev).to(p.dtype)
            r = 2 * r - 1
        else:
            raise ValueError(f"unknown kind {kind!r}; use 'normal' or 'rademacher'")
        out[k] = r.to(p.device)
    return out


def deviations(stacked: Stacked) -> Stacked:
    """The deviations ``d_j = w_j - w_a``, stacked like the input; they sum to zero over j."""
    return {k: s - s.mean(0, keepdim=True) for k, s in stacked.items()}


def sample_xi(stacked: Stacked, n: int, generator: torch.Generator | None = None) -> Stacked:
    """n draws of eps ~ N(0, Xi), Xi = (1/m) sum_j d_j d_j^T the covariance of the m rows of
    ``stacked`` about their mean, as ``{name: (n, *shape)}``.

    Exact, not an approximation: eps = (1/sqrt(m)) sum_j z_j d_j with z ~ N(0, I_m) has
    Cov(eps) = Xi; one z across all dict entries (the joint covariance), so each draw lies in
    the span of the deviations and Xi (P x P, rank <= m - 1) is never formed. The normal draws
    are made on the generator's device (CPU if None). Centring already centred rows changes
    nothing.
    """
    devs = deviations(stacked)
    first = next(iter(devs.values()))
    m = first.shape[0]
    gdev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn((n, m), generator=generator, device=gdev, dtype=first.dtype)
    z = z.to(first.device) / math.sqrt(m)  # (n, m)
    return {k: torch.tensordot(z, d, dims=([1], [0])) for k, d in devs.items()}


class Smoothed(NamedTuple):
    """A Monte Carlo estimate of the smoothed gradient per row, and its standard error per
    entry (NaN with one draw), both {name: (n, *shape)}."""

    mean: Stacked
    se: Stacked | None


def smoothed_gradient(
    grad_at: Callable[[Stacked], Stacked],
    w: Stacked,
    draws: Iterable[Stacked],
    *,
    antithetic: bool = True,
    together: bool = False,
    control: Iterable[Stacked] | None = None,
    control_mean: Stacked | None = None,
    with_se: bool = True,
) -> Smoothed:
    """``(1/K) sum_k grad L(w + eps_k)`` per row of ``w`` {name: (n, *shape)}, for draws eps_k
    {name: (n, *shape)} of N(0, Sigma), with its standard error.

    ``antithetic``: each draw is used as +eps_k and -eps_k; the pair mean cancels every odd
    term of the Taylor expansion around w (exact on a quadratic for every draw).
    ``together``: evaluate all 2K points in one ``grad_at`` call (rows stacked draw-major);
    otherwise one call per point, with the n rows as ``grad_at`` expects them (a worker's own
    mini-batch per row). ``control``: per draw a control variate c_k with known mean
    ``control_mean`` (e.g. the second-order term (1/2) L'''[eps_k, eps_k, .], whose mean is
    grad (1/2) Tr(H Sigma)); the estimate is mean_k (pair_k - c_k) + control_mean, unbiased,
    and its noise is that of the remainder only.

    The mean is a running mean over the individual gradients, so when every draw gives the
    same gradient (Sigma = 0) it returns exactly that gradient. ``with_se=False`` (training,
    no control variate) keeps no per-draw values and returns ``se=None``.
    """
    if control is not None and not with_se:
        raise ValueError("a control variate needs the per-draw values (with_se=True)")
    signs = (1.0, -1.0) if antithetic else (1.0,)
    controls = list(control) if control is not None else None
    if together:
        draws = list(draws)
        pts = {k: torch.cat([w[k] + s * e[k] for e in draws for s in signs]) for k in w}
        g = grad_at(pts)
        n = next(iter(w.values())).shape[0]
        grads = [[{k: v[(i * len(signs) + j) * n:(i * len(signs) + j + 1) * n]
                   for k, v in g.items()} for j in range(len(signs))]
                 for i in range(len(draws))]
    else:
        grads = ([grad_at(add(w, e, alpha=s)) for s in signs] for e in draws)
    mean: Stacked | None = None
    pairs: list[Stacked] = []
    count = 0
    for i, gs in enumerate(grads):
        for g in gs:
            count += 1
            # running mean: mean <- mean + (g - mean) / k; exact when all draws agree
            mean = ({k: torch.zeros_like(v) for k, v in g.items()} if mean is None else mean)
            mean = {k: mean[k] + (g[k] - mean[k]) / count for k in mean}
        if not with_se:
            continue
        pair = {k: sum(g[k] for g in gs) / len(gs) for k in gs[0]}
        if controls is not None:
            pair = {k: pair[k] - controls[i][k] for k in pair}
        pairs.append(pair)
    if mean is None:
        raise ValueError("smoothed_gradient needs at least one draw")
    if not with_se:
        return Smoothed(mean, None)
    K = len(pairs)
    avg = {k: sum(p[k].double() for p in pairs) / K for k in mean}
    if controls is not None:
        mean = {k: (avg[k] + control_mean[k].double()).to(mean[k]) for k in mean}
    # two-pass sample variance of the pair values; se of their mean = std / sqrt(K)
    se = {k: (sum((p[k].double() - avg[k]) ** 2 for p in pairs) / (K - 1) / K).sqrt().to(
        mean[k]) if K > 1 else torch.full_like(mean[k], math.nan) for k in mean}
    return Smoothed(mean, se)
