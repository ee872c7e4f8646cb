"""UvmObject: the persistent, prototype-based particle of the living image.

An object is a bag of *slots* (ordinary attributes in its own persistent state,
so one object is one database record) plus *methods* stored as source text.
What an object does not hold itself it finds in its ``parents``, searched in
order, depth first, each ancestor once.

How reads stay cheap
    ``Persistent``'s attribute hook runs on every read and costs about three
    times a plain read once a class defines ``__getattr__``. UvmObject reads
    straight from the instance dict (``object.__getattribute__``); a ghost has
    an empty dict, so its first read misses and ``__getattr__`` activates it.
    Where a name was found in the delegation chain is cached per object (the
    volatile ``_v_lookup``), and values found in an ancestor (immutable
    values, persistent objects, bound methods) are also copied into the
    reader's dict for plain reads: never pickled, dropped when an object they
    depend on changes (``batos_uvm.delegation``). ``send`` and ``lookup`` of a
    cached name cost a dict lookup, and tell ZODB's cache the receiver was
    used, so objects in use are not the first it evicts.

Methods
    Each installed method keeps every version (source, author, time, cycle id),
    each in a record of its own outside the object (``batos_uvm.method_store``).
    Generated methods never run in the process holding the image: calling one
    runs it in a *cell*, a sandboxed worker process (``batos_uvm.cells``), and
    only its changes to the receiver's own slots come back. Kernel behaviour
    (``doesNotUnderstand``, ``search`` ...) is a method record written by the
    kernel naming a primitive of ``batos_uvm.primitives``.
"""

from __future__ import annotations

import keyword
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, NamedTuple

from persistent import GHOST, Persistent

from . import primitives
from .delegation import forget, remember
from .method_store import MethodTable, with_version
from .reprs import safe_repr

__all__ = [
    "MethodRecord",
    "SelectorNotUnderstood",
    "UvmObject",
    "check_selector",
    "format_oid",
    "parse_oid",
]

_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset)


class SelectorNotUnderstood(AttributeError):
    """No object in the receiver's delegation chain answers the selector."""

    def __init__(self, receiver: Any, selector: str) -> None:
        self.selector = selector
        self.receiver = receiver
        super().__init__(
            f"{describe_briefly(receiver)} does not understand {selector!r}: "
            "no slot or method in it or its ancestors"
        )


class MethodRecord(NamedTuple):
    """One version of one method. Immutable; pickled in a record of its own."""

    selector: str
    version: int
    source: str | None  # Python source, or None for a primitive
    primitive: str | None  # name in the primitive registry, or None
    created: float
    author: str  # persona name, "architect" or "kernel"
    cycle_id: str | None
    note: str = ""

    @property
    def kind(self) -> str:
        return "primitive" if self.primitive else "source"


def check_selector(selector: Any) -> str:
    """Return the selector or raise ValueError saying why it cannot name a method."""
    if not isinstance(selector, str) or not selector:
        raise ValueError(f"selector must be a non-empty string, not {selector!r}")
    if not selector.isidentifier():
        raise ValueError(f"selector {selector!r} is not a Python identifier")
    if keyword.iskeyword(selector) or keyword.issoftkeyword(selector):
        raise ValueError(f"selector {selector!r} is a Python keyword")
    if selector.startswith("_"):
        raise ValueError(f"selector {selector!r} starts with '_' (reserved for the system)")
    if len(selector) > 120:
        raise ValueError(f"selector is {len(selector)} characters long (at most 120)")
    return selector


def format_oid(oid: bytes | None) -> str:
    return "transient" if oid is None else hex(int.from_bytes(oid, "big"))


def parse_oid(text: str) -> bytes:
    """Accept ``0x1f`` or ``31``; raise ValueError otherwise."""
    text = text.strip()
    value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    if not 0 <= value < 2**64:
        raise ValueError(f"oid {text!r} is out of range")
    return value.to_bytes(8, "big")


def describe_briefly(obj: Any) -> str:
    if isinstance(obj, UvmObject):
        try:
            label = _activate(obj).get("_label")  # a ghost has no state until activated
        except Exception:  # a record that cannot be loaded still gets a name
            label = None
        named = f" {label!r}" if label else ""
        return f"UvmObject oid={format_oid(obj._p_oid)}{named}"
    return repr(obj)


