"""The communicator over torch.distributed: one process per block of workers, gossip by
point-to-point exchange with neighbours only.

The ``W`` processes of a torchrun job host the ``m`` workers in contiguous blocks of
``b = m / W``: rank r hosts workers ``range(r * b, (r + 1) * b)``. For the mixing matrix P(t)
of step t, worker j needs ``sum_k P[j, k] x_k``, so each rank

- receives, from every other rank q, the rows x_k of q's workers k that some hosted worker j
  reads (``P[j, k] != 0``): the row structure of P over its block;
- sends to every rank q its own rows that some worker of q reads: the column structure of P;
- uses the rows of its own workers without any communication.

All sends and receives of a step go out in one ``dist.batch_isend_irecv``: one message per
neighbouring rank and direction, never an all-gather. Both sides compute the same plan from
``topology.matrix(step)``, a pure function of the step; static topologies cache it, time-varying
ones (one-peer exponential, ``permuted``) rebuild it each step. ``mean`` (C-SGD, the averaged
model, consensus distance) is one ``all_reduce`` of the local row sum; ``mean_message``
(compressed C-SGD) one ``all_gather`` of each tensor of the compressed messages.

Running it (the training CLI builds on :func:`init_from_env`)::

    # one machine, 4 processes (gloo on CPU, nccl with one GPU per process)
    torchrun --standalone --nproc-per-node=4 -m dsgd train --config X.toml --engine distributed

    # two machines with 4 processes each: run on both, same endpoint (host:port of node 0)
    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d \\
             --rdzv-endpoint=node0.example:29500 --rdzv-id=run1 -m dsgd train ... \\
             --engine distributed

In code::

    ctx = init_from_env(timeout_s=60)                 # reads RANK, WORLD_SIZE, LOCAL_RANK, ...
    comm = TorchDistributedCommunicator(topology, timeout_s=60, checkpoint_dir=run_dir)
    engine = Engine(model.to(ctx.device), comm=comm, ...)
    for x, y in batches:                              # x: (m, B, ...) -> this rank's rows
        engine.step(x[comm.workers.start:comm.workers.stop], y[...])
    shutdown()

Each rank checkpoints its own block (``engine.state_dict()`` holds ``w`` of shape (b, P)).

Faults: every wait is bounded by ``timeout_s``. A peer that dies makes its neighbours fail at
once (gloo: "Connection closed by peer"); a peer that hangs makes them fail after ``timeout_s``.
Either way the communicator raises :class:`PeerFailure`, a one-line ``UserError``, and the
ranks further away fail in turn when those neighbours exit (torchrun also stops the rest of the
job when one process exits non-zero). After a PeerFailure, print the message and end the process
with :func:`abort_process`, not ``sys.exit``: a gloo collective (the all-reduce of ``mean``) that
timed out leaves a background thread blocked until the process group's own timeout, and a normal
interpreter exit waits for that thread (``destroy_process_group`` and ``abort`` do not free it).
Give ``init_from_env`` the same ``timeout_s`` as the communicator.

Accounting: ``bytes_sent`` counts the bytes this rank puts on the wire, the convention of
``dsgd.engine.comm``: for ``mix`` the rows it sends (``rows * P * itemsize`` per neighbouring
rank), for ``mean`` what a ring all-reduce over W ranks sends per rank, ``2 (W - 1) / W`` of the
vector, for ``mean_message`` what a ring all-gather of the messages over W ranks sends per
rank, ``W - 1`` blocks of its ``b`` messages. With one worker per rank that is
``2 * P * itemsize`` per ring gossip step, ``2 (m - 1) / m * P * itemsize`` per C-SGD step and
``m - 1`` messages per compressed C-SGD step, as the simulated communicator counts.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from dsgd.compress import Compressor, Message
from dsgd.engine.comm import allgather_bytes, allreduce_bytes
from dsgd.errors import TrainingDiverged, UserError
from dsgd.topology import Topology

__all__ = [
    "DistributedContext",
    "DistributedSetupError",
    "GossipPlan",
    "PeerFailure",
    "TorchDistributedCommunicator",
    "abort_process",
    "gossip_plan",
    "init_from_env",
    "shutdown",
]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_DIVERGED = "dsgd/diverged"  # the store key a diverged rank leaves its message under
_STORE_GRACE_S = 1.0


class DistributedSetupError(UserError):
    """The process group cannot be formed, or the job's shape does not fit the workers."""


