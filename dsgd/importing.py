"""Naming one's own code in a config: ``"package.module:attribute"``.

``model.name = "mymodels:small_cnn"`` and ``data.name = "mydata:load"`` name a factory in the
user's own module, imported with ``importlib.import_module`` and fetched with ``getattr``: the
same as ``python -c "from mymodels import small_cnn"``. Only that form is accepted (never
``eval``), and only modules Python can already import (installed, or on ``PYTHONPATH``) are
found: a config names code the user has; it cannot carry code of its own.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from dsgd.errors import UserError

_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_import_name(name: str) -> bool:
    """Whether ``name`` has the ``module:attribute`` form (rather than a registered name)."""
    return ":" in name


def import_object(spec: str, key: str) -> Callable:
    """The callable ``spec = "package.module:attribute"`` names; ``key`` is the config key,
    for the message. A missing module, attribute or a non-callable is one-line UserError."""
    if not _SPEC.fullmatch(spec):
        raise UserError(f'{key} = "{spec}" is neither a known name nor "package.module:factory"')
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise  # the module exists but an import inside it failed: the user's own bug
        raise UserError(f'cannot import {module_name!r} for {key} = "{spec}": {e}; put its '
                        "folder on PYTHONPATH (e.g. PYTHONPATH=. dsgd train ...) or pip "
                        "install it") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f'{module_name} has no attribute {attr!r} ({key} = "{spec}")')
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f'{key} = "{spec}" is a {type(obj).__name__}, not a callable factory')
    return obj
