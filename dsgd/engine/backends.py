"""How the hosted workers' gradients are computed: one small class each, one signature::

    grads, loss, acc = backend.gradients(w, buffers, x, y)
        w: (m, P) flat weights, one row per worker; buffers: {name: (m, *shape)} the model's
        buffers, updated in place (BatchNorm running statistics); x: (m, B, ...), y: (m, B)
        grads: (m, P); loss, acc: (m,) each worker's mini-batch loss and top-1 accuracy
    backend.close()

- ``VmapBackend``: every worker in one ``torch.func.vmap(torch.func.grad(...))`` call, or
  ``chunk_size`` workers at a time; optionally through ``torch.compile``. Each worker draws its own
  random numbers (``randomness="different"``: its own dropout mask). A model of Linear layers and
  elementwise modules (an MLP) skips vmap: one batched matrix product a layer for all workers
  (``dsgd.engine.stacked``), the same gradients at a fraction of vmap's per-operation cost.
- ``LoopBackend``: one forward/backward per worker. On CPU with n intra-op threads the workers are
  spread over n Python threads with one intra-op thread each (a worker's batch is too small to
  split, the workers are independent), unless the model draws random numbers: threads would
  take them from the shared generator in no fixed order, so such a model runs serially.
- ``OneBatchBackend``: C-SGD on a model without batch-coupled layers, one forward/backward over
  the hosted workers' samples together: the mean of the workers' mean losses has the averaged
  gradient, so it is the same update at the cost of one model at the total batch.
- ``OutOfMemoryFallback``: runs a vmap backend; when it runs out of memory, halves the chunk, down
  to the loop, says so, and recomputes the step (the buffers are untouched until a call succeeds).
- ``AutoBackend``: times its candidates on the first batch it is given and keeps one for the run.

The model's mode decides what it computes (``engine.step`` puts it in train mode): in eval mode
dropout draws nothing and BatchNorm uses its running statistics.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dsgd._types import Params
from dsgd.engine.layout import Layout
from dsgd.engine.stacked import StackedGradients, stack

Gradients = tuple[Tensor, Tensor, Tensor]  # grads (m, P), loss (m,), accuracy (m,)
STRATEGIES = ("auto", "vmap", "loop")


class Backend(Protocol):
    name: str

    def gradients(self, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> Gradients:
        ...

    def close(self) -> None:
        ...


def accuracy(out: Tensor, y: Tensor, lead: int = 0) -> Tensor:
    """Top-1 accuracy of each batch, out: (*lead, B, C), y: (*lead, B) class indices; NaN of
    shape ``lead`` when the outputs are not class scores."""
    if out.ndim == lead + 2 and not y.is_floating_point():
        return (out.argmax(-1) == y).float().mean(-1)
    return torch.full(y.shape[:lead], float("nan"), device=out.device)


class Objective:
    """One worker's mini-batch loss as a function of its named parameters and buffers.

    ``precision="bf16"`` runs the forward (and so the backward) under ``torch.autocast`` in
    bfloat16: matrix products and convolutions in bf16, the weights, their gradients, the loss
    and everything after (gossip, optimizer state) in float32, so gossip still preserves the
    workers' mean exactly.

    ``channels_last``: image batches (N, C, H, W) go into the model in channels-last memory
    format (oneDNN and cuDNN convolutions of many channels run faster on it: on this project's
    CPU resnet8 with 16 workers 1.28x, LeNet-5's 6 and 16 channels within 5 % either way).
    None: for models with 2-d convolutions. The values
    are the same, the rounding of the convolutions may differ. A model whose forward needs
    contiguous activations (``x.view(x.size(0), -1)`` after a convolution) fails on it; the
    first such failure switches it off for the run, with a warning, and the call is repeated
    on contiguous input. vmap runs contiguous (its batching rules do not take the format)."""

    def __init__(self, model: nn.Module, layout: Layout, loss: Callable[[Tensor, Tensor], Tensor],
                 precision: str = "fp32", channels_last: bool | None = None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model, self.layout, self.loss, self.precision = model, layout, loss, precision
        if channels_last is None:
            channels_last = any(isinstance(mod, nn.Conv2d) for mod in model.modules())
        self.channels_last = channels_last
        self._format_checked = not channels_last
        # module -> (the names it was called with, its slots for them)
        self._slots: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
        if precision == "bf16":
            # normalisation layers keep float32 statistics: feed them float32 (vmap's batch-norm
            # rule refuses a bf16 input beside float32 running statistics)
            for mod in model.modules():
                if isinstance(mod, nn.modules.batchnorm._NormBase):
                    mod.register_forward_pre_hook(_stats_dtype_input)

    def contiguous(self) -> Objective:
        """This objective with contiguous inputs (for vmap)."""
        flat = copy.copy(self)
        flat.channels_last, flat._format_checked = False, True
        return flat

    def forward(self, module: nn.Module, tensors: Params, x: Tensor) -> Tensor:
        """The model's float32 outputs on x, under autocast for bf16, in channels-last format
        where it applies."""
        if self.channels_last and x.ndim == 4:
            if self._format_checked:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                return self._first_channels_last(module, tensors, x)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            out = self._call(module, tensors, x)
        return _full_precision(out)

    def _call(self, module: nn.Module, tensors: Params, x: Tensor) -> Tensor:
        """``functional_call(module, tensors, (x,))``: the module run with ``tensors`` in place
        of its parameters and buffers. The module's slots are found once per module and swapped
        directly (what functional_call does after finding them on every call: 0.1 to 0.2 ms,
        paid by every worker of every loop step); a name that is not a parameter or buffer slot
        goes through functional_call, as does everything under ``torch.compile``, which traces
        functional_call's own swapping."""
        if torch.compiler.is_compiling():
            return functional_call(module, tensors, (x,))
        names = tuple(tensors)
        slots = self._slots.get(module)
        if slots is None or slots[0] != names:
            slots = self._slots[module] = (names, _slots(module, tensors))
        entries = slots[1]
        if entries is None:
            return functional_call(module, tensors, (x,))
        saved = [table[attr] for table, attr, _ in entries]
        try:
            for table, attr, name in entries:
                table[attr] = tensors[name]
            return module(x)
        finally:
            for (table, attr, _), orig in zip(entries, saved, strict=True):
                table[attr] = orig

    def _first_channels_last(self, module: nn.Module, tensors: Params, x: Tensor) -> Tensor:
        """The first channels-last call: on a failure, put back the buffers (BatchNorm may have
        updated them before the failing operation) and the random numbers it drew, and run it
        again on contiguous input; only if that succeeds is the format switched off."""
        saved = {n: t.clone() for n, t in tensors.items() if n not in self.layout.shapes}
        rng = _rng_state(x.device)
        self._format_checked = True
        try:
            return self.forward(module, tensors, x)
        except torch.OutOfMemoryError:
            self._format_checked = False
            raise
        except RuntimeError as err:
            for n, t in saved.items():
                tensors[n].copy_(t)
            _set_rng_state(x.device, rng)
            self.channels_last = False
            try:
                out = self.forward(module, tensors, x)
            except Exception:
                self.channels_last, self._format_checked = True, False
                raise
            warnings.warn(f"the model failed on channels-last input ({str(err).splitlines()[0]}"
                          "); running it on contiguous input (Engine(channels_last=False) "
                          "skips the attempt)", stacklevel=2)
            return out

    def __call__(self, p: Params, b: Params, x: Tensor, y: Tensor, module: nn.Module | None = None):
        out = self.forward(self.model if module is None else module, {**p, **b}, x)
        loss = self.loss(out, y)
        return loss, (loss.detach(), accuracy(out, y).detach())


def _slots(module: nn.Module, tensors: Params) -> list[tuple[dict, str, str]] | None:
    """(the submodule's ``_parameters`` or ``_buffers``, attribute, name in ``tensors``) for
    every slot ``tensors`` fills, tied slots included (a parameter registered under two names
    takes the tensor of the name ``named_parameters()`` gives it, as functional_call ties it);
    None if a name is not a parameter or buffer slot of the module."""
    entries = []
    for name in tensors:
        prefix, _, attr = name.rpartition(".")
        try:
            sub = module.get_submodule(prefix)
        except AttributeError:
            return None
        table = (sub._parameters if attr in sub._parameters
                 else sub._buffers if attr in sub._buffers else None)
        if table is None:
            return None
        entries.append((table, attr, name))
    given = {id(table[attr]): name for table, attr, name in entries if table[attr] is not None}
    for kind in ("parameters", "buffers"):
        for name, t in getattr(module, f"named_{kind}")(remove_duplicate=False):
            if name not in tensors and id(t) in given:  # a tied alias of a given name
                prefix, _, attr = name.rpartition(".")
                entries.append((getattr(module.get_submodule(prefix), f"_{kind}"), attr,
                                given[id(t)]))
    return entries


def _full_precision(out: Tensor) -> Tensor:
    """Outputs computed in bf16 (under autocast) back to float32 for the loss."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def _stats_dtype_input(mod: nn.Module, args: tuple) -> tuple:
    ref = next((t for t in (mod.weight, mod.running_mean) if t is not None), None)
    if ref is None:
        return args
    return tuple(a.to(ref.dtype) if isinstance(a, Tensor) and a.is_floating_point() else a
                 for a in args)


class VmapBackend:
    name = "vmap"

    def __init__(self, objective: Objective, chunk_size: int | None = None, compile: bool = False):
        self.objective, self.chunk_size, self.compiled = objective, chunk_size, compile
        self._vmapped = vmap(grad(objective.contiguous(), has_aux=True), chunk_size=chunk_size,
                             randomness="different")
        self._flat = torch.compile(self._flat_grads, dynamic=False) if compile else self._flat_grads
        # an MLP (Linear layers, elementwise modules): batched matrix products, no vmap
        plan = (stack(objective.model) if not compile and chunk_size is None
                and objective.precision == "fp32" else None)
        self._stacked = (StackedGradients(plan, objective.layout, objective.loss, accuracy)
                         if plan is not None else None)

    def _flat_grads(self, w: Tensor, bufs: Params, x: Tensor, y: Tensor) -> Gradients:
        g, (loss, acc) = self._vmapped(self.objective.layout.views(w), bufs, x, y)
        return self.objective.layout.flatten(g, batch_dims=1), loss, acc

    def gradients(self, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> Gradients:
        if self._stacked is not None:
            return self._stacked.gradients(w, x, y)
        # BatchNorm's in-place update of its running statistics does not reach strided views
        # under vmap: hand it contiguous copies, write them back once the call succeeded.
        own = {n: v.clone() for n, v in buffers.items()}
        grads, loss, acc = self._flat(w, own, x, y)
        for n, v in buffers.items():
            v.copy_(own[n])
        return grads, loss, acc

    def with_chunk(self, chunk_size: int) -> VmapBackend:
        return VmapBackend(self.objective, chunk_size, self.compiled)

    def close(self) -> None:
        pass


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@contextmanager
def drawing_from(generator: torch.Generator) -> Iterator[None]:
    """Inside the block, random ops (which draw from torch's default generator of the
    generator's device: dropout, ``torch.rand``) draw from ``generator`` instead; its state moves
    on, and the default generator is left as it was."""
    dev = generator.device
    default = (torch.cuda.default_generators[dev.index if dev.index is not None
                                             else torch.cuda.current_device()]
               if dev.type == "cuda" else torch.default_generator)
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


class LoopBackend:
    name = "loop"

    def __init__(self, objective: Objective, threads: int | None = None):
        self.objective = objective
        self.threads = threads  # None: as many as torch's intra-op threads, at each call
        self._pool: ThreadPoolExecutor | None = None
        self._modules: list[nn.Module] = []
        self._draws_random: bool | None = None  # learned from the first worker of the first call

    def gradients(self, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> Gradients:
        m = w.shape[0]
        grads = torch.empty_like(w)
        losses: list[Tensor] = [torch.empty(0)] * m
        accs: list[Tensor] = [torch.empty(0)] * m
        views = self.objective.layout.views(w)

        def work(module: nn.Module, js) -> None:
            for j in js:
                p = {n: v[j].detach().requires_grad_() for n, v in views.items()}
                loss, (_, acc) = self.objective(p, {n: v[j] for n, v in buffers.items()}, x[j],
                                                y[j], module)
                gs = torch.autograd.grad(loss, list(p.values()), materialize_grads=True)
                torch.cat([gi.reshape(-1) for gi in gs], out=grads[j])
                losses[j], accs[j] = loss.detach(), acc

        n = 1 if w.is_cuda else min(self.threads or torch.get_num_threads(), m)
        rest = range(m)
        if self._draws_random is None:
            # Does the model draw random numbers? Watch worker 0, computed as a worker thread
            # would compute it (one intra-op thread), so that its numbers do not depend on it.
            rng, own = _rng_state(w.device), {k: v[0].clone() for k, v in buffers.items()}
            with _intra_op_threads(1 if n > 1 else torch.get_num_threads()):
                work(self.objective.model, [0])
            self._draws_random = not torch.equal(rng, _rng_state(w.device))
            if self._draws_random and n > 1:  # recompute it serially, from the same draws
                _set_rng_state(w.device, rng)
                for k, v in buffers.items():
                    v[0].copy_(own[k])
            else:
                rest = range(1, m)
        if n <= 1 or self._draws_random:
            work(self.objective.model, rest)
        else:
            self._run_threaded(work, rest, n)
        return grads, torch.stack(losses), torch.stack(accs)

    def _run_threaded(self, work, rest: range, n: int) -> None:
        model = self.objective.model
        if self._pool is None or len(self._modules) != n:
            self.close()
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="dsgd-worker")
            # functional_call swaps a module's tensors: one copy of the module per thread
            self._modules = [model] + [copy.deepcopy(model) for _ in range(n - 1)]
        for module in self._modules:
            module.train(model.training)
        with _intra_op_threads(1):  # one intra-op thread per worker thread
            list(self._pool.map(work, self._modules, [rest[k::n] for k in range(n)]))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._pool, self._modules = None, []


class OneBatchBackend:
    """``per_worker``: the backend for gradients at weights whose rows differ (a SAM-family
    rule perturbs each worker's row)."""

    name = "one-batch"

    def __init__(self, objective: Objective, per_worker: Backend | None = None):
        self.objective = objective
        self.per_worker = per_worker if per_worker is not None else LoopBackend(objective)

    def gradients(self, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> Gradients:
        """Every row of the result is the hosted workers' averaged gradient (the rows of ``w``
        are equal under C-SGD); the loss and accuracy stay per worker, for the log."""
        ob = self.objective
        m, batch = y.shape[0], y.shape[1]
        p = {n: v[0].detach().requires_grad_() for n, v in ob.layout.views(w).items()}
        out = ob.forward(ob.model, p, x.reshape(m * batch, *x.shape[2:]))
        out = out.reshape(m, batch, *out.shape[1:])
        losses = vmap(ob.loss)(out, y)  # (m,) each worker's mean loss
        gs = torch.autograd.grad(losses.mean(), list(p.values()), materialize_grads=True)
        flat = ob.layout.flatten(dict(zip(p, gs)))
        return flat.expand(m, -1), losses.detach(), accuracy(out, y, lead=1).detach()

    def close(self) -> None:
        self.per_worker.close()


class OutOfMemoryFallback:
    def __init__(self, backend: VmapBackend, loop: Callable[[], Backend]):
        self.backend: Backend = backend
        self._loop = loop

    @property
    def name(self) -> str:
        return self.backend.name

    def gradients(self, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> Gradients:
        while True:
            try:
                return self.backend.gradients(w, buffers, x, y)
            except torch.OutOfMemoryError:
                if not isinstance(self.backend, VmapBackend):
                    raise
                if w.is_cuda:
                    torch.cuda.empty_cache()
                chunk = (self.backend.chunk_size or w.shape[0]) // 2
                smaller = self.backend.with_chunk(chunk) if chunk >= 2 else self._loop()
                how = (f"vmap over {chunk} workers at a time" if chunk >= 2
                       else "worker by worker (loop)")
                warnings.warn(f"computing {w.shape[0]} workers' gradients ran out of memory; "
                              f"computing them {how} from now on", stacklevel=3)
                self.backend.close()
                self.backend = smaller

    def close(self) -> None:
        self.backend.close()


class AutoBackend:
    """Times each candidate on the first batch it is given (a warm-up call, then the median of
    three calls interleaved with the other candidates'; results discarded, buffers and random
    numbers untouched) and keeps one for the run, as ``torch.backends.cudnn.benchmark`` does
    for convolution algorithms. The candidate named ``default`` is kept unless another is more
    than ``margin`` times faster and the step is long enough (``floor_s``) for the difference
    to matter, so that a run repeated on the same machine usually picks the same backend;
    timings vary with the machine's load, and two backends round differently, so a run that
    must repeat bit for bit names its strategy. ``reason`` says what was measured;
    ``select(name)`` skips the timing (a resumed run keeps its checkpoint's choice)."""

    def __init__(self, candidates: dict[str, Callable[[], Backend]], default: str,
                 margin: float = 1.1, floor_s: float = 0.02):
        self.candidates, self.default, self.margin, self.floor_s = (candidates, default, margin,
                                                                    floor_s)
        self.chosen: Backend | None = None
        self.reason = "not chosen yet (chosen at the first step)"

    @property
    def name(self) -> str:
        return self.chosen.name if self.chosen is not None else "auto"

    def select(self, name: str, reason: str | None = None) -> None:
        if name not in self.candidates:
            raise ValueError(f"no backend {name!r} among {list(self.candidates)}")
        if self.chosen is not None:
            self.chosen.close()
        self.chosen = self.candidates[name]()
        self.reason = reason or f"auto: {name} (kept from the checkpoint)"

    def gradients(self, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> Gradients:
        if self.chosen is None:
            self._choose(w, buffers, x, y)
        assert self.chosen is not None
        return self.chosen.gradients(w, buffers, x, y)

    def _choose(self, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> None:
        built = {name: make() for name, make in self.candidates.items()}
        samples: dict[str, list[float]] = {name: [] for name in built}
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for rnd in range(4):  # a warm-up round, then rounds with the candidates alternating
                for name, backend in built.items():
                    if samples[name] and samples[name][-1] == float("inf"):
                        continue
                    try:
                        took = _time(backend, w, buffers, x, y)
                    except torch.OutOfMemoryError:
                        took = float("inf")
                    if rnd or took == float("inf"):
                        samples[name].append(took)
                if rnd and min(min(v) for v in samples.values()) > 0.5:
                    break  # slow steps: one timed round is enough
        times = {name: statistics.median(v) for name, v in samples.items()}
        best = min(times, key=times.__getitem__)
        keep = self.default if self.default in times else best
        if times[keep] > self.margin * times[best] and times[keep] > self.floor_s:
            keep = best
        for name, backend in built.items():
            if name != keep:
                backend.close()
        self.chosen = built[keep]
        measured = ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in times.items())
        self.reason = (f"auto: {keep} ({measured} a step on the first batch; default "
                       f"{self.default}, switched only when another is {self.margin:g}x faster)")

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()


def _time(backend: Backend, w: Tensor, buffers: Params, x: Tensor, y: Tensor) -> float:
    """Seconds of one call, on copies of the buffers."""
    own = {n: v.clone() for n, v in buffers.items()}
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    start = time.perf_counter()
    backend.gradients(w, own, x, y)
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    return time.perf_counter() - start


_SEQUENTIAL = (nn.RNNBase, nn.MultiheadAttention)


def default_strategy(model: nn.Module, m_local: int, device: torch.device | str) -> str:
    """What ``"auto"`` keeps unless another backend is clearly faster: vmap on GPU, and on CPU for
    models without convolutions, recurrent layers or attention (on CPU a conv net is
    compute-bound and the loop keeps its working set small; the CPU kernels of LSTM / GRU and
    of attention have no batching rule, so vmap runs them one worker at a time); the loop for
    one hosted worker."""
    if m_local <= 1:
        return "loop"
    if torch.device(device).type != "cpu":
        return "vmap"
    slow = (nn.modules.conv._ConvNd, *_SEQUENTIAL)
    return "loop" if any(isinstance(mod, slow) for mod in model.modules()) else "vmap"


def make_backend(strategy: str, objective: Objective, *, m_local: int, device: torch.device,
                 chunk_size: int | None = None, compile: bool = False,
                 one_batch: bool = False) -> Backend:
    """The backend for ``strategy`` ("auto", "vmap" or "loop"). ``one_batch``: the workers'
    gradients are averaged anyway and the model has no batch-coupled layers (C-SGD)."""
    if one_batch:
        return OneBatchBackend(objective, make_backend(strategy, objective, m_local=m_local,
                                                       device=device, chunk_size=chunk_size,
                                                       compile=compile))
    if strategy == "vmap":
        return VmapBackend(objective, chunk_size, compile)
    if strategy == "loop":
        return LoopBackend(objective)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    default = default_strategy(objective.model, m_local, device)
    if m_local <= 1:
        return LoopBackend(objective)
    return AutoBackend({
        "vmap": lambda: OutOfMemoryFallback(VmapBackend(objective, chunk_size, compile),
                                            lambda: LoopBackend(objective)),
        "loop": lambda: LoopBackend(objective),
    }, default=default)
