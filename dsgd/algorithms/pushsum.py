"""Push-sum SGD / Stochastic Gradient Push (Nedić & Olshevsky 2016; Assran et al. 2019).

For a column-stochastic P (a directed graph: each worker splits its mass over itself and its
out-neighbours; rows need not sum to 1) every worker holds a numerator x_j and a scalar weight
psi_j, psi(0) = 1, and its model is the de-biased z_j = x_j / psi_j::

    x(t+1)   = P (x(t) - eta g(z(t)))
    psi(t+1) = P psi(t)
    z(t+1)   = x(t+1) / psi(t+1)

Mixing with a column-stochastic matrix preserves the sums of x and psi, so the z_j reach
consensus on the true average sum_j x_j / sum_j psi_j, where plain mixing with the same matrix
would not. The engine's weights are the z_j (what the gradients are taken at and what is
evaluated); with a doubly stochastic P, psi stays 1 and this is D-SGD in the step-then-gossip
order. The scalar weight travels with the weights: one more number per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from dsgd.algorithms.base import State, Stateless

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


class PushSum(Stateless):
    name = "pushsum"
    mixing = "column"

    def init(self, w: Tensor, comm: Communicator) -> State:
        return {"psi": w.new_ones(w.shape[0], 1)}

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        psi = state["psi"]
        x = comm.mix((w * psi).sub_(d, alpha=lr), t)  # (m, P) the numerators
        psi = comm.mix(psi, t)  # (m, 1)
        return x.div_(psi), {"psi": psi}

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return b  # running statistics stay local: a column-stochastic mix would not average them
