"""Inside a cell: its channel to the kernel, and serving one call after another.

A call arrives as plain data: the receiver's visible slots (a snapshot), the
method's source, the arguments. The cell compiles the source (cached), runs it
with ``self`` as a proxy (batos_uvm.cells.proxy and .call), captures what it
prints, and answers the value, the diff of the receiver's own slots and the
output. Nothing here is trusted with more than the cell itself: whatever
generated code does, the kernel checks what it receives.
"""

from __future__ import annotations

import sys
import traceback
import types
from collections import OrderedDict

from . import wire
from .call import Call
from .proxy import calls as _calls

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

OUTPUT_CHARS = 16 * 1024  # printed text kept per call
MEMORY_LIMIT = "the cell's memory limit"  # the runner names it in MiB
REPR_CHARS = 4096  # the repr of a result that is not plain data
COMPILED_METHODS = 512  # compiled sources kept per cell (least recently used go first)
TRACEBACK_CHARS = 4000


class Channel:
    """Blocking, framed messages on the cell's end of its socket pair."""

    def __init__(self, fd: int) -> None:
        import os

        self.fd = fd
        self._read = os.read
        self._write = os.write

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(wire.encode(message))

    def send_bytes(self, payload: bytes) -> None:
        data = wire.frame(payload)
        view = memoryview(data)
        while view:
            view = view[self._write(self.fd, view) :]

    def receive(self) -> dict[str, Any] | None:
        header = self._exactly(wire.HEADER.size)
        if header is None:
            return None
        (length,) = wire.HEADER.unpack(header)
        payload = self._exactly(length)
        if payload is None:
            return None
        return wire.decode(payload, _TRUSTED)

    def _exactly(self, size: int) -> bytes | None:
        parts, missing = [], size
        while missing:
            chunk = self._read(self.fd, min(missing, 1 << 20))
            if not chunk:
                return None
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)


# What the kernel sends is trusted; only its size is bounded by what it chose to send.
_TRUSTED = wire.Limits(max_bytes=1 << 31, max_nesting=10_000, max_int_bits=1 << 40)


class Capture:
    """Bounded stand-in for stdout and stderr while a method runs."""

    def __init__(self, limit: int = OUTPUT_CHARS) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0
        self.limit = limit

    def write(self, text: Any) -> int:
        text = str(text)
        room = self.limit - self.size
        if room > 0:
            kept = text[:room]
            self.parts.append(kept)
            self.size += len(kept)
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n... ({self.dropped} more characters not kept)"
        return text


