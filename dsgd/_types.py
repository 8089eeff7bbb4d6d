"""Types that carry meaning, in one place.

``Stacked`` is the state of m workers: one dict of tensors whose leading axis is the worker,
``{name: (m, *shape)}``. ``Params`` is one model's parameters, ``{name: shape}``.
``MixingMatrix`` is an (m, m) doubly stochastic tensor: row j holds the weights worker j gives
to every worker when it gossips.
"""

from __future__ import annotations

from torch import Tensor

Params = dict[str, Tensor]
Stacked = dict[str, Tensor]  # {name: (m, *shape)}
MixingMatrix = Tensor  # (m, m), doubly stochastic, float64
