"""C-SGD: large-batch SGD with the gradient averaged over all m workers (an all-reduce)::

    w(t+1) = w(t) - eta_t * u(t),   u from (1/m) sum_j grad L_j(w(t))

Every worker holds the same weights; BatchNorm statistics, when gossiped, are averaged each step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dsgd.algorithms.base import State, Stateless

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


class CSGD(Stateless):
    name = "csgd"
    averages_gradients = True

    def gradient(self, g: Tensor, loss: Tensor, state: State, comm: Communicator, t: int
                 ) -> tuple[Tensor, State]:
        return comm.mean(g), state

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        return torch.add(w, d, alpha=-lr), state

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mean(b)