# --- what belongs to the kernel --------------------------------------------------
def kernel_owned(obj: Any) -> bool:
    """Whether ``obj`` is part of the kernel's machinery (sealed at its incarnation).

    Generated methods are neither grown on such objects nor allowed to change
    them: the catalog, the state machine, the weights' owner, the traits.
    """
    return isinstance(obj, UvmObject) and bool(_activate(obj).get("_sealed"))


def seal(obj: UvmObject) -> None:
    """Mark ``obj`` as the kernel's own (see :func:`kernel_owned`)."""
    if not _activate(obj).get("_sealed"):
        obj._sealed = True


def holds_kernel_object(value: Any) -> bool:
    """A slot value that is kernel state (a store, a library, a BTree), not data or an object."""
    from persistent.list import PersistentList
    from persistent.mapping import PersistentMapping

    return isinstance(value, Persistent) and not isinstance(
        value, (UvmObject, PersistentMapping, PersistentList)
    )


# --- the delegation cache (see batos_uvm.delegation) ---------------------------
def _cacheable(value: Any) -> bool:
    if isinstance(value, _IMMUTABLE) or isinstance(value, Persistent):
        return True
    if isinstance(value, tuple):
        return all(_cacheable(item) for item in value)
    return isinstance(value, (CellMethod, BoundPrimitive))


# --- generated methods run in cells -------------------------------------------------
class CellMethod:
    """A generated method bound to its receiver: calling it runs it in a cell.

    Generated code never runs in the process that holds the image. Inside the
    kernel, sends go through the kernel's cell pool; elsewhere (the shell,
    tests) through a small local pool (batos_uvm.cells.local).
    """

    __slots__ = ("receiver", "record")

    def __init__(self, receiver: Any, record: MethodRecord) -> None:
        object.__setattr__(self, "receiver", receiver)
        object.__setattr__(self, "record", record)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a bound method cannot be changed")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .cells.local import run_method

        return run_method(self.receiver, self.record.selector, list(args), dict(kwargs))

    def __repr__(self) -> str:
        return f"<method {self.record.selector} v{self.record.version} of " \
            f"{describe_briefly(self.receiver)}>"


