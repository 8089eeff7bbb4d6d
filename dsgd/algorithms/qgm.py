"""Quasi-global momentum, QG-DSGDm (Lin et al. 2021, "Quasi-global momentum: accelerating
decentralized deep learning on heterogeneous data")::

    d_j      = g_j + beta m_j
    x(t+1)   = P (x(t) - eta d)
    m_j      <- beta m_j + (1 - beta) (x_j(t) - x_j(t+1)) / eta

The momentum buffer is built from the change of the gossiped weights (an estimate of the global
direction), not from the local gradient, which keeps local momentum from amplifying the
heterogeneity between workers. Use it with the optimizer's momentum at 0 (its weight decay
still applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from dsgd.algorithms.base import State, Stateless

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


@dataclass(frozen=True)
class QGM(Stateless):
    beta: float = 0.9  # the paper's momentum factor
    name = "qgm"

    def __post_init__(self):
        if not 0 <= self.beta < 1:
            raise ValueError(f"qgm beta must be in [0, 1), got {self.beta}")

    def gradient(self, g: Tensor, loss: Tensor, state: State, comm: Communicator, t: int
                 ) -> tuple[Tensor, State]:
        if "m" not in state:
            return g, state
        return g + self.beta * state["m"], state

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        new = comm.mix(w - lr * d, t)
        if lr <= 0:
            return new, state
        change = (w - new).div_(lr)  # (m, P) the step the gossiped weights took, per unit lr
        m = change.mul_(1 - self.beta) if "m" not in state else (
            state["m"].mul(self.beta).add_(change, alpha=1 - self.beta))
        return new, {"m": m}

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mix(b, t)
