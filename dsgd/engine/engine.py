"""The engine: m workers of any nn.Module, one step at a time, for any algorithm.

State lives in flat tensors: parameters ``w`` of shape (m_local, P), floating buffers ``b`` of
shape (m_local, Pb) (BatchNorm running statistics). The communicator decides how many workers
are hosted here (all of them in one process; one or a block per rank under torchrun). One step::

    g, loss  = backend.gradients(w, b, x, y)          # each worker's own mini-batch, at w_j(t)
    g        = algorithm.gradient(g, loss, ..., t)    # e.g. C-SGD's all-reduce mean
    d        = optimizer.direction(g, ...)            # momentum, weight decay
    w        = algorithm.step(w, d, ..., lr, t)       # e.g. D-SGD: mix(w) - lr * d

The algorithm (``dsgd.algorithms``: D-SGD, C-SGD, local SGD) owns the update rule, the backend
(``dsgd.engine.backends``: vmap, threaded loop, one-batch C-SGD, chosen by timing under
``strategy="auto"``) how the gradients are computed; neither is a branch in here.

BatchNorm buffers: ``buffers="gossip"`` (default) lets the algorithm mix the running statistics
like the weights (C-SGD averages them), so the averaged model's statistics are the average of
the workers'; ``buffers="local"`` keeps each worker's own, as the paper's code did (its
evaluated model used worker 0's statistics). Integer buffers (``num_batches_tracked``) stay local.

Random numbers drawn by the model (dropout) come from the engine's own generator, seeded with
``seed`` and checkpointed: every worker draws its own, and a resumed run draws what the
uninterrupted one would have.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsgd._types import Params, Stacked
from dsgd.algorithms import Algorithm, LocalSGD, make_algorithm
from dsgd.engine.backends import STRATEGIES, Objective, drawing_from, make_backend
from dsgd.engine.checks import check_batch
from dsgd.engine.comm import Communicator, LocalCommunicator
from dsgd.engine.fused import FusedStep, fusable
from dsgd.engine.layout import Layout
from dsgd.errors import TrainingDiverged
from dsgd.optim.schedule import Schedule, constant
from dsgd.optim.sgd import SGD, SGDState
from dsgd.topology import Topology, TopologyError


@dataclass
class StepResult:
    loss: Tensor  # (m_local,) each worker's mini-batch loss, before the update
    accuracy: Tensor  # (m_local,) each worker's mini-batch accuracy (NaN if not classification)
    lr: float


def _batch_coupled(model: nn.Module) -> bool:
    return any(isinstance(mod, nn.modules.batchnorm._NormBase) for mod in model.modules())


class Engine:
    """m workers of ``model`` trained with ``algorithm``.

    model: the nn.Module every worker starts from (its parameters and buffers are copied).
    topology / comm: a mixing-matrix schedule (all workers in this process), or a communicator
        hosting some of them (``dsgd.engine.distributed`` under torchrun).
    optimizer: an object with ``init(params)`` and ``direction(grads, state, params)``
        (``dsgd.optim.SGD``); lr: a float or a schedule ``step -> lr``.
    algorithm: a name ("dsgd", "csgd", "local", "gt", "d2", "qgm", "pushsum", "drdsgd") or an
        algorithm object (``dsgd.algorithms``);
        gossip_every: tau > 1 turns "dsgd" into local SGD, gossiping every tau steps.
    buffers: "gossip" or "local" BatchNorm statistics; strategy: "auto", "vmap" or "loop".
    loss: ``loss(outputs, targets)``, a mean over the batch.
    gradient_rule: optional SAM-family rule (``dsgd.optim.SAM``, ``AvgSAM``).
    seed: seeds the generators of the gradient rule and of the model's random ops (checkpointed).
    compile: ``torch.compile``: plain D-SGD with ``dsgd.optim.SGD`` on a fixed matrix in one
        process, for a model without buffers, as one compiled function of the whole step
        (``dsgd.engine.fused``); anything else as two, the vmap gradient and gossip + update.
    chunk_size: vmap over this many workers at a time (None: all); caps activation memory.
    precision: "fp32", or "bf16" for the forward and backward under autocast (weights, gossip
        and optimizer state stay float32).
    channels_last: image batches into the model in channels-last memory format (faster
        convolutions); None: for models with 2-d convolutions, except under vmap.
    algorithm_options: the named algorithm's options, e.g. ``beta`` for "qgm", ``lam`` for
        "drdsgd", ``compression`` and ``consensus_step`` for "choco" and
        "deepsqueeze", ``compression`` for "csgd" (compressed gradients with error feedback).
    """

    def __init__(
        self,
        model: nn.Module,
        topology: Topology | None = None,
        *,
        comm: Communicator | None = None,
        optimizer: Any = None,
        lr: float | Schedule = 0.1,
        algorithm: str | Algorithm = "dsgd",
        gossip_every: int = 1,
        buffers: str = "gossip",
        strategy: str = "auto",
        loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        gradient_rule: Any = None,
        seed: int = 0,
        compile: bool = False,
        chunk_size: int | None = None,
        precision: str = "fp32",
        channels_last: bool | None = None,
        **algorithm_options: Any,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if buffers not in ("gossip", "local"):
            raise ValueError(f"buffers must be 'gossip' or 'local', got {buffers!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if comm is None:
            if topology is None:
                raise ValueError("give a topology (or a communicator)")
            comm = LocalCommunicator(topology, compile=compile)
        if isinstance(algorithm, str):
            if algorithm == "local":
                algorithm_options.setdefault("every", gossip_every)
            algorithm = (LocalSGD(gossip_every) if algorithm == "dsgd" and gossip_every != 1
                         else make_algorithm(algorithm, **algorithm_options))
        elif algorithm_options:
            raise ValueError(f"options {sorted(algorithm_options)} go to an algorithm given by "
                             "name; an algorithm object carries its own")
        topology = getattr(comm, "topology", None)
        if algorithm.mixing == "doubly" and getattr(topology, "stochastic", "doubly") != "doubly":
            raise TopologyError(f"{algorithm.name} needs a doubly stochastic mixing matrix; "
                                f"{topology.name} is only column stochastic (a directed graph): "
                                "use algorithm 'pushsum'")
        self.model, self.comm, self.algorithm = model, comm, algorithm
        self.optimizer = optimizer if optimizer is not None else SGD()
        self.lr = lr if callable(lr) else constant(float(lr))
        self.buffer_mode, self.loss, self.gradient_rule = buffers, loss, gradient_rule
        m_local = len(comm.workers)

        # Every worker starts from the model's weights (consensus distance 0 at t=0).
        params = {n: p.detach() for n, p in model.named_parameters()}
        float_bufs = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
        self.layout, self.buffer_layout = Layout(params), Layout(float_bufs)
        self.w = self.layout.flatten(params).repeat(m_local, 1)  # (m_local, P)
        self.b = (self.buffer_layout.flatten(float_bufs).repeat(m_local, 1) if float_bufs
                  else self.w.new_zeros(m_local, 0))  # (m_local, Pb)
        self.int_buffers = {n: b.detach().clone().repeat(m_local, *[1] * b.ndim)
                            for n, b in model.named_buffers() if not b.is_floating_point()}
        self.opt_state = self.optimizer.init({"w": self.w})
        self.algo_state = algorithm.init(self.w, comm)
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(seed)  # the gradient rule's draws
        self.random_ops = torch.Generator(self.w.device).manual_seed(seed)  # the model's draws

        one_batch = (algorithm.averages_gradients and gradient_rule is None
                     and not getattr(algorithm, "needs_worker_gradients", False)
                     and not self.b.shape[1] and not self.int_buffers
                     and not _batch_coupled(model))
        self.objective = Objective(model, self.layout, loss, precision, channels_last)
        self.backend = make_backend(strategy, self.objective,
                                    m_local=m_local, device=self.w.device,
                                    chunk_size=chunk_size, compile=compile, one_batch=one_batch)
        # compile: plain D-SGD's whole step as one graph, once the gradients run under vmap
        self._fused = (FusedStep(self.objective, self.layout, self.optimizer, comm)
                       if compile and strategy != "loop" and chunk_size is None
                       and fusable(self) is None else None)
        self._lr = torch.zeros((), dtype=self.w.dtype, device=self.w.device)

    # ---- state -------------------------------------------------------------------------------
    @property
    def m(self) -> int:
        return self.comm.m

    @property
    def params(self) -> Stacked:
        """{name: (m_local, *shape)}, views into the flat weights."""
        return self.layout.views(self.w)

    @property
    def worker_buffers(self) -> Stacked:
        """{name: (m_local, *shape)} every buffer of every hosted worker (views of ``b``)."""
        bufs = self.buffer_layout.views(self.b) if self.buffer_layout.names else {}
        return {**bufs, **self.int_buffers}

    def average_state(self) -> Params:
        """The averaged model w_a = (1/m) sum_j w_j and its averaged float buffers."""
        state = self.layout.views(self.comm.mean(self.w)[0])
        if self.buffer_layout.names:
            state.update(self.buffer_layout.views(self.comm.mean(self.b)[0]))
        state.update({n: v[0] for n, v in self.int_buffers.items()})
        return state

    def worker_state(self, j: int) -> Params:
        """Worker j's own weights and buffers (j indexes the workers hosted here)."""
        return {n: v[j] for n, v in {**self.params, **self.worker_buffers}.items()}

    def module(self, state: Params) -> nn.Module:
        """A copy of the model holding ``state``, e.g. ``engine.average_state()``."""
        mod = copy.deepcopy(self.model)
        mod.load_state_dict({n: t.clone() for n, t in state.items()}, strict=False)
        return mod

    def consensus_distance(self) -> float:
        """Tr Xi = (1/m) sum_j ||w_j - w_a||^2 over all m workers."""
        dev = self.w - self.comm.mean(self.w)
        return float(self.comm.mean((dev * dev).sum(1, keepdim=True))[0, 0])

    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs; loadable with torch.load(weights_only=True)."""
        return {"step": self.step_count, "w": self.w, "b": self.b,
                "int_buffers": self.int_buffers, "opt_state": dict(self.opt_state._asdict()),
                "algorithm": self.algo_state, "generator": self.generator.get_state(),
                "random_ops": self.random_ops.get_state(), "backend": self.backend.name,
                "channels_last": self.objective.channels_last}

    def load_state_dict(self, state: dict) -> None:
        if state["w"].shape != self.w.shape:
            raise ValueError(f"checkpoint holds weights of shape {tuple(state['w'].shape)}, "
                             f"this engine {tuple(self.w.shape)}: different model or workers")
        state = copy.deepcopy(state)  # nothing shared with the caller's tensors
        self.step_count = int(state["step"])
        self.w, self.b = state["w"].to(self.w), state["b"].to(self.b)
        self.int_buffers = {n: t.to(self.int_buffers[n].device)
                            for n, t in state["int_buffers"].items()}
        self.opt_state = type(self.opt_state)(**state["opt_state"])
        self.algo_state = {k: v.to(self.w.device) for k, v in state.get("algorithm", {}).items()}
        self.generator.set_state(state["generator"])
        if "random_ops" in state:
            self.random_ops.set_state(state["random_ops"])
        if "channels_last" in state:  # decided by the first step: a fallback stays
            if not state["channels_last"]:
                self.objective.channels_last = False
            self.objective._format_checked = True
        choice = state.get("backend")
        if hasattr(self.backend, "select") and choice not in (None, "auto"):
            self.backend.select(choice)  # keep the measured choice: same numbers as before

    def close(self) -> None:
        """Release the backend's threads."""
        self.backend.close()

    # ---- the step ----------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """One iteration on a batch x: (m_local, B, ...), y: (m_local, B)."""
        t, lr = self.step_count, float(self.lr(self.step_count))
        x, y = check_batch(x.to(self.w.device), y.to(self.w.device), len(self.comm.workers),
                           self.loss)
        self.model.train()
        if self._fused is not None and self.backend.name == "vmap":
            return self._fused_step(x, y, t, lr)
        with drawing_from(self.random_ops):
            grads, loss, acc = self.backend.gradients(self.w, self.worker_buffers, x, y)
            self._check_finite(loss, t, lr)
            if self.gradient_rule is not None:
                grads = self._apply_rule(grads, x, y)
        g, self.algo_state = self.algorithm.gradient(grads, loss, self.algo_state, self.comm, t)
        d, self.opt_state = self.optimizer.direction({"w": g}, self.opt_state, {"w": self.w})
        self.w, self.algo_state = self.algorithm.step(self.w, d["w"], self.algo_state, self.comm,
                                                      lr, t)
        if self.buffer_mode == "gossip" and self.b.shape[1]:
            self.b = self.algorithm.mix_buffers(self.b, self.comm, t)
        self.step_count += 1
        return StepResult(loss=loss, accuracy=acc, lr=lr)

    def _fused_step(self, x: Tensor, y: Tensor, t: int, lr: float) -> StepResult:
        """The step as one compiled function (``dsgd.engine.fused``); its new weights and
        momentum are kept only if every loss is finite. Out of memory, it gives way to the
        backend's step (which halves its chunk) for the rest of the run."""
        assert self._fused is not None
        momentum = self.opt_state.momentum
        try:
            with drawing_from(self.random_ops):
                w, buf, loss, acc, finite = self._fused(
                    self.w, None if momentum is None else momentum["w"], x, y,
                    self._lr.fill_(lr), t)
                if not bool(finite):
                    self._check_finite(loss, t, lr)
        except torch.OutOfMemoryError:
            warnings.warn("the compiled whole step ran out of memory; computing the gradients "
                          "and the update separately from now on", stacklevel=3)
            self._fused = None
            return self.step(x, y)
        self.comm.count_mix(t, self.w)
        self.w = w
        if buf is not None:
            self.opt_state = SGDState(momentum={"w": buf})
        self.step_count += 1
        return StepResult(loss=loss, accuracy=acc, lr=lr)

    def _check_finite(self, loss: Tensor, t: int, lr: float) -> None:
        finite = torch.isfinite(loss)
        if bool(finite.all()):
            return
        bad = [self.comm.workers[j] for j in torch.nonzero(~finite).flatten()]
        message = (f"loss is {loss[~finite][0].item()} at step {t} on worker(s) {bad[:8]}: "
                   f"lower the learning rate (now {lr:g}) or add warmup")
        announce = getattr(self.comm, "announce_divergence", None)  # under torchrun
        if announce is not None:
            announce(message)
        raise TrainingDiverged(message)

    def _apply_rule(self, grads: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Hand the gradient to a SAM-family rule, which may evaluate more gradients (at other
        weights, leaving the BatchNorm statistics alone)."""
        lay = self.layout

        backend = getattr(self.backend, "per_worker", self.backend)  # rows that differ

        def grad_fn(params: Stacked) -> Stacked:
            frozen = {n: v.clone() for n, v in self.worker_buffers.items()}
            return lay.views(backend.gradients(lay.flatten(params, 1), frozen, x, y)[0])

        out = self.gradient_rule(grad_fn, lay.views(self.w), lay.views(grads),
                                 generator=self.generator)
        return lay.flatten(out, batch_dims=1)
