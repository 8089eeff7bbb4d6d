"""CHOCO-SGD (Koloskova, Stich & Jaggi 2019): decentralized SGD with compressed gossip.

Every worker keeps public copies x_hat of its own and its neighbours' weights and sends only a
compressed update of its own::

    x_j'      = x_j - eta d_j
    q_j       = Q(x_j' - x_hat_j)              # the message, compressed
    x_hat_j  += q_j                            # on every worker holding a copy of j
    x_j      <- x_j' + gamma sum_k P[j, k] (x_hat_k - x_hat_j)

gamma is the consensus step size. CHOCO needs Q to be a contraction; an unbiased compressor
with variance omega (random-k, QSGD) is one once rescaled by 1 / (1 + omega)
(``dsgd.compress.Rescaled``), which ``Choco`` applies to them itself. The copies are updated by
the messages alone, so the error of a biased compressor (top-k) is not lost but fed back in the
next message. With the identity compressor and gamma = 1 this is D-SGD in the step-then-gossip
order, x(t+1) = P (x(t) - eta d(t)). Random compressors draw from each worker's own generator
(``dsgd.compress.compress_rows``), so a run draws the same numbers in one process and under
torchrun.

On a fixed P each worker keeps ``s = P x_hat`` up to date from the mixed messages, so a step
mixes only the compressed messages (``comm.mix_message``). On a time-varying schedule P(t)
(one-peer exponential, shuffled, dropped links and stragglers) the step is the same rule with
P(t), x_j <- x_j' + gamma (sum_k P(t)[j, k] x_hat_k - x_hat_j), and the copies are kept as
follows (``comm.mix_copies``): every worker keeps the copy of every worker it ever gossips with
(the union graph of the schedule; for dropped links the base graph); a message that cannot
travel at step t (a dropped link, a peer not contacted at t) is delivered at the next contact,
so a copy is current whenever it is used. The bytes are one message per holder of the sender's
copy and step, counted when sent (what a real network carries); a worker reached for the first
time at step t receives the t earlier messages then. Mixing the copies with a doubly stochastic
P(t) keeps the workers' mean that of x', as D-SGD's. This path runs in one process; under
torchrun a time-varying schedule is refused (use deepsqueeze there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dsgd.algorithms.base import State, Stateless
from dsgd.compress import Identity, Message, as_contraction, compress_rows, generator_states

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


@dataclass(frozen=True)
class CompressedGossip(Stateless):
    """What the compressed-gossip algorithms (CHOCO, DeepSqueeze) share: a compressor (by name
    or object; an unbiased one rescaled into a contraction), the consensus step gamma and the
    seed of the random compressors' draws (worker j's generator seeded from (seed, j), its state
    a row of ``state["rng"]``, (m_local, L) uint8, checkpointed with the rest)."""

    compression: Any = field(default_factory=Identity)  # a compressor or its name
    consensus_step: float = 1.0  # gamma
    seed: int = 0  # of the random compressors' draws

    def __post_init__(self):
        object.__setattr__(self, "compression", as_contraction(self.compression))
        if not 0 < self.consensus_step <= 1:
            raise ValueError(f"consensus_step (gamma) must be in (0, 1], got "
                             f"{self.consensus_step}")

    def _generators(self, comm: Communicator) -> Tensor:  # (m_local, L)
        return generator_states(self.seed, comm.workers)

    def _compress(self, x: Tensor, state: State) -> tuple[Message, Tensor]:
        """The hosted workers' messages, each row compressed with its worker's generator."""
        return compress_rows(self.compression, x, state["rng"])


@dataclass(frozen=True)
class Choco(CompressedGossip):
    name = "choco"

    def init(self, w: Tensor, comm: Communicator) -> State:
        start = {"x_hat": torch.zeros_like(w), "rng": self._generators(comm)}
        if comm.topology.time_varying:  # who holds each worker's copy, for the byte count
            return {**start, "holders": comm.copy_holders()}
        return {**start, "s": torch.zeros_like(w)}

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        x = w - lr * d  # (m, P)
        msg, rng = self._compress(x - state["x_hat"], state)
        q = self.compression.decompress(msg).to(w.dtype)
        x_hat = state["x_hat"] + q
        if "holders" in state:  # a time-varying P(t): mix the current copies with it
            mixed, holders = comm.mix_copies(x_hat, msg, self.compression, t, state["holders"])
            new = x.add_(mixed.to(w.dtype) - x_hat, alpha=self.consensus_step)
            return new, {"x_hat": x_hat, "holders": holders, "rng": rng}
        s = state["s"] + comm.mix_message(msg, self.compression, t).to(w.dtype)
        new = x.add_(s - x_hat, alpha=self.consensus_step)
        return new, {"x_hat": x_hat, "s": s, "rng": rng}

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mix(b, t)
