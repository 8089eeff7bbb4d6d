"""D-SGD in an existing torchrun training script: one worker per process, the user's own model,
DataLoader and ``torch.optim`` optimizer.

    dist.init_process_group("gloo")                 # or dsgd.engine.distributed.init_from_env()
    gossip = dsgd.Gossip(model, topology="ring")    # rank 0's weights to everyone, as DDP does
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward()
        gossip.step(opt)       # mix the pre-step weights with the neighbours, then opt.step()

The step (Lian et al. 2017; Zhu et al., ICML 2023, eq. 2): the gradient g_j is taken at worker
j's own weights w_j(t) (the backward before ``step``), the weights are mixed with the
neighbours', and the optimizer steps from the mixed point:

    w_j(t+1) = sum_k P(t)[j, k] w_k(t) - lr * u_j(t)

with u_j the optimizer's direction from g_j (for SGD with momentum, its momentum buffer). That
is ``dsgd.engine.Engine``'s D-SGD step, computed the same way for any weight decay of 0; with
weight decay torch.optim adds ``wd * (mixed weights)`` where the Engine adds ``wd * w_j(t)``.
The exchange is the distributed engine's point-to-point plan
(``dsgd.engine.distributed.TorchDistributedCommunicator``): one message per neighbouring
process and direction, gloo on CPU, nccl on CUDA (the model's parameters on the process's GPU).

Options: ``gossip_every=tau`` mixes every tau steps (local SGD; on ``"complete"`` it is periodic
averaging); ``algorithm="csgd"`` all-reduces the gradients instead (C-SGD, what DDP does);
``buffers="gossip"`` (default) mixes BatchNorm running statistics like the weights, ``"local"``
keeps each process's own (integer buffers always stay local), as the Engine's option.

A peer that dies or stops responding ends every wait within ``timeout_s``: the process prints
one line (``dsgd: error: ...``) and exits with status 2 (``exit_on_failure=False`` raises
:class:`~dsgd.engine.distributed.PeerFailure` instead; then end the process with
``abort_process``, as a gloo thread blocked in a timed-out collective would stall a normal exit).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dsgd.engine.distributed import (
    DistributedSetupError,
    PeerFailure,
    TorchDistributedCommunicator,
    abort_process,
)
from dsgd.topology import Topology, make_topology

ALGORITHMS = ("dsgd", "csgd")


def _flat(tensors: list[Tensor]) -> Tensor:
    """(1, P): the tensors' values in one row."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).view(1, -1)


@torch.no_grad()
def _unflat(row: Tensor, tensors: list[Tensor]) -> None:
    """Write the (1, P) row back into the tensors, in place (optimizers keep their handles)."""
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in
                                   zip(row[0].split([t.numel() for t in tensors]), tensors)])


