"""Turning the outcome of a send into the Reply a client gets, without running image code.

A method's result comes back from its cell as plain data (or the repr text the
cell made of it); a slot read returns whatever the image holds. Either way the
reply is built by exact type: plain data travels as msgpack, anything else as a
bounded, safe repr (batos_uvm/reprs.py). No ``__repr__`` of the image runs here.
"""

from __future__ import annotations

from typing import Any

from .cells.invocation import MethodFailed, Refused
from .cells.pool import CellTimeout
from .cells.wire import ReprText
from .cycle import CycleOutcome
from .objects import UvmObject, describe_briefly
from .protocol import ERR_CANCELLED, MAX_REPR_CHARS, Reply
from .reprs import safe_repr

Wire = tuple[Any, "str | None", "str | None"]  # (value, repr text, output)


class SendFailed(Exception):
    """A send whose method failed; ``kind`` is the reply's error kind."""

    def __init__(self, kind: str, reason: str, output: str | None = None) -> None:
        super().__init__(reason)
        self.kind, self.output = kind, output or None

    @classmethod
    def from_exception(cls, exc: Exception, output: str) -> SendFailed:
        if isinstance(exc, MethodFailed):
            return cls("method_raised", str(exc), output)
        if isinstance(exc, Refused):
            return cls("method_raised", f"{exc.kind}: {exc}", output)
        if isinstance(exc, CellTimeout):
            return cls("method_timeout", str(exc), output)
        return cls(getattr(exc, "kind", "cell_crashed"), f"the method's cell failed: {exc}", output)


def to_wire(value: Any, output: str | None = None) -> Wire:
    """(value, None, output) when it travels as msgpack, else (None, a safe repr, output)."""
    if type(value) is ReprText:  # a result that is not plain data, shown as the cell saw it
        return None, str.__str__(value)[:MAX_REPR_CHARS], output
    if _is_plain(value, 0):
        return value, None, output
    return None, safe_repr(value, MAX_REPR_CHARS, describe=_describe_object), output


def _is_plain(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind is int:
        return -(2**63) <= value < 2**64  # what msgpack carries
    if kind in (type(None), bool, float, str, bytes):
        return True
    if depth > 64:
        return False
    if kind is list:
        return all(_is_plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _describe_object(value: Any) -> str | None:
    return describe_briefly(value) if isinstance(value, UvmObject) else None


def completed(wire: Wire, outcome: CycleOutcome | None) -> Reply:
    value, text, output = wire
    return Reply(
        status="COMPLETE",
        result=value,
        result_repr=text,
        cycle_id=outcome.cycle_id if outcome else None,
        replayed=outcome.replayed if outcome else False,
        output=output,
    )


def cycle_failed(outcome: CycleOutcome) -> Reply:
    return Reply.failed(
        ERR_CANCELLED if outcome.status == "CANCELLED" else "cycle_failed",
        outcome.reason or "the cognitive cycle failed",
        cycle_id=outcome.cycle_id,
        replayed=outcome.replayed,
    )