class Cell:
    """Serves calls one at a time: compile (cached), run, report value, diff and output."""

    def __init__(self, channel: Channel, compile_method: Callable[..., types.FunctionType]):
        self.channel = channel
        self.compile = compile_method
        self.sources: dict[str, str] = {}  # key -> source, for methods this cell knows
        self.compiled: OrderedDict[str, types.FunctionType] = OrderedDict()
        self.calls = 0
        self.last_value: Any = None
        self.max_frame = 1 << 31  # what the kernel accepts (the runner sets it)

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.channel.send(message)
        reply = self.channel.receive()
        if reply is None:
            raise SystemExit(0)  # the kernel went away
        if reply.get("op") != "reply":
            raise SystemExit(f"cell protocol: expected a reply, got {reply.get('op')!r}")
        return reply

    def function(self, key: str, selector: str) -> types.FunctionType | None:
        function = self.compiled.get(key)
        if function is not None:
            self.compiled.move_to_end(key)
            return function
        source = self.sources.get(key)
        if source is None:
            return None
        filename = f"<method {selector}>"
        import linecache

        linecache.cache[filename] = (0, None, source.splitlines(True), filename)
        function = self.compile(source, selector, filename)
        self.compiled[key] = function
        if len(self.compiled) > COMPILED_METHODS:
            self.compiled.popitem(last=False)
        return function

    def bound_method(self, call: Call, selector: str) -> Any:
        """``self.selector`` where the selector names a method: run here, or ask the kernel."""
        key = call.methods[selector]
        if key.startswith("primitive:"):
            def primitive(*args: Any, **kwargs: Any) -> Any:
                return call.request(
                    "send",
                    target=wire.Handle(0),
                    selector=selector,
                    args=call.delocalize(list(args)),
                    kwargs=call.delocalize(dict(kwargs)),
                )

            return primitive
        function = self.function(key, selector)
        if function is None:
            answer = call.request("source", key=key, selector=selector)
            self.sources[key] = str(answer)
            function = self.function(key, selector)
        return types.MethodType(function, call.receiver)

    def serve(self, message: dict[str, Any]) -> dict[str, Any]:
        """Run one call; every outcome becomes the reply's fields."""
        self.calls += 1
        selector, key = message["selector"], message["key"]
        if message.get("source") is not None:
            self.sources[key] = message["source"]
        call = Call(self, message)
        capture = Capture()
        real = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = capture  # type: ignore[assignment]
        _calls.append(call)
        outcome: dict[str, Any]
        try:
            function = self.function(key, selector)
            if function is None:
                return {"op": "need_source", "key": key}
            args, kwargs = call.localize(message["args"]), call.localize(message["kwargs"])
            value = function(call.receiver, *args, **kwargs)
            self.last_value = value  # for its repr, if it turns out not to be plain data
            outcome = {"value": call.delocalize(value)}
        except MemoryError:
            outcome = {"error": _error(MemoryError(f"{MEMORY_LIMIT} was exceeded")), "retire": True}
        except BaseException as exc:  # noqa: BLE001 - any failure of generated code is a result
            if isinstance(exc, SystemExit) and not isinstance(exc.code, (int, type(None))):
                raise  # the protocol broke: end the cell
            outcome = {"error": _error(exc)}
        finally:
            _calls.pop()
            sys.stdout, sys.stderr = real
        try:
            outcome["diff"] = call.diff() if "error" not in outcome else {"set": {}, "delete": []}
        except TypeError as exc:  # a container read and filled with something not plain
            outcome = {"error": _error(exc)}
        outcome.update(op="done", output=capture.text())
        return outcome

    def answer(self, outcome: dict[str, Any]) -> None:
        """Send the outcome; a value that is not plain data goes as its repr.

        An outcome larger than the kernel accepts becomes an error the method's
        author can act on, instead of a frame the kernel would refuse.
        """
        try:
            try:
                payload = wire.encode(outcome)
            except wire.WireError:
                if "value" not in outcome:
                    raise
                outcome["value"] = repr_of(self.last_value)
                payload = wire.encode(outcome)
            if len(payload) > self.max_frame:
                error = MemoryError(
                    f"the method's result and changes take {len(payload)} bytes; a call may "
                    f"hand the kernel at most {self.max_frame}"
                )
                payload = wire.encode({"op": "done", "id": outcome.get("id"),
                                       "error": _error(error), "output": outcome.get("output", ""),
                                       "diff": {"set": {}, "delete": []}})
            self.channel.send_bytes(payload)
        finally:
            self.last_value = None


def repr_of(value: Any) -> wire.ReprText:
    """The bounded repr of a result that is not plain data, made here in the cell."""
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken __repr__ is still an answer
        text = f"<unrepresentable {wire.type_name(value)}: {type(exc).__name__}>"
    if len(text) > REPR_CHARS:
        text = text[: REPR_CHARS - 3] + "..."
    return wire.ReprText(text)


def _error(exc: BaseException) -> dict[str, str]:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<")]
    text = "".join(traceback.format_list(frames)) + "".join(
        traceback.format_exception_only(type(exc), exc)
    )
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = "<unprintable message>"
    return {
        "type": type(exc).__name__,
        "message": message[:2000],
        "traceback": ("Traceback (most recent call last):\n" + text)[-TRACEBACK_CHARS:],
    }
