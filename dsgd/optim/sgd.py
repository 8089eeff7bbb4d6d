"""SGD with momentum, Nesterov and weight decay, as a pure (init, update) pair over stacked tensors.

The rule is torch.optim.SGD's (dampening 0), applied independently to every worker:

    g   <- g + weight_decay * w
    buf <- g                      (first step)
    buf <- momentum * buf + g     (later steps)
    d   <- g + momentum * buf     (nesterov)  or  buf
    w   <- mix(w) - lr * d        (the engine applies it, fused with gossip)

Gradients and weight decay are taken at the worker's pre-gossip weights, as D-SGD requires
(Lian et al. 2017; Zhu et al. 2023, eq. 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from dsgd._types import Stacked


class SGDState(NamedTuple):
    momentum: Stacked | None  # {name: (m, *shape)}; None until the first step


@dataclass(frozen=True)
class SGD:
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")

    def init(self, params: Stacked) -> SGDState:
        return SGDState(momentum=None)

    @torch.no_grad()
    def direction(self, grads: Stacked, state: SGDState, params: Stacked, inplace: bool = True
                  ) -> tuple[Stacked, SGDState]:
        """Return ``(d, state)``: the step is ``w <- mix(w) - lr * d``. ``d`` may be ``grads``
        itself (plain SGD); callers must not modify it in place. ``inplace=False`` leaves the
        momentum buffers given in ``state`` untouched and returns new ones (for a compiled
        step, which commits them only after checking the loss)."""
        names = list(grads)
        g = [grads[k] for k in names]
        if self.weight_decay:
            g = torch._foreach_add(g, [params[k] for k in names], alpha=self.weight_decay)
        if self.momentum:
            if state.momentum is None:
                buf = [x.clone() for x in g]
            else:
                buf = [state.momentum[k] for k in names]
                if inplace:
                    torch._foreach_mul_(buf, self.momentum)
                    torch._foreach_add_(buf, g)
                else:
                    buf = torch._foreach_add(torch._foreach_mul(buf, self.momentum), g)
            state = SGDState(momentum=dict(zip(names, buf)))
            d = torch._foreach_add(g, buf, alpha=self.momentum) if self.nesterov else buf
        else:
            d = g
        return dict(zip(names, d)), state
