"""dsgd: decentralized SGD for any nn.Module, and the instruments that measure what it does.

The public API, imported on first use (``import dsgd`` itself loads no torch)::

    dsgd.Engine(model, dsgd.make_topology("ring", 16), optimizer=dsgd.SGD(momentum=0.9))
                                   # m simulated workers in one process (dsgd.engine)
    dsgd.Gossip(model, "ring")     # one worker per torchrun process, your own loop (dsgd.gossip)
    dsgd.split(dataset, 16, 64)    # any Dataset, cut among workers (dsgd.data.split)
    dsgd.SGD, dsgd.SAM, dsgd.AvgSAM  # optimizer and gradient rules (dsgd.optim)
    dsgd.make_topology(name, m)    # mixing matrices (dsgd.topology)
    dsgd.load_config(...), dsgd.train(...)  # run a config from Python (dsgd.api)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "dsgd.engine",
    "Gossip": "dsgd.gossip",
    "split": "dsgd.data.split",
    "SGD": "dsgd.optim",
    "SAM": "dsgd.optim",
    "AvgSAM": "dsgd.optim",
    "make_topology": "dsgd.topology",
    "load_config": "dsgd.api",
    "train": "dsgd.api",
}
__all__ = ["SAM", "SGD", "AvgSAM", "Engine", "Gossip", "__version__", "load_config",
           "make_topology", "split", "train"]

if TYPE_CHECKING:
    from dsgd.api import load_config, train
    from dsgd.data.split import split
    from dsgd.engine import Engine
    from dsgd.gossip import Gossip
    from dsgd.optim import SAM, SGD, AvgSAM
    from dsgd.topology import make_topology


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'dsgd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
