"""The communicator interface every algorithm is written against, and its in-process version.

A communicator hosts a block of ``m_local`` of the ``m`` workers and exchanges their flattened
state, a tensor of shape ``(m_local, P)``:

- ``mix(x, step)``: gossip; row j becomes ``sum_k P(step)[j, k] x_k`` over *all* m workers.
- ``mean(x)``: every row becomes the mean over all m workers (the all-reduce of C-SGD).

``LocalCommunicator`` hosts every worker in one process, so both are a matrix product. The
distributed communicator (``dsgd.engine.distributed``) implements the same two calls with
torch.distributed, exchanging only with neighbours.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from dsgd.topology import Topology


class Communicator(Protocol):
    m: int  # all workers
    workers: range  # the global indices of the workers hosted here
    bytes_sent: int  # payload bytes sent so far (in one process: what processes would send)

    def mix(self, x: Tensor, step: int) -> Tensor:  # (m_local, P) -> (m_local, P)
        ...

    def mean(self, x: Tensor) -> Tensor:  # (m_local, P) -> (m_local, P), rows equal
        ...


class LocalCommunicator:
    """All m workers in one process. Gossip is ``P @ x`` (dense) or, when every worker has few
    neighbours, a sum of ``deg`` row-gathers (sparse: O(deg * m * P) instead of O(m^2 P)).
    ``mode`` forces one ("dense" or "sparse"); "auto" is dense: one (m, m) x (m, P) product
    reads every row once, and ``benchmarks/gossip.py`` measured the row gathers slower on
    ring, grid and exponential graphs at P = 100k and 11M."""

    def __init__(self, topology: Topology, mode: str = "auto"):
        if mode not in ("auto", "dense", "sparse"):
            raise ValueError(f"mode must be auto, dense or sparse, got {mode!r}")
        self.topology = topology
        self.m = topology.m
        self.workers = range(self.m)
        self.bytes_sent = 0
        self.mode = mode
        self._cache: tuple[int, str, Tensor, Tensor | None] | None = None

    def _plan(self, step: int, like: Tensor):
        """The matrix in x's dtype/device, and for sparse mode the (deg, m) gather plan."""
        key = 0 if not self.topology.time_varying else step
        cached = self._cache
        if cached and cached[0] == key and cached[2].dtype == like.dtype \
                and cached[2].device == like.device:
            return cached[1:]
        P = self.topology.matrix(step)
        nnz = (P != 0).sum(1)
        deg = int(nnz.max())
        mode = "dense" if self.mode == "auto" else self.mode
        plan = None
        if mode == "sparse":
            # slot s of row j: the s-th neighbour of j (padded with j itself at weight 0)
            order = torch.argsort((P == 0).to(torch.int8), dim=1, stable=True)[:, :deg]  # (m, deg)
            weights = torch.gather(P, 1, order)
            plan = (order.T.contiguous().to(like.device),
                    weights.T.contiguous().to(like.device, like.dtype))  # (deg, m) each
        self._cache = (key, mode, P.to(like.device, like.dtype), plan)
        return self._cache[1:]

    def mix(self, x: Tensor, step: int) -> Tensor:
        mode, P, plan = self._plan(step, x)
        # nominal accounting, as if each worker were a process: worker k sends its row to
        # every other worker j with P[j, k] != 0
        sends = int((P != 0).sum()) - int((P.diagonal() != 0).sum())
        self.bytes_sent += sends * x.shape[1] * x.element_size()
        if mode == "dense":
            return P @ x
        index, weights = plan
        out = x[index[0]] * weights[0][:, None]
        for s in range(1, index.shape[0]):
            out.addcmul_(x[index[s]], weights[s][:, None])
        return out

    def mean(self, x: Tensor) -> Tensor:
        self.bytes_sent += x.numel() * x.element_size()  # each worker hands its row to all-reduce
        return x.mean(0, keepdim=True).expand_as(x).clone()


def global_average(comm: Communicator, x: Tensor) -> Tensor:
    """The mean over all m workers, one row: (m_local, P) -> (P,)."""
    return comm.mean(x)[0]


__all__ = ["Communicator", "LocalCommunicator", "global_average"]
