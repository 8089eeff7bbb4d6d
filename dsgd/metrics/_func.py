"""Functional helpers shared by the metrics: a loss as a pure function of a parameter dict,
flat views, batched gradients, and the tree operations of ``dsgd.treemath``.

Every metric in ``dsgd.metrics`` takes ``loss_fn: Callable[[Params], Tensor]`` (a scalar), so it
can be differentiated any number of times with ``torch.func`` (grad, jvp, vmap).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dsgd import treemath
from dsgd._types import Params

LossFn = Callable[[Params], Tensor]


def make_loss_fn(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    buffers: dict[str, Tensor] | None = None,
    train_mode: bool = False,
) -> LossFn:
    """Return ``loss_fn(params) = loss(module(x; params, buffers), y)`` via ``functional_call``.

    ``params`` need only hold the trainable parameters; ``buffers`` default to the module's own.
    By default the module runs in eval mode, so BatchNorm uses its running statistics and the
    loss is a deterministic function of the weights (what curvature metrics need). With
    ``train_mode=True`` BatchNorm uses batch statistics; the buffers are then cloned on every
    call, so the running statistics are never updated by a metric. The module's own
    ``training`` flag is restored after each call.
    """
    if buffers is None:
        buffers = dict(module.named_buffers())

    def loss_fn(params: Params) -> Tensor:
        bufs = {k: b.clone() for k, b in buffers.items()} if train_mode else buffers
        was_training = module.training
        module.train(train_mode)
        try:
            out = functional_call(module, {**bufs, **params}, (x,))
        finally:
            module.train(was_training)
        return loss(out, y)

    return loss_fn


def module_params(module: nn.Module) -> Params:
    """The module's trainable parameters, detached: ``{name: tensor}``."""
    return {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}


# --- flat vectors ---------------------------------------------------------------------------


def flatten(params: Params) -> Tensor:
    """Concatenate the tensors of ``params`` (in key order) into one vector ``(P,)``."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vec: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: split ``vec`` ``(P,)`` into tensors shaped as ``like``."""
    out, i = {}, 0
    for k, p in like.items():
        n = p.numel()
        out[k] = vec[i : i + n].view_as(p)
        i += n
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, the parameters {i}")
    return out


def flatten_stacked(stacked: dict[str, Tensor]) -> Tensor:
    """``{name: (m, *shape)}`` -> ``(m, P)``, worker j's flattened weights in row j."""
    return torch.cat([s.reshape(s.shape[0], -1) for s in stacked.values()], dim=1)


def batched_grad(
    loss_fn: LossFn,
    points: dict[str, Tensor],
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """``grad L`` at each of n points: ``{name: (n, *shape)} -> {name: (n, *shape)}``, detached.

    ``vectorize=True`` evaluates all points in one ``vmap`` (in chunks of ``chunk_size`` to bound
    memory); use ``False`` for losses vmap cannot batch (data-dependent control flow, BatchNorm
    in train mode), which loops over the points instead.
    """
    g = grad(loss_fn)
    if vectorize:
        out = vmap(g, chunk_size=chunk_size)(points)
    else:
        n = next(iter(points.values())).shape[0]
        gs = [g({k: v[i] for k, v in points.items()}) for i in range(n)]
        out = {k: torch.stack([x[k] for x in gs]) for k in points}
    return {k: v.detach() for k, v in out.items()}


def stack_trees(trees: list[Params]) -> dict[str, Tensor]:
    """``[{name: shape}] * n -> {name: (n, *shape)}``."""
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


# --- tree arithmetic: dsgd.treemath, under the names the metrics use ------------------------

tree_add = treemath.add
tree_scale = treemath.scale
tree_dot = treemath.dot
tree_norm = treemath.norm
tree_detach = treemath.detach
random_like = treemath.random_like
