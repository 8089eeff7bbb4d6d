"""The communicator interface every algorithm is written against, and its in-process version.

A communicator hosts a block of ``m_local`` of the ``m`` workers and exchanges their flattened
state, a tensor of shape ``(m_local, P)``:

- ``mix(x, step)``: gossip; row j becomes ``sum_k P(step)[j, k] x_k`` over *all* m workers.
- ``mean(x)``: every row becomes the mean over all m workers (the all-reduce of C-SGD).
- ``mean_message(msg, compressor)``: every row becomes the mean over all m workers of the
  decoded messages (compressed C-SGD): an all-gather of the messages themselves, each decoded
  by every receiver, since a sum of compressed messages is not one.
- ``mix_add(x, d, alpha, step)``: ``mix(x, step) + alpha * d``, the D-SGD update in one call, so
  a communicator can fuse it into one pass over memory.
- ``mix_message(msg, compressor, step)``: ``mix`` of a compressed message (``dsgd.compress``):
  what a worker sends is the message, what it computes with is the decoded rows.
- ``mix_copies(copies, msg, compressor, step, holders)``: ``mix`` of public copies that every
  worker who ever gossips with their owner keeps current from the owners' messages (CHOCO on a
  time-varying schedule); ``holders`` (from ``copy_holders()``, kept by the caller) records who
  holds each hosted worker's copy. A message counts once per holder when it is sent, also to a
  holder not contacted at ``step`` (it is delivered at the next contact); a worker contacted
  for the first time receives the sender's earlier messages then, ``step`` of them.

Accounting, one convention for every call: ``bytes_sent`` counts the bytes the hosted workers
put on the wire (in one process: what the workers would send as processes). A gossip sends one
row (or message) per out-neighbour; a ring all-reduce sends ``2 (m - 1) / m`` of the vector per
worker (reduce-scatter, then all-gather); a ring all-gather of one message per worker sends
``m - 1`` messages per worker (its own, then the ones it passes on), so each message reaches
the ``m - 1`` others. ``rounds`` lists the step's communication rounds, ``(kind, step, bytes of
one message)`` with kind ``"gossip"``, ``"allreduce"`` (the bytes of the whole vector) or
``"allgather"``, for the simulated clock (``dsgd.engine.network``); the caller clears it.

``LocalCommunicator`` hosts every worker in one process, so both are a matrix product. The
distributed communicator (``dsgd.engine.distributed``) implements the same calls with
torch.distributed, exchanging only with neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dsgd.compress import Compressor, Message
from dsgd.topology import Topology


def allreduce_bytes(vector_bytes: int, world: int) -> int:
    """What one of ``world`` participants sends in a ring all-reduce of a ``vector_bytes``
    vector: 2 (world - 1) chunks of vector_bytes / world (0 when alone)."""
    return 2 * (world - 1) * vector_bytes // world if world > 1 else 0


def allgather_bytes(message_bytes: int, count: int, world: int) -> int:
    """What one of ``world`` participants sends in a ring all-gather of ``count`` messages of
    ``message_bytes`` each per participant: world - 1 blocks of count messages (its own block,
    then those it passes on)."""
    return (world - 1) * count * message_bytes


class Communicator(Protocol):
    m: int  # all workers
    workers: range  # the global indices of the workers hosted here
    bytes_sent: int  # payload bytes sent so far (in one process: what processes would send)
    rounds: list[tuple[str, int, int]]  # (kind, step, message bytes) since last cleared

    def mix(self, x: Tensor, step: int, row_bytes: int | None = None) -> Tensor:
        ...  # (m_local, P) -> (m_local, P); row_bytes: a row's size on the wire, if compressed

    def mean(self, x: Tensor) -> Tensor:  # (m_local, P) -> (m_local, P), rows equal
        ...

    def mean_message(self, msg: Message, compressor: Compressor) -> Tensor:
        ...  # (m_local, P), every row the mean over all m workers of decompress(msg)

    def mix_add(self, x: Tensor, d: Tensor, alpha: float, step: int) -> Tensor:
        ...

    def mix_message(self, msg: Message, compressor: Compressor, step: int) -> Tensor:
        ...  # P(step) @ decompress(msg): what travels is the compressed message

    def copy_holders(self) -> Tensor:  # (m_local, m) bool, all False
        ...

    def mix_copies(self, copies: Tensor, msg: Message, compressor: Compressor, step: int,
                   holders: Tensor) -> tuple[Tensor, Tensor]:
        ...  # (P(step) @ copies, holders after step): msg is what updated the copies

    def agree_min(self, value: int) -> int:  # the smallest value over all processes
        ...


@dataclass(frozen=True)
class MixPlan:
    """How ``LocalCommunicator`` computes ``P @ x`` for one matrix."""

    mode: str  # "dense", "shift" or "sparse"
    matrix: Tensor  # (m, m) P on x's device and dtype
    shifts: tuple[tuple[int, float], ...]  # shift: (offset o, weight P[0, o]) for P[0, o] != 0
    index: Tensor | None  # sparse: (deg, m), slot s of row j is j's s-th neighbour
    weights: Tensor | None  # sparse: (deg, m), its weight (0 where a row has fewer neighbours)
    sends: int  # rows handed to other workers per gossip (as if each worker were a process)


def gossip(x: Tensor, plan: MixPlan) -> Tensor:
    """``P @ x`` for x: (m, P), by the plan's mode; the one implementation of every mode, which
    the compiled ``mix_add`` wraps."""
    if plan.mode == "dense":
        return plan.matrix @ x
    if plan.mode == "shift":
        m = x.shape[0]
        own = dict(plan.shifts).get(0)  # the worker's own weight: start from it, not from zeros
        out = torch.mul(x, own) if own is not None else torch.zeros_like(x)
        for o, w in plan.shifts:
            if o == 0:
                continue
            out[: m - o].add_(x[o:], alpha=w)  # rows j < m - o read x[j + o]
            out[m - o:].add_(x[:o], alpha=w)  # the rest wrap around
        return out
    assert plan.index is not None and plan.weights is not None
    out = torch.index_select(x, 0, plan.index[0]).mul_(plan.weights[0][:, None])
    for s in range(1, plan.index.shape[0]):
        out.addcmul_(torch.index_select(x, 0, plan.index[s]), plan.weights[s][:, None])
    return out


def gossip_add(x: Tensor, d: Tensor, alpha: float | Tensor, plan: MixPlan) -> Tensor:
    """``P @ x + alpha * d``; ``alpha`` a float, or a 0-d tensor under ``torch.compile`` (a new
    lr then does not recompile)."""
    out = gossip(x, plan)
    return out.add_(d, alpha=alpha) if isinstance(alpha, float) else out.add_(d * alpha)


def fused_gossip_add(x: Tensor, d: Tensor, alpha: Tensor, plan: MixPlan) -> Tensor:
    """``gossip_add`` as ``torch.compile`` traces it: a shift plan as a sum of rolled rows,
    which compiles to one pass over x and d (the in-place slice adds of ``gossip`` compile to
    several); ``alpha`` a 0-d tensor."""
    if plan.mode != "shift":
        return gossip_add(x, d, alpha, plan)
    out = d * alpha
    for o, w in plan.shifts:
        out = out + w * torch.roll(x, -o, 0)  # row j reads x[(j + o) % m]
    return out


class LocalCommunicator:
    """All m workers in one process; ``mix`` computes ``P @ x`` in one of three ways:

    - ``shift``: for circulant P (ring, exponential, one-peer exponential, complete),
      ``out[j] = sum_o P[0, o] x[(j + o) % m]`` as in-place adds of row slices, no temporaries;
    - ``dense``: one (m, m) x (m, P) matrix product, which reads every row once;
    - ``sparse``: ``deg`` row gathers (``index_select``), O(deg * m * P) instead of O(m^2 P).

    ``compile=True`` runs ``mix_add`` through ``torch.compile`` for topologies whose matrix does
    not change, so the gossip and the update can fuse into fewer passes over memory.

    ``"auto"`` picks what ``benchmarks/gossip.py`` measured fastest
    (docs/performance-history.md). On CPU: shift for circulant matrices with few neighbours
    (``4 * deg <= m``, deg counting the worker itself), dense otherwise up to m = 256, sparse
    beyond. On GPU: dense up to m = 256 (one GEMM beats every elementwise path there), beyond it
    shift or sparse. Dense is never picked on a GPU while TF32 matrix products are allowed
    (``torch.backends.cuda.matmul.allow_tf32``): their 10-bit mantissa would round the weights
    at every gossip step and the workers' mean would drift.
    """

    MODES = ("auto", "dense", "sparse", "shift")

    def __init__(self, topology: Topology, mode: str = "auto", compile: bool = False):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.topology = topology
        self.m = topology.m
        self.workers = range(self.m)
        self.bytes_sent = 0
        self.rounds: list[tuple[str, int, int]] = []
        self.mode = mode
        self._cache: tuple[tuple, MixPlan] | None = None
        self.compiled = compile and not topology.time_varying
        self._fused = torch.compile(fused_gossip_add, dynamic=False) if self.compiled else None
        self._alpha: Tensor | None = None

    def plan(self, step: int, like: Tensor) -> MixPlan:
        """The plan for step ``step``'s matrix and tensors like ``like``, cached while the
        matrix cannot change."""
        tf32 = like.is_cuda and torch.backends.cuda.matmul.allow_tf32
        key = (0 if not self.topology.time_varying else step, like.dtype, like.device, tf32)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        P = self.topology.matrix(step)
        circulant = all(torch.equal(P[j], torch.roll(P[0], j)) for j in range(self.m))
        mode = self.mode
        if mode == "auto":
            few = 4 * int((P[0] != 0).sum()) <= self.m
            if like.is_cuda:
                mode = ("dense" if self.m <= 256 and not tf32
                        else "shift" if circulant else "sparse")
            else:
                mode = ("shift" if circulant and few
                        else "dense" if self.m <= 256 else "sparse")
        if mode == "shift" and not circulant:
            raise ValueError(f"shift gossip needs a circulant matrix; {self.topology.name} "
                             "is not one")
        shifts: tuple[tuple[int, float], ...] = ()
        index = weights = None
        if mode == "shift":
            shifts = tuple((o, float(P[0, o])) for o in torch.nonzero(P[0]).flatten().tolist())
        elif mode == "sparse":
            deg = int((P != 0).sum(1).max())
            # slot s of row j: the s-th neighbour of j (padded with j itself at weight 0)
            order = torch.argsort((P == 0).to(torch.int8), dim=1, stable=True)[:, :deg]  # (m, deg)
            index = order.T.contiguous().to(like.device)
            weights = torch.gather(P, 1, order).T.contiguous().to(like.device, like.dtype)
        # nominal accounting, as if each worker were a process: worker k sends its row to
        # every other worker j with P[j, k] != 0
        sends = int((P != 0).sum()) - int((P.diagonal() != 0).sum())
        plan = MixPlan(mode, P.to(like.device, like.dtype), shifts, index, weights, sends)
        self._cache = (key, plan)
        return plan

    def mix(self, x: Tensor, step: int, row_bytes: int | None = None) -> Tensor:
        """``P(step) @ x``; ``row_bytes``: what one row costs on the wire when it stands for a
        compressed message (default: the dense row)."""
        plan = self.plan(step, x)
        self._count(plan, step, x.shape[1] * x.element_size() if row_bytes is None else row_bytes)
        return gossip(x, plan)

    def count_mix(self, step: int, x: Tensor) -> None:
        """Count one ``mix`` of x's rows at ``step`` that the caller computed itself (the
        engine's compiled whole step, ``dsgd.engine.fused``)."""
        self._count(self.plan(step, x), step, x.shape[1] * x.element_size())

    def _count(self, plan: MixPlan, step: int, row_bytes: int) -> None:
        self.bytes_sent += plan.sends * row_bytes
        self.rounds.append(("gossip", step, row_bytes))

    def mix_message(self, msg: Message, compressor: Compressor, step: int) -> Tensor:
        """``P(step) @ decompress(msg)``, counting the compressed message's bytes."""
        return self.mix(compressor.decompress(msg), step, row_bytes=compressor.bytes(msg))

    def copy_holders(self) -> Tensor:
        """(m, m) bool, all False: ``[j, k]`` once worker k holds worker j's public copy."""
        return torch.zeros(self.m, self.m, dtype=torch.bool)

    def mix_copies(self, copies: Tensor, msg: Message, compressor: Compressor, step: int,
                   holders: Tensor) -> tuple[Tensor, Tensor]:
        """``P(step) @ copies`` (m, P), the public copies the messages ``msg`` have just
        updated; every holder of a copy has it current. Worker j's message counts once per
        holder of j's copy; a worker k that reads j for the first time (``P(step)[k, j] != 0``)
        becomes a holder and receives j's ``step`` earlier messages too (every message of a
        stream has one size: it depends only on the compressor and the vector's length)."""
        plan = self.plan(step, copies)
        reads = plan.matrix.T != 0  # [j, k]: worker k reads worker j at this step
        reads.fill_diagonal_(False)
        reads = reads.to(holders.device)
        new = reads & ~holders
        holders = holders | reads
        nbytes = compressor.bytes(msg)
        self.bytes_sent += nbytes * (int(holders.sum()) + step * int(new.sum()))
        self.rounds.append(("gossip", step, nbytes))
        return gossip(copies, plan), holders

    def mix_add(self, x: Tensor, d: Tensor, alpha: float, step: int) -> Tensor:
        plan = self.plan(step, x)
        self._count(plan, step, x.shape[1] * x.element_size())
        if self._fused is None:
            return gossip_add(x, d, alpha, plan)
        # alpha as a tensor, so a new lr does not recompile; filled in place (no host-to-device
        # copy that would wait for the GPU)
        if self._alpha is None or (self._alpha.dtype, self._alpha.device) != (x.dtype, x.device):
            self._alpha = torch.zeros((), dtype=x.dtype, device=x.device)
        return self._fused(x, d, self._alpha.fill_(alpha), plan)

    def mean(self, x: Tensor) -> Tensor:
        row = x.shape[1] * x.element_size()
        self.bytes_sent += 2 * (self.m - 1) * row  # m workers, 2 (m - 1) / m rows each
        self.rounds.append(("allreduce", -1, row))
        return x.mean(0, keepdim=True).expand_as(x).clone()

    def mean_message(self, msg: Message, compressor: Compressor) -> Tensor:
        """Every row the mean of the m decoded messages; counted as the ring all-gather of
        the messages, m - 1 messages per worker."""
        nbytes = compressor.bytes(msg)
        self.bytes_sent += self.m * allgather_bytes(nbytes, 1, self.m)
        self.rounds.append(("allgather", -1, nbytes))
        every = compressor.decompress(msg)  # (m, P)
        return every.mean(0, keepdim=True).expand_as(every).clone()

    def agree_min(self, value: int) -> int:
        return value  # one process


__all__ = ["Communicator", "LocalCommunicator", "MixPlan", "allgather_bytes", "allreduce_bytes",
           "fused_gossip_add", "gossip", "gossip_add"]
