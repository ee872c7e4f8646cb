"""Which cached lookups depend on which objects: invalidation that stays local.

A UvmObject caches where a name was found (its *lookup cache*, a volatile
``_v_lookup`` dict). That answer depends on every object searched on the way:
a write of the same name, or of ``parents``, to any of them may change it. So
each searched object records the reader here, per name, and a write notifies
only those readers: the cost of a write is the number of entries that really
depend on it, not the number of cached entries in the process.

Nothing here keeps an object alive: readers are held by weak references, and
the registry is keyed weakly by the object depended on. A cache entry itself
holds its searched objects (as ``Found.searched``), so an object stays the
instance its oid maps to in its connection while some entry depends on it; its
writes and ZODB's invalidations then reach this registry. An entry lives only
as long as its reader's state: when ZODB's cache turns the reader into a
ghost, the entry goes with it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

from persistent import GHOST

__all__ = ["dependent_count", "forget", "forget_dependents", "remember"]

_lock = threading.Lock()
_readers: weakref.WeakKeyDictionary[Any, dict[str, _Readers]] = weakref.WeakKeyDictionary()


class _Readers:
    """The readers whose entry for one name depends on one object, held weakly."""

    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs: set[weakref.ref[Any]] = set()

    def add(self, reader: Any) -> None:
        self.refs.add(weakref.ref(reader, self._gone))

    def _gone(self, ref: weakref.ref[Any]) -> None:
        self.refs.discard(ref)
        if not self.refs:
            self.refs = set()  # a set never shrinks its table; a new one does

    def alive(self) -> list[Any]:
        return [reader for reader in (ref() for ref in list(self.refs)) if reader is not None]


def remember(reader: Any, name: str, searched: Iterable[Any]) -> None:
    """``reader``'s cached entry for ``name`` depends on every object in ``searched``.

    The reader itself is not recorded here: its own writes reach its own
    entries directly (:func:`forget`).
    """
    with _lock:
        for obj in searched:
            by_name = _readers.get(obj)
            if by_name is None:
                by_name = _readers[obj] = {}
            readers = by_name.get(name)
            if readers is None:
                readers = by_name[name] = _Readers()
            readers.add(reader)


def forget(obj: Any, name: str | None = None) -> int:
    """``obj`` changed ``name`` (None: its parents, or anything): drop what depends on it."""
    return _drop_own(obj, name) + forget_dependents(obj, name)


def _drop_own(obj: Any, name: str | None) -> int:
    if name is not None:
        return drop_entry(obj, name)
    if obj._p_state == GHOST:
        return 0
    state = object.__getattribute__(obj, "__dict__")
    cache = state.get("_v_lookup")
    if not cache:
        return 0
    for cached in list(cache):
        state.pop(cached, None)  # each copy before its entry, as in drop_entry
    dropped = len(cache)
    state.pop("_v_lookup", None)
    return dropped


def forget_dependents(obj: Any, name: str | None = None) -> int:
    """Drop the cached entries that depend on ``obj`` (for ``name``, or for every name).

    Returns how many entries were dropped.
    """
    if not _readers.get(obj):  # most writes: nobody depends on the object
        return 0
    with _lock:
        by_name = _readers.get(obj)
        if not by_name:
            return 0
        if name is None:
            affected = list(by_name.items())
            by_name.clear()
        else:
            readers = by_name.pop(name, None)
            if readers is None:
                return 0
            affected = [(name, readers)]
        if not by_name:
            _readers.pop(obj, None)
    dropped = 0
    for entry_name, readers in affected:
        for reader in readers.alive():
            dropped += drop_entry(reader, entry_name)
    return dropped


def drop_entry(reader: Any, name: str) -> int:
    """Forget ``reader``'s cached lookup of ``name`` (and its copy for plain reads)."""
    if reader._p_state == GHOST:
        return 0  # a ghost's state, and with it its cache, is already gone
    state = object.__getattribute__(reader, "__dict__")
    cache = state.get("_v_lookup")
    if not cache or name not in cache:
        return 0
    # The copy goes before the entry: a copy without its entry would pass for
    # one of the reader's own slots.
    state.pop(name, None)
    cache.pop(name, None)
    return 1


def dependent_count(obj: Any) -> int:
    """How many cached entries depend on ``obj`` (for tests and the shell)."""
    with _lock:
        by_name = _readers.get(obj) or {}
        return sum(len(readers.alive()) for readers in by_name.values())
