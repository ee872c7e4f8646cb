"""The state of the call a cell is serving: snapshot, diff, handles, requests.

A :class:`Call` answers what ``self`` does (reads from the snapshot, writes into
a diff of the receiver's own slots, operations such as ``clone``), turns handles
into references and back, and asks the kernel for everything else, sending the
pending diff first so the kernel sees what the method has written so far.
"""

from __future__ import annotations

from . import wire
from .proxy import ObjectRef, Receiver, RemoteMethod, number_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .runtime import Cell

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
class Call:
    """The state of the call a cell is serving: snapshot, diff, handles, requests."""

    def __init__(self, cell: Cell, message: dict[str, Any]) -> None:
        self.cell = cell
        self.call_id = message.get("id")
        self.receiver = Receiver(self)
        target = message["self"]
        self.label: str = target["label"]
        self.slots: dict[str, Any] = target["slots"]
        self.own: set[str] = set(target["own"])
        self.parents: tuple[Any, ...] = tuple(target["parents"])
        self.methods: dict[str, str] = dict(target.get("methods", {}))
        self.methods.setdefault(message["selector"], message["key"])  # recursion needs no request
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
        self.methods.update(target.get("methods", {}))  # what was looked up stays known
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
        value = answer["value"]
        if type(value) is wire.Opaque:
            raise AttributeError(
                f"slot {name!r} of {self.names.get(number, 'that object')} holds a "
                f"{value.type_name}, which generated methods cannot read"
            )
        return value

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
        message = {"op": "request", "call": self.call_id, "kind": kind, "diff": self.flush(),
                   **fields}
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
            return wire.Handle(number_of(value))
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
        return wire.Handle(number_of(obj))
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
