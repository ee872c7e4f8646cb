"""Plain data across the cell boundary: the codec, its limits, and framing.

Only inert data crosses between the kernel and a cell: None, bool, int, float,
str, bytes, list and dicts, plus a few extension types that carry no code
either: tuples, sets and frozensets, integers wider than 64 bits, dicts with
keys other than strings, *handles* naming objects of the image, *opaque*
markers for slots that hold kernel objects, and *repr* text for results that
are not plain data (computed inside the cell, bounded).

Messages are msgpack (ormsgpack), each framed by a 4-byte big-endian length.
The kernel decodes what a cell sends with :class:`Limits`: frame size, nesting
of extension types (ormsgpack itself refuses deep plain nesting), integer width
and text length. Nothing decoded here can run code: every value is built from
the builtin types above or the three inert classes of this module.

Imported by the cell itself, so it depends only on the standard library and
ormsgpack.
"""

from __future__ import annotations

import struct

import ormsgpack

from ..reprs import type_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = [
    "Handle",
    "Decoder",
    "Limits",
    "Opaque",
    "ReprText",
    "WireError",
    "decode",
    "encode",
    "frame",
    "prepare",
    "type_name",
]

EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_BIGINT, EXT_PAIRS = 1, 2, 3, 4, 5
EXT_HANDLE, EXT_OPAQUE, EXT_REPR = 6, 7, 8

HEADER = struct.Struct(">I")
# Everything ormsgpack would otherwise turn into plain data on its own (dates,
# dataclasses, enums, UUIDs, subclasses) goes through ``default``: only the
# builtin types above are plain; the rest is a stand-in or refused.
_OPTIONS = (
    ormsgpack.OPT_PASSTHROUGH_BIG_INT
    | ormsgpack.OPT_PASSTHROUGH_TUPLE
    | ormsgpack.OPT_PASSTHROUGH_SUBCLASS
    | ormsgpack.OPT_PASSTHROUGH_DATETIME
    | ormsgpack.OPT_PASSTHROUGH_DATACLASS
    | ormsgpack.OPT_PASSTHROUGH_ENUM
    | ormsgpack.OPT_PASSTHROUGH_UUID
)
_SCALARS = (type(None), bool, int, float, str, bytes)


class WireError(ValueError):
    """Data that is not plain, or breaks a limit; the message says which."""


class Limits:
    """What the kernel accepts from a cell (a plain class: the cell imports this module)."""

    __slots__ = ("max_bytes", "max_nesting", "max_int_bits", "max_text")

    def __init__(
        self,
        max_bytes: int = 2**20 + 64 * 1024,  # one frame
        max_nesting: int = 8,  # tuples, sets and maps inside each other (each may hold
        # plain nesting up to ormsgpack's own limit, so this bounds the C stack too)
        max_int_bits: int = 65_536,
        max_text: int = 64 * 1024,  # the repr of a result that is not plain data
    ) -> None:
        self.max_bytes, self.max_nesting = max_bytes, max_nesting
        self.max_int_bits, self.max_text = max_int_bits, max_text


DEFAULT_LIMITS = Limits()


class Handle:
    """An object of the image, by its number in the current call's handle table."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        object.__setattr__(self, "number", number)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a handle cannot be changed")

    def __eq__(self, other: object) -> bool:
        return type(other) is Handle and other.number == self.number

    def __hash__(self) -> int:
        return hash((Handle, self.number))

    def __repr__(self) -> str:
        return f"<handle {self.number}>"


class Opaque:
    """A slot holding a kernel object that generated code cannot read."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        object.__setattr__(self, "type_name", type_name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("an opaque marker cannot be changed")

    def __eq__(self, other: object) -> bool:
        return type(other) is Opaque and other.type_name == self.type_name

    def __hash__(self) -> int:
        return hash((Opaque, self.type_name))

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


class ReprText(str):
    """The bounded repr of a result that is not plain data, made inside the cell."""

    __slots__ = ()


# -- encoding -------------------------------------------------------------------------
def encode(value: Any, fallback: Callable[[Any], Any] | None = None) -> bytes:
    """msgpack bytes for ``value``.

    ``fallback(obj)`` is asked for anything that is not plain data and returns
    its stand-in (a Handle, an Opaque, a ReprText, a plain copy ...) or raises
    WireError.
    """

    problems: list[WireError] = []

    def default(obj: Any) -> Any:
        try:
            return convert(obj)
        except WireError as exc:
            problems.append(exc)
            raise

    def convert(obj: Any) -> Any:
        kind = type(obj)
        if kind is int:
            return _bigint(obj)
        if kind is tuple:
            return ormsgpack.Ext(EXT_TUPLE, encode(list(obj), fallback))
        if kind is set or kind is frozenset:
            tag = EXT_SET if kind is set else EXT_FROZENSET
            return ormsgpack.Ext(tag, encode(_ordered(obj), fallback))
        if kind is _Pairs:
            return ormsgpack.Ext(EXT_PAIRS, encode(obj.items, fallback))
        if kind is Handle:
            return ormsgpack.Ext(EXT_HANDLE, HEADER.pack(obj.number))
        if kind is Opaque:
            return ormsgpack.Ext(EXT_OPAQUE, obj.type_name.encode("utf-8", "replace"))
        if kind is ReprText:
            return ormsgpack.Ext(EXT_REPR, str.encode(obj, "utf-8", "replace"))
        if fallback is not None:
            return fallback(obj)
        raise WireError(f"a {type_name(obj)} is not plain data")

    try:
        return ormsgpack.packb(value, default=default, option=_OPTIONS)
    except TypeError as exc:
        if problems:
            raise problems[0] from None
        if "key" not in str(exc):
            raise WireError(str(exc)) from None
    # A dict with keys other than strings somewhere: rebuild that part in Python.
    try:
        return ormsgpack.packb(_with_pairs(value), default=default, option=_OPTIONS)
    except TypeError as exc:
        raise (problems[0] if problems else WireError(str(exc))) from None


