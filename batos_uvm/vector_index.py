"""The catalog's chunk vectors in memory: exact while small, an inverted file past a threshold.

A :class:`VectorIndex` holds one catalog's committed vectors, keyed by chunk
id, and is changed incrementally (``add``/``remove``), never rebuilt per
write. While it holds fewer than ``ann_threshold`` vectors it is a plain
matrix and every search is exact. Past the threshold the vectors move into a
faiss inverted-file index (IVF, inner product on unit vectors, float32): the
vectors are grouped around ``nlist`` centroids, and a search scans the
``nprobe`` groups nearest to the query, an eighth of the vectors, at a small
cost in recall (``bench/catalog.py`` reports recall@5 against the exact scan).

Why IVF and not a graph (HNSW): on two cores, inserting 100k vectors of 384
dimensions into an HNSW graph took minutes (usearch) and its recall on
clustered texts was lower, while the IVF trains in seconds, adds a vector in
microseconds and keeps recall at an eighth of the scan's cost.

It can be saved to a file and loaded again, so a restarted kernel neither
re-embeds nor rebuilds the graph. The file is a cache: the catalog decides
whether it still matches the image, and rebuilds from the stored vectors if not.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ANN_THRESHOLD", "VectorIndex", "ann_available"]

ANN_THRESHOLD = 20_000  # below this a numpy scan is about as fast (~1.5 ms at 20k x 384)
_NLIST = 256  # centroids; each list then holds ~80 (at 20k) to ~400 (at 100k) vectors
_NPROBE = 32  # lists scanned per search: an eighth of the vectors
_TRAINING_POINTS = 64 * _NLIST  # enough for stable centroids, quick to train


def ann_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class VectorIndex:
    """Chunk id -> unit vector, searchable by cosine similarity. Not thread-safe: use ``lock``."""

    def __init__(self, dim: int, *, ann_threshold: int = ANN_THRESHOLD) -> None:
        self.dim = int(dim)
        self.ann_threshold = int(ann_threshold)
        self.lock = threading.RLock()
        self.generation = -1  # the catalog generation this index reflects; -1: none yet
        self.stamp = ""
        self.saved_count = 0  # vectors held when last saved to a file
        self._ids = np.zeros(0, dtype=np.int64)
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._count = 0  # rows of _ids/_matrix in use (the arrays grow by doubling)
        self._rows: dict[int, int] = {}
        self._ann: Any = None

    def __len__(self) -> int:
        return int(self._ann.ntotal) if self._ann is not None else self._count

    @property
    def approximate(self) -> bool:
        return self._ann is not None

    def clear(self) -> None:
        self.__init__(self.dim, ann_threshold=self.ann_threshold)  # type: ignore[misc]

    # -- changes ------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        if not len(ids):
            return
        if self._ann is not None:
            self._ann.remove_ids(ids)  # a chunk added again replaces its vector
            self._ann.add_with_ids(vectors, ids)
            return
        self.remove([i for i in ids.tolist() if i in self._rows])
        self._reserve(self._count + len(ids))
        end = self._count + len(ids)
        self._ids[self._count : end] = ids
        self._matrix[self._count : end] = vectors
        for row, chunk_id in enumerate(ids.tolist(), start=self._count):
            self._rows[chunk_id] = row
        self._count = end
        if self._count >= self.ann_threshold and ann_available():
            self._to_ann()

    def remove(self, ids: Any) -> None:
        if self._ann is not None:
            wanted = np.asarray([int(i) for i in ids], dtype=np.int64)
            if len(wanted):
                self._ann.remove_ids(wanted)
            return
        for chunk_id in (int(i) for i in ids):
            row = self._rows.pop(chunk_id, None)
            if row is None:
                continue
            last = self._count - 1
            if row != last:  # move the last row into the gap
                moved = int(self._ids[last])
                self._ids[row] = moved
                self._matrix[row] = self._matrix[last]
                self._rows[moved] = row
            self._count = last

    def _reserve(self, rows: int) -> None:
        if rows <= len(self._ids):
            return
        capacity = max(rows, 2 * len(self._ids), 1024)
        ids = np.zeros(capacity, dtype=np.int64)
        matrix = np.zeros((capacity, self.dim), dtype=np.float32)
        ids[: self._count] = self._ids[: self._count]
        matrix[: self._count] = self._matrix[: self._count]
        self._ids, self._matrix = ids, matrix

    def _to_ann(self) -> None:
        vectors = self._matrix[: self._count]
        ann = _new_ann(self.dim)
        sample = np.random.default_rng(0).permutation(len(vectors))[:_TRAINING_POINTS]
        ann.train(np.ascontiguousarray(vectors[sample]))
        ann.add_with_ids(vectors, self._ids[: self._count].copy())
        self._ann = ann
        self._ids = np.zeros(0, dtype=np.int64)
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._rows, self._count = {}, 0

    # -- searching ----------------------------------------------------------------------
    def all_cosines(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every chunk id and its cosine with ``query`` (exact mode only)."""
        # einsum, not BLAS: on few cores, multi-threaded BLAS right after a torch
        # encode fights torch's still-spinning threads and gets 10-100x slower.
        cosine = np.einsum("ij,j->i", self._matrix[: self._count], query)
        return self._ids[: self._count].copy(), cosine

    def nearest(self, query: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` chunk ids nearest to ``query`` (approximate mode) and their cosines."""
        count = min(count, len(self))
        if count <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores, ids = self._ann.search(query.reshape(1, -1).astype(np.float32), count)
        found = ids[0] >= 0
        return ids[0][found].astype(np.int64), scores[0][found].astype(np.float32)

    def cosines(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Cosines of ``query`` with the given chunks (NaN for chunks not held)."""
        out = np.full(len(ids), np.nan, dtype=np.float32)
        if self._ann is not None:
            for position, chunk_id in enumerate(ids.tolist()):
                vector = _ann_vector(self._ann, chunk_id)
                if vector is not None:
                    out[position] = float(np.dot(vector, query))
            return out
        for position, chunk_id in enumerate(ids.tolist()):
            row = self._rows.get(chunk_id)
            if row is not None:
                out[position] = float(np.dot(self._matrix[row], query))
        return out

    # -- files --------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the index and ``meta`` (plus its generation and stamp) to ``path``.*"""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = Path(f"{path}.data")
        tmp = Path(f"{data}.tmp")
        if self._ann is not None:
            import faiss

            faiss.write_index(self._ann, str(tmp))
            kind = "faiss-ivf"
        else:
            with open(tmp, "wb") as handle:
                np.save(handle, self._ids[: self._count])
                np.save(handle, self._matrix[: self._count])
            kind = "matrix"
        os.replace(tmp, data)
        info = dict(meta, kind=kind, dim=self.dim, count=len(self),
                    generation=self.generation, stamp=self.stamp)  # fmt: skip
        Path(f"{path}.json.tmp").write_text(json.dumps(info))
        os.replace(f"{path}.json.tmp", f"{path}.json")
        self.saved_count = len(self)

    @classmethod
    def load(cls, path: Path, *, ann_threshold: int = ANN_THRESHOLD) -> tuple[VectorIndex, dict]:
        """An index saved by :meth:`save`, and its meta; raises OSError/ValueError if unusable."""
        info = json.loads(Path(f"{path}.json").read_text())
        index = cls(int(info["dim"]), ann_threshold=ann_threshold)
        data = f"{path}.data"
        if info["kind"] == "faiss-ivf":
            if not ann_available():
                raise ValueError("faiss is not installed")
            import faiss

            index._ann = faiss.read_index(data)
            index._ann.nprobe = _NPROBE
        else:
            with open(data, "rb") as handle:
                ids, matrix = np.load(handle), np.load(handle)
            index.add(ids, matrix)
        if len(index) != int(info["count"]):
            raise ValueError(f"{data} holds {len(index)} vectors, its meta says {info['count']}")
        index.generation, index.stamp = int(info["generation"]), str(info["stamp"])
        index.saved_count = len(index)
        return index, info


def _new_ann(dim: int) -> Any:
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time: threads only add overhead
    index = faiss.index_factory(dim, f"IVF{_NLIST},Flat", faiss.METRIC_INNER_PRODUCT)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # vectors by chunk id
    index.nprobe = _NPROBE
    return index


def _ann_vector(ann: Any, chunk_id: int) -> np.ndarray | None:
    try:
        return ann.reconstruct(int(chunk_id))
    except RuntimeError:  # faiss: "key not found"
        return None
