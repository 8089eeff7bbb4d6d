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


def shards(labels: Tensor, m: int, shards_per_worker: int, seed: int) -> list[Tensor]:
    """Pathological non-iid split (McMahan et al. 2017, "k classes per worker"): the samples
    sorted by label (ties in a seeded random order) are cut into m * shards_per_worker equal
    shards of n // (m * shards_per_worker), and every worker gets shards_per_worker of them,
    dealt by a seeded permutation. A worker then holds at most shards_per_worker classes when
    every class fills whole shards; the remainder n mod (m * k) is dropped.

    labels: (N,) int. Returns m tensors of sorted int64 indices, each (k * (n // (m * k)),).
    """
    labels = torch.as_tensor(labels).reshape(-1)
    n, k = len(labels), int(shards_per_worker)
    if k < 1:
        raise UserError(f"shards_per_worker must be >= 1, got {shards_per_worker}")
    if m < 1 or n < m * k:
        raise UserError(f"cannot cut {n} samples into {m} workers x {k} shards; need "
                        "workers * shards_per_worker <= samples")
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n, generator=g)  # random order within each class
    by_label = shuffled[labels[shuffled].argsort(stable=True)]  # (n,) grouped by label
    size = n // (m * k)
    cut = by_label[: m * k * size].view(m * k, size)  # (m * k, size) shards, label-contiguous
    deal = torch.randperm(m * k, generator=g).view(m, k)  # (m, k) shard ids of each worker
    return [cut[deal[j]].reshape(-1).sort().values for j in range(m)]


PARTITIONS = ("iid", "dirichlet", "shards")


def partition(
    name: str,
    n: int,
    labels,
    m: int,
    *,
    alpha: float = 1.0,
    shards_per_worker: int = 2,
    seed: int = 0,
) -> list[Tensor]:
    """The partition ``name`` (one of PARTITIONS) of n samples among m workers. ``labels`` is
    the (N,) label tensor, or a function returning it: the iid split never asks for it, so a
    Dataset's labels are read only when the partition needs them."""
    if name == "iid":
        return iid(n, m, seed=seed)
    if name not in PARTITIONS:
        raise UserError(f"unknown partition {name!r}; choose one of {', '.join(PARTITIONS)}")
    y = labels() if callable(labels) else labels
    if name == "dirichlet":
        return dirichlet(y, m, alpha=alpha, seed=seed)
    return shards(y, m, shards_per_worker, seed=seed)
