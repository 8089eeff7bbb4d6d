"""Gradients of stacked Linear layers: every worker's MLP in one batched matrix product a layer.

``torch.func.vmap(grad(...))`` computes the m workers' gradients of a model in one pass, but for
a small MLP its per-operation cost is a large part of the step. A model built only of
``nn.Linear`` layers and elementwise modules (ReLU, Tanh, GELU, ..., dropout; no buffers)
needs none of its generality: layer l of all hosted workers is one ``torch.baddbmm`` of the
activations (m, B, in) with the workers' weights (m, out, in), and its backward is two more
(the weight gradient in (m, out, in), the input gradient only where one is needed).
``stack(model)`` decides from the model's ``torch.fx`` graph whether it is such a model and
returns the plan, or ``None`` (then the engine keeps vmap). ``StackedGradients`` runs the plan;
its gradients equal vmap's to float rounding (tested).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import vmap

ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU,
                       nn.ELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Identity)
ELEMENTWISE_FUNCTIONS = (torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu,
                         nn.functional.gelu, nn.functional.silu, nn.functional.leaky_relu,
                         nn.functional.elu, nn.functional.softplus, nn.functional.tanh,
                         nn.functional.sigmoid)
ELEMENTWISE_METHODS = ("relu", "tanh", "sigmoid")  # x.relu() and the like


class _LinearStack(torch.autograd.Function):
    """z = h W^T + b for every worker at once: h (m, N, in), W (m, out, in), b (m, out)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        wt = weight.transpose(1, 2)
        return torch.baddbmm(bias.unsqueeze(1), h, wt) if bias is not None else torch.bmm(h, wt)

    @staticmethod
    def backward(ctx, dz: Tensor):
        h, weight = ctx.saved_tensors
        dh = torch.bmm(dz, weight) if ctx.needs_input_grad[0] else None
        # (m, out, in) contiguous; written into the (m, P) rows by one cat afterwards, which
        # measured faster than bmm(..., out=) into the rows' strided views
        return dh, torch.bmm(dz.transpose(1, 2), h), dz.sum(1) if ctx.has_bias else None


