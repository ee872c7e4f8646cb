"""Where an object's methods are stored: one small record per version.

An object's methods live outside its own record, in a :class:`MethodTable`
(a BTree of selector -> history), and every version of every method is a
:class:`StoredVersion` record of its own. A selector with one version maps
to that version itself; from the second version on, to a
:class:`MethodHistory` listing them. Installing a method therefore writes the
new version, at most one small history and one BTree bucket, however many
methods the object holds; loading the object loads none of them, and a
lookup loads only the selector it needs.

Only kernel code reaches these records (generated code cannot name private
attributes, and the kernel never hands them out): the versions are immutable
``MethodRecord`` tuples, and a history only grows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from BTrees.OOBTree import OOBTree
from persistent import Persistent

__all__ = ["MethodHistory", "MethodTable", "StoredVersion", "with_version"]


class StoredVersion(Persistent):
    """One version of one method (its ``MethodRecord``), a record of its own.

    Also the history of a selector that has only this version.
    """

    def __init__(self, record: Any) -> None:
        self.record = record

    # Pickled as the bare fields: the record's class name need not be in every version.
    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(self.record)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        from .objects import MethodRecord

        self.__dict__["record"] = MethodRecord(*state)

    def __len__(self) -> int:
        return 1

    def current(self) -> Any:
        return self.record

    def records(self) -> list[Any]:
        return [self.record]

    def __repr__(self) -> str:
        return f"<StoredVersion {self.record.selector} v{self.record.version}>"


class MethodHistory(Persistent):
    """Every version of one selector, oldest first, each in its own record."""

    def __init__(self, versions: tuple[StoredVersion, ...] = ()) -> None:
        self._versions = versions

    def __len__(self) -> int:
        return len(self._versions)

    def current(self) -> Any:
        return self._versions[-1].record

    def records(self) -> list[Any]:
        return [stored.record for stored in self._versions]

    def append(self, record: Any) -> None:
        self._versions = (*self._versions, StoredVersion(record))

    def __repr__(self) -> str:
        return f"<MethodHistory of {len(self._versions)} version(s)>"


def with_version(history: StoredVersion | MethodHistory | None, record: Any) -> Any:
    """Add ``record`` to a selector's history; return what the table must now hold."""
    if history is None:
        return StoredVersion(record)
    if isinstance(history, StoredVersion):
        return MethodHistory((history, StoredVersion(record)))
    history.append(record)
    return history


class MethodTable(OOBTree):
    """selector -> StoredVersion (one version) or MethodHistory.

    Small buckets: installing a new selector rewrites one bucket, so its size
    bounds the bytes an install writes besides the new version itself.
    """

    max_leaf_size = 8

    def histories(self) -> Iterator[tuple[str, StoredVersion | MethodHistory]]:
        return iter(self.items())