class BoundPrimitive:
    """A primitive bound to its receiver; the name is resolved at call time."""

    __slots__ = ("receiver", "name")

    def __init__(self, receiver: Any, name: str) -> None:
        object.__setattr__(self, "receiver", receiver)
        object.__setattr__(self, "name", name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a bound primitive cannot be changed")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return primitives.resolve(self.name)(self.receiver, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<primitive {self.name} of {describe_briefly(self.receiver)}>"


def bind(record: MethodRecord, receiver: Any) -> Callable[..., Any]:
    if record.primitive:
        if record.author != "kernel" or record.source is not None:
            raise PermissionError(
                f"method record {record.selector!r} names primitive {record.primitive!r} but "
                "was not written by the kernel; it is not run"
            )
        return BoundPrimitive(receiver, record.primitive)
    return CellMethod(receiver, record)


class Found(NamedTuple):
    owner: UvmObject
    value: Any  # a slot value, or a MethodRecord when is_method
    is_method: bool
    searched: tuple[UvmObject, ...] = ()  # every object looked at, owner last


def _activate(obj: UvmObject) -> dict[str, Any]:
    if obj._p_state == GHOST:
        obj._p_activate()
    return object.__getattribute__(obj, "__dict__")


class UvmObject(Persistent):
    """A persistent prototype object: slots, parents, and methods as source."""

    # Plain reads hit the instance dict directly; see the module docstring.
    __getattribute__ = object.__getattribute__

    def __init__(self, parents: Any = (), *, label: str | None = None, **slots: Any) -> None:
        if isinstance(parents, UvmObject):
            parents = [parents]
        if parents:
            self.parents = list(parents)
        if label:
            self._label = label
        for name, value in slots.items():
            if name.startswith("_"):
                raise ValueError(
                    f"slot {name!r}: names starting with '_' belong to the kernel"
                )
            setattr(self, name, value)

    # -- attribute protocol ---------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Special names never delegate: a parent's _v_ cache or _p_ state must
        # not leak, and pickling probes dunders on half-built objects.
        if name.startswith(("__", "_p_", "_v_")):
            raise AttributeError(name)
        state = object.__getattribute__(self, "__dict__")
        if self._p_state == GHOST:
            self._p_activate()
            if name in state:
                return state[name]
        if name.startswith("_"):
            raise AttributeError(f"{describe_briefly(self)} has no attribute {name!r}")
        found = self._find(name)
        if found is None:
            raise SelectorNotUnderstood(self, name)
        value = bind(found.value, self) if found.is_method else found.value
        if name in state.get("_v_lookup", ()):
            state[name] = value  # cached: the next read is a plain dict read
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RESERVED_SELECTORS:
            raise AttributeError(
                f"{name!r} is an operation of every UvmObject and cannot be a slot"
            )
        if not name.startswith("_"):
            # Lookups that passed through this object may now end elsewhere
            # (its own cached entry too: the new slot shadows it).
            forget(self, None if name == "parents" else name)
        Persistent.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if not name.startswith("_"):
            forget(self, None if name == "parents" else name)
        Persistent.__delattr__(self, name)

    def __getstate__(self) -> Any:
        state = Persistent.__getstate__(self)
        cached = object.__getattribute__(self, "__dict__").get("_v_lookup")
        if cached:
            state = {key: value for key, value in state.items() if key not in cached}
        return state

    def _p_invalidate(self) -> None:
        # Another connection changed this object (or a transaction was
        # aborted): lookups that passed through it may be stale.
        forget(self)
        Persistent._p_invalidate(self)

    # -- lookup ---------------------------------------------------------------
    def ancestors(self) -> Iterator[UvmObject]:
        """Self, then every ancestor in lookup order (depth first, each once)."""
        seen: set[int] = set()
        stack: list[Any] = [self]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or not isinstance(obj, UvmObject):
                continue
            seen.add(id(obj))
            yield obj
            parents = _activate(obj).get("parents") or ()
            if isinstance(parents, UvmObject):
                parents = (parents,)
            stack.extend(reversed(list(parents)))

    def _find(self, name: str) -> Found | None:
        """Where ``name`` is answered, from the lookup cache when nothing changed."""
        cache = object.__getattribute__(self, "__dict__").get("_v_lookup")  # a ghost has none
        if cache is not None:
            found = cache.get(name)
            if found is not None:
                self._p_getattr(name)  # tell ZODB's cache this object is in use
                return found
        state = _activate(self)
        cache = state.get("_v_lookup")
        if name in state:
            return Found(self, state[name], False, (self,))
        found = self._walk(name)
        if found is not None and (found.is_method or _cacheable(found.value)):
            if cache is None:
                cache = state["_v_lookup"] = {}
            cache[name] = found
            remember(self, name, found.searched[1:])
        return found

    def _walk(self, name: str) -> Found | None:
        searched: list[UvmObject] = []
        for obj in self.ancestors():
            searched.append(obj)
            state = _activate(obj)
            if name in state:
                cached = state.get("_v_lookup")
                if not (cached and name in cached):
                    return Found(obj, state[name], False, tuple(searched))
            record = _current_method(state, name)
            if record is not None:
                return Found(obj, record, True, tuple(searched))
        return None

    def lookup(self, selector: str) -> Found | None:
        """Where ``selector`` is answered: owner, value or method record."""
        return self._find(_public(selector, self))

    def responds_to(self, selector: str) -> bool:
        return self._find(_public(selector, self)) is not None

    def send(self, selector: str, *args: Any, **kwargs: Any) -> Any:
        """Send a message; an unknown selector goes to ``doesNotUnderstand``."""
        found = self._find(_public(selector, self))
        if found is not None:
            target = bind(found.value, self) if found.is_method else found.value
            if not callable(target):
                if args or kwargs:
                    raise TypeError(f"slot {selector!r} is not callable; it takes no arguments")
                return target
            return target(*args, **kwargs)
        handler = self._find("doesNotUnderstand")
        if handler is None or not handler.is_method:
            raise SelectorNotUnderstood(self, selector)
        return bind(handler.value, self)(selector, list(args), dict(kwargs))

    # -- prototypes -----------------------------------------------------------
    def clone(self, **slots: Any) -> UvmObject:
        """A new object delegating to this one (Self-style, nothing copied)."""
        return UvmObject(parents=[self], **slots)

    # -- slots ----------------------------------------------------------------
    @property
    def _slots(self) -> SlotsView:
        return SlotsView(self)

    def slot_names(self) -> list[str]:
        return list(SlotsView(self))

    # -- methods --------------------------------------------------------------
    def _writable_method_table(self) -> MethodTable:
        """This object's method table, created (or converted from the old layout) if needed."""
        state = _activate(self)
        table = state.get("_method_store")
        if table is None:
            table = MethodTable()
            for selector, records in (state.get("_methods") or {}).items():
                table[selector] = _history_of(records)
            self._method_store = table
            if "_methods" in state:
                del self._methods
        return table

    def _add_version(self, selector: str, **fields: Any) -> MethodRecord:
        check_selector(selector)
        table = self._writable_method_table()
        history = table.get(selector)
        record = MethodRecord(
            selector=selector,
            version=(len(history) if history is not None else 0) + 1,
            created=time.time(),
            **fields,
        )
        stored = with_version(history, record)
        if stored is not history:
            table[selector] = stored
        self._methods_changed(selector)
        return record

    def _methods_changed(self, selector: str) -> None:
        forget(self, selector)
        # The owner's own record is written too (it is small: the methods live
        # elsewhere), so other connections invalidate it and drop their lookups.
        self._p_changed = True

    def install_method(
        self,
        selector: str,
        source: str,
        *,
        author: str = "architect",
        cycle_id: str | None = None,
        note: str = "",
    ) -> MethodRecord:
        """Store a new version of a method, after the Guardian's audit."""
        check_selector(selector)
        if selector in RESERVED_SELECTORS:
            raise ValueError(f"{selector!r} is an operation of every UvmObject")
        from .guardian import audit

        audit(source, selector)  # parses it too: a syntax error fails now, not at first call
        return self._add_version(
            selector, source=source, primitive=None, author=author, cycle_id=cycle_id, note=note
        )

    def install_primitive(self, selector: str, primitive: str, *, note: str = "") -> MethodRecord:
        """Answer ``selector`` with the kernel primitive registered as ``primitive``."""
        return self._add_version(
            selector, source=None, primitive=primitive, author="kernel", cycle_id=None, note=note
        )

    def methods(self) -> dict[str, MethodRecord]:
        """This object's own methods, current version of each."""
        state = _activate(self)
        table = state.get("_method_store")
        if table is not None:
            return {name: history.current() for name, history in table.items()}
        return {name: history[-1] for name, history in (state.get("_methods") or {}).items()}

    def method_history(self, selector: str) -> list[MethodRecord]:
        """Every version of a method, oldest first (searching ancestors too)."""
        for obj in self.ancestors():
            history = _versions(_activate(obj), selector)
            if history:
                return history
        raise SelectorNotUnderstood(self, selector)

    def method_source(self, selector: str, version: int | None = None) -> str:
        history = self.method_history(selector)
        record = history[-1] if version is None else _version(history, selector, version)
        return record.source if record.source is not None else f"<primitive {record.primitive}>"

    def revert_method(
        self, selector: str, version: int, *, author: str = "architect"
    ) -> MethodRecord:
        """Make an earlier version current again, as a new version (history stays linear)."""
        history = _versions(_activate(self), selector)
        if not history:
            raise SelectorNotUnderstood(self, selector)
        old = _version(history, selector, version)
        return self._add_version(
            selector,
            source=old.source,
            primitive=old.primitive,
            author=author,
            cycle_id=old.cycle_id,
            note=f"revert to version {version}",
        )

    def remove_method(self, selector: str) -> None:
        if not _versions(_activate(self), selector):
            raise SelectorNotUnderstood(self, selector)
        del self._writable_method_table()[selector]
        self._methods_changed(selector)

    # -- presentation ----------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Slots, parents and methods, as plain data (for ``inspect`` and ``ls``)."""
        state = _activate(self)
        return {
            "oid": format_oid(self._p_oid),
            "label": state.get("_label"),
            "slots": {name: _short_repr(value) for name, value in SlotsView(self).items()},
            "parents": [describe_briefly(p) for p in state.get("parents") or ()],
            "methods": {
                name: {
                    "version": record.version,
                    "kind": record.kind,
                    "author": record.author,
                    "cycle_id": record.cycle_id,
                    "created": record.created,
                }
                for name, record in self.methods().items()
            },
        }

    def __repr__(self) -> str:
        state = _activate(self)
        slots = [name for name in SlotsView(self) if name != "parents"]
        methods = sorted(_selectors(state))
        parents = len(state.get("parents") or ())
        return f"<{describe_briefly(self)} slots={slots} methods={methods} parents={parents}>"


def _public(selector: str, receiver: Any) -> str:
    """Messages name public selectors only: internals are not reachable by a send."""
    if not isinstance(selector, str) or selector.startswith("_"):
        raise SelectorNotUnderstood(receiver, str(selector))
    return selector


def _history_of(records: list[MethodRecord]) -> Any:
    history = None
    for record in records:
        history = with_version(history, record)
    return history


def _current_method(state: dict[str, Any], selector: str) -> MethodRecord | None:
    """The current version of an object's own method, from its state (either layout)."""
    table = state.get("_method_store")
    if table is not None:
        history = table.get(selector)
        return history.current() if history is not None else None
    legacy = state.get("_methods")  # images from before per-method records
    if legacy:
        history = legacy.get(selector)
        return history[-1] if history else None
    return None


def _selectors(state: dict[str, Any]) -> list[str]:
    table = state.get("_method_store")
    return list(table.keys()) if table is not None else list(state.get("_methods") or ())


def _versions(state: dict[str, Any], selector: str) -> list[MethodRecord]:
    table = state.get("_method_store")
    if table is not None:
        history = table.get(selector)
        return history.records() if history is not None else []
    return list((state.get("_methods") or {}).get(selector, ()))


def _version(history: list[MethodRecord], selector: str, version: int) -> MethodRecord:
    for record in history:
        if record.version == version:
            return record
    raise ValueError(f"{selector!r} has no version {version} (versions 1..{len(history)})")


def _short_repr(value: Any, limit: int = 200) -> str:
    """A value of the image as text, without running any of its code."""
    return safe_repr(value, limit, describe=_name_of_object)


def _name_of_object(value: Any) -> str | None:
    return describe_briefly(value) if isinstance(value, UvmObject) else None


class SlotsView(MutableMapping[str, Any]):
    """The object's own slots as a mapping (``obj._slots``), without internals."""

    __slots__ = ("_obj",)

    def __init__(self, obj: UvmObject) -> None:
        self._obj = obj

    def _state(self) -> dict[str, Any]:
        return _activate(self._obj)

    def _visible(self, name: str) -> bool:
        state = self._state()
        return not name.startswith("_") and name not in state.get("_v_lookup", ())

    def __getitem__(self, name: str) -> Any:
        state = self._state()
        if name in state and self._visible(name):
            return state[name]
        raise KeyError(name)

    def __setitem__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise KeyError(f"slot names may not start with '_': {name!r}")
        setattr(self._obj, name, value)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        delattr(self._obj, name)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name in list(self._state()) if self._visible(name)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"<slots of {describe_briefly(self._obj)}: {sorted(self)}>"


# Operations of every UvmObject: never slots, never grown methods.
RESERVED_SELECTORS = frozenset(name for name in dir(UvmObject) if not name.startswith("_"))


def _not_understood(receiver: Any, selector: str, args: Any, kwargs: Any) -> Any:
    raise SelectorNotUnderstood(receiver, selector)


# Behaviour every image needs, also without a kernel. The kernel answers
# unknown messages itself (it grows them); elsewhere they are errors.
primitives.register("clone", lambda receiver, **slots: receiver.clone(**slots))
primitives.register("describe", lambda receiver: receiver.describe())
primitives.register("doesNotUnderstand", _not_understood)