def _worker_losses(loss: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """(m, B, ...) outputs and targets -> (m,) each worker's mean loss: cross-entropy as one
    call over all workers' samples, any other loss through vmap."""
    if loss is not nn.functional.cross_entropy:
        return vmap(loss)

    def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
        if out.ndim != 3 or y.ndim != 2 or y.is_floating_point():
            return vmap(loss)(out, y)  # class probabilities, or sequence outputs
        each = nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        counted = (y != -100).sum(1)  # F.cross_entropy's mean leaves out ignore_index targets
        return each.view(y.shape).sum(1) / counted
    return cross_entropy


@dataclass(frozen=True)
class Op:
    kind: str  # "input", "linear", "apply" (an elementwise module or function), "flatten",
    # "output"
    node: str
    args: tuple[str, ...]
    target: Any = None  # linear: the module's name; apply: the callable; flatten: (start, end)


def _hooked(model: nn.Module) -> bool:
    """Forward or backward hooks anywhere (the traced graph would not run them)."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    g = nn.modules.module
    global_hooks = (g._global_forward_hooks, g._global_forward_pre_hooks,
                    g._global_backward_hooks, g._global_backward_pre_hooks)
    return any(global_hooks) or any(getattr(mod, h, None) for mod in model.modules()
                                    for h in hooks)


def _plain_linear(mod: nn.Module) -> bool:
    """An nn.Linear holding exactly ``weight`` (and ``bias``): not a weight-normed or
    parametrized one, whose parameters are stored differently."""
    own = {n for n, _ in mod.named_parameters(recurse=False)}
    return type(mod) is nn.Linear and "weight" in own and own <= {"weight", "bias"}


def _constants(values) -> bool:
    return not any(isinstance(v, fx.Node) for v in values)


def stack(model: nn.Module) -> list[Op] | None:
    """The plan for a model of Linear layers and elementwise modules, else None."""
    layers = (nn.Linear, nn.Flatten, nn.Dropout, nn.Sequential, nn.ModuleList,
              *ELEMENTWISE_MODULES)
    if (any(True for _ in model.buffers()) or _hooked(model)
            or not all(isinstance(mod, layers) for mod in list(model.modules())[1:])):
        return None  # decided without tracing: conv nets, attention, BatchNorm, hooks
    training = model.training
    try:
        model.train()  # the graph the engine's steps run (a forward may branch on the mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.symbolic_trace(model).graph
    except Exception:  # control flow, unsupported calls: not a stackable model
        return None
    finally:
        model.train(training)
    ops: list[Op] = []
    linear_params: set[str] = set()
    inputs = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            inputs += 1
            ops.append(Op("input", node.name, ()))
            continue
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return None  # several outputs
            ops.append(Op("output", node.name, (node.args[0].name,)))
            continue
        if node.op == "get_attr" or not node.args or not isinstance(node.args[0], fx.Node):
            return None  # a parameter used outside a Linear layer, or no tensor input
        src, rest = (node.args[0].name,), node.args[1:]
        if not _constants(rest) or not _constants(node.kwargs.values()):
            return None  # a second tensor input (a residual, a product)
        if node.op == "call_module":
            mod = model.get_submodule(node.target)
            if rest or node.kwargs:
                return None
            if _plain_linear(mod):
                ops.append(Op("linear", node.name, src, node.target))
                linear_params |= {f"{node.target}.{n}" for n, _ in mod.named_parameters()}
            elif isinstance(mod, (*ELEMENTWISE_MODULES, nn.Dropout)):
                # dropout on all workers' activations at once: each worker its own part of the
                # mask (drawn from the engine's generator, as vmap's randomness="different"
                # draws one of its own), and none in eval mode
                ops.append(Op("apply", node.name, src, mod))
            elif isinstance(mod, nn.Flatten):
                ops.append(Op("flatten", node.name, src, (mod.start_dim, mod.end_dim)))
            else:
                return None
            continue
        fn = node.target
        if fn in (torch.flatten, "flatten"):
            given = dict(zip(("start_dim", "end_dim"), rest), **node.kwargs)
            start, end = given.pop("start_dim", 0), given.pop("end_dim", -1)
            if given or not (isinstance(start, int) and isinstance(end, int)):
                return None
            ops.append(Op("flatten", node.name, src, (start, end)))
        elif node.op == "call_function" and fn in ELEMENTWISE_FUNCTIONS:
            ops.append(Op("apply", node.name, src,
                          functools.partial(fn, *rest, **node.kwargs) if rest or node.kwargs
                          else fn))
        elif node.op == "call_method" and fn in ELEMENTWISE_METHODS and not rest:
            ops.append(Op("apply", node.name, src, getattr(torch, fn)))
        else:
            return None
    if inputs != 1 or linear_params != {n for n, _ in model.named_parameters()}:
        return None
    return ops


class StackedGradients:
    """``gradients(w, x, y)`` for a plan from :func:`stack`: (m, P) gradients, (m,) losses,
    (m,) accuracies, as the vmap backend returns them."""

    def __init__(self, plan: list[Op], layout, loss: Callable[[Tensor, Tensor], Tensor],
                 accuracy: Callable[..., Tensor]):
        self.plan, self.layout, self.accuracy = plan, layout, accuracy
        self.losses = _worker_losses(loss)

    def gradients(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = w.shape[0]
        leaves = {n: v.detach().requires_grad_() for n, v in self.layout.views(w).items()}
        env: dict[str, Tensor] = {}
        out = x
        for op in self.plan:
            if op.kind == "input":
                env[op.node] = x
                continue
            h = env[op.args[0]]
            if op.kind == "linear":
                weight, bias = leaves[f"{op.target}.weight"], leaves.get(f"{op.target}.bias")
                z = _LinearStack.apply(h.reshape(m, -1, h.shape[-1]), weight, bias)
                env[op.node] = z.view(*h.shape[:-1], weight.shape[1])
            elif op.kind == "apply":
                env[op.node] = op.target(h)
            elif op.kind == "flatten":  # dims of one worker's batch: one more in front here
                start, end = op.target
                env[op.node] = torch.flatten(h, start + 1 if start >= 0 else start,
                                             end + 1 if end >= 0 else end)
            else:  # output
                out = h
        losses = self.losses(out, y)  # (m,) each worker's mean loss
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()), materialize_grads=True)
        flat = self.layout.flatten(dict(zip(leaves, grads)), batch_dims=1)
        return flat, losses.detach(), self.accuracy(out, y, lead=1).detach()
