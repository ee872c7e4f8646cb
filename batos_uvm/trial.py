"""Verification by running: a candidate method's trial, in a cell like any real call.

The trial runs the candidate exactly as the kernel would run the installed
method (batos_uvm.cells): the same kind of cell, the same ``self`` proxy, the
receiver's real slots and parents, nested sends performed by the kernel. Each
call runs inside a savepoint of the cycle's transaction that is rolled back
afterwards, so every call sees the receiver as it is and nothing the trial
does is kept. No method can tell the trial from a real call.

It always runs the call the brief asked for (with its arguments, also when
there are none), then the model's examples; the verdict says which failed and
why, with the method's own traceback.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .cells.invocation import Invocation, MethodFailed, Refused, Services
from .cells.pool import CellFailure, CellPool, CellProtocolError, CellTimeout
from .objects import UvmObject, describe_briefly
from .reprs import safe_repr

__all__ = ["ExampleResult", "TrialResult", "run_trial", "same"]


@dataclass
class ExampleResult:
    """One call of the method: what went in, what was expected, what came out."""

    args: list
    kwargs: dict
    expect: object
    got: object
    ok: bool
    error: str | None
    has_expect: bool = True  # False: the call only had to return without raising
    requested: bool = False  # True: the call the brief asked for (always run)


@dataclass
class TrialResult:
    """The verdict of one trial."""

    ok: bool
    reason: str | None
    examples: list[ExampleResult]
    duration_s: float
    traceback: str | None
    stdout: str = ""  # what the method printed (bounded)
    protections: list[str] = field(default_factory=list)  # the cell layers that were active

    def to_record(self) -> dict:
        """Plain JSON-able data for the cycle's record."""
        record = asdict(self)
        record["examples"] = [
            {
                **asdict(e),
                "args": jsonable(e.args),
                "kwargs": jsonable(e.kwargs),
                "expect": jsonable(e.expect),
                "got": jsonable(e.got),
            }
            for e in self.examples
        ]
        return record