class PeerFailure(UserError):
    """A peer process died or stopped responding during an exchange."""

    def __init__(self, message: str, *, peer: int | None, step: int | None, elapsed_s: float):
        super().__init__(message)
        self.peer, self.step, self.elapsed_s = peer, step, elapsed_s


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" or "nccl"
    device: torch.device  # where this rank's tensors live


def init_from_env(timeout_s: float = 60, backend: str | None = None) -> DistributedContext:
    """Join the job torchrun launched this process into (its RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT variables). The backend is nccl when CUDA is available, gloo
    otherwise; with nccl the process takes GPU ``LOCAL_RANK``. ``timeout_s`` bounds the
    rendezvous and every collective without its own timeout. Calling it again is a no-op."""
    missing = [k for k in _ENV if k not in os.environ]
    if missing and not dist.is_initialized():
        raise DistributedSetupError(
            f"{', '.join(missing)} not set: launch with torchrun, e.g. torchrun --standalone "
            "--nproc-per-node=4 -m dsgd train --config X.toml --engine distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_initialized():
        backend = dist.get_backend()
    elif backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                "use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedSetupError(
                f"could not join the process group at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} within {timeout_s:g} s ({first[:200]}); "
                "check that every process was started and the endpoint is reachable") from e
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank,
                              dist.get_backend(), device)


def shutdown(timeout_s: float = 60) -> None:
    """Leave the process group (at the end of a run; safe to call when none exists).

    Every rank first waits at a barrier (at most ``timeout_s``), so no rank tears its
    connections down while a peer is still using them: a gloo rank that exits early can abort
    its peers' threads at exit ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier(async_op=True).wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError:
        pass  # a peer is gone already: leave anyway
    dist.destroy_process_group()


def announced_divergence() -> str | None:
    """The message a diverged rank left in the job's store (``announce_divergence``), if any."""
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.get(_DIVERGED).decode() if store.check([_DIVERGED]) else None
    except Exception:  # no process group or no store
        return None


