"""C-SGD: large-batch SGD with the gradient averaged over all m workers (an all-reduce)::

    w(t+1) = w(t) - eta_t * u(t),   u from (1/m) sum_j grad L_j(w(t))

Every worker holds the same weights; BatchNorm statistics, when gossiped, are averaged each step.

With ``compression`` the gradients are exchanged compressed, with error feedback (EF-SGD: Seide
et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD")::

    c_j  = Q(g_j + e_j),   e_j <- g_j + e_j - c_j     # what the message left out, carried on
    u    from (1/m) sum_k c_k                         # the same on every worker

so sum over steps of the decoded means plus the mean residual is the sum of the mean gradients:
nothing is lost, only delayed. The residual is kept in gradient units, before the optimizer's
momentum and learning rate (as in 1-bit SGD and deep gradient compression; Karimireddy et al.
compress the step lr * g + e instead, which differs when the learning rate changes). The
messages travel in an all-gather (a sum of compressed messages is not one of them): each
worker's message reaches the m - 1 others, which in a ring all-gather is m - 1 messages of one
message's size sent per worker (``comm.mean_message``).
Unbiased compressors are rescaled into contractions (``dsgd.compress.Rescaled``), as error
feedback needs; random ones draw from each worker's own generator. Every worker needs its own
gradient, so the engine computes them one per worker (``needs_worker_gradients``), not one
gradient of the combined batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dsgd.algorithms.base import State, Stateless
from dsgd.compress import as_contraction, compress_rows, generator_states

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


@dataclass(frozen=True)
class CSGD(Stateless):
    compression: Any = None  # None: the exact all-reduce; a compressor (or its name): EF-SGD
    seed: int = 0  # of the random compressors' draws (worker j's from (seed, j))
    name = "csgd"
    averages_gradients = True

    def __post_init__(self):
        if self.compression is not None:
            object.__setattr__(self, "compression", as_contraction(self.compression))

    @property
    def needs_worker_gradients(self) -> bool:  # compressed: each worker's own, not their mean
        return self.compression is not None

    def init(self, w: Tensor, comm: Communicator) -> State:
        if self.compression is None:
            return {}
        return {"error": torch.zeros_like(w), "rng": generator_states(self.seed, comm.workers)}

    def gradient(self, g: Tensor, loss: Tensor, state: State, comm: Communicator, t: int
                 ) -> tuple[Tensor, State]:
        if self.compression is None:
            return comm.mean(g), state
        v = g + state["error"]  # (m_local, P)
        msg, rng = compress_rows(self.compression, v, state["rng"])
        c = self.compression.decompress(msg).to(g.dtype)
        mean = comm.mean_message(msg, self.compression).to(g.dtype)
        return mean, {"error": v - c, "rng": rng}

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        return torch.add(w, d, alpha=-lr), state

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mean(b)
