"""The vector index of each catalog, shared by the connections of this process.

A catalog's committed vectors are searched through one
:class:`~batos_uvm.vector_index.VectorIndex` per (database, catalog) in the
process, whichever connection asks. The catalog logs which chunks every change
added and removed; an index behind the connection's view applies the logged
changes one by one (a write never costs a rebuild), and is rebuilt from the
stored vectors only when the log does not reach back far enough. Changes a
connection has not committed yet are not in the shared index: the catalog
searches them beside it. With :func:`set_index_directory` an index is saved to
a file (as it grows by a tenth), so a restarted kernel loads it and replays
only the changes since.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from batos_uvm.vector_index import VectorIndex

__all__ = ["current_index", "private_index", "set_index_directory", "shared_index"]

log = logging.getLogger("batos.catalog")

def current_index(store: Any) -> tuple[VectorIndex, list[int], list[int]]:
    """The vector index at this transaction's committed generation, and the chunks
    added and removed since then in this transaction (not in the index)."""
    committed = store._generation
    if store.changed_in_this_transaction():
        committed = getattr(store, "_v_base_generation", store._generation)
    pending_added: dict[int, None] = {}
    pending_removed: set[int] = set()
    for generation in range(committed + 1, store._generation + 1):
        entry = store._changes[generation][0] if store._changes is not None else None
        if entry is None:  # a reindex in this transaction: search this view alone
            return private_index(store), [], []
        for cid in entry[1]:
            pending_added.pop(cid, None)
            pending_removed.add(cid)
        for cid in entry[0]:
            pending_removed.discard(cid)
            pending_added[cid] = None
    index = shared_index(store)
    with index.lock:
        if index.generation < committed and not _catch_up(store, index, committed):
            if committed != store._generation:
                return private_index(store), [], []  # cannot separate uncommitted vectors
            _rebuild(store, index, committed)
    return index, list(pending_added), list(pending_removed)

def _catch_up(store: Any, index: VectorIndex, target: int) -> bool:
    """Apply logged changes up to ``target``; False when the log does not reach back."""
    entries = store.logged_changes(index.generation, target)
    if entries is None or any(change is None for change, _ in entries):
        return False  # the log does not reach back, or every vector changed
    if index.stamp:
        before = store._changes.get(index.generation)
        if before is not None and before[1] != index.stamp:
            return False  # the index was built from another history of this catalog
    for (added, removed), stamp in entries:
        index.remove(removed)
        present = [cid for cid in added if cid in store._vectors]
        if present:
            index.add(np.asarray(present), np.vstack([store._vector(c) for c in present]))
        index.stamp = stamp
    index.generation = target
    _maybe_save(store, index)
    return True

def _rebuild(store: Any, index: VectorIndex, generation: int) -> None:
    started = time.perf_counter()
    loaded = _load_saved(store, index.ann_threshold)
    if loaded is not None:
        _replace(index, loaded)
        if index.generation == generation or _catch_up(store, index, generation):
            log.info("catalog index loaded from %s", _index_path(store))
            return
    index.clear()
    ids = np.fromiter(store._vectors.keys(), dtype=np.int64, count=len(store._vectors))
    for start in range(0, len(ids), 10_000):
        batch = ids[start : start + 10_000]
        blob = b"".join(store._vectors[int(cid)] for cid in batch)
        index.add(batch, np.frombuffer(blob, dtype="<f4").reshape(len(batch), -1))
    index.generation, index.stamp = generation, store._stamp
    if len(ids) >= 1000:
        log.info("catalog index built: %d vectors in %.1f s", len(ids),
                 time.perf_counter() - started)  # fmt: skip
    _maybe_save(store, index, force=True)

def private_index(store: Any) -> VectorIndex:
    """An index of exactly this connection's view (a change that cannot be separated)."""
    index = VectorIndex(int(store.dim or 1), ann_threshold=2**62)
    ids = np.fromiter(store._vectors.keys(), dtype=np.int64, count=len(store._vectors))
    if len(ids):
        index.add(ids, np.vstack([store._vector(int(cid)) for cid in ids]))
    return index


_shared_lock = threading.Lock()
_shared: weakref.WeakKeyDictionary[Any, dict[bytes, VectorIndex]] = weakref.WeakKeyDictionary()
_index_directory: Path | None = None


def set_index_directory(path: str | Path | None) -> None:
    """Save catalog vector indexes under ``path`` (None: keep them in memory only)."""
    global _index_directory
    _index_directory = Path(path) if path is not None else None


def shared_index(store: Any) -> VectorIndex:
    jar, oid = store._p_jar, store._p_oid
    if jar is None or oid is None:  # not in a database: the store's own
        index = getattr(store, "_v_index", None)
        if index is None:
            index = store._v_index = VectorIndex(int(store.dim or 1))
        return index
    with _shared_lock:
        per_db = _shared.setdefault(jar.db(), {})
        index = per_db.get(oid)
        if index is None or index.dim != int(store.dim or 1):
            index = per_db[oid] = VectorIndex(int(store.dim or 1))
        return index


def _replace(index: VectorIndex, loaded: VectorIndex) -> None:
    lock = index.lock
    index.__dict__.update(loaded.__dict__)
    index.lock = lock


def _index_path(store: Any) -> Path | None:
    if _index_directory is None or store._p_oid is None:
        return None
    return _index_directory / f"catalog-{store._p_oid.hex()}"


def _load_saved(store: Any, threshold: int) -> VectorIndex | None:
    path = _index_path(store)
    if path is None or not Path(f"{path}.json").exists():
        return None
    try:
        index, info = VectorIndex.load(path, ann_threshold=threshold)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("catalog index %s is unusable (%s); rebuilding it", path, exc)
        return None
    if info.get("embedder") != store.embedder_name or index.dim != int(store.dim or 0):
        return None
    if index.generation == store._generation and index.stamp != store._stamp:
        return None
    return index


def _maybe_save(store: Any, index: VectorIndex, *, force: bool = False) -> None:
    """Save the index when it has grown by a tenth (or 1,000 vectors) since its last save."""
    path = _index_path(store)
    if path is None or len(index) < 1000:
        return
    if not force and len(index) - index.saved_count < max(1000, index.saved_count // 10):
        return
    try:
        index.save(path, {"embedder": store.embedder_name})
    except OSError as exc:
        log.warning("could not save the catalog index to %s: %s", path, exc)