def abort_process(code: int = 2) -> NoReturn:
    """End this process now with status ``code``, after a :class:`PeerFailure` was reported.

    Skips the interpreter's shutdown (``os._exit``), which would wait for gloo threads still
    blocked in a timed-out collective. Flushes stdout and stderr first; close any other files
    (logs, metrics) before calling it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if (dist.is_initialized() and dist.get_rank() == 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            and announced_divergence() is not None):
        # launched without torchrun's agent, rank 0 hosts the job's store: keep it up a moment
        # for the peers still reading why a process stopped (``announce_divergence``)
        time.sleep(_STORE_GRACE_S)
    os._exit(code)


# ---- the plan: who sends which rows to whom, a pure function of (P, rank, world size) --------
@dataclass(frozen=True)
class GossipPlan:
    sends: tuple[tuple[int, Tensor], ...]  # (peer rank, local row indices (n,)), by peer
    recvs: tuple[tuple[int, int], ...]  # (peer rank, number of rows it sends), by peer
    weights: Tensor  # (b, b + sum of received rows): P's rows of this block, columns gathered

    @property
    def rows_sent(self) -> int:
        return sum(len(idx) for _, idx in self.sends)


def gossip_plan(P: Tensor, rank: int, world_size: int) -> GossipPlan:
    """The exchange rank ``rank`` makes to mix with P, workers in contiguous blocks.

    The columns of ``weights`` are the rows the rank will hold after the exchange: its own b
    rows, then the rows received from each peer in rank order (sorted by worker index within
    a peer). Rank q's ``sends`` to r equal r's ``recvs`` from q, since both read them off P.
    """
    m = P.shape[0]
    b = m // world_size
    nz = P != 0  # (m, m)
    mine = slice(rank * b, (rank + 1) * b)
    sends, recvs, columns = [], [], list(range(rank * b, (rank + 1) * b))
    for q in range(world_size):
        if q == rank:
            continue
        theirs = slice(q * b, (q + 1) * b)
        # my workers k that some worker of q reads: column structure of my block
        out = torch.nonzero(nz[theirs, mine].any(0)).flatten()
        if len(out):
            sends.append((q, out))
        # q's workers k that some worker of mine reads: row structure of my block
        inc = torch.nonzero(nz[mine, theirs].any(0)).flatten()
        if len(inc):
            recvs.append((q, len(inc)))
            columns.extend((q * b + inc).tolist())
    weights = P[mine][:, columns]
    return GossipPlan(tuple(sends), tuple(recvs), weights)


class TorchDistributedCommunicator:
    """The communicator of one rank of a torch.distributed job (see the module docstring).

    ``timeout_s`` bounds every wait of ``mix`` and ``mean``; a peer that dies or hangs raises
    :class:`PeerFailure` naming ``checkpoint_dir`` (settable later) as the place to resume
    from. ``step`` is the step in progress for error messages: ``mix`` sets it, a training
    loop may set it too (C-SGD never calls ``mix``).
    """

    def __init__(self, topology: Topology, *, timeout_s: float = 60, group=None,
                 checkpoint_dir: str | os.PathLike | None = None, advice: str | None = None):
        if not dist.is_initialized():
            raise DistributedSetupError(
                "torch.distributed is not initialized: call init_from_env() first (under torchrun)")
        self.topology = topology
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.m = topology.m
        if self.m % self.world_size:
            raise DistributedSetupError(
                f"{self.m} workers do not split evenly over {self.world_size} processes: "
                "choose a number of workers divisible by --nproc-per-node x --nnodes")
        b = self.m // self.world_size
        self.workers = range(self.rank * b, (self.rank + 1) * b)
        self.timeout_s = float(timeout_s)
        self.checkpoint_dir = checkpoint_dir
        self.advice = advice  # what a PeerFailure tells the user to do (default: --resume)
        self.bytes_sent = 0
        self.rounds: list[tuple[str, int, int]] = []  # for the simulated clock
        self.step: int | None = None
        backend = dist.get_backend(group)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                       else torch.device("cpu"))
        self._cache: tuple[int, torch.dtype, torch.device, GossipPlan] | None = None
        self._handshake()

    def _handshake(self) -> None:
        """All ranks take part once (batched P2P needs every rank in its group's first
        collective) and must agree on the number of workers. Bounded by the process group's
        timeout, not ``timeout_s``: ranks may start seconds apart."""
        probe = torch.tensor([self.m, -self.m], dtype=torch.int64, device=self.device)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=self.group)
        if int(probe[0]) != -int(probe[1]):
            raise DistributedSetupError(
                f"processes disagree on the number of workers ({-int(probe[1])} to "
                f"{int(probe[0])}): give every process the same config")

    # ---- faults ------------------------------------------------------------------------------
    def announce_divergence(self, message: str) -> None:
        """Leave why this process stops in the job's key-value store (the rendezvous store every
        rank reaches), so that peers which find it gone report divergence, not a dead peer."""
        try:
            dist.distributed_c10d._get_default_store().set(_DIVERGED, message)
        except Exception:  # no store (a process group made without one): peers see a dead peer
            pass

    def _failure(self, what: str, peer: int | None, started: float, err: Exception):
        reason = announced_divergence()
        if reason is not None:  # the peer stopped because its loss diverged: say that
            return TrainingDiverged(f"{reason} (on another process; this one stopped at step "
                                    f"{self.step})")
        elapsed = time.monotonic() - started
        text = str(err).lower()
        why = ("timed out" if "timed out" in text or "timeout" in text
               else "connection lost" if "closed" in text or "reset" in text or "broken" in text
               else type(err).__name__)
        who = f"worker process {peer} (or a peer)" if peer is not None else "a worker process"
        at = f" at step {self.step}" if self.step is not None else ""
        where = f" in {os.fspath(self.checkpoint_dir)}" if self.checkpoint_dir else ""
        return PeerFailure(
            f"{who} stopped responding during {what}{at} after {elapsed:.1f} s ({why}, rank "
            f"{self.rank} of {self.world_size}); "
            + (self.advice or f"the run's checkpoints{where} are intact: resume with --resume"),
            peer=peer, step=self.step, elapsed_s=elapsed)

    def _wait(self, works, peers, what: str, started: float) -> None:
        """Wait for every work, ``timeout_s`` in all from ``started`` (not per work)."""
        deadline = started + self.timeout_s
        for work, peer in zip(works, peers):
            left = max(deadline - time.monotonic(), 1e-3)
            try:
                work.wait(timeout=timedelta(seconds=left))
            except RuntimeError as e:  # DistBackendError, gloo's "Connection closed", timeouts
                raise self._failure(what, peer, started, e) from e

    def _global(self, q: int) -> int:
        return q if self.group is None else dist.get_global_rank(self.group, q)

    # ---- the protocol ------------------------------------------------------------------------
    def plan(self, step: int, like: Tensor) -> GossipPlan:
        key = step if self.topology.time_varying else 0
        cached = self._cache
        if cached and cached[:3] == (key, like.dtype, like.device):
            return cached[3]
        plan = gossip_plan(self.topology.matrix(step), self.rank, self.world_size)
        plan = GossipPlan(tuple((q, idx.to(like.device)) for q, idx in plan.sends), plan.recvs,
                          plan.weights.to(like.device, like.dtype))
        self._cache = (key, like.dtype, like.device, plan)
        return plan

    def _exchange(self, parts: list[Tensor], plan: GossipPlan) -> list[list[Tensor]]:
        """Send each neighbouring rank the rows it reads of every tensor in ``parts`` (all with
        the hosted workers as rows) and receive theirs; returns, per receive of the plan, the
        received rows of every part. One ``batch_isend_irecv`` for the whole step."""
        # gloo and nccl send contiguous tensors whose dtype the receiver expects: t[idx] is a
        # fresh contiguous copy, and every rank exchanges the same dtypes and widths.
        bufs = [[t.new_empty(n, *t.shape[1:]) for t in parts] for _, n in plan.recvs]
        ops = [dist.P2POp(dist.isend, t[idx], self._global(q), self.group)
               for q, idx in plan.sends for t in parts]
        ops += [dist.P2POp(dist.irecv, buf, self._global(q), self.group)
                for (q, _), received in zip(plan.recvs, bufs) for buf in received]
        if ops:
            started = time.monotonic()
            peers = ([q for q, _ in plan.sends for _ in parts]
                     + [q for q, _ in plan.recvs for _ in parts])
            try:
                works = dist.batch_isend_irecv(ops)
            except RuntimeError as e:
                raise self._failure("gossip", None, started, e) from e
            # the returned works match ops one to one on gloo; nccl coalesces into one
            self._wait(works, peers if len(works) == len(ops) else [None] * len(works),
                       "gossip", started)
        return bufs

    def mix(self, x: Tensor, step: int) -> Tensor:  # (b, P) -> (b, P)
        self.step = step
        plan = self.plan(step, x)
        x = x.contiguous()
        bufs = [rows for (rows,) in self._exchange([x], plan)]  # (n, P) each
        if plan.sends or plan.recvs:
            self.bytes_sent += plan.rows_sent * x.shape[1] * x.element_size()
        self.rounds.append(("gossip", step, x.shape[1] * x.element_size()))
        return plan.weights @ torch.cat([x, *bufs]) if bufs else plan.weights @ x

    def mix_message(self, msg: Message, compressor: Compressor, step: int) -> Tensor:
        """``P(step) @ decompress(msg)`` where what travels is the compressed message (its
        values, indices and scales), decoded by the receiver."""
        self.step = step
        own = compressor.decompress(msg)  # (b, P)
        plan = self.plan(step, own)
        parts = [t.contiguous() for t in (msg.values, msg.indices, msg.scale) if t is not None]
        has = (msg.indices is not None, msg.scale is not None)
        decoded = []
        for received in self._exchange(parts, plan):
            it = iter(received)
            values = next(it)
            indices = next(it) if has[0] else None
            scale = next(it) if has[1] else None
            decoded.append(compressor.decompress(Message(values, msg.size, indices, scale,
                                                         msg.meta)).to(own.dtype))
        if plan.sends or plan.recvs:
            self.bytes_sent += plan.rows_sent * compressor.bytes(msg)
        self.rounds.append(("gossip", step, compressor.bytes(msg)))
        return plan.weights @ torch.cat([own, *decoded]) if decoded else plan.weights @ own

    def copy_holders(self) -> Tensor:
        """Public copies on a time-varying schedule (``dsgd.engine.comm``) are kept in one
        process only: every rank would have to hold, and bring up to date at each first
        contact, the copies of every worker its workers ever gossip with."""
        raise self._one_process_only()

    def mix_copies(self, copies: Tensor, msg: Message, compressor: Compressor, step: int,
                   holders: Tensor) -> tuple[Tensor, Tensor]:
        raise self._one_process_only()

    def _one_process_only(self) -> UserError:
        return UserError(f"choco on the time-varying topology {self.topology.name} runs in "
                         "one process only: use algorithm deepsqueeze under torchrun, or run "
                         "choco without --engine distributed")

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (e.g. the checkpoint step every rank holds)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        started = time.monotonic()
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self._failure("all-reduce", None, started, e) from e
        self._wait([work], [None], "all-reduce", started)
        return int(t.item())

    def mix_add(self, x: Tensor, d: Tensor, alpha: float, step: int) -> Tensor:
        return self.mix(x, step).add_(d, alpha=alpha)

    def mean_message(self, msg: Message, compressor: Compressor) -> Tensor:
        """(b, P), every row the mean over all m workers of the decoded messages: one
        all-gather of each of the message's tensors (values, indices, scales), every rank
        decoding all m messages. Counted as a ring all-gather over the W ranks: W - 1 blocks
        of b messages sent per rank."""
        parts = [t.contiguous() for t in (msg.values, msg.indices, msg.scale) if t is not None]
        gathered = [[torch.empty_like(t) for _ in range(self.world_size)] for t in parts]
        started = time.monotonic()
        try:
            works = [dist.all_gather(out, t, group=self.group, async_op=True)
                     for out, t in zip(gathered, parts)]
        except RuntimeError as e:
            raise self._failure("all-gather", None, started, e) from e
        self._wait(works, [None] * len(works), "all-gather", started)
        it = (torch.cat(out) for out in gathered)  # (m, ...) each, in worker order
        values = next(it)
        indices = next(it) if msg.indices is not None else None
        scale = next(it) if msg.scale is not None else None
        every = compressor.decompress(Message(values, msg.size, indices, scale, msg.meta))
        nbytes = compressor.bytes(msg)
        self.bytes_sent += allgather_bytes(nbytes, len(self.workers), self.world_size)
        self.rounds.append(("allgather", -1, nbytes))
        return every.mean(0, keepdim=True).expand(len(self.workers), -1).clone()

    def mean(self, x: Tensor) -> Tensor:  # (b, P) -> (b, P), every row the mean of all m
        total = x.sum(0)  # (P,)
        started = time.monotonic()
        try:
            work = dist.all_reduce(total, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self._failure("all-reduce", None, started, e) from e
        self._wait([work], [None], "all-reduce", started)
        row = total.numel() * total.element_size()
        self.bytes_sent += allreduce_bytes(row, self.world_size)
        self.rounds.append(("allreduce", -1, row))
        return (total / self.m).expand_as(x).clone()