class Gossip:
    """Decentralized SGD for the model of this process (see the module docstring).

    model: this process's nn.Module (one worker), on the device of its backend.
    topology: a name (``dsgd.topology.NAMES``) built for the job's world size, or a Topology
        with ``m`` equal to it. shuffle, seed: a fresh random relabelling each step.
    algorithm: "dsgd" or "csgd"; gossip_every: tau > 1 gives local SGD.
    buffers: "gossip" or "local" BatchNorm statistics. timeout_s: bound on every wait.
    broadcast: start every process from rank 0's weights and buffers (consensus distance 0).
    group: a torch.distributed process group (default: the whole job).
    """

    def __init__(self, model: nn.Module, topology: str | Topology = "ring", *,
                 algorithm: str = "dsgd", gossip_every: int = 1, buffers: str = "gossip",
                 shuffle: bool = False, seed: int = 0, timeout_s: float = 60.0,
                 broadcast: bool = True, group=None, exit_on_failure: bool = True):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if buffers not in ("gossip", "local"):
            raise ValueError(f"buffers must be 'gossip' or 'local', got {buffers!r}")
        if gossip_every < 1:
            raise ValueError(f"gossip_every must be >= 1, got {gossip_every}")
        if not dist.is_initialized():
            raise DistributedSetupError(
                "torch.distributed is not initialized: call dist.init_process_group (or "
                "dsgd.engine.distributed.init_from_env) under torchrun before dsgd.Gossip")
        world = dist.get_world_size(group)
        topo = (make_topology(topology, world, shuffle=shuffle, seed=seed)
                if isinstance(topology, str) else topology)
        if topo.m != world:
            raise DistributedSetupError(
                f"topology {topo.name!r} has {topo.m} workers but the job has {world} "
                "processes: Gossip hosts one worker per process")
        self.model = model
        self.algorithm, self.gossip_every, self.buffer_mode = algorithm, gossip_every, buffers
        self.exit_on_failure = exit_on_failure
        self.params = list(model.parameters())
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        if len({p.dtype for p in self.params}) > 1 or len({p.device for p in self.params}) > 1:
            raise DistributedSetupError("Gossip needs every parameter in one dtype on one device")
        self.comm = TorchDistributedCommunicator(
            topo, timeout_s=timeout_s, group=group,
            advice="restart the job from your last checkpoint")
        self.step_count = 0
        if broadcast:
            self._guard(self._broadcast)

    @property
    def rank(self) -> int:
        return self.comm.rank

    # ---- failures ----------------------------------------------------------------------------
    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except PeerFailure as err:
            if not self.exit_on_failure:
                raise
            print(f"dsgd: error: {err}", file=sys.stderr)
            abort_process(2)

    def _broadcast(self) -> None:
        state = self.params + self.buffers
        row = _flat(state)
        src = dist.get_global_rank(self.comm.group, 0) if self.comm.group is not None else 0
        started = time.monotonic()
        try:
            work = dist.broadcast(row, src, group=self.comm.group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.comm.timeout_s))
        except RuntimeError as e:  # the communicator's one-line message for a lost peer
            raise self.comm._failure("broadcast", None, started, e) from e
        _unflat(row, state)

    # ---- the step ----------------------------------------------------------------------------
    def _mix(self, tensors: list[Tensor], t: int) -> None:
        _unflat(self.comm.mix(_flat(tensors), t), tensors)

    def _mean(self, tensors: list[Tensor]) -> None:
        _unflat(self.comm.mean(_flat(tensors)), tensors)

    def _exchange(self, t: int) -> None:
        self.comm.step = t
        if self.algorithm == "csgd":
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self._mean([p.grad for p in self.params])
            if self.buffer_mode == "gossip" and self.buffers:
                self._mean(self.buffers)
        elif (t + 1) % self.gossip_every == 0:
            self._mix(self.params, t)
            if self.buffer_mode == "gossip" and self.buffers:
                self._mix(self.buffers, t)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Mix the weights (the gradients, for C-SGD) with the neighbours', then
        ``optimizer.step()``. Call it where ``optimizer.step()`` was, after ``backward()``."""
        self._guard(self._exchange, self.step_count)
        if optimizer is not None:
            optimizer.step()
        self.step_count += 1

    # ---- what the workers agree on -----------------------------------------------------------
    def consensus_distance(self) -> float:
        """Tr Xi = (1/m) sum_j ||w_j - w_a||^2 over all processes (a collective: every rank
        calls it at the same point)."""

        def measure() -> float:
            w = _flat(self.params)
            dev = w - self.comm.mean(w)
            return float(self.comm.mean((dev * dev).sum(1, keepdim=True))[0, 0])

        return self._guard(measure)

    def average_state(self) -> dict[str, Tensor]:
        """The model's state_dict with the parameters and float buffers averaged over all
        processes, w_a = (1/m) sum_j w_j (a collective): ``model.load_state_dict(...)`` of it
        gives the averaged model to evaluate."""
        named = dict(self.model.named_parameters()) | {
            n: b for n, b in self.model.named_buffers() if b.is_floating_point()}
        copies = [t.detach().clone() for t in named.values()]
        self._guard(self._mean, copies)
        return self.model.state_dict() | dict(zip(named, copies))

    @property
    def bytes_sent(self) -> int:
        return self.comm.bytes_sent

    def state_dict(self) -> dict:
        """The step counter (the gossip_every phase and time-varying topologies depend on it);
        save it beside the model's and optimizer's state."""
        return {"step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
