"""Gradient tracking (DSGT / GT-DSGD; Pu & Nedić 2021, Koloskova et al. 2021)::

    x(t+1) = P x(t) - eta y(t)
    y(t+1) = P y(t) + g(x(t+1)) - g(x(t)),      y(0) = g(x(0))

y_j tracks the workers' average gradient (gossip preserves the mean of y, and the correction
g(t+1) - g(t) keeps that mean equal to the mean of the current gradients), so with full
gradients and a constant lr the workers converge to the exact optimum of the average loss,
where D-SGD stops at a point biased by eta times the heterogeneity. Each step sends two vectors
per neighbour, x and y. The optimizer's direction (momentum, weight decay) is taken from y.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from dsgd.algorithms.base import State, Stateless

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


class GradientTracking(Stateless):
    name = "gt"

    def gradient(self, g: Tensor, loss: Tensor, state: State, comm: Communicator, t: int
                 ) -> tuple[Tensor, State]:
        if "y" not in state:
            return g, {"y": g.clone(), "g": g.clone()}
        y = comm.mix(state["y"], t - 1).add_(g).sub_(state["g"])  # P y(t-1) + g(t) - g(t-1)
        return y, {"y": y, "g": g.clone()}

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        return comm.mix_add(w, d, -lr, t), state

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:
        return comm.mix(b, t)
