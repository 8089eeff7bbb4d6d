"""Measurements of what decentralization does (Zhu et al., ICML 2023, and around it).

Every curvature metric takes ``loss_fn: Callable[[Params], Tensor]`` (see ``make_loss_fn``);
consensus statistics take stacked worker weights ``{name: (m, *shape)}``.
"""

from dsgd.metrics._func import make_loss_fn
from dsgd.metrics.consensus import (
    average,
    consensus_distance,
    consensus_spectrum,
    deviations,
    per_layer_consensus,
    sample_xi,
)
from dsgd.metrics.equivalence import Decomposition, decompose
from dsgd.metrics.hessian import (
    hutchinson_trace,
    hvp,
    lanczos_top_k,
    top_eigenvalue,
    xi_weighted_trace,
)
from dsgd.metrics.landscape import interpolate, surface_2d
from dsgd.metrics.smoothness import gradient_lipschitz, smoothed_gradient_lipschitz
from dsgd.metrics.uncertainty import ece, evaluate_uncertainty, nll

__all__ = [
    "Decomposition", "average", "consensus_distance", "consensus_spectrum", "decompose",
    "deviations", "ece", "evaluate_uncertainty", "gradient_lipschitz", "hutchinson_trace", "hvp",
    "interpolate", "lanczos_top_k", "make_loss_fn", "nll", "per_layer_consensus", "sample_xi",
    "smoothed_gradient_lipschitz", "surface_2d", "top_eigenvalue", "xi_weighted_trace",
]
