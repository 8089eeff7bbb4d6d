"""Model registry: a name -> factory table, and ``build_model`` that validates and calls it.

A factory is any callable ``factory(num_classes, in_shape, **options) -> nn.Module`` where
``in_shape`` is the shape of one sample without the batch axis, e.g. ``(1, 28, 28)`` for
Fashion-MNIST, ``(3, 32, 32)`` for CIFAR, ``(40,)`` for MNIST-1D. Built-in factories register
themselves with ``@register_model("name")``; ``build_model`` also accepts a factory directly, so
a user's own model needs no registration, or its ``"package.module:factory"`` name (the form
``model.name`` takes in a config; see ``dsgd.importing``). A factory named that way is called
with its options as keyword arguments, plus ``num_classes=`` and ``in_shape=`` when its
signature names those parameters, so ``"torchvision.models:resnet18"`` works as it is.

Every model here is written for the engine, which stacks m copies' parameters and calls
``torch.func.functional_call``, often under ``torch.func.vmap(torch.func.grad(...))``:
no in-place activations, no data-dependent Python control flow, no ``.item()`` in ``forward``,
and initialisation drawn only from torch's global RNG (deterministic under ``torch.manual_seed``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from dsgd.errors import UserError
from dsgd.importing import call_imported, is_import_name

ModelFactory = Callable[..., nn.Module]  # (num_classes, in_shape, **options) -> nn.Module

MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: add the factory to ``MODELS`` under ``name`` (lower case), unchanged."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        key = name.lower()
        if key in MODELS and MODELS[key] is not factory:
            raise UserError(f"model name {key!r} is already registered; pick another name")
        MODELS[key] = factory
        return factory

    return decorate


def build_model(
    name: str | ModelFactory, num_classes: int, in_shape: Sequence[int], **kwargs: object
) -> nn.Module:
    """Build a model by registered name (or from a factory) for ``num_classes`` outputs.

    ``in_shape`` is one sample's shape, e.g. ``(3, 32, 32)`` or ``(40,)``. Options in ``kwargs``
    go to the factory; an option the factory does not take is a ``UserError``.
    """
    if isinstance(name, str) and is_import_name(name):
        return _build_imported(name, num_classes, in_shape, kwargs)
    if callable(name):
        factory, label = name, getattr(name, "__name__", repr(name))
    else:
        factory = MODELS.get(str(name).lower())
        if factory is None:
            known = ", ".join(sorted(MODELS))
            raise UserError(f"unknown model {name!r}; known models: {known}")
        label = str(name).lower()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive int, got {num_classes!r}")
    shape = tuple(in_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise UserError(f"in_shape must be a non-empty tuple of positive ints, got {in_shape!r}")
    try:
        inspect.signature(factory).bind(num_classes, shape, **kwargs)
    except TypeError as err:
        raise UserError(f"model {label!r}: bad options {sorted(kwargs)}: {err}") from None
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    model = factory(num_classes, shape, **kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {label!r} returned {type(model).__name__}, not nn.Module")
    return model


def _build_imported(spec: str, num_classes: int, in_shape: Sequence[int],
                    options: dict[str, object]) -> nn.Module:
    """``factory(**options)`` for ``spec = "module:factory"``, handing it ``num_classes`` and
    ``in_shape`` as keywords where it names them (and the options do not)."""
    model = call_imported(spec, "model.name", "model", options,
                          {"num_classes": num_classes, "in_shape": tuple(in_shape)})
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {spec!r} returned {type(model).__name__}, not nn.Module")
    return model


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (buffers such as BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def image_shape(name: str, in_shape: tuple[int, ...], min_size: int) -> tuple[int, int, int]:
    """Check that ``in_shape`` is (C, H, W) with H, W >= ``min_size``; return it."""
    if len(in_shape) != 3:
        raise UserError(
            f"model {name!r} needs image samples shaped (C, H, W); got in_shape {in_shape}"
        )
    c, h, w = in_shape
    if min(h, w) < min_size:
        raise UserError(
            f"model {name!r} needs images of at least {min_size}x{min_size}; got {h}x{w}"
        )
    return c, h, w
