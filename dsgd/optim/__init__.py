"""Optimizers as pure (init, update) pairs over stacked worker tensors, gradient rules of the
SAM family (SAM, ASAM, average-direction SAM), and learning-rate schedules."""

from dsgd.optim.avg_sam import AvgSAM, from_deviations, isotropic, virtual_workers
from dsgd.optim.sam import SAM
from dsgd.optim.sgd import SGD, SGDState

__all__ = ["SAM", "SGD", "AvgSAM", "SGDState", "from_deviations", "isotropic",
           "virtual_workers"]
