"""Kernel-provided behaviour, referenced from the image by name.

The image never stores a bound method or a function of the kernel: an object
that answers ``search`` with kernel code holds a method record of kind
"primitive" naming ``search``, and the running process resolves that name here.
An image opened without a kernel (the shell, a test) still loads; calling a
primitive nobody registered raises a clear error instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Primitive = Callable[..., Any]

_REGISTRY: dict[str, Primitive] = {}


class PrimitiveUnavailable(RuntimeError):
    """The image names a primitive this process does not provide."""


def register(name: str, function: Primitive, *, replace: bool = True) -> None:
    """Provide ``name``; the function is called as ``function(receiver, *args, **kwargs)``."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"primitive name {name!r} is not a dotted identifier")
    if not replace and name in _REGISTRY:
        raise ValueError(f"primitive {name!r} is already registered")
    _REGISTRY[name] = function


def primitive(name: str) -> Callable[[Primitive], Primitive]:
    """Decorator form of :func:`register`."""

    def decorate(function: Primitive) -> Primitive:
        register(name, function)
        return function

    return decorate


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def resolve(name: str) -> Primitive:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PrimitiveUnavailable(
            f"primitive {name!r} is not provided by this process "
            f"(available: {', '.join(sorted(_REGISTRY)) or 'none'}); "
            "it is registered by the running kernel"
        ) from None


def registered() -> list[str]:
    return sorted(_REGISTRY)
