"""Where an object's methods are stored: one small record per version.

An object's methods live outside its own record, in a :class:`MethodTable`
(a BTree of selector -> :class:`MethodHistory`), and every version of every
method is a :class:`StoredVersion` record of its own. Installing a method
therefore writes the new version, the small history of that one selector and
one BTree bucket, however many methods the object holds; loading the object
loads none of them, and a lookup loads only the selector it needs.

Only kernel code reaches these records (generated code cannot name private
attributes, and the kernel never hands them out): the versions are immutable
``MethodRecord`` tuples, and a history only grows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from BTrees.OOBTree import OOBTree
from persistent import Persistent

__all__ = ["MethodHistory", "MethodTable", "StoredVersion"]


class StoredVersion(Persistent):
    """One version of one method (its ``MethodRecord``), a record of its own."""

    def __init__(self, record: Any) -> None:
        self.record = record

    def __repr__(self) -> str:
        return f"<StoredVersion {self.record.selector} v{self.record.version}>"


class MethodHistory(Persistent):
    """Every version of one selector, oldest first, each in its own record."""

    def __init__(self) -> None:
        self._versions: tuple[StoredVersion, ...] = ()

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


class MethodTable(OOBTree):
    """selector -> MethodHistory.

    Small buckets: installing a new selector rewrites one bucket, so its size
    bounds the bytes an install writes besides the new version itself.
    """

    max_leaf_size = 16

    def histories(self) -> Iterator[tuple[str, MethodHistory]]:
        return iter(self.items())
