"""Local SGD / periodic gossip (Koloskova et al. 2020, "A unified theory of decentralized SGD
with changing topology and local updates"): D-SGD that gossips only every ``every`` steps,
taking plain local steps in between::

    w_j(t+1) = sum_k P(t)[j, k] w_k(t) - eta_t u_j(t)   if (t + 1) % every == 0
    w_j(t+1) = w_j(t) - eta_t u_j(t)                     otherwise

On ``complete`` this is periodic model averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dsgd.algorithms.base import State, Stateless

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


@dataclass(frozen=True)
class LocalSGD(Stateless):
    every: int = 4
    name = "local"

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"local SGD gossips every tau >= 1 steps, got {self.every}")

    def _gossips(self, t: int) -> bool:
        return (t + 1) % self.every == 0

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        if self._gossips(t):
            return comm.mix_add(w, d, -lr, t), state
        return torch.add(w, d, alpha=-lr), state

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mix(b, t) if self._gossips(t) else b
