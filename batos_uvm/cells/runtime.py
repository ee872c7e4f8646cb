"""Inside a cell: what generated code sees as ``self``, other objects and kernel services.

A call arrives as plain data: the receiver's visible slots (a snapshot), the
method's source, the arguments. ``self`` is a :class:`Receiver`: reads come
from the snapshot, writes are recorded and go back to the kernel as a diff of
the receiver's own slots, ``parents`` is read-only. Other objects are
:class:`ObjectRef` handles: reading their slots and calling their methods are
messages to the kernel, which performs them as ordinary sends. ``batos`` (a
builtin of every method) offers the kernel services: ``batos.search``,
``batos.ask`` and ``batos.now``.

Nothing here is trusted with more than the cell itself: whatever generated
code does to these objects, the kernel checks the diff it receives.
"""

from __future__ import annotations

import sys
import time
import traceback
import types
from collections import OrderedDict

from . import wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

OUTPUT_CHARS = 16 * 1024  # printed text kept per call
MEMORY_LIMIT = "the cell's memory limit"  # the runner names it in MiB
REPR_CHARS = 4096  # the repr of a result that is not plain data
COMPILED_METHODS = 512  # compiled sources kept per cell (least recently used go first)
TRACEBACK_CHARS = 4000

#: Operations every UvmObject answers, as generated code may use them on self.
SELF_OPERATIONS = frozenset({"clone", "send", "responds_to", "slot_names", "describe"})
#: Operations of a UvmObject that generated code may not use.
KERNEL_OPERATIONS = frozenset(
    "ancestors lookup methods method_history method_source install_method install_primitive "
    "revert_method remove_method".split()
)


class KernelRefusal(Exception):
    """The kernel refused a request of this method; the message says why."""


# -- talking to the kernel ----------------------------------------------------------------
class Channel:
    """Blocking, framed messages on the cell's end of its socket pair."""

    def __init__(self, fd: int) -> None:
        import os

        self.fd = fd
        self._read = os.read
        self._write = os.write

    def send(self, message: dict[str, Any]) -> None:
        data = wire.frame(wire.encode(message))
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


# -- the objects generated code holds -----------------------------------------------------
_MISSING = object()


