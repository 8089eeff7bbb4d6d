"""What the engine checks of a batch before it computes anything, with the fix in the message."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from dsgd.errors import BatchError

_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)
_REGRESSION_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)


def check_batch(x: Tensor, y: Tensor, m: int, loss: Callable) -> tuple[Tensor, Tensor]:
    """Raise a one-line BatchError unless x: (m, B, ...) and y: (m, B, ...) fit m hosted
    workers and the loss (class indices for cross-entropy, real targets for regression)."""
    if x.ndim < 2 or x.shape[0] != m:
        raise BatchError(f"x has shape {tuple(x.shape)}, but the engine hosts {m} workers: "
                         f"give x of shape ({m}, B, ...), one mini-batch per worker")
    if y.shape[:2] != x.shape[:2]:
        raise BatchError(f"x has shape {tuple(x.shape)} and y {tuple(y.shape)}: y must have "
                         f"shape ({m}, {x.shape[1]}, ...), the same workers and batch as x")
    if loss in _CLASS_LOSSES and y.ndim == 2 and y.is_floating_point():
        raise BatchError(f"the loss takes class indices, but y is {y.dtype} of shape "
                         f"{tuple(y.shape)}: pass y.long() (or class probabilities of shape "
                         f"({m}, B, C))")
    if loss in _REGRESSION_LOSSES and not y.is_floating_point():
        raise BatchError(f"the loss takes real targets, but y is {y.dtype}: pass y.float()")
    return x, y
