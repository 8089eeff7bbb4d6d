"""Curvature of a loss through Hessian-vector products; the Hessian H is never formed.

All functions take ``loss_fn: Callable[[Params], Tensor]`` (see ``dsgd.metrics._func``) and
differentiate it with ``torch.func``:

    H v                = jvp(grad L)(w; v)                   (forward-over-reverse)
    d^T H(w) d         = <d, H(w) d>
    grad_w d^T H(w) d  = d/dt H(w + t d) d = L'''(w)[d, d, .]  (a jvp of the HVP)

The D-SGD quantities (Zhu et al., ICML 2023, main theorem) are the Xi-weighted trace
Tr(H Xi) = (1/m) sum_j d_j^T H d_j and its gradient with Xi held fixed, the sharpness
regularizer that D-SGD adds to the gradient of the averaged model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from dsgd._types import Params, Stacked
from dsgd.metrics._func import (
    LossFn,
    flatten,
    random_like,
    tree_dot,
    tree_norm,
    tree_scale,
    unflatten,
)


def _batched(fn, trees: Stacked, vectorize: bool, chunk_size: int | None):
    """``fn`` applied to each tree of ``{name: (n, *shape)}``; results stacked on a leading n axis.

    One ``vmap`` (optionally chunked) or, with ``vectorize=False``, a loop for losses vmap cannot
    batch (data-dependent control flow, BatchNorm in train mode).
    """
    if vectorize:
        return vmap(fn, chunk_size=chunk_size)(trees)
    n = next(iter(trees.values())).shape[0]
    outs = [fn({k: t[i] for k, t in trees.items()}) for i in range(n)]
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return torch.stack(outs)


def hvp(loss_fn: LossFn, params: Params, v: Params) -> Params:
    """The Hessian-vector product ``H(w) v``, by forward-over-reverse differentiation."""
    return jvp(grad(loss_fn), (params,), (v,))[1]


def second_directional(loss_fn: LossFn, params: Params, d: Params) -> Tensor:
    """``d^T H(w) d = d^2/dt^2 L(w + t d)|_{t=0}``, by two nested forward-mode jvps (0-dim)."""

    def first(w: Params) -> Tensor:
        return jvp(loss_fn, (w,), (d,))[1]

    return jvp(first, (params,), (d,))[1]


def hutchinson_trace(
    loss_fn: LossFn,
    params: Params,
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    probes: Stacked | None = None,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> tuple[float, float]:
    """Hutchinson's estimate of Tr H: the mean of v^T H v over Rademacher probes v.

    Returns ``(mean, stderr)``, stderr = std / sqrt(n) of the per-probe values. ``probes``
    (``{name: (n, *shape)}``) replaces the random ones; the estimate is then exact whenever
    (1/n) sum v v^T = I, e.g. the scaled basis ``sqrt(P) e_i`` (stderr then measures spread, not
    error). The HVPs are vmapped over the probes (in chunks of ``chunk_size``) unless
    ``vectorize=False``.
    """
    if probes is None:
        template = {k: p.expand(num_samples, *p.shape) for k, p in params.items()}
        probes = random_like(template, generator, "rademacher")  # {name: (n, *shape)}

    def quad(v: Params) -> Tensor:
        return tree_dot(v, hvp(loss_fn, params, v))

    vals = _batched(quad, probes, vectorize, chunk_size).double()  # (n,)
    n = vals.numel()
    stderr = float(vals.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(vals.mean()), stderr


def top_eigenvalue(
    loss_fn: LossFn,
    params: Params,
    iters: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> tuple[float, Params]:
    """Power iteration on H: the eigenvalue of largest magnitude and a unit eigenvector.

    This is lambda_max (the sharpness) when H's positive end dominates, as it does near a
    minimum; if a negative eigenvalue is larger in magnitude, that one is returned (signed).
    Stops when the Rayleigh quotient changes by less than ``tol`` relative, or after ``iters``.
    """
    v = random_like(params, generator, "normal")
    v = tree_scale(v, 1.0 / tree_norm(v))
    eig = float("nan")
    for _ in range(iters):
        hv = hvp(loss_fn, params, v)
        new = float(tree_dot(v, hv))  # Rayleigh quotient, ||v|| = 1
        nrm = tree_norm(hv)
        if nrm == 0.0:
            return 0.0, v
        v = tree_scale(hv, 1.0 / nrm)
        if abs(new - eig) <= tol * max(abs(new), 1e-30):
            eig = new
            break
        eig = new
    return eig, v


def lanczos_top_k(
    loss_fn: LossFn,
    params: Params,
    k: int,
    iters: int = 50,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The k algebraically largest eigenvalues of H (descending, float64 ``(k,)``) by Lanczos.

    ``iters`` Lanczos steps (capped at P) with full reorthogonalization in float64; the Ritz
    values of the (iters x iters) tridiagonal matrix approximate H's extreme eigenvalues first.
    Memory: the iters Lanczos vectors, iters * P float64 numbers.
    """
    flat0 = flatten(params)
    p, dtype = flat0.numel(), flat0.dtype
    n = min(iters, p)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, min(iters, P)={n}], got {k}")
    q = flatten(random_like(params, generator, "normal")).double()
    q = q / q.norm()
    qs, alphas, betas = [q], [], []
    for i in range(n):
        w = flatten(hvp(loss_fn, params, unflatten(qs[-1].to(dtype), params))).double()
        alphas.append(torch.dot(w, qs[-1]))
        basis = torch.stack(qs)  # (i+1, P)
        w = w - basis.T @ (basis @ w)  # full reorthogonalization, twice for stability
        w = w - basis.T @ (basis @ w)
        if i == n - 1:
            break
        b = w.norm()
        if b < 1e-12 * max(1.0, float(torch.stack(alphas).abs().max())):
            break  # invariant subspace found: the Ritz values are exact
        betas.append(b)
        qs.append(w / b)
    a = torch.stack(alphas)
    t = torch.diag(a)
    if betas:
        b = torch.stack(betas)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    ev = torch.linalg.eigvalsh(t).flip(0)
    if ev.numel() < k:
        raise ValueError(f"Krylov space has dimension {ev.numel()} < k={k}; use another start")
    return ev[:k]


