"""Verification by running: a generated method's trial in a separate, limited process.

The kernel never runs unverified code in its own process. :func:`run_trial`
starts ``python -I -S`` (isolated mode, no site-packages) in a fresh
temporary directory with a minimal environment, sends the job as JSON on
stdin and reads the outcome as JSON on stdout. The child (trial_runner.py)
enters a new network namespace when it can, sets resource limits and
installs an audit hook before any untrusted code runs; this side enforces
wall time (killing the whole process group) and the output bound, and
judges the examples itself, so a child that was subverted can at most lie
about what the method returned.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .trial_runner import pack, to_plain, unpack

__all__ = ["ExampleResult", "TrialLimits", "TrialResult", "run_trial", "run_trial_sync", "to_plain"]

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_BOOTSTRAP = (
    "import sys, types\n"
    "package = types.ModuleType('batos_uvm')\n"
    f"package.__path__ = [{_PACKAGE_DIR!r}]\n"
    "sys.modules['batos_uvm'] = package  # skip the package's __init__: import only the runner\n"
    "from batos_uvm import trial_runner\n"
    "trial_runner.main()\n"
)
_STDERR_TAIL = 4096
_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
}


@dataclass
class TrialLimits:
    """Limits of one trial process."""

    cpu_seconds: float = 2.0
    wall_seconds: float = 5.0
    memory_bytes: int = 256 * 2**20
    output_bytes: int = 64 * 1024


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
    requested: bool = False  # True: the call the user asked for (not a model's example)


@dataclass
class TrialResult:
    """The verdict of one trial."""

    ok: bool
    reason: str | None
    examples: list[ExampleResult]
    duration_s: float
    traceback: str | None
    stdout: str = ""  # what the method printed (bounded)
    protections: list[str] = field(default_factory=list)  # what the child managed to apply

    def to_record(self) -> dict:
        """Plain JSON-able data for the cycle's record."""
        record = asdict(self)
        record["examples"] = [
            {
                **asdict(e),
                "args": _jsonable(e.args),
                "kwargs": _jsonable(e.kwargs),
                "expect": _jsonable(e.expect),
                "got": _jsonable(e.got),
            }
            for e in self.examples
        ]
        return record


