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

The clock (``SimulatedClock``) turns a step into seconds: the slowest compute of the workers a
worker waits for, plus the communication, from per-link latency and bandwidth. A gossip step
waits for the neighbours only; C-SGD's ring all-reduce takes 2 (m - 1) sequential hops of P / m
values and waits for every worker, so one straggler delays all of C-SGD but only its neighbours
in gossip.
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

    def gossip_step(self, P: Tensor, message_bytes: float, delays: Tensor | None = None
                    ) -> Tensor:
        """(m,) when each worker finishes a gossip step: its own compute and that of the
        neighbours it receives from (delays: (m,) extra compute seconds, stragglers), then one
        message per neighbour, sent in parallel over separate links."""
        m = P.shape[0]
        ready = self.compute_s + (delays if delays is not None else torch.zeros(m, dtype=P.dtype))
        receives = (P != 0) & ~torch.eye(m, dtype=torch.bool)  # row j: the k j hears from
        waits = torch.where(receives, ready[None, :], torch.zeros_like(P)).amax(1)
        comm = self.transfer(message_bytes) if receives.any() else 0.0
        return torch.maximum(ready, waits) + comm

    def allreduce_step(self, m: int, vector_bytes: float, delays: Tensor | None = None) -> float:
        """A ring all-reduce (reduce-scatter then all-gather): every worker's compute first, then
        2 (m - 1) sequential hops of vector_bytes / m each."""
        slowest = self.compute_s + (float(delays.max()) if delays is not None else 0.0)
        hops = 2 * (m - 1)
        return slowest + hops * self.transfer(vector_bytes / m) if m > 1 else slowest
