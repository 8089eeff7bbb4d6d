"""DeepSqueeze (Tang et al. 2019, "DeepSqueeze: Decentralization Meets Error-Compensated
Compression"): D-SGD whose gossip messages are compressed with error feedback::

    x_j'     = x_j - eta d_j
    v_j      = x_j' + e_j                       # the residual of the last message added back
    c_j      = Q(v_j),   e_j <- v_j - c_j       # what the message left out, carried forward
    x_j     <- x_j' + gamma sum_k (P[j, k] c_k - [j = k] c_k)

Each worker sends only its message c_j; nothing is kept of the neighbours. For a doubly
stochastic P the correction sum_k (P - I) c has mean zero, so the workers' mean moves exactly as
in D-SGD, whatever the compressor. With the identity and gamma = 1 it is D-SGD in the
step-then-gossip order, x(t+1) = P (x(t) - eta d(t)), as CHOCO is. Unlike CHOCO it works on
time-varying and faulty topologies (it keeps no P x_hat); but it compresses the weights, not
their change, so the compression error does not vanish at consensus (with top-10 % and lr 0 on
a 6-ring the consensus distance only halved in 400 steps): where exact consensus matters,
use CHOCO. Unbiased compressors are rescaled into
contractions as for CHOCO (``dsgd.compress.Rescaled``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dsgd.algorithms.base import State
from dsgd.algorithms.choco import CompressedGossip

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


@dataclass(frozen=True)
class DeepSqueeze(CompressedGossip):
    name = "deepsqueeze"

    def init(self, w: Tensor, comm: Communicator) -> State:
        return {"error": torch.zeros_like(w), "rng": self._generators(comm)}

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        x = w - lr * d  # (m, P)
        v = x + state["error"]
        msg, rng = self._compress(v, state)
        c = self.compression.decompress(msg).to(w.dtype)
        mixed = comm.mix_message(msg, self.compression, t).to(w.dtype)  # P c
        new = x.add_(mixed - c, alpha=self.consensus_step)
        return new, {"error": v - c, "rng": rng}

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mix(b, t)
