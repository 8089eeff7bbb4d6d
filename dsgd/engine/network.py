"""The network as it is: messages that get lost, workers that fall behind, and a clock.

Faults are a topology wrapper, so every algorithm and both communicators see them the same way,
deterministically from ``(seed, step)``:

- ``drop``: each undirected link {j, k} loses its messages with probability p at a step; both
  ends keep their own weight instead (P[j, k] moves to P[j, j], P[k, j] to P[k, k]). A symmetric
  doubly stochastic matrix stays doubly stochastic, so the workers' mean is preserved. For a
  column-stochastic matrix (a directed graph) the *sender* keeps the mass it would have sent
  (P[k, j] moves to P[j, j]), which keeps the columns summing to 1, as push-sum needs; a
  non-symmetric doubly stochastic matrix (the exponential graph) then stays column but not row
  stochastic, so its mean drifts: use push-sum there.
- ``stragglers``: with probability q a worker falls behind and misses the gossip of the next
  ``straggle_steps`` steps: every link of it drops for those steps.

The clock (``SimulatedClock``) turns a step into seconds, per worker: worker j's compute
(``compute_s``, plus a delay while it straggles) starts when j finished its previous step; a
gossip round then waits for the messages of j's in-neighbours (those with P[j, k] != 0 at that
step: a dropped link, or a straggler that misses the round, is not waited for) and takes one
message time, latency + bytes / bandwidth, the messages to several neighbours travelling in
parallel over separate links. A ring all-reduce (C-SGD) waits for every worker and takes
2 (m - 1) sequential hops of P / m values; a ring all-gather of one message per worker
(compressed C-SGD) waits for every worker too and takes m - 1 sequential hops of one message.
So a delay blocks all of C-SGD at once, while in gossip it reaches only the neighbours at the
next round and spreads one hop per step (overlapping delays at different workers then cost
their maximum, not their sum). ``NetworkClock`` carries
each worker's finishing time from step to step, fed by the communicator's ``rounds``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsgd.topology import Topology


def _draws(seed: int, step: int, m: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(m, m, generator=g, dtype=torch.float64)


def straggling(m: int, step: int, prob: float, steps: int, seed: int) -> Tensor:
    """(m,) bool: which workers miss the gossip at ``step`` (a worker that falls behind at step s
    misses steps s .. s + steps - 1)."""
    out = torch.zeros(m, dtype=torch.bool)
    for s in range(max(0, step - steps + 1), step + 1):
        g = torch.Generator().manual_seed(seed * 999_983 + s)
        out |= torch.rand(m, generator=g, dtype=torch.float64) < prob
    return out


def faulty(topology: Topology, *, drop: float = 0.0, stragglers: float = 0.0,
           straggle_steps: int = 1, seed: int = 0) -> Topology:
    """``topology`` with dropped links and straggling workers (see the module docstring)."""
    if not 0 <= drop <= 1 or not 0 <= stragglers <= 1:
        raise ValueError(f"drop and stragglers are probabilities, got {drop}, {stragglers}")
    if straggle_steps < 1:
        raise ValueError(f"straggle_steps must be >= 1, got {straggle_steps}")
    if drop == 0 and stragglers == 0:
        return topology
    m, column = topology.m, topology.stochastic == "column"

    def schedule(step: int) -> Tensor:
        P = topology.matrix(step).clone()
        u = _draws(seed, step, m)
        lost = torch.triu(u < drop, diagonal=1)
        lost = lost | lost.T  # a link is lost in both directions
        late = straggling(m, step, stragglers, straggle_steps, seed)
        lost |= late[:, None] | late[None, :]
        lost.fill_diagonal_(False)
        moved = torch.where(lost, P, torch.zeros_like(P))  # P[j, k] that does not arrive
        P -= moved
        # receivers keep their own weight (rows stay 1); for push-sum the senders keep it
        P += torch.diag(moved.sum(0) if column else moved.sum(1))
        return P

    return Topology(f"{topology.name}+faults", m, schedule, time_varying=True,
                    stochastic=topology.stochastic)


@dataclass(frozen=True)
class SimulatedClock:
    """Seconds a step takes on a network of ``latency_s`` per message and ``bandwidth_bps``
    bytes/s per link; ``compute_s`` one worker's gradient time (measured or given)."""

    compute_s: float
    latency_s: float = 1e-3
    bandwidth_bps: float = 1e9 / 8  # 1 Gbit/s

    def transfer(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bps

    def gossip_round(self, ready: Tensor, P: Tensor, message_bytes: float) -> Tensor:
        """(m,) when each worker has its round's messages: ``ready`` (m,) when each worker's
        message is ready, then one message time after the last of its in-neighbours'."""
        m = P.shape[0]
        receives = (P != 0) & ~torch.eye(m, dtype=torch.bool, device=P.device)
        waits = torch.where(receives, ready[None, :], torch.full_like(P, -torch.inf)).amax(1)
        return torch.where(receives.any(1), torch.maximum(ready, waits)
                           + self.transfer(message_bytes), ready)

    def _ring(self, ready: Tensor, hops: int, hop_bytes: float) -> Tensor:
        """(m,) every worker ends a ring collective together: after the last one is ready,
        ``hops`` sequential hops of ``hop_bytes`` each (none for one worker)."""
        end = ready.max() + (hops * self.transfer(hop_bytes) if ready.shape[0] > 1 else 0.0)
        return end.expand(ready.shape[0]).clone()

    def allreduce_round(self, ready: Tensor, vector_bytes: float) -> Tensor:
        """The ring all-reduce (reduce-scatter then all-gather): 2 (m - 1) hops of
        vector_bytes / m each."""
        m = ready.shape[0]
        return self._ring(ready, 2 * (m - 1), vector_bytes / m)

    def allgather_round(self, ready: Tensor, message_bytes: float) -> Tensor:
        """The ring all-gather of one message each: m - 1 hops of one message."""
        return self._ring(ready, ready.shape[0] - 1, message_bytes)

    def gossip_step(self, P: Tensor, message_bytes: float, delays: Tensor | None = None
                    ) -> Tensor:
        """(m,) when each worker finishes a gossip step started together: its own compute
        (delays: (m,) extra compute seconds, stragglers), then one round."""
        return self.gossip_round(self._ready(P.shape[0], delays, P.dtype), P, message_bytes)

    def allreduce_step(self, m: int, vector_bytes: float, delays: Tensor | None = None) -> float:
        """Seconds of a C-SGD step started together: every worker's compute, then the ring
        all-reduce."""
        return float(self.allreduce_round(self._ready(m, delays), vector_bytes)[0])

    def _ready(self, m: int, delays: Tensor | None, dtype=torch.float64) -> Tensor:
        base = torch.full((m,), self.compute_s, dtype=dtype)
        return base + delays if delays is not None else base


class NetworkClock:
    """Simulated wall-clock time of a run: each worker's finishing time, step after step.

    ``advance(step, rounds)`` starts every worker's compute at its own previous finishing time
    (plus ``delay_s`` for the workers straggling at ``step``), then plays the step's
    communication rounds (``comm.rounds``: ``("gossip", t, message bytes)`` on ``topology``'s
    P(t), ``("allreduce", _, vector bytes)``, ``("allgather", _, message bytes)``) and
    returns the time the last worker finished."""

    def __init__(self, clock: SimulatedClock, topology: Topology, *, delay_s: float = 0.0,
                 stragglers: float = 0.0, straggle_steps: int = 1, seed: int = 0):
        self.clock, self.topology = clock, topology
        self.delay_s, self.stragglers = delay_s, stragglers
        self.straggle_steps, self.seed = straggle_steps, seed
        self.finish = torch.zeros(topology.m, dtype=torch.float64)

    def advance(self, step: int, rounds: list[tuple[str, int, int]],
                compute_s: float | None = None, delays: Tensor | None = None) -> float:
        """``compute_s``: this step's compute per worker (default the clock's); ``delays``:
        (m,) extra seconds per worker (default: ``delay_s`` for the stragglers drawn)."""
        c = self.clock.compute_s if compute_s is None else compute_s
        t = self.finish + c
        if delays is None and self.delay_s and self.stragglers:
            delays = self.delay_s * straggling(self.topology.m, step, self.stragglers,
                                               self.straggle_steps, self.seed).to(t.dtype)
        if delays is not None:
            t = t + delays
        for kind, at, nbytes in rounds:
            if kind == "gossip":
                t = self.clock.gossip_round(t, self.topology.matrix(at).to(t.dtype), nbytes)
            elif kind == "allgather":
                t = self.clock.allgather_round(t, nbytes)
            else:
                t = self.clock.allreduce_round(t, nbytes)
        self.finish = t
        return float(t.max())

    def state_dict(self) -> dict:
        return {"finish": self.finish.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.finish = torch.tensor(state["finish"], dtype=torch.float64)
