"""Where each named tensor of a model lives in one flat buffer.

The engine keeps the m workers' parameters as a single (m, P) tensor, so that gossip is one
matrix product and the optimizer touches one tensor; ``Layout.views`` gives the named,
shaped views that ``torch.func.functional_call`` consumes, without copying.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Layout:
    def __init__(self, named: dict[str, Tensor]):
        self.names = list(named)
        self.shapes = {n: tuple(t.shape) for n, t in named.items()}
        self.slices: dict[str, slice] = {}
        offset = 0
        for n in self.names:
            size = math.prod(self.shapes[n])
            self.slices[n] = slice(offset, offset + size)
            offset += size
        self.size = offset  # P

    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        """{name: (*batch, *shape)} -> (*batch, P) (a copy)."""
        if not self.names:
            raise ValueError("empty layout")
        lead = tensors[self.names[0]].shape[:batch_dims]
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """(*batch, P) -> {name: (*batch, *shape)}, views into ``flat``."""
        lead = flat.shape[:-1]
        return {n: flat[..., self.slices[n]].view(*lead, *self.shapes[n]) for n in self.names}
