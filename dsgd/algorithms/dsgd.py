"""D-SGD (Lian et al. 2017; the form of Zhu et al., ICML 2023, eq. 2)::

    w_j(t+1) = sum_k P(t)[j, k] w_k(t) - eta_t * u_j(t)

with u_j the optimizer's direction from worker j's gradient at its *pre-gossip* weights w_j(t).
Mixing and the step happen together, in the communicator's one fused call ``mix_add``.
BatchNorm running statistics, when gossiped, are mixed with the same matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from dsgd.algorithms.base import State, Stateless

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


class DSGD(Stateless):
    name = "dsgd"

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        return comm.mix_add(w, d, -lr, t), state

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mix(b, t)
