"""DR-DSGD, distributionally robust D-SGD (Issaid, Elgabli & Bennis 2022).

The KL-regularized worst case over mixtures of the workers' distributions,
``lambda log((1/m) sum_j exp(f_j / lambda))``, has the minimizer of its surrogate
``lambda sum_j exp(f_j / lambda)`` (log is monotone), whose gradient at worker j is
``exp(f_j / lambda) grad f_j``: D-SGD with each worker's gradient scaled by the exponential of
its own mini-batch loss, so workers whose data the model fits worst pull hardest. The paper
writes the surrogate without the factor lambda, i.e. the scale (1/lambda) exp(f_j / lambda):
the same update with the learning rate divided by lambda. Written with lambda, the lr stays in
D-SGD's units and lambda -> infinity is D-SGD. The paper's analysis takes lambda > 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dsgd.algorithms.base import State
from dsgd.algorithms.dsgd import DSGD

if TYPE_CHECKING:
    from dsgd.engine.comm import Communicator


@dataclass(frozen=True)
class DRDSGD(DSGD):
    lam: float = 10.0  # the regularization lambda (> 1 in the paper's analysis)
    name = "drdsgd"

    def __post_init__(self):
        if not self.lam > 0:
            raise ValueError(f"drdsgd lambda must be > 0, got {self.lam}")

    def gradient(self, g: Tensor, loss: Tensor, state: State, comm: Communicator, t: int
                 ) -> tuple[Tensor, State]:
        scale = torch.exp(loss.to(g.dtype) / self.lam)  # (m,)
        return g * scale[:, None], state
