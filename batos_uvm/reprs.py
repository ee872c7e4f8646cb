"""Readable, bounded text for values of the image, without running any of their code.

``repr()`` of an arbitrary value runs that value's ``__repr__``: code from the
image, possibly written by a hostile model. The kernel and the shell show
values with :func:`safe_repr` instead, which renders builtin data by its exact
type and everything else by its class name.
"""

from __future__ import annotations

from typing import Any

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def type_name(value: Any) -> str:
    """The name of ``value``'s class, without running a metaclass's code."""
    return type.__dict__["__qualname__"].__get__(type(value))


def safe_repr(value: Any, limit: int = 200, *, describe: Any = None) -> str:
    """Like ``repr`` for builtin data, ``<Class object>`` for anything else, at most ``limit``.

    ``describe(value)`` may name objects of the image (it is asked first and
    returns None for values it does not know).
    """
    parts: list[str] = []
    _render(value, parts, [limit + 1], describe, depth=0)
    text = "".join(parts)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _render(value: Any, out: list[str], room: list[int], describe: Any, depth: int) -> None:
    if room[0] <= 0:
        return
    kind = type(value)
    if describe is not None:
        named = describe(value)
        if named is not None:
            _emit(f"<{named}>", out, room)
            return
    if kind in _SCALARS:
        if kind is int and value.bit_length() > 4000:
            _emit(f"<int of {value.bit_length()} bits>", out, room)
        elif kind in (str, bytes) and len(value) > room[0]:
            _emit(repr(value[: room[0]]), out, room)
        else:
            _emit(repr(value), out, room)
        return
    if kind in (list, tuple, set, frozenset, dict) and depth > 20:
        _emit("...", out, room)
        return
    if kind is dict:
        _emit("{", out, room)
        for index, (key, item) in enumerate(value.items()):
            if room[0] <= 0:
                return
            if index:
                _emit(", ", out, room)
            _render(key, out, room, describe, depth + 1)
            _emit(": ", out, room)
            _render(item, out, room, describe, depth + 1)
        _emit("}", out, room)
        return
    if kind in (list, tuple, set, frozenset):
        if not value and kind in (set, frozenset):
            _emit(f"{kind.__name__}()", out, room)
            return
        opening, closing = {list: "[]", tuple: "()", set: "{}", frozenset: "{}"}[kind]
        _emit(("frozenset(" if kind is frozenset else "") + opening, out, room)
        for index, item in enumerate(value):
            if room[0] <= 0:
                return
            if index:
                _emit(", ", out, room)
            _render(item, out, room, describe, depth + 1)
        if kind is tuple and len(value) == 1:
            _emit(",", out, room)
        _emit(closing + (")" if kind is frozenset else ""), out, room)
        return
    _emit(f"<{type_name(value)} object>", out, room)


def _emit(text: str, out: list[str], room: list[int]) -> None:
    out.append(text[: max(room[0], 0)])
    room[0] -= len(text)
