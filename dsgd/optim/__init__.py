"""Optimizers as pure (init, update) pairs over stacked worker tensors, and lr schedules."""

from dsgd.optim.sgd import SGD, SGDState

__all__ = ["SGD", "SGDState"]