def jsonable(value: Any) -> Any:
    """Lists for tuples and sets, string keys, text for bytes and huge ints: what JSON carries.

    Objects of the image and anything else not plain become their safe repr.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):  # json refuses ints of more than 4300 digits
        return value if value.bit_length() <= 13_000 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return repr(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return safe_repr(value, 200, describe=_name)


def _name(value: Any) -> str | None:
    return describe_briefly(value) if isinstance(value, UvmObject) else None


def same(expect: Any, got: Any) -> bool:
    """Equality of plain data; floats with rel_tol=1e-9, abs_tol=1e-12; lists == tuples."""
    if isinstance(expect, bool) or isinstance(got, bool):
        return type(expect) is type(got) and expect == got
    if isinstance(expect, (int, float)) and isinstance(got, (int, float)):
        if isinstance(expect, float) or isinstance(got, float):
            return math.isclose(expect, got, rel_tol=1e-9, abs_tol=1e-12) or (
                math.isnan(expect) and math.isnan(got)
            )
        return expect == got
    sequences = (list, tuple)
    if isinstance(expect, sequences) and isinstance(got, sequences):
        return len(expect) == len(got) and all(same(a, b) for a, b in zip(expect, got, strict=True))
    if isinstance(expect, dict) and isinstance(got, dict):
        return expect.keys() == got.keys() and all(same(expect[k], got[k]) for k in expect)
    sets = (set, frozenset)
    if isinstance(got, sets) and isinstance(expect, (*sequences, *sets)):
        try:  # a JSON example can only spell a set as a list (and a tuple as a list)
            wanted = {_frozen(v) for v in expect}
            return len(wanted) == len(expect) and wanted == {_frozen(v) for v in got}
        except TypeError:
            return False
    return bool(expect == got)


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _brief(value: Any, limit: int = 120) -> str:
    return safe_repr(value, limit)


class _BadInput(ValueError):
    pass


def _examples(examples: list[dict] | None) -> list[dict] | None:
    if examples is None:
        return None
    if not isinstance(examples, list):
        raise _BadInput("examples must be a list")
    checked = []
    for number, example in enumerate(examples, 1):
        if not isinstance(example, dict) or set(example) - {"args", "kwargs", "expect"}:
            raise _BadInput(
                f"example {number} is malformed: expected a dict with 'args', 'kwargs' and 'expect'"
            )
        args, kwargs = example.get("args", []), example.get("kwargs", {})
        if (
            not isinstance(args, (list, tuple))
            or not isinstance(kwargs, dict)
            or not all(isinstance(k, str) for k in kwargs)
        ):
            raise _BadInput(
                f"example {number} is malformed: args must be a list and kwargs "
                "a dict with string keys"
            )
        checked.append(
            {
                "args": list(args),
                "kwargs": dict(kwargs),
                "has_expect": "expect" in example,
                "expect": example.get("expect"),
            }
        )
    return checked


async def run_trial(
    pool: CellPool,
    connection: Any,
    target: UvmObject,
    selector: str,
    source: str,
    examples: list[dict] | None,
    requested: dict[str, Any] | None,
    *,
    timeout: float,
    services: Services | None = None,
) -> TrialResult:
    """Run ``source`` as ``target``'s method ``selector``: the requested call, then examples.

    ``requested`` is the call that started the cycle ({"args": [...], "kwargs": {...}}).
    Every call runs in a savepoint of the connection's current transaction, with
    the candidate installed, and is rolled back. ``target`` must be an object of
    the image (stored, with a connection).
    """
    if target._p_jar is None:
        raise ValueError("a trial runs on an object of the image, not a transient one")
    started = time.perf_counter()
    try:
        checked = _examples(examples) or []
    except _BadInput as exc:
        return TrialResult(False, str(exc), [], 0.0, None)
    if requested is not None:
        checked.insert(0, {
            "args": list(requested.get("args", [])),
            "kwargs": dict(requested.get("kwargs", {})),
            "has_expect": False,
            "expect": None,
            "requested": True,
        })
    results: list[ExampleResult] = []
    reason = trace = None
    output: list[str] = []
    tm = connection.transaction_manager
    for number, example in enumerate(checked, 1):
        savepoint = tm.savepoint()
        invocation = Invocation(pool, timeout=timeout, services=services)
        got, error, failure_trace = None, None, None
        try:
            # Installed for the call, as it would be for real (its description, its
            # children and other objects see it), then rolled back with the rest.
            target.install_method(selector, source, author="trial", note="trial run")
            got = await invocation.call(target, selector, example["args"], example["kwargs"])
        except MethodFailed as exc:
            error, failure_trace = f"raised {exc}", exc.traceback or None
        except Refused as exc:
            error = f"raised {exc.kind}: {exc}"
        except CellTimeout:
            error = f"ran longer than the trial's time limit ({timeout:g} s)"
        except CellProtocolError as exc:
            error = f"its cell was stopped: {exc}"
        except CellFailure as exc:
            error = str(exc)
        finally:
            savepoint.rollback()
        if invocation.output:
            output.append(invocation.output)
        ok = error is None and (not example["has_expect"] or same(example["expect"], got))
        if not ok and error is None:
            error = f"expected {_brief(example['expect'])}, got {_brief(got)}"
        results.append(
            ExampleResult(
                example["args"], example["kwargs"], example["expect"], got, ok, error,
                example["has_expect"], example.get("requested", False),
            )
        )
        if not ok and reason is None:
            what = "the requested call" if example.get("requested") else f"example {number}"
            args = ", ".join([_brief(a, 60) for a in example["args"]]
                             + [f"{k}={_brief(v, 60)}" for k, v in example["kwargs"].items()])
            reason, trace = f"{what} {selector}({args}): {error}", failure_trace
    if not checked:
        reason = "nothing was run: no call was requested and the reply held no examples"
    return TrialResult(
        reason is None,
        reason,
        results,
        round(time.perf_counter() - started, 4),
        trace,
        stdout="".join(output)[:16 * 1024],
        protections=[k for k, v in pool.layers.items() if v.startswith("active")],
    )