def xi_weighted_trace(
    loss_fn: LossFn,
    w_a: Params,
    devs: Stacked,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> float:
    """``Tr(H(w_a) Xi) = (1/m) sum_j d_j^T H(w_a) d_j`` with ``devs = {name: (m, *shape)}``.

    Xi = (1/m) sum_j d_j d_j^T is the consensus covariance (Zhu et al., ICML 2023); one HVP per
    worker (vmapped over the workers unless ``vectorize=False``), Xi is never formed.
    """

    def quad(d: Params) -> Tensor:
        return tree_dot(d, hvp(loss_fn, w_a, d))

    return float(_batched(quad, devs, vectorize, chunk_size).double().mean())  # mean of (m,)


def grad_xi_weighted_trace(
    loss_fn: LossFn,
    w_a: Params,
    devs: Stacked,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> Params:
    """``grad_w [ (1/2) Tr(H(w) Xi) ]`` at ``w = w_a``, with Xi (the deviations) held fixed.

    Equals (1/m) sum_j (1/2) grad_w (d_j^T H(w) d_j) = (1/(2m)) sum_j L'''(w_a)[d_j, d_j, .],
    the second-order term of (1/m) sum_j grad L(w_a + d_j) around w_a, i.e. the gradient of the
    sharpness regularizer that D-SGD implicitly descends (Zhu et al., ICML 2023). Exact: since
    third derivatives are symmetric, L'''[d, d, .] = d/dt H(w + t d) d at t = 0, a forward-mode
    jvp of the HVP (forward-over-forward-over-reverse), vmapped over the workers unless
    ``vectorize=False``. Zero for a quadratic loss.
    """

    t = third_directional(loss_fn, w_a, devs, vectorize, chunk_size)  # {name: (m, *shape)}
    return {k: 0.5 * v.mean(0) for k, v in t.items()}


def third_directional(
    loss_fn: LossFn,
    w: Params,
    dirs: Stacked,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> Stacked:
    """``L3(w)[d_i, d_i, .]`` (the third derivative along d_i twice) for each row d_i of
    ``dirs`` {name: (n, *shape)}, detached.

    Third derivatives are symmetric, so L3[d, d, .] = d/dt H(w + t d) d at t = 0: a
    forward-mode jvp of the HVP (forward-over-forward-over-reverse), vmapped over the rows
    unless ``vectorize=False``. Half of it is the second-order term of grad L(w + d) - grad L(w)
    that the antithetic pair (+d, -d) keeps.
    """

    def third(d: Params) -> Params:
        return jvp(lambda v: hvp(loss_fn, v, d), (w,), (d,))[1]

    return {k: v.detach() for k, v in _batched(third, dirs, vectorize, chunk_size).items()}
