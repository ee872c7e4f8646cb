"""Bringing an image written by an older BAT OS up to the current layout, once.

Format 1 kept every version of every method inside its owner's record (a dict
``_methods``); format 2 keeps each version in a record of its own
(``batos_uvm.method_store``). The migration runs when a kernel opens a
format-1 image: it copies a FileStorage image to a backup file first, then
converts every UvmObject reachable from the root in one transaction, and
logs what it did and where the backup is.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ZODB.serialize import referencesf
from ZODB.utils import get_pickle_metadata, load_current, z64

from .objects import UvmObject

log = logging.getLogger("batos.migration")

IMAGE_FORMAT = 2

__all__ = ["IMAGE_FORMAT", "backup_image", "migrate_image", "needs_migration"]


def needs_migration(root: Any) -> bool:
    meta = root.get("image_meta")
    return meta is not None and int(meta.get("format", 1)) < IMAGE_FORMAT


def backup_image(path: Path) -> Path:
    """Copy an image file beside itself (blobs are not touched by a migration)."""
    backup = path.with_name(f"{path.name}.format1-{time.strftime('%Y%m%d-%H%M%S')}.bak")
    shutil.copy2(path, backup)
    return backup


def migrate_image(connection: Any, *, progress: Callable[[int], None] | None = None) -> int:
    """Convert every reachable UvmObject to format 2; the caller commits. Returns the count."""
    converted = 0
    for number, oid in enumerate(_uvm_object_oids(connection.db().storage)):
        obj = connection.get(oid)
        obj._p_activate()
        if "_methods" in object.__getattribute__(obj, "__dict__"):
            obj._writable_method_table()
            converted += 1
        if number % 1000 == 999:
            connection.transaction_manager.savepoint(True)  # keep memory flat
        if progress is not None:
            progress(number + 1)
    connection.root()["image_meta"]["format"] = IMAGE_FORMAT
    return converted


def _uvm_object_oids(storage: Any) -> Iterator[bytes]:
    """Oids of the UvmObjects reachable from the root, found from the records alone."""
    classes: dict[tuple[str, str], bool] = {}
    seen = {z64}
    pending = [z64]
    scanned = 0
    while pending:
        oid = pending.pop()
        data, _serial = load_current(storage, oid)
        scanned += 1
        if scanned % 50_000 == 0:
            log.info("migration: %d records scanned", scanned)
        if _is_uvm_object(get_pickle_metadata(data), classes):
            yield oid
        for ref in referencesf(data):
            if ref not in seen:
                seen.add(ref)
                pending.append(ref)


def _is_uvm_object(name: tuple[str, str], classes: dict[tuple[str, str], bool]) -> bool:
    known = classes.get(name)
    if known is None:
        module, qualname = name
        try:
            klass = getattr(importlib.import_module(module), qualname)
            known = isinstance(klass, type) and issubclass(klass, UvmObject)
        except Exception:  # a class this kernel does not have cannot be a UvmObject
            known = False
        classes[name] = known
    return known
