"""D-SGD's whole step as one compiled function: gradients, SGD direction, gossip and update.

With ``Engine(compile=True)`` the gradients (vmap) and the gossip + update are compiled as two
graphs; between them the (m, P) gradients, the momentum and the new weights each make a round
trip through memory, and every graph call pays its own guards. For plain D-SGD on a fixed
mixing matrix in one process, with ``dsgd.optim.SGD`` and a model without buffers, the engine
instead compiles the whole step,

    g = vmap(grad(loss))(w, x, y);  d, buf = SGD(g, buf, w);  w' = P w - lr d,

so that the compiler fuses the elementwise work of all three (on the project's CPU, an MLP with
16 workers: 1.30x the speed of the eager step, against 1.13x with the two graphs;
docs/performance.md). On a GPU ``torch.compile(mode="reduce-overhead")`` could replay it as one
CUDA graph; that is not built.

The step is functional: it returns the new weights and momentum and the engine commits them only
after checking the losses, so a non-finite loss leaves the pre-step state in place, as in the
eager step. The first step's momentum (none yet) is a zero buffer: ``mu * 0 + g`` is ``g``
exactly, one graph for every step. Bytes and rounds are counted by the communicator as for any
``mix_add``. Inputs seen before (shapes, dtypes, the model's mode, the momentum's presence) skip
the guards that cannot tell compiled versions apart, so the model's modules must not be changed
in the middle of a run (a new engine checks every guard on its first step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

from dsgd.algorithms import DSGD
from dsgd.engine.comm import LocalCommunicator, MixPlan, fused_gossip_add
from dsgd.optim.sgd import SGD, SGDState


def fusable(engine) -> str | None:
    """Why ``engine``'s step cannot be compiled whole, or None if it can."""
    if type(engine.algorithm) is not DSGD:
        return f"algorithm {engine.algorithm.name} (only plain dsgd)"
    if not isinstance(engine.comm, LocalCommunicator) or engine.comm.topology.time_varying:
        return "a time-varying topology or a distributed communicator"
    if type(engine.optimizer) is not SGD:
        return "an optimizer other than dsgd.optim.SGD"
    if engine.gradient_rule is not None:
        return "a gradient rule (SAM)"
    if engine.b.shape[1] or engine.int_buffers:
        return "a model with buffers (BatchNorm)"
    return None


class FusedStep:
    """``step(w, momentum, x, y, lr, t) -> (w', momentum', losses, accuracies)`` for an engine
    that :func:`fusable` accepts; ``lr`` is a 0-d tensor (a new value does not recompile)."""

    def __init__(self, objective, layout, optimizer: SGD, comm: LocalCommunicator):
        self.layout, self.optimizer, self.comm = layout, optimizer, comm
        self._grads = vmap(grad(objective.contiguous(), has_aux=True), randomness="different")
        self.model = objective.model
        self._compiled: Callable | None = None
        self._plan: MixPlan | None = None
        self._seen: set[tuple] = set()

    def _step(self, w: Tensor, buf: Tensor | None, x: Tensor, y: Tensor, lr: Tensor):
        assert self._plan is not None
        g, (loss, acc) = self._grads(self.layout.views(w), {}, x, y)
        g = self.layout.flatten(g, batch_dims=1)
        state = SGDState(momentum=None if buf is None else {"w": buf})
        d, state = self.optimizer.direction({"w": g}, state, {"w": w}, inplace=False)
        new_buf = None if state.momentum is None else state.momentum["w"]
        return (fused_gossip_add(w, d["w"], -lr, self._plan), new_buf, loss, acc,
                torch.isfinite(loss).all())

    def __call__(self, w: Tensor, momentum: Tensor | None, x: Tensor, y: Tensor, lr: Tensor,
                 t: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
        """momentum: the (m, P) buffer, None before the first step (and without momentum).
        Returns the new weights and momentum, the losses, the accuracies, and whether every
        loss is finite (a 0-d bool tensor)."""
        plan = self.comm.plan(t, w)
        if self._compiled is None or plan is not self._plan:
            self._plan = plan  # a fixed matrix: one plan, one compiled step for the run
            self._compiled = torch.compile(self._step, dynamic=False)
            self._seen.clear()
        if momentum is None and self.optimizer.momentum:
            momentum = torch.zeros_like(w)  # mu * 0 + g = g: the first step in the same graph
        # What the compiled code depends on that can change between calls. Inputs already seen
        # run with only the guards that tell the compiled versions apart: evaluating all of
        # them (the model's structure, the layout, the plan) cost 0.3 ms a step, 7 % of an MLP
        # step with 16 workers. New inputs go through every guard (and compile).
        key = (x.shape, x.dtype, y.shape, y.dtype, w.shape, w.dtype, momentum is None,
               self.model.training, torch.is_grad_enabled(),
               torch.are_deterministic_algorithms_enabled())
        if key in self._seen:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._compiled(w, momentum, x, y, lr)
        out = self._compiled(w, momentum, x, y, lr)
        self._seen.add(key)
        return out
