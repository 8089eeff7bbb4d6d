"""Naming one's own code in a config: ``"package.module:attribute"``.

``model.name = "mymodels:small_cnn"`` and ``data.name = "mydata:load"`` name a factory in the
user's own module, imported with ``importlib.import_module`` and fetched with ``getattr``: the
same as ``python -c "from mymodels import small_cnn"``. Only that form is accepted (never
``eval``), and only modules Python can already import (installed, or on ``PYTHONPATH``) are
found: a config names code the user has; it cannot carry code of its own.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

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


def call_imported(spec: str, key: str, what: str, options: Mapping[str, Any],
                  context: Mapping[str, Any]) -> Any:
    """Import ``spec`` (see ``import_object``) and call it with ``options`` as keywords, plus each
    ``context`` value (e.g. ``num_classes``) that the factory names and the options do not
    set. Options the factory does not take are one line: ``"<what> 'spec': bad options"``."""
    factory = import_object(spec, key)
    try:
        named = inspect.signature(factory).parameters
    except ValueError:  # no signature available (some builtins): hand over the options only
        named = {}
    kwargs = {k: v for k, v in context.items() if k in named and k not in options} | dict(options)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise UserError(f"{what} {spec!r}: bad options {sorted(options)}: {err}") from None
    except ValueError:
        pass
    return factory(**kwargs)
