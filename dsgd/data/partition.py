"""Splitting a training set among m workers. A partition is a list of m int64 index tensors,
one per worker, pairwise disjoint."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dsgd.errors import UserError


def iid(n: int, m: int, seed: int) -> list[Tensor]:
    """Seeded shuffle of range(n), cut into m equal shards of n // m; the remainder is dropped.
    This is the split of Zhu et al. (ICML 2023). Returns m tensors, each (n // m,) int64."""
    if m < 1 or n < m:
        raise UserError(f"cannot split {n} samples among {m} workers; need 1 <= workers <= samples")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return list(perm[: (n // m) * m].view(m, n // m).unbind(0))


def dirichlet(labels: Tensor, m: int, alpha: float, seed: int) -> list[Tensor]:
    """Non-iid label skew (Hsu et al. 2019): for every class c, its samples are shuffled and
    dealt to the workers in proportions p_c ~ Dirichlet(alpha * 1_m). Small alpha: each worker
    holds few classes; large alpha: close to iid. Every sample goes to exactly one worker.

    A worker left empty takes one sample from the currently largest worker, so every worker has
    at least one. labels: (N,) int. Returns m tensors of sorted int64 indices, unequal lengths.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    n = len(labels)
    if m < 1 or n < m:
        raise UserError(f"cannot split {n} samples among {m} workers; need 1 <= workers <= samples")
    if not alpha > 0:
        raise UserError(f"dirichlet alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(m, float(alpha)))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for j, part in enumerate(np.split(idx, cuts)):
            owner[part] = j
    counts = np.bincount(owner, minlength=m)
    for j in np.flatnonzero(counts == 0):  # rare with alpha >~ 0.1; a handful of moves at most
        donor = int(np.argmax(counts))
        moved = np.flatnonzero(owner == donor)[0]
        owner[moved] = j
        counts[donor] -= 1
        counts[j] += 1
    order = np.argsort(owner, kind="stable")  # indices grouped by worker, sorted within
    return list(torch.from_numpy(order).split(counts.tolist()))