def _bigint(value: int) -> ormsgpack.Ext:
    length = (value.bit_length() + 8) // 8  # room for the sign bit
    return ormsgpack.Ext(EXT_BIGINT, value.to_bytes(length, "big", signed=True))


def _ordered(items: Any) -> list[Any]:
    try:
        return sorted(items)
    except TypeError:
        return list(items)


class _Pairs:
    """A dict whose keys are not all strings, encoded as a list of [key, value]."""

    __slots__ = ("items",)

    def __init__(self, items: list[list[Any]]) -> None:
        self.items = items


def prepare(value: Any) -> Any:
    """``value`` ready for :func:`encode` even where dicts have keys other than strings."""
    return _with_pairs(value)


def _with_pairs(value: Any, depth: int = 0) -> Any:
    if depth > 200:
        raise WireError("the value nests too deeply")
    kind = type(value)
    if kind is dict:
        if all(type(key) is str for key in value):
            return {key: _with_pairs(item, depth + 1) for key, item in value.items()}
        return _Pairs(
            [[_with_pairs(k, depth + 1), _with_pairs(v, depth + 1)] for k, v in value.items()]
        )
    if kind is list:
        return [_with_pairs(item, depth + 1) for item in value]
    if kind is tuple:
        return tuple(_with_pairs(item, depth + 1) for item in value)
    return value


# -- decoding -------------------------------------------------------------------------
class Decoder:
    """Decodes with one set of limits; reusable, for one thread at a time."""

    __slots__ = ("limits", "_depth", "_problem", "_hook")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._depth = 0
        self._problem: WireError | None = None
        self._hook = self._ext

    def __call__(self, data: bytes) -> Any:
        limits = self.limits
        if len(data) > limits.max_bytes:
            raise WireError(f"{len(data)} bytes; the limit is {limits.max_bytes}")
        self._depth, self._problem = 0, None
        try:
            return ormsgpack.unpackb(data, ext_hook=self._hook)
        except (ValueError, TypeError, RecursionError, MemoryError) as exc:
            if self._problem is not None:
                raise self._problem from None
            raise WireError(f"not valid plain data: {exc}") from None

    def _ext(self, tag: int, body: bytes) -> Any:
        try:
            return self._convert(tag, body)
        except WireError as exc:
            self._problem = self._problem or exc
            raise

    def _convert(self, tag: int, body: bytes) -> Any:
        limits = self.limits
        if tag == EXT_HANDLE:
            if len(body) != HEADER.size:
                raise WireError("a malformed handle")
            return Handle(HEADER.unpack(body)[0])
        if tag == EXT_BIGINT:
            if len(body) * 8 > limits.max_int_bits + 8:
                raise WireError(f"an integer wider than {limits.max_int_bits} bits")
            return int.from_bytes(body, "big", signed=True)
        if tag in (EXT_OPAQUE, EXT_REPR):
            if len(body) > limits.max_text:
                raise WireError(f"a text of {len(body)} bytes; the limit is {limits.max_text}")
            text = body.decode("utf-8", "replace")
            return Opaque(text) if tag == EXT_OPAQUE else ReprText(text)
        if tag not in (EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_PAIRS):
            raise WireError(f"unknown extension type {tag}")
        self._depth += 1
        try:
            if self._depth > limits.max_nesting:
                raise WireError(f"more than {limits.max_nesting} nested tuples, sets or maps")
            items = ormsgpack.unpackb(body, ext_hook=self._hook)
        finally:
            self._depth -= 1
        if type(items) is not list:
            raise WireError("a malformed container")
        if tag == EXT_TUPLE:
            return tuple(items)
        if tag == EXT_PAIRS:
            if not all(type(pair) is list and len(pair) == 2 for pair in items):
                raise WireError("a malformed map")
            _check_hashes([pair[0] for pair in items])
            return dict(items)
        _check_hashes(items)
        return set(items) if tag == EXT_SET else frozenset(items)


MAX_COLLISIONS = 64


def _check_hashes(keys: list[Any]) -> None:
    """Refuse members that are unhashable, or that share hashes to make hashing quadratic.

    Strings hash with a per-process key, but integers (equal modulo 2**61 - 1),
    floats and tuples of them collide at will; n colliding members cost n**2
    comparisons to put in a set. Counting distinct hashes costs one pass.
    """
    try:
        distinct = len(set(map(hash, keys)))
    except TypeError as exc:  # an unhashable key or member
        raise WireError(f"a malformed container: {exc}") from None
    if len(keys) - distinct > MAX_COLLISIONS:
        raise WireError(
            f"{len(keys) - distinct} members of a set or keys of a map share their hashes"
        )


_decoders: dict[int, Decoder] = {}


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The value ``data`` encodes, or WireError when it is malformed or over a limit."""
    decoder = _decoders.get(id(limits))
    if decoder is None or decoder.limits is not limits:
        decoder = _decoders[id(limits)] = Decoder(limits)
    return decoder(data)


def frame(payload: bytes) -> bytes:
    """The payload with its length prefix."""
    return HEADER.pack(len(payload)) + payload
