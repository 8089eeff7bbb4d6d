"""The D-SGD / C-SGD engine: m workers of any nn.Module, written once against a communicator.

Update rules (Zhu et al., ICML 2023, Sec. 2; Lian et al. 2017):

    D-SGD:  w_j(t+1) = sum_k P(t)[j, k] w_k(t) - eta_t * u_j(t)
    C-SGD:  w(t+1)   = w(t) - eta_t * u(t),  with the gradient averaged over all m workers

where u_j is the optimizer's direction (the plain gradient for momentum-free SGD) computed from
the gradient of worker j's own mini-batch loss *at its pre-gossip weights*. Local SGD is D-SGD
that gossips only every ``gossip_every`` steps (on ``complete`` it averages).

State lives in flat tensors: parameters ``w`` of shape (m_local, P), floating buffers ``b`` of
shape (m_local, Pb) (BatchNorm running statistics). The communicator decides how many workers
are hosted here (all of them in one process; one or a block per rank under torchrun).

BatchNorm buffers: ``buffers="gossip"`` (default) mixes the running statistics with the same
matrix as the weights (C-SGD averages them), so the averaged model's statistics are the average
of the workers'; ``buffers="local"`` keeps each worker's own, as the paper's code did (its
evaluated model used worker 0's statistics). Integer buffers (``num_batches_tracked``) stay local.

Gradient strategies: ``"vmap"`` computes all workers' gradients in one
``torch.func.vmap(torch.func.grad(...))`` call; ``"loop"`` runs one forward/backward per worker.
``"auto"`` picks vmap for models without convolutions on CPU and for every model on GPU, loop
otherwise (on CPU a conv net is compute-bound, and a loop keeps its working set small) and for
a single hosted worker (one worker per process under torchrun), where vmap only adds overhead.
On CPU the loop spreads the workers over as many Python threads as torch has intra-op threads,
one intra-op thread each: a worker's batch is too small to split, its neighbours are independent.
``compile=True`` runs the vmap gradient through ``torch.compile`` (TorchInductor; on CPU it
needs a C++ compiler): the first step compiles (tens of seconds), later steps lose most of the
per-op dispatch cost that dominates small models (MLP, 16 workers, CPU: 1.4x per step,
docs/performance.md).
C-SGD on a model without batch-coupled layers (no BatchNorm, no buffers) takes its gradient in
one forward/backward of the hosted workers' whole batch: the mean of the workers' mean losses
has the averaged gradient, so it is the same update (up to float rounding) at the cost of one
model at the total batch. With BatchNorm each worker's statistics come from its own batch, as
in the paper, so there the workers' gradients are computed apart.
vmap holds the activations of ``chunk_size`` workers at once (all of them by default); if that
runs out of memory under ``"auto"``, the engine halves the chunk (down to the loop, one worker at
a time), says so, and recomputes the step: nothing is lost.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dsgd._types import Params, Stacked
from dsgd.engine.comm import Communicator, LocalCommunicator
from dsgd.engine.layout import Layout
from dsgd.errors import TrainingDiverged
from dsgd.optim.schedule import Schedule, constant
from dsgd.optim.sgd import SGD
from dsgd.topology import Topology

ALGORITHMS = ("dsgd", "csgd")
STRATEGIES = ("auto", "vmap", "loop")


@dataclass
class StepResult:
    loss: Tensor  # (m_local,) each worker's mini-batch loss, before the update
    accuracy: Tensor  # (m_local,) each worker's mini-batch accuracy (NaN if not classification)
    lr: float


def _accuracy(out: Tensor, y: Tensor, lead: int = 0) -> Tensor:
    """Top-1 accuracy of each batch, out: (*lead, B, C), y: (*lead, B) class indices; NaN of
    shape ``lead`` when the outputs are not class scores."""
    if out.ndim == lead + 2 and not y.is_floating_point():
        return (out.argmax(-1) == y).float().mean(-1)
    return torch.full(y.shape[:lead], float("nan"), device=out.device)


def _is_conv(model: nn.Module) -> bool:
    return any(isinstance(mod, nn.modules.conv._ConvNd) for mod in model.modules())


def auto_strategy(model: nn.Module, m_local: int, device: torch.device | str) -> str:
    """The gradient strategy ``"auto"`` picks (see the module docstring)."""
    gpu = torch.device(device).type != "cpu"
    return "vmap" if m_local > 1 and (gpu or not _is_conv(model)) else "loop"


class Engine:
    """m workers of ``model`` trained with D-SGD or C-SGD.

    model: the nn.Module every worker starts from (its parameters and buffers are copied).
    topology / comm: a mixing-matrix schedule (all workers in this process), or a communicator
        hosting some of them (``dsgd.engine.distributed`` under torchrun).
    optimizer: an object with ``init(params)`` and ``direction(grads, state, params)``
        (``dsgd.optim.SGD``); lr: a float or a schedule ``step -> lr``.
    algorithm: "dsgd" or "csgd"; gossip_every: tau > 1 gives local SGD.
    buffers: "gossip" or "local" BatchNorm statistics; strategy: "auto", "vmap" or "loop".
    loss: ``loss(outputs, targets)``, a mean over the batch.
    gradient_rule: optional SAM-family rule (``dsgd.optim.SAM``, ``AvgSAM``).
    seed: seeds the generator the gradient rule draws from (checkpointed).
    compile: compile the vmap gradient with ``torch.compile`` and fuse gossip and update (see
        the module docstring).
    chunk_size: vmap over this many workers at a time (None: all); caps activation memory.
    """

    def __init__(
        self,
        model: nn.Module,
        topology: Topology | None = None,
        *,
        comm: Communicator | None = None,
        optimizer: Any = None,
        lr: float | Schedule = 0.1,
        algorithm: str = "dsgd",
        gossip_every: int = 1,
        buffers: str = "gossip",
        strategy: str = "auto",
        loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        gradient_rule: Any = None,
        seed: int = 0,
        compile: bool = False,
        chunk_size: int | None = None,
    ):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if buffers not in ("gossip", "local"):
            raise ValueError(f"buffers must be 'gossip' or 'local', got {buffers!r}")
        if gossip_every < 1:
            raise ValueError(f"gossip_every must be >= 1, got {gossip_every}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if comm is None:
            if topology is None:
                raise ValueError("give a topology (or a communicator)")
            comm = LocalCommunicator(topology, compile=compile)
        self.model = model
        self.comm = comm
        self.optimizer = optimizer if optimizer is not None else SGD()
        self.lr = lr if callable(lr) else constant(float(lr))
        self.algorithm, self.gossip_every, self.buffer_mode = algorithm, gossip_every, buffers
        self.loss = loss
        self.gradient_rule = gradient_rule
        self.generator = torch.Generator().manual_seed(seed)
        m_local = len(comm.workers)

        # Every worker starts from the model's weights (consensus distance 0 at t=0).
        params = {n: p.detach() for n, p in model.named_parameters()}
        float_bufs = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
        self.layout = Layout(params)
        self.buffer_layout = Layout(float_bufs)
        self.w = self.layout.flatten(params).repeat(m_local, 1)  # (m_local, P)
        self.b = (self.buffer_layout.flatten(float_bufs).repeat(m_local, 1) if float_bufs
                  else self.w.new_zeros(m_local, 0))  # (m_local, Pb)
        self.int_buffers = {n: b.detach().clone().repeat(m_local, *[1] * b.ndim)
                            for n, b in model.named_buffers() if not b.is_floating_point()}
        self.opt_state = self.optimizer.init({"w": self.w})
        self.step_count = 0

        self.strategy = auto_strategy(model, m_local, self.w.device) if strategy == "auto" \
            else strategy
        self._may_fall_back = strategy == "auto"
        self._one_batch_csgd = (algorithm == "csgd" and gradient_rule is None
                                and not self.b.shape[1] and not self.int_buffers
                                and not any(isinstance(mod, nn.modules.batchnorm._NormBase)
                                            for mod in model.modules()))
        self._pool: ThreadPoolExecutor | None = None  # the CPU loop's threads, made on first use
        self._modules: list[nn.Module] = []
        self.chunk_size = chunk_size
        self._vmapped = self._build_vmapped(chunk_size)
        self._flat_vmap_grads = (torch.compile(self._vmap_gradients, dynamic=False) if compile
                                 else self._vmap_gradients)

    # ---- state -------------------------------------------------------------------------------
    @property
    def m(self) -> int:
        return self.comm.m

    @property
    def params(self) -> Stacked:
        """{name: (m_local, *shape)}, views into the flat weights."""
        return self.layout.views(self.w)

    @property
    def buffers(self) -> Stacked:
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
        state = self.layout.views(self.w[j])
        if self.buffer_layout.names:
            state.update(self.buffer_layout.views(self.b[j]))
        state.update({n: v[j] for n, v in self.int_buffers.items()})
        return state

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
        return {
            "step": self.step_count,
            "w": self.w,
            "b": self.b,
            "int_buffers": self.int_buffers,
            "opt_state": dict(self.opt_state._asdict()),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["w"].shape != self.w.shape:
            raise ValueError(f"checkpoint holds weights of shape {tuple(state['w'].shape)}, "
                             f"this engine {tuple(self.w.shape)}: different model or workers")
        self.step_count = int(state["step"])
        self.w = state["w"].to(self.w)
        self.b = state["b"].to(self.b)
        self.int_buffers = {n: t.to(self.int_buffers[n].device)
                            for n, t in state["int_buffers"].items()}
        self.opt_state = type(self.opt_state)(**state["opt_state"])
        self.generator.set_state(state["generator"])

    # ---- gradients ---------------------------------------------------------------------------
    def _worker_loss(self, p: Params, b: Params, x: Tensor, y: Tensor, module=None):
        out = functional_call(self.model if module is None else module, {**p, **b}, (x,))
        loss = self.loss(out, y)
        return loss, (loss.detach(), _accuracy(out, y).detach())

    def gradients(self, w: Tensor, x: Tensor, y: Tensor, update_buffers: bool = True):
        """Each worker's mini-batch gradient at its weights: (m_local, P) -> (m_local, P).

        Returns ``(grads, loss, accuracy)``. BatchNorm running statistics are updated in place
        when ``update_buffers`` (the first gradient of a step), left alone otherwise.
        """
        b = self.b if update_buffers else self.b.clone()
        ints = self.int_buffers if update_buffers else {n: v.clone()
                                                        for n, v in self.int_buffers.items()}
        bufs = {**(self.buffer_layout.views(b) if self.buffer_layout.names else {}), **ints}
        self.model.train()
        if self.strategy == "vmap":
            # BatchNorm's in-place update of its running statistics does not reach strided
            # views under vmap: hand it contiguous copies and write them back.
            own = {n: v.clone() for n, v in bufs.items()}
            try:
                grads, loss, acc = self._flat_vmap_grads(w, own, x, y)
            except torch.OutOfMemoryError:
                if not self._may_fall_back:
                    raise
                # the buffers are untouched (``own`` is a copy): recompute with smaller chunks
                self._shrink_chunks(w)
                return self.gradients(w, x, y, update_buffers)
            for n, v in bufs.items():
                v.copy_(own[n])
            return grads, loss, acc
        return self._loop_gradients(w, x, y, bufs)

    def _one_batch_gradients(self, w: Tensor, x: Tensor, y: Tensor):
        """C-SGD's averaged gradient from one forward/backward over all hosted workers' samples
        (the rows of ``w`` are equal); per-worker losses and accuracies for the log."""
        m_local, batch = y.shape[0], y.shape[1]
        p = {n: v[0].detach().requires_grad_() for n, v in self.layout.views(w).items()}
        self.model.train()
        out = functional_call(self.model, p, (x.reshape(m_local * batch, *x.shape[2:]),))
        out = out.reshape(m_local, batch, *out.shape[1:])
        losses = vmap(self.loss)(out, y)  # (m_local,) each worker's mean loss
        gs = torch.autograd.grad(losses.mean(), list(p.values()), materialize_grads=True)
        flat = self.layout.flatten(dict(zip(p, gs)))
        return flat.expand(m_local, -1), losses.detach(), _accuracy(out, y, lead=1).detach()

    def _build_vmapped(self, chunk_size: int | None):
        return vmap(grad(self._worker_loss, has_aux=True), chunk_size=chunk_size)

    def _shrink_chunks(self, w: Tensor) -> None:
        """After an out-of-memory error: vmap over half as many workers, or loop over them."""
        if w.is_cuda:
            torch.cuda.empty_cache()
        chunk = (self.chunk_size or w.shape[0]) // 2
        if chunk >= 2:
            self.chunk_size = chunk
            self._vmapped = self._build_vmapped(chunk)
            how = f"vmap over {chunk} workers at a time"
        else:
            self.strategy = "loop"
            how = "worker by worker (strategy 'loop')"
        warnings.warn(f"computing {w.shape[0]} workers' gradients ran out of memory; "
                      f"computing them {how} from now on", stacklevel=3)

    def _vmap_gradients(self, w: Tensor, bufs: Params, x: Tensor, y: Tensor):
        g, (loss, acc) = self._vmapped(self.layout.views(w), bufs, x, y)
        return self.layout.flatten(g, batch_dims=1), loss, acc

    def _loop_gradients(self, w: Tensor, x: Tensor, y: Tensor, bufs: Params):
        """One forward/backward per worker. On CPU with several intra-op threads the workers are
        spread over that many Python threads, one intra-op thread each (a batch per worker is
        too small for intra-op parallelism; independent workers are not): each thread has its
        own copy of the module, since ``functional_call`` swaps a module's tensors."""
        m_local = w.shape[0]
        grads = torch.empty_like(w)
        losses: list[Tensor] = [None] * m_local  # type: ignore[list-item]
        accs: list[Tensor] = [None] * m_local  # type: ignore[list-item]
        views = self.layout.views(w)

        def work(module, js):
            for j in js:
                p = {n: v[j].detach().requires_grad_() for n, v in views.items()}
                loss, (_, acc) = self._worker_loss(p, {n: v[j] for n, v in bufs.items()}, x[j],
                                                   y[j], module)
                gs = torch.autograd.grad(loss, list(p.values()), materialize_grads=True)
                torch.cat([gi.reshape(-1) for gi in gs], out=grads[j])
                losses[j], accs[j] = loss.detach(), acc

        n = min(torch.get_num_threads(), m_local) if not w.is_cuda else 1
        if n == 1:
            work(self.model, range(m_local))
        else:
            if self._pool is None or len(self._modules) != n:
                if self._pool is not None:
                    self._pool.shutdown()
                self._pool = ThreadPoolExecutor(n, thread_name_prefix="dsgd-worker")
                self._modules = [self.model] + [copy.deepcopy(self.model) for _ in range(n - 1)]
            for module in self._modules:
                module.train(self.model.training)
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                list(self._pool.map(work, self._modules, [range(k, m_local, n)
                                                          for k in range(n)]))
            finally:
                torch.set_num_threads(before)
        return grads, torch.stack(losses), torch.stack(accs)

    # ---- the step ----------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """One iteration on a batch x: (m_local, B, ...), y: (m_local, B)."""
        t = self.step_count
        lr = float(self.lr(t))
        x, y = x.to(self.w.device), y.to(self.w.device)
        grads, loss, acc = (self._one_batch_gradients(self.w, x, y) if self._one_batch_csgd
                            else self.gradients(self.w, x, y))
        if not torch.isfinite(loss).all():
            bad = [self.comm.workers[j] for j in torch.nonzero(~torch.isfinite(loss)).flatten()]
            raise TrainingDiverged(f"loss is {loss[~torch.isfinite(loss)][0].item()} at step {t} "
                                   f"on worker(s) {bad[:8]}: lower the learning rate "
                                   f"(now {lr:g}) or add warmup")
        if self.gradient_rule is not None:
            grads = self._apply_rule(grads, x, y)
        if self.algorithm == "csgd":
            grads = self.comm.mean(grads)
        d, self.opt_state = self.optimizer.direction({"w": grads}, self.opt_state, {"w": self.w})
        gossip = self.algorithm == "dsgd" and (t + 1) % self.gossip_every == 0
        # w <- mix(w) - lr * d: the communicator's one fused call (no other (m, P) temporary)
        self.w = (self.comm.mix_add(self.w, d["w"], -lr, t) if gossip
                  else torch.add(self.w, d["w"], alpha=-lr))
        if self.buffer_mode == "gossip" and self.b.shape[1]:
            if gossip:
                self.b = self.comm.mix(self.b, t)
            elif self.algorithm == "csgd":
                self.b = self.comm.mean(self.b)
        self.step_count += 1
        return StepResult(loss=loss, accuracy=acc, lr=lr)

    def _apply_rule(self, grads: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Hand the gradient to a SAM-family rule, which may evaluate more gradients."""
        lay = self.layout

        def grad_fn(params: Stacked) -> Stacked:
            return lay.views(self.gradients(lay.flatten(params, 1), x, y, update_buffers=False)[0])

        out = self.gradient_rule(grad_fn, lay.views(self.w), lay.views(grads),
                                 generator=self.generator)
        return lay.flatten(out, batch_dims=1)
