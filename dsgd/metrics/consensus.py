"""Consensus statistics of a D-SGD state (Zhu et al., ICML 2023).

For m workers with weights w_j (flattened, P entries each) the global average and deviations are

    w_a = (1/m) sum_j w_j,        d_j = w_j - w_a,        sum_j d_j = 0,

and the consensus covariance and consensus distance are

    Xi = (1/m) sum_j d_j d_j^T = (1/m) D^T D        (D: (m, P), row j = d_j; 1/m, not 1/(m-1))
    Tr Xi = (1/m) sum_j ||d_j||^2.

Xi is P x P with rank <= m - 1, so nothing here ever forms it: its nonzero spectrum is the
spectrum of the m x m Gram matrix (1/m) D D^T, and N(0, Xi) is sampled as a random combination
of the m deviations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsgd import treemath
from dsgd._types import Params, Stacked
from dsgd.treemath import deviations


def average(stacked: Stacked) -> Params:
    """The global average ``w_a = (1/m) sum_j w_j``: ``{name: (m, *shape)} -> {name: shape}``."""
    return {k: s.mean(0) for k, s in stacked.items()}


def per_layer_consensus(stacked: Stacked) -> dict[str, float]:
    """``{name: (1/m) sum_j ||w_j[name] - w_a[name]||^2}``; the values sum to the total Tr Xi."""
    out = {}
    for k, d in deviations(stacked).items():
        m = d.shape[0]
        out[k] = float(d.double().pow(2).sum()) / m
    return out


def consensus_distance(stacked: Stacked) -> float:
    """The consensus distance ``Tr Xi = (1/m) sum_j ||w_j - w_a||^2`` (Zhu et al., 2023)."""
    return sum(per_layer_consensus(stacked).values())


def gram(stacked: Stacked) -> Tensor:
    """The m x m Gram matrix ``(1/m) D D^T`` in float64, accumulated layer by layer. ``(m, m)``"""
    devs = deviations(stacked)
    m = next(iter(devs.values())).shape[0]
    g = None
    for d in devs.values():
        d2 = d.reshape(m, -1).double()  # (m, P_layer)
        g = d2 @ d2.T if g is None else g + d2 @ d2.T
    return g / m


def consensus_spectrum(stacked: Stacked, k: int) -> Tensor:
    """The top-k eigenvalues of Xi = (1/m) D^T D, in descending order, float64 ``(k,)``.

    Xi and the Gram matrix (1/m) D D^T share their nonzero eigenvalues, so this costs an m x m
    eigendecomposition. Xi has at most m - 1 nonzero eigenvalues (the deviations sum to zero);
    for k beyond m the remaining entries are exact zeros (up to k <= P).
    """
    g = gram(stacked)
    m = g.shape[0]
    p = sum(s[0].numel() for s in stacked.values())
    if not 1 <= k <= p:
        raise ValueError(f"k must be in [1, P={p}], got {k}")
    ev = torch.linalg.eigvalsh(g).flip(0).clamp_min(0.0)  # (m,), descending
    if k <= m:
        return ev[:k]
    return torch.cat([ev, ev.new_zeros(k - m)])


sample_xi_stacked = treemath.sample_xi  # n draws of N(0, Xi), {name: (n, *shape)}


def sample_xi(stacked: Stacked, n: int, generator: torch.Generator | None = None) -> list[Params]:
    """:func:`sample_xi_stacked` as a list of n parameter dicts (same draws for the same seed)."""
    eps = sample_xi_stacked(stacked, n, generator)
    return [{k: v[i] for k, v in eps.items()} for i in range(n)]
