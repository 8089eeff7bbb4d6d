"""D² / exact diffusion (Tang et al. 2018, "D²: Decentralized Training over Decentralized
Data")::

    x(1)   = P (x(0) - eta g(0))
    x(t+1) = P (2 x(t) - x(t-1) - eta g(t) + eta g(t-1))

(with a schedule, ``eta_t g(t) - eta_{t-1} g(t-1)``). The correction cancels the gradient
heterogeneity between workers, so D² converges to the exact optimum at a constant lr. The
analysis needs a symmetric P whose smallest eigenvalue is above -1/3; the algorithm refuses
other matrices (a ring of an even number of workers has eigenvalue -1/3: use an odd number,
or lazy gossip, ``dsgd.topology.lazy``: more self-weight).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dsgd.algorithms.base import State, Stateless
from dsgd.errors import UserError

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


def check_d2_matrix(P: Tensor, name: str) -> None:
    """Raise a one-line UserError unless P is symmetric with lambda_min > -1/3."""
    if not torch.allclose(P, P.T, atol=1e-9):
        raise UserError(f"D2 needs a symmetric mixing matrix; {name} is not symmetric "
                        "(use ring, grid, torus, complete or star)")
    low = float(torch.linalg.eigvalsh(P.double()).min())
    if low <= -1 / 3 + 1e-9:
        raise UserError(f"D2 needs the smallest eigenvalue of the mixing matrix above -1/3; "
                        f"{name} has {low:.4f} (use a ring of an odd number of workers, lazy "
                        "gossip (train.lazy = 0.5), a star or complete)")


class D2(Stateless):
    name = "d2"

    def init(self, w: Tensor, comm: Communicator) -> State:
        topology = comm.topology
        steps = range(1) if not topology.time_varying else range(8)
        for t in steps:
            check_d2_matrix(topology.matrix(t), topology.name)
        return {}

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        step = d * lr  # (m, P) eta_t g(t)
        if "x" not in state:
            z = w - step
        else:
            z = (2 * w).sub_(state["x"]).sub_(step).add_(state["step"])
        return comm.mix(z, t), {"x": w, "step": step}

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mix(b, t)