class Receiver:
    """``self`` inside a cell. See the module docstring."""

    __slots__ = ("__call",)

    def __init__(self, call: Call) -> None:
        object.__setattr__(self, "_Receiver__call", call)

    def __getattr__(self, name: str) -> Any:
        call: Call = object.__getattribute__(self, "_Receiver__call")
        return call.read(name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__getattribute__(self, "_Receiver__call").write(name, value)

    def __delattr__(self, name: str) -> None:
        object.__getattribute__(self, "_Receiver__call").delete(name)

    def __repr__(self) -> str:
        return f"<{object.__getattribute__(self, '_Receiver__call').label}>"

    def __dir__(self) -> list[str]:
        return sorted(object.__getattribute__(self, "_Receiver__call").visible())


class ObjectRef:
    """Another object of the image: its slots and methods are reached by messages."""

    __slots__ = ("__call", "__number")

    def __init__(self, call: Call, number: int) -> None:
        object.__setattr__(self, "_ObjectRef__call", call)
        object.__setattr__(self, "_ObjectRef__number", number)

    def __getattr__(self, name: str) -> Any:
        call: Call = object.__getattribute__(self, "_ObjectRef__call")
        return call.remote_get(object.__getattribute__(self, "_ObjectRef__number"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"cannot set {name!r} on {self!r}: a method changes only its own receiver; "
            "send the other object a message instead"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete {name!r} of {self!r}: a method changes only self")

    def __eq__(self, other: object) -> bool:
        return type(other) is ObjectRef and _number(other) == _number(self)

    def __hash__(self) -> int:
        return hash((ObjectRef, _number(self)))

    def __repr__(self) -> str:
        call: Call = object.__getattribute__(self, "_ObjectRef__call")
        return f"<{call.names.get(_number(self), 'UvmObject')}>"


def _number(ref: ObjectRef) -> int:
    return object.__getattribute__(ref, "_ObjectRef__number")


class RemoteMethod:
    """A method of another object; calling it is a send performed by the kernel."""

    __slots__ = ("__call", "__number", "__selector")

    def __init__(self, call: Call, number: int, selector: str) -> None:
        object.__setattr__(self, "_RemoteMethod__call", call)
        object.__setattr__(self, "_RemoteMethod__number", number)
        object.__setattr__(self, "_RemoteMethod__selector", selector)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a method cannot be changed")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        get = object.__getattribute__
        return get(self, "_RemoteMethod__call").remote_send(
            get(self, "_RemoteMethod__number"), get(self, "_RemoteMethod__selector"), args, kwargs
        )

    def __repr__(self) -> str:
        return f"<method {object.__getattribute__(self, '_RemoteMethod__selector')}>"


class Services:
    """The kernel services generated code may use, as the builtin ``batos``."""

    __slots__ = ()

    def search(self, query: str, top_k: int = 5) -> list[dict[str, Any]]:
        """Search the knowledge catalog: a list of {"doc_id", "text", "score"}."""
        return _active().service("search", [str(query), int(top_k)])

    def ask(self, persona: str, prompt: str) -> str:
        """Ask a persona (ALFRED, BRICK, ROBIN or BABS) and return its answer."""
        return _active().service("ask", [str(persona), str(prompt)])

    def now(self) -> float:
        """The kernel's clock: seconds since the epoch."""
        return time.time()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("batos is read-only")

    def __repr__(self) -> str:
        return "<BAT OS kernel services: search(query, top_k), ask(persona, prompt), now()>"


SERVICES = Services()
_calls: list[Call] = []  # the call being served (one at a time per cell)


def _active() -> Call:
    if not _calls:
        raise RuntimeError("kernel services are available only while a method runs")
    return _calls[-1]


# -- one call -----------------------------------------------------------------------------
class Call:
    """The state of the call a cell is serving: snapshot, diff, handles, requests."""

    def __init__(self, cell: Cell, message: dict[str, Any]) -> None:
        self.cell = cell
        self.receiver = Receiver(self)
        target = message["self"]
        self.label: str = target["label"]
        self.slots: dict[str, Any] = target["slots"]
        self.own: set[str] = set(target["own"])
        self.parents: tuple[Any, ...] = tuple(target["parents"])
        self.methods: dict[str, str] = dict(target.get("methods", {}))
        self.methods_complete: bool = bool(target.get("complete", True))
        self.looked_up: set[str] = set()
        self.names: dict[int, str] = {}
        self.learn_names(message.get("names"))
        self.written: dict[str, Any] = {}
        self.deleted: set[str] = set()
        self.read_before: dict[str, bytes] = {}  # containers read: their encoding when first read
        self.refs: dict[int, ObjectRef] = {}

    def learn_names(self, names: Any) -> None:
        for number, label in (names or {}).items():
            self.names[int(number)] = str(label)

    # -- self ----------------------------------------------------------------------------
    def visible(self) -> set[str]:
        return (set(self.slots) | set(self.written)) - self.deleted

    def read(self, name: str) -> Any:
        if name in self.written:
            return self.written[name]
        if name.startswith("_"):
            raise AttributeError(f"{self.label} has no attribute {name!r}")
        if name not in self.deleted and name in self.slots:
            value = self.slots[name]
            if type(value) is wire.Opaque:
                raise AttributeError(
                    f"slot {name!r} of {self.label} holds a {value.type_name}, "
                    "which generated methods cannot read"
                )
            value = self.localize(value)
            if type(value) in (list, dict, set, bytearray) and name not in self.read_before:
                self.read_before[name] = _encoding(value)
                self.slots[name] = value  # later reads see the same (maybe mutated) object
            return value
        if name == "parents":
            return tuple(self.localize(p) for p in self.parents)
        if name in SELF_OPERATIONS:
            return getattr(self, "op_" + name)
        if name in KERNEL_OPERATIONS:
            raise AttributeError(f"{name!r} is an operation of the kernel, not of methods")
        if self.has_method(name):
            return self.cell.bound_method(self, name)
        raise AttributeError(f"{self.label} has no slot or method {name!r}")

    def has_method(self, name: str) -> bool:
        if name in self.methods:
            return True
        if self.methods_complete or name in self.looked_up:
            return False
        self.looked_up.add(name)  # too many methods to send them all: ask for this one
        key = self.request("lookup", name=name).get("key")
        if key:
            self.methods[name] = key
        return bool(key)

    def write(self, name: str, value: Any) -> None:
        if name == "_p_changed":
            return  # the kernel records changes itself; older methods still say so
        _check_slot_name(name, self.label)
        _encoding(value)  # refuse what cannot be stored, on the line that tried
        self.written[name] = value
        self.deleted.discard(name)

    def delete(self, name: str) -> None:
        _check_slot_name(name, self.label)
        if name in self.written:
            del self.written[name]
            if name not in self.own:
                return
        elif name not in self.own or name in self.deleted:
            raise AttributeError(f"{self.label} has no slot {name!r} of its own to delete")
        self.deleted.add(name)

    def mutated(self) -> dict[str, Any]:
        """Containers read from slots and changed in place since (they count as written)."""
        return {
            name: self.slots[name]
            for name, before in self.read_before.items()
            if name not in self.written
            and name not in self.deleted
            and _encoding(self.slots[name]) != before
        }

    def diff(self) -> dict[str, Any]:
        """The receiver's changed own slots."""
        changed = {**self.mutated(), **self.written}
        return {"set": {k: self.delocalize(v) for k, v in changed.items()},
                "delete": sorted(self.deleted)}

    def flush(self) -> dict[str, Any]:
        """The diff so far, now applied by the kernel: start a new one."""
        diff = self.diff()
        for name, value in diff["set"].items():
            self.slots[name] = self.written.get(name, self.slots.get(name, value))
            self.own.add(name)
        for name in self.deleted:
            self.slots.pop(name, None)
            self.own.discard(name)
        self.written.clear()
        self.deleted.clear()
        self.read_before = {name: _encoding(self.slots[name]) for name in self.read_before
                            if name in self.slots}
        return diff

    def refresh(self, target: dict[str, Any]) -> None:
        """The kernel's new snapshot of self after another method changed it."""
        self.slots = target["slots"]
        self.own = set(target["own"])
        self.parents = tuple(target["parents"])
        self.methods = dict(target.get("methods", self.methods))
        self.methods_complete = bool(target.get("complete", True))
        self.read_before = {}

    # -- operations on self --------------------------------------------------------------
    def op_clone(self, **slots: Any) -> ObjectRef:
        for name in slots:
            _check_slot_name(name, "a clone")
        return self.request("clone", slots=self.delocalize(slots))

    def op_send(self, selector: str, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(selector, str) or selector.startswith("_"):
            raise AttributeError(f"{self.label} does not understand {selector!r}")
        target = self.read(selector)
        if args or kwargs or callable(target):
            return target(*args, **kwargs)
        return target

    def op_responds_to(self, selector: str) -> bool:
        if not isinstance(selector, str) or selector.startswith("_"):
            return False
        return (
            selector in self.visible()
            or selector in SELF_OPERATIONS
            or selector == "parents"
            or self.has_method(selector)
        )

    def op_slot_names(self) -> list[str]:
        return sorted((self.own | set(self.written) | set(self.mutated())) - self.deleted)

    def op_describe(self) -> Any:
        return self.request("describe", target=wire.Handle(0))

    # -- other objects -------------------------------------------------------------------
    def remote_get(self, number: int, name: str) -> Any:
        if not isinstance(name, str) or name.startswith("_"):
            raise AttributeError(f"attribute {name!r} is not allowed")
        if number == 0:
            return self.read(name)
        answer = self.request("get", target=wire.Handle(number), name=name)
        if isinstance(answer, dict) and answer.get("method"):
            return RemoteMethod(self, number, name)
        return answer["value"]

    def remote_send(self, number: int, selector: str, args: Any, kwargs: Any) -> Any:
        if number == 0:
            return self.op_send(selector, *args, **kwargs)
        return self.request(
            "send",
            target=wire.Handle(number),
            selector=selector,
            args=self.delocalize(list(args)),
            kwargs=self.delocalize(dict(kwargs)),
        )

    def service(self, name: str, args: list[Any]) -> Any:
        return self.request("service", name=name, args=args)

    def request(self, kind: str, **fields: Any) -> Any:
        """Ask the kernel; our pending changes go first, so it sees what we see."""
        message = {"op": "request", "kind": kind, "diff": self.flush(), **fields}
        reply = self.cell.ask(message)
        self.learn_names(reply.get("names"))
        if "self" in reply:
            self.refresh(reply["self"])
        if "error" in reply:
            raise _refusal(reply["error"])
        return self.localize(reply.get("value"))

    # -- handles <-> references ----------------------------------------------------------
    def localize(self, value: Any) -> Any:
        """Plain data from the kernel, with handles turned into references."""
        kind = type(value)
        if kind is wire.Handle:
            if value.number == 0:
                return self.receiver
            ref = self.refs.get(value.number)
            if ref is None:
                ref = self.refs[value.number] = ObjectRef(self, value.number)
            return ref
        if kind is list:
            return [self.localize(v) for v in value] if _has_handles(value) else value
        if kind is dict:
            if not _has_handles(value):
                return value
            return {k: self.localize(v) for k, v in value.items()}
        if kind is tuple and _has_handles(value):
            return tuple(self.localize(v) for v in value)
        return value

    def delocalize(self, value: Any) -> Any:
        """References back to handles, for the kernel."""
        kind = type(value)
        if kind is ObjectRef:
            return wire.Handle(_number(value))
        if kind is Receiver:
            return wire.Handle(0)
        if kind is list:
            return [self.delocalize(v) for v in value]
        if kind is dict:
            return {k: self.delocalize(v) for k, v in value.items()}
        if kind is tuple:
            return tuple(self.delocalize(v) for v in value)
        return value


def _has_handles(value: Any) -> bool:
    kind = type(value)
    if kind is wire.Handle:
        return True
    if kind is list or kind is tuple:
        return any(_has_handles(v) for v in value)
    if kind is dict:
        return any(_has_handles(v) for v in value.values())
    return False


def _check_slot_name(name: Any, label: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise AttributeError(f"{name!r} is not a slot name")
    if name.startswith("_"):
        raise AttributeError(f"slot names starting with '_' belong to the kernel ({name!r})")
    if name == "parents":
        raise AttributeError(f"parents of {label} are read-only to generated methods")
    if name in SELF_OPERATIONS or name in KERNEL_OPERATIONS:
        raise AttributeError(f"{name!r} is an operation of every object, not a slot")


def _encoding(value: Any) -> bytes:
    """The wire form of a value generated code wants to keep: plain data or refused."""
    try:
        return wire.encode(value, _refs_only)
    except wire.WireError as exc:
        raise TypeError(f"cannot keep this value in a slot: {exc}") from None


def _refs_only(obj: Any) -> Any:
    kind = type(obj)
    if kind is ObjectRef:
        return wire.Handle(_number(obj))
    if kind is Receiver:
        return wire.Handle(0)
    raise wire.WireError(
        f"a {wire.type_name(obj)} is not plain data (use None, bool, int, float, str, "
        "bytes, list, tuple, set, dict or another object)"
    )


def _refusal(error: Any) -> BaseException:
    if isinstance(error, dict):
        kind, message = error.get("type", "KernelRefusal"), str(error.get("message", ""))
    else:
        kind, message = "KernelRefusal", str(error)
    exception = _BUILTIN_ERRORS.get(kind, KernelRefusal)
    return exception(message)


_BUILTIN_ERRORS = {
    name: getattr(__import__("builtins"), name)
    for name in (
        "AttributeError TypeError ValueError KeyError IndexError ZeroDivisionError "
        "RuntimeError RecursionError LookupError ArithmeticError OverflowError "
        "NotImplementedError AssertionError UnicodeError"
    ).split()
}


# -- the cell ------------------------------------------------------------------------------
class Cell:
    """Serves calls one at a time: compile (cached), run, report value, diff and output."""

    def __init__(self, channel: Channel, compile_method: Callable[..., types.FunctionType]):
        self.channel = channel
        self.compile = compile_method
        self.sources: dict[str, str] = {}  # key -> source, for methods this cell knows
        self.compiled: OrderedDict[str, types.FunctionType] = OrderedDict()
        self.calls = 0

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
            outcome = {"value": _result(call, value)}
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


def _result(call: Call, value: Any) -> Any:
    """The return value as plain data; anything else as its bounded repr."""
    value = call.delocalize(value)
    try:
        wire.encode(value)
        return value
    except wire.WireError:
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