def _jsonable(value: Any) -> Any:
    """Lists for tuples and sets, string keys, text for bytes: what JSON can carry."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


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
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
                "args": to_plain(list(args)),
                "kwargs": to_plain(dict(kwargs)),
                "has_expect": "expect" in example,
                "expect": to_plain(example.get("expect")),
            }
        )
    return checked


async def run_trial(
    source: str,
    selector: str,
    slots: dict,
    examples: list[dict] | None = None,
    methods: dict[str, str] | None = None,
    limits: TrialLimits | None = None,
    *,
    restricted: bool = True,
) -> TrialResult:
    """Run ``source``'s method ``selector`` on a copy of ``slots`` in a limited child process.

    Each example runs against a fresh copy of the slots. Without examples the
    method is called once when it needs no argument besides self; otherwise
    the trial only checks that the source compiles and defines the function.
    ``restricted=False`` compiles with the full builtins: only for testing the
    process sandbox by itself (the kernel never passes it).
    """
    limits = limits or TrialLimits()
    started = time.perf_counter()

    def verdict(
        ok: bool,
        reason: str | None,
        results: list[ExampleResult] | None = None,
        trace: str | None = None,
        **extra: Any,
    ) -> TrialResult:
        return TrialResult(
            ok, reason, results or [], round(time.perf_counter() - started, 4), trace, **extra
        )

    try:
        checked = _examples(examples)
        job = {
            "source": source,
            "selector": selector,
            "restricted": restricted,
            "slots": pack(to_plain(dict(slots))),
            "methods": dict(methods or {}),
            "limits": asdict(limits),
            "examples": None
            if checked is None
            else [{"args": pack(e["args"]), "kwargs": pack(e["kwargs"])} for e in checked],
        }
    except _BadInput as exc:
        return verdict(False, str(exc))
    workdir = tempfile.mkdtemp(prefix="batos-trial-")
    try:
        outcome, failure = await _run_child(_encode(job), workdir, limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if failure is not None:
        return verdict(False, failure)
    try:
        return _interpret(outcome, checked, verdict)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        # only a subverted or broken child sends this: the verdict is a failure
        return verdict(False, f"trial produced a malformed outcome ({type(exc).__name__})")


def _interpret(outcome: dict, checked: list[dict] | None, verdict: Any) -> TrialResult:
    extra = {
        "stdout": str(outcome.get("stdout", "")),
        "protections": [str(p) for p in outcome.get("protections", [])],
    }
    if outcome.get("fatal"):
        return verdict(False, str(outcome["fatal"]), **extra)
    if outcome.get("refusal") and outcome.get("compile_error"):
        return verdict(False, str(outcome["refusal"]), None, outcome.get("traceback"), **extra)
    if outcome.get("compile_error"):
        return verdict(
            False,
            f"does not compile: {outcome['compile_error']}",
            None,
            outcome.get("traceback"),
            **extra,
        )
    results, reason, trace = _judge(checked, outcome, numbered=checked is not None)
    if outcome.get("refusal"):
        reason = str(outcome["refusal"])  # even when the method swallowed the refusal
    return verdict(reason is None, reason, results, trace, **extra)


def _judge(
    checked: list[dict] | None, outcome: dict, numbered: bool
) -> tuple[list[ExampleResult], str | None, str | None]:
    results: list[ExampleResult] = []
    reason = trace = None
    calls = outcome.get("examples") or []
    if checked is None:  # the no-argument call, when the method takes none
        checked = [{"args": [], "kwargs": {}, "expect": None, "has_expect": False}] if calls else []
    for number, (example, call) in enumerate(zip(checked, calls, strict=False), 1):
        got = unpack(call.get("got"))
        error = call.get("error")
        ok = error is None and (not example["has_expect"] or same(example["expect"], got))
        if not ok and error is None:
            error = f"expected {_brief(example['expect'])}, got {_brief(got)}"
        results.append(
            ExampleResult(
                example["args"],
                example["kwargs"],
                example["expect"],
                got,
                ok,
                error,
                example["has_expect"],
            )
        )
        if not ok and reason is None:
            prefix = f"example {number}: " if numbered else ""
            reason, trace = prefix + str(error), call.get("traceback")
    if reason is None and len(calls) < len(checked):
        reason = f"example {len(calls) + 1} did not run"
    return results, reason, trace


def _encode(job: dict) -> bytes:
    import json

    return json.dumps(job, ensure_ascii=True).encode("ascii")


async def _run_child(job: bytes, workdir: str, limits: TrialLimits) -> tuple[dict, str | None]:
    """Run the child; return its parsed outcome or a failure reason."""
    import json

    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C.UTF-8"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        _BOOTSTRAP,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=workdir,
        env=env,
        start_new_session=True,
    )  # its own process group: one kill reaches everything
    stderr_task = asyncio.ensure_future(_tail(proc.stderr))
    failure: str | None = None
    output = b""
    try:
        async with asyncio.timeout(limits.wall_seconds):
            await _feed(proc, job)
            output, overflow = await _read_bounded(proc.stdout, limits.output_bytes)
            if overflow:
                failure = f"output too large (more than {limits.output_bytes} bytes)"
            else:
                await proc.wait()
    except TimeoutError:
        failure = f"timeout after {float(limits.wall_seconds)} s wall time"
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            await proc.wait()
        stderr = await _finish(stderr_task)
    if failure is not None:
        return {}, failure
    code = proc.returncode
    if code is not None and code < 0:
        number = -code
        if number in _SIGNAL_REASONS:
            return {}, _SIGNAL_REASONS[number]
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        return {}, f"crashed with signal {number} ({name})"
    try:
        outcome = json.loads(output.decode("ascii"))
        if code != 0 or not isinstance(outcome, dict):
            raise ValueError("no outcome")
    except (ValueError, RecursionError):
        tail = stderr.decode("utf-8", "replace").strip()[-600:]
        return {}, f"trial runner failed (exit status {code}){': ' + tail if tail else ''}"
    return outcome, None


async def _feed(proc: asyncio.subprocess.Process, job: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(job)
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child died early; its exit status tells why


async def _read_bounded(stream: asyncio.StreamReader | None, limit: int) -> tuple[bytes, bool]:
    assert stream is not None
    data = bytearray()
    while chunk := await stream.read(65536):
        data += chunk
        if len(data) > limit:
            return bytes(data[:limit]), True
    return bytes(data), False


async def _tail(stream: asyncio.StreamReader | None) -> bytes:
    """Drain a stream, keeping only its end."""
    assert stream is not None
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-_STDERR_TAIL:]
    return kept


async def _finish(task: asyncio.Future) -> bytes:
    try:
        return await asyncio.wait_for(task, 1.0)
    except (TimeoutError, asyncio.CancelledError):
        return b""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_trial_sync(*args: Any, **kwargs: Any) -> TrialResult:
    """:func:`run_trial` for code without an event loop (tests, benchmarks)."""
    return asyncio.run(run_trial(*args, **kwargs))
