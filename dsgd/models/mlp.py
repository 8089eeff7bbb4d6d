"""Multi-layer perceptron: flatten, then Linear-ReLU layers, then a Linear classifier.

The default hidden sizes (100, 100) are the MLP baseline of MNIST-1D (Greydanus, "Scaling down
deep learning", 2020); the same net works on any input shape because it flattens the sample.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dsgd.errors import UserError
from dsgd.models.registry import register_model


class MLP(nn.Module):
    """``in_features -> hidden[0] -> ... -> hidden[-1] -> num_classes`` with ReLU between."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (100, 100)):
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(widths):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (N, *in_shape) -> (N, num_classes)
        return self.net(torch.flatten(x, 1))


@register_model("mlp")
def mlp(num_classes: int, in_shape: tuple[int, ...], hidden: Sequence[int] = (100, 100)) -> MLP:
    """MLP on flattened samples of any shape, e.g. (40,) MNIST-1D or (1, 28, 28) Fashion-MNIST."""
    hidden = tuple(hidden)
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise UserError(f"mlp hidden sizes must be positive ints, got {hidden!r}")
    return MLP(math.prod(in_shape), num_classes, hidden)
