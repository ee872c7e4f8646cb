"""One method execution in one cell, as the kernel sees it: receiver, handles, snapshot.

A :class:`Frame` numbers the objects it hands to its cell (0 is the receiver;
others as they are given out, so a cell cannot name an object it was not
given), turns kernel values into plain data on the way in (objects become
handles, kernel objects opaque markers) and back on the way out, and builds
the snapshot of the receiver's visible slots, cached while the receiver's
chain is unchanged.
"""

from __future__ import annotations

import hashlib
import keyword
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from ..objects import RESERVED_SELECTORS, UvmObject, describe_briefly
from . import wire

if TYPE_CHECKING:
    from .invocation import Invocation

class Refused(Exception):
    """A request of generated code the kernel does not carry out; goes back as an exception."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def method_key(source: str) -> str:
    return "m" + hashlib.blake2b(source.encode("utf-8"), digest_size=12).hexdigest()


def check_slot_name(name: Any) -> str:
    """A name generated code may write: raises Refused otherwise."""
    if type(name) is not str or not name.isidentifier() or keyword.iskeyword(name):
        raise Refused("AttributeError", f"{name!r} is not a slot name")
    if name.startswith("_"):
        raise Refused("AttributeError", f"slot names starting with '_' belong to the kernel: {name!r}")
    if name == "parents":
        raise Refused("AttributeError", "parents are read-only to generated methods")
    if name in RESERVED_SELECTORS:
        raise Refused("AttributeError", f"{name!r} is an operation of every object, not a slot")
    if len(name) > 120:
        raise Refused("AttributeError", f"slot name of {len(name)} characters (at most 120)")
    return name


# Snapshots by the state of the receiver's chain: (id, oid, serial) of every object
# in it. Slot values stay the live objects (encoded at each call); what is kept
# is which names answer with which value and which method, until a chain object
# is written (then it is marked changed, and gets a new serial when committed).
_snapshots: OrderedDict[tuple[Any, ...], tuple[Any, ...]] = OrderedDict()
SNAPSHOTS_KEPT = 1024


def _chain_key(chain: list[UvmObject]) -> tuple[Any, ...] | None:
    key = []
    for obj in chain:
        if obj._p_oid is None or obj._p_changed:
            return None  # new or changed in this transaction: build it afresh
        key.append((id(obj), obj._p_oid, obj._p_serial))
    return tuple(key)


_SCALARS = (type(None), bool, int, float, str, bytes)
# What the kernel takes from a cell, whatever fits in a frame: a depth it can send
# back out (the encoder of dicts with other keys recurses in Python), and a number
# of items an invocation may hand over (each costs the event loop and memory).
MAX_VALUE_DEPTH = 100


class Frame:
    """One method execution in one cell: its receiver and its handle table."""

    def __init__(self, invocation: Invocation, receiver: UvmObject) -> None:
        self.invocation = invocation
        self.receiver = receiver
        self.objects: list[Any] = [receiver]
        self.numbers: dict[int, int] = {id(receiver): 0}
        self.sources: dict[str, str] = {}
        self.fresh_names: dict[int, str] = {}
        self.seen_version = invocation.version(receiver)

    # -- handles -------------------------------------------------------------------------
    def handle(self, obj: UvmObject) -> wire.Handle:
        number = self.numbers.get(id(obj))
        if number is None:
            number = self.numbers[id(obj)] = len(self.objects)
            self.objects.append(obj)
            self.fresh_names[number] = describe_briefly(obj)
        return wire.Handle(number)

    def resolve(self, value: Any) -> UvmObject:
        if type(value) is not wire.Handle:
            raise Refused("TypeError", "expected an object")
        if not 0 <= value.number < len(self.objects):
            raise Refused("LookupError", f"handle {value.number} was never given to this method")
        return self.objects[value.number]

    def names(self) -> dict[str, str]:
        """Labels of handles given out since the last message (for reprs in the cell)."""
        fresh, self.fresh_names = self.fresh_names, {}
        return {str(number): label for number, label in fresh.items()}

    # -- values ----------------------------------------------------------------------------
    def outward(self, obj: Any) -> Any:
        """Stand-in for what is not plain data, on its way into a cell (an encode fallback)."""
        if isinstance(obj, UvmObject):
            return self.handle(obj)
        kind = type(obj)
        if kind is PersistentMapping:
            return wire.prepare(dict(obj.data))
        if kind is PersistentList:
            return wire.prepare(list(obj.data))
        return wire.Opaque(wire.type_name(obj))

    def inward(self, value: Any, *, for_slot: bool) -> Any:
        """Plain data from a cell, with handles resolved; what a slot may not hold refused.

        Walks every item once, in place (decoded values are fresh), within the
        invocation's budget of items and a depth the kernel can send back out.
        """
        return self._inward(value, for_slot, 0)

    def _inward(self, value: Any, for_slot: bool, depth: int) -> Any:
        self.invocation.spend_items(1)
        kind = type(value)
        if kind in _SCALARS:
            return value
        if depth > MAX_VALUE_DEPTH:
            raise Refused("RecursionError", f"a value nested more than {MAX_VALUE_DEPTH} levels")
        if kind is wire.Handle:
            return self.resolve(value)
        if kind is wire.Opaque or kind is wire.ReprText:
            if for_slot:
                raise Refused("TypeError", f"cannot keep {value!r} in a slot: it is not plain data")
            return value
        if kind is list:
            for index, item in enumerate(value):
                inner = self._inward(item, for_slot, depth + 1)
                if inner is not item:
                    value[index] = inner
            return value
        if kind is dict:
            for key, item in value.items():
                self._key(key, depth + 1)
                inner = self._inward(item, for_slot, depth + 1)
                if inner is not item:
                    value[key] = inner  # an existing key: the dict keeps its size
            return value
        if kind is tuple:
            items = [self._inward(item, for_slot, depth + 1) for item in value]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else tuple(items)
        if kind is set or kind is frozenset:
            for item in value:
                self._key(item, depth + 1)
            return value
        raise Refused("TypeError", f"a {wire.type_name(value)} is not plain data")

    def _key(self, key: Any, depth: int) -> None:
        """Dict keys and set members: plain values only, no objects or kernel markers."""
        self.invocation.spend_items(1)
        kind = type(key)
        if kind in _SCALARS:
            return
        if depth > MAX_VALUE_DEPTH:
            raise Refused("RecursionError", f"a value nested more than {MAX_VALUE_DEPTH} levels")
        if kind is tuple or kind is frozenset:
            for item in key:
                self._key(item, depth + 1)
            return
        raise Refused(
            "TypeError", f"a {wire.type_name(key)} cannot be a dict key or a set member here"
        )

    # -- what the cell sees of its receiver ---------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        receiver = self.receiver
        chain = list(receiver.ancestors())
        overlaid = any(target == id(receiver) for target, _ in self.invocation.overlay)
        key = None if overlaid else _chain_key(chain)
        cached = _snapshots.get(key) if key is not None else None
        if cached is not None and all(
            ref() is obj for ref, obj in zip(cached[3], chain, strict=True)
        ):
            _snapshots.move_to_end(key)
            snapshot, sources, parents, _ = cached
            for parent in parents:  # the same handle numbers as when it was built
                self.handle(parent)
            self.sources.update(sources)
            return snapshot
        slots: dict[str, Any] = {}
        for owner in chain:
            for name in owner.slot_names():
                if name != "parents" and name not in slots:
                    slots[name] = owner._slots[name]
        # Methods are not listed: an object may hold thousands. The cell knows the
        # one it runs and asks for others by name (the kernel's lookup is cached).
        methods: dict[str, str] = {}
        for (target_id, selector), source in self.invocation.overlay.items():
            if target_id == id(receiver):
                methods[selector] = self.keep_source(source)
        own = [name for name in receiver.slot_names() if name != "parents"]
        parents = tuple(p for p in receiver._slots.get("parents") or () if isinstance(p, UvmObject))
        snapshot = {
            "label": describe_briefly(receiver),
            "slots": slots,
            "own": own,
            "parents": [self.handle(p) for p in parents],
            "methods": methods,
            "complete": False,
        }
        if key is not None:
            refs = tuple(weakref.ref(obj) for obj in chain)  # the very objects, not look-alikes
            _snapshots[key] = (snapshot, dict(self.sources), parents, refs)
            if len(_snapshots) > SNAPSHOTS_KEPT:
                _snapshots.popitem(last=False)
        return snapshot

    def keep_source(self, source: str) -> str:
        key = method_key(source)
        self.sources[key] = source
        return key

    def encode(self, message: dict[str, Any]) -> bytes:
        return wire.encode(message, self.outward)
