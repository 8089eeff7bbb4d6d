"""What an algorithm is: how the workers' gradients become new weights, written once against the
communicator (``dsgd.engine.comm``), so the same object runs with every worker in one process and
under torchrun.

One step of the engine, for the ``m_local`` workers hosted here (flat tensors of shape
``(m_local, P)``)::

    g        = backend gradients at w                    # each worker's own mini-batch
    g, state = algorithm.gradient(g, loss, state, comm, t)  # C-SGD: the all-reduce mean
    d, opt   = optimizer.direction(g, opt, w)            # momentum, weight decay
    w, state = algorithm.step(w, d, state, comm, lr, t)  # D-SGD: mix(w) - lr * d
    b        = algorithm.mix_buffers(b, comm, t)         # BatchNorm statistics, if gossiped

``state`` is a dict of tensors (empty for the stateless methods): the engine checkpoints it, so
an algorithm that keeps previous weights or tracking variables resumes bit-identically. Adding an
algorithm means writing one of these; the engine's step does not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


State = dict[str, Tensor]


class Algorithm(Protocol):
    name: str
    averages_gradients: bool  # every worker steps with the all-workers mean of the gradients
    # it reads each worker's own gradient, not only their mean (compressed C-SGD): the engine
    # must not compute one gradient of the combined batch in their place
    needs_worker_gradients: bool
    mixing: str  # the matrices it needs: "doubly" stochastic, or "column" stochastic suffices

    def init(self, w: Tensor, comm: Communicator) -> State:  # w: (m_local, P)
        ...

    def gradient(self, g: Tensor, loss: Tensor, state: State, comm: Communicator, t: int
                 ) -> tuple[Tensor, State]:
        ...

    def step(self, w: Tensor, d: Tensor, state: State, comm: Communicator, lr: float, t: int
             ) -> tuple[Tensor, State]:
        ...

    def mix_buffers(self, b: Tensor, comm: Communicator, t: int) -> Tensor:  # (m_local, Pb)
        ...


class Stateless:
    """Defaults for an algorithm that keeps no state and hands the gradient on unchanged."""

    averages_gradients = False
    needs_worker_gradients = False
    mixing = "doubly"

    def init(self, w: Tensor, comm: Communicator) -> State:
        return {}

    def gradient(self, g: Tensor, loss: Tensor, state: State, comm: Communicator, t: int
                 ) -> tuple[Tensor, State]:
        return g, state
