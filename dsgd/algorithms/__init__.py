"""Decentralized and centralized algorithms, one small object each (see ``base``).

``make_algorithm("dsgd")`` / ``make_algorithm("local", every=4)`` / ``make_algorithm("qgm",
beta=0.9)`` build one by name; the engine accepts a name or an object.
"""

from __future__ import annotations

from typing import Any

from dsgd.algorithms.base import Algorithm, State, Stateless
from dsgd.algorithms.choco import Choco
from dsgd.algorithms.csgd import CSGD
from dsgd.algorithms.d2 import D2
from dsgd.algorithms.deepsqueeze import DeepSqueeze
from dsgd.algorithms.drdsgd import DRDSGD
from dsgd.algorithms.dsgd import DSGD
from dsgd.algorithms.gt import GradientTracking
from dsgd.algorithms.local import LocalSGD
from dsgd.algorithms.pushsum import PushSum
from dsgd.algorithms.qgm import QGM

ALGORITHMS: dict[str, type] = {"dsgd": DSGD, "csgd": CSGD, "local": LocalSGD,
                               "gt": GradientTracking, "d2": D2, "qgm": QGM, "pushsum": PushSum,
                               "drdsgd": DRDSGD, "choco": Choco, "deepsqueeze": DeepSqueeze}


def make_algorithm(name: str, **options: Any) -> Algorithm:
    """The algorithm called ``name`` with its options (e.g. ``every`` for ``local``)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    try:
        return ALGORITHMS[name](**options)
    except TypeError as e:
        raise ValueError(f"algorithm {name!r}: bad options {sorted(options)} ({e})") from None


__all__ = ["ALGORITHMS", "CSGD", "D2", "DRDSGD", "DSGD", "QGM", "Algorithm", "Choco", "DeepSqueeze",
           "GradientTracking", "LocalSGD", "PushSum", "State", "Stateless", "make_algorithm"]
