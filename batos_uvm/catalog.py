"""The knowledge catalog ("Fractal Memory"): chunked documents, searchable
by keywords and by meaning, held entirely in the living image.

A :class:`CatalogStore` is one persistent object. Everything it needs to
answer a search after a restart is part of its pickled state: the documents,
the chunks, the full-text index (a zope.index Okapi BM25 index and its
lexicon), one float32 embedding per chunk, and a log of which chunks each
change added and removed.

Vectors are searched in memory (``batos_uvm.vector_index``): exactly while the
catalog is small, through an HNSW graph past a threshold. That index is
shared by every connection of the process and kept up to date from the
change log, one change at a time, so a write never costs a rebuild; a change
not yet committed is searched beside it. With :func:`set_index_directory` it
is also saved to a file, so a restart loads it instead of rebuilding it.

The caller owns the transaction: nothing here commits or aborts.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import BTrees
import numpy as np
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from transaction.interfaces import NoTransaction
from zope.index.text.lexicon import CaseNormalizer, Lexicon, Splitter, StopWordRemover
from zope.index.text.okapiindex import OkapiIndex

from batos_uvm.catalog_index import current_index, set_index_directory
from batos_uvm.text import (
    Embedder,
    default_embedder,
    embedder_from_name,
    semantic_chunk_spans,
    split_long,
    split_sentences,
)
from batos_uvm.text_scores import text_scores

__all__ = [
    "CatalogStore",
    "Chunk",
    "DocumentInfo",
    "EmbedderMismatchError",
    "Hit",
    "set_index_directory",
]

log = logging.getLogger("batos.catalog")

MAX_DOC_ID_CHARS = 512
MAX_DOCUMENT_CHARS = 2_000_000
MAX_QUERY_CHARS = 10_000
_VECTOR_DTYPE = np.dtype("<f4")  # fixed byte order: images move between machines
_LOG_KEPT = 4096  # change-log entries kept; an index further behind is rebuilt
# With an approximate index, the exact hybrid score is computed for the best
# chunks by vector and the best by keywords (both many times top_k), so a
# chunk that ranks well on one and moderately on the other is still found.
_CANDIDATES = 64


class EmbedderMismatchError(ValueError):
    """The catalog holds vectors from another embedding model."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score = w_text * text_score + w_vec * max(vector_score, 0)``."""

    chunk_id: int
    doc_id: str
    text: str
    metadata: dict[str, Any]
    score: float
    text_score: float  # Okapi BM25 divided by the best BM25 of this query, in [0, 1]
    vector_score: float  # cosine similarity of query and chunk embeddings, in [-1, 1]
    position: int = 0  # index of the chunk within its document


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    doc_id: str
    position: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DocumentInfo:
    doc_id: str
    metadata: dict[str, Any]
    chunk_ids: tuple[int, ...]
    chars: int
    added_at: float


_resolved_embedders: dict[str, Embedder] = {}


class CatalogStore(Persistent):
    """Documents split into semantic chunks, with a text index and vectors.

    Chunk ids come from a counter in the store and are 64-bit safe: the text
    index uses the 64-bit BTrees family, so ids never overflow zope.index's
    32-bit default. Every change bumps ``_generation`` on the store object
    itself, so a commit by another connection invalidates this object (and
    with it the volatile matrix) and two concurrent writers get a
    ``ConflictError`` (to be retried) instead of interleaving.
    """

    # Class-level defaults: an image pickled by an older version gains them.
    text_weight: float = 0.5
    chunk_percentile: float = 10.0
    max_sentences: int = 8
    max_chars: int = 1000
    embedder_name: str | None = None
    dim: int | None = None
    _changes: Any = None  # generation -> ((added chunk ids, removed chunk ids) or None, stamp)
    _stamp = ""  # changes at every write: tells one history from another

    def __init__(
        self,
        *,
        text_weight: float = 0.5,
        chunk_percentile: float = 10.0,
        max_sentences: int = 8,
        max_chars: int = 1000,
    ) -> None:
        if not 0.0 <= text_weight <= 1.0:
            raise ValueError("text_weight must be within [0, 1]")
        self.text_weight = float(text_weight)
        self.chunk_percentile = float(chunk_percentile)
        self.max_sentences = int(max_sentences)
        self.max_chars = int(max_chars)
        self._documents = OOBTree()  # doc_id -> {"metadata", "chunk_ids", "chars", "added_at"}
        self._chunks = LOBTree()  # chunk_id -> {"doc_id", "position", "text"}
        self._vectors = LOBTree()  # chunk_id -> little-endian float32 bytes (dim * 4)
        self._lexicon = Lexicon(Splitter(), CaseNormalizer(), StopWordRemover())
        self._text_index = OkapiIndex(self._lexicon, family=BTrees.family64)
        self._last_chunk_id = 0
        self._chunk_count = 0
        self._generation = 0
        self._changes = LOBTree()

    # ------------------------------------------------------------------ info

    def __len__(self) -> int:
        """Number of chunks."""
        return self._chunk_count

    def __bool__(self) -> bool:
        # An empty catalog is still a catalog: `store or CatalogStore()` must keep it.
        return True

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and doc_id in self._documents

    def __repr__(self) -> str:
        return (
            f"<CatalogStore {len(self._documents)} documents, {self._chunk_count} chunks, "
            f"embedder={self.embedder_name!r}>"
        )

    def documents(self) -> list[str]:
        """The ids of all documents, sorted."""
        return list(self._documents.keys())

    def get_document(self, doc_id: str) -> DocumentInfo | None:
        record = self._documents.get(doc_id)
        if record is None:
            return None
        return DocumentInfo(
            doc_id=doc_id,
            metadata=copy.deepcopy(record["metadata"]),
            chunk_ids=tuple(record["chunk_ids"]),
            chars=record["chars"],
            added_at=record["added_at"],
        )

    def get_chunk(self, chunk_id: int) -> Chunk | None:
        record = self._chunks.get(int(chunk_id))
        if record is None:
            return None
        return Chunk(
            chunk_id=int(chunk_id),
            doc_id=record["doc_id"],
            position=record["position"],
            text=record["text"],
            metadata=self._doc_metadata(record["doc_id"]),
        )

    def stats(self) -> dict[str, Any]:
        return {
            "documents": len(self._documents),
            "chunks": self._chunk_count,
            "words": self._lexicon.wordCount(),
            "embedder": self.embedder_name,
            "dim": self.dim,
        }

    # --------------------------------------------------------------- writing

    def add_document(
        self,
        doc_id: str,
        text: str,
        metadata: dict[str, Any] | None = None,
        embedder: Embedder | None = None,
        *,
        whole: bool = False,
    ) -> list[int]:
        """Split, chunk, embed and index one document; return its chunk ids.

        Re-adding an existing ``doc_id`` replaces its old chunks. With no
        ``embedder``, the one the catalog was built with is used. With
        ``whole=True`` a document of at most ``max_chars`` characters is one
        chunk (for text that is not prose, such as a method's source: it is
        embedded once instead of sentence by sentence).
        """
        return self.add_documents([(doc_id, text, metadata)], embedder, whole=whole)[0]

    def add_documents(
        self,
        items: Iterable[tuple[str, str, dict[str, Any] | None]],
        embedder: Embedder | None = None,
        *,
        whole: bool = False,
    ) -> list[list[int]]:
        """Add many ``(doc_id, text, metadata)`` documents, embedding in batches.

        All embedding happens before anything in the store changes, so a
        failing embedder leaves the catalog as it was. ``whole``: see
        :meth:`add_document`.
        """
        docs = [self._validate(doc_id, text, metadata) for doc_id, text, metadata in items]
        if not docs:
            return []
        embedder = self._resolve(embedder)
        self._check_embedder(embedder, adopt=True)
        prepared = self._prepare([text for _, text, _ in docs], embedder, whole=whole)

        self._begin_change()
        added: list[int] = []
        removed: list[int] = []
        if self.embedder_name is None or self._chunk_count == 0:
            self.embedder_name, self.dim = embedder.name, int(embedder.dim)
        all_ids = []
        for (doc_id, text, metadata), (chunks, vectors) in zip(docs, prepared, strict=True):
            removed.extend(self._remove(doc_id))
            ids = []
            for position, (chunk_text, vector) in enumerate(zip(chunks, vectors, strict=True)):
                self._last_chunk_id += 1
                chunk_id = self._last_chunk_id
                self._chunks[chunk_id] = {
                    "doc_id": doc_id,
                    "position": position,
                    "text": chunk_text,
                }
                self._vectors[chunk_id] = vector.astype(_VECTOR_DTYPE).tobytes()
                self._text_index.index_doc(chunk_id, chunk_text)
                ids.append(chunk_id)
            self._documents[doc_id] = {
                "metadata": metadata,
                "chunk_ids": tuple(ids),
                "chars": len(text),
                "added_at": time.time(),
            }
            self._chunk_count += len(ids)
            added.extend(ids)
            all_ids.append(ids)
        self._log_change(added, removed)
        return all_ids

    def remove_document(self, doc_id: str) -> bool:
        """Remove a document and its chunks; False if there was none."""
        if doc_id not in self._documents:
            return False
        self._begin_change()
        self._log_change([], self._remove(doc_id))
        return True

    def reindex(self, embedder: Embedder, batch_size: int = 256) -> int:
        """Re-embed every chunk with ``embedder`` (chunk boundaries are kept).

        This is the way to switch embedding models; commit afterwards. To
        re-chunk as well, add the documents again. Returns the chunk count.
        """
        ids = list(self._chunks.keys())
        vectors: dict[int, bytes] = {}  # compute all first: a failure changes nothing
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            texts = [self._chunks[cid]["text"] for cid in batch]
            encoded = _check_vectors(embedder.encode(texts), len(texts), embedder)
            for cid, vector in zip(batch, encoded, strict=True):
                vectors[cid] = vector.astype(_VECTOR_DTYPE).tobytes()
        self._begin_change()
        for cid, blob in vectors.items():
            self._vectors[cid] = blob
        self.embedder_name, self.dim = embedder.name, int(embedder.dim)
        self._log_change(None, None)  # every vector changed: indexes start over
        return len(ids)

    # ------------------------------------------------------------- searching

    def search(
        self,
        query: str,
        embedder: Embedder | None = None,
        top_k: int = 5,
        *,
        min_score: float = 0.0,
    ) -> list[Hit]:
        """Hybrid keyword + semantic search, best first.

        For every chunk: ``text_score`` is its Okapi BM25 score for the query
        divided by the highest BM25 score of the query (so the best keyword
        match is 1.0, chunks without a query word are 0.0);
        ``vector_score`` is the cosine similarity of query and chunk
        embeddings. ``score = text_weight * text_score + (1 - text_weight) *
        max(vector_score, 0)`` with ``text_weight = 0.5`` by default. A chunk
        that only matches words and one that only matches meaning can both
        rank; chunks scoring ``<= min_score`` are left out. Ties go to the
        older chunk. A blank query gives ``[]``; a query of stop words or
        unknown words still gets vector hits.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be str, not {type(query).__name__}")
        if not query.strip() or top_k <= 0 or self._chunk_count == 0:
            return []
        query = query[:MAX_QUERY_CHARS]
        embedder = self._resolve(embedder)
        self._check_embedder(embedder, adopt=False)

        query_vector = _check_vectors(embedder.encode([query]), 1, embedder)[0]
        ids, cosine, text_norm = self._score(query, query_vector, max(int(top_k), _CANDIDATES))
        if not len(ids):
            return []
        combined = self.text_weight * text_norm + (1.0 - self.text_weight) * np.clip(
            cosine, 0.0, 1.0
        )
        wanted = min(len(ids), int(top_k) + 16)  # a few spare: some may be gone in this view
        threshold = -np.partition(-combined, wanted - 1)[wanted - 1]
        rows = np.flatnonzero(combined >= threshold)  # with every tie at the boundary
        order = rows[np.lexsort((ids[rows], -combined[rows]))]  # ties go to the older chunk
        hits = []
        for row in order.tolist():
            if len(hits) == top_k or combined[row] <= min_score:
                break
            chunk_id = int(ids[row])
            record = self._chunks.get(chunk_id)
            if record is None:
                continue  # removed in this connection's view, not yet in the shared index
            hits.append(
                Hit(
                    chunk_id=chunk_id,
                    doc_id=record["doc_id"],
                    text=record["text"],
                    metadata=self._doc_metadata(record["doc_id"]),
                    score=float(combined[row]),
                    text_score=float(text_norm[row]),
                    vector_score=float(cosine[row]),
                    position=record["position"],
                )
            )
        return hits

    def _score(
        self, query: str, vector: np.ndarray, candidates: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk ids with their cosine and normalised BM25 scores, for every chunk
        (exact) or for the best candidates by each (approximate)."""
        index, added, removed = current_index(self)
        text_ids, text_scores = self._text_hits(query)
        with index.lock:
            if not index.approximate:
                ids, cosine = index.all_cosines(vector)
            else:
                ids, cosine = index.nearest(vector, candidates)
                best_text = text_ids[_best(text_scores, candidates)]
                extra = np.setdiff1d(best_text, ids)
                extra_cosine = index.cosines(vector, extra)
                held = ~np.isnan(extra_cosine)
                ids = np.concatenate([ids, extra[held]])
                cosine = np.concatenate([cosine, extra_cosine[held]])
        if added:  # written in this transaction, not committed: scanned here
            new_ids = np.fromiter(added, dtype=np.int64, count=len(added))
            matrix = np.vstack([self._vector(cid) for cid in added])
            keep = ~np.isin(ids, new_ids)
            ids = np.concatenate([ids[keep], new_ids])
            cosine = np.concatenate([cosine[keep], matrix @ vector])
        if removed:
            keep = ~np.isin(ids, np.fromiter(removed, dtype=np.int64, count=len(removed)))
            ids, cosine = ids[keep], cosine[keep]
        text_norm = np.zeros(len(ids), dtype=np.float64)
        if len(text_ids):
            best = float(text_scores.max())
            if best > 0 and math.isfinite(best):
                rows = np.minimum(np.searchsorted(text_ids, ids), len(text_ids) - 1)
                found = text_ids[rows] == ids
                text_norm[found] = text_scores[rows[found]] / best
        return ids, cosine.astype(np.float64), text_norm

    # -------------------------------------------------------------- internals

    def _validate(
        self, doc_id: str, text: str, metadata: dict[str, Any] | None
    ) -> tuple[str, str, dict[str, Any]]:
        if not isinstance(doc_id, str) or not doc_id.strip():
            raise ValueError("doc_id must be a non-empty string")
        if len(doc_id) > MAX_DOC_ID_CHARS:
            raise ValueError(f"doc_id longer than {MAX_DOC_ID_CHARS} characters")
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"document {doc_id!r} has no text")
        if len(text) > MAX_DOCUMENT_CHARS:
            raise ValueError(
                f"document {doc_id!r} has {len(text)} characters; the limit is "
                f"{MAX_DOCUMENT_CHARS} (split it into several documents)"
            )
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict or None")
        # A private deep copy: later changes by the caller must not leak into the image.
        return doc_id, text, copy.deepcopy(dict(metadata or {}))

    def _prepare(
        self, texts: list[str], embedder: Embedder, *, whole: bool = False
    ) -> list[tuple[list[str], np.ndarray]]:
        """Sentences -> semantic chunks -> chunk vectors, for many documents at once."""
        sentence_lists = [
            [t.strip()] if whole and len(t.strip()) <= self.max_chars
            else split_long(split_sentences(t), self.max_chars)
            for t in texts
        ]  # fmt: skip
        # Sentence vectors are only needed to find topic shifts in longer documents.
        flat = [s for sentences in sentence_lists if len(sentences) > 1 for s in sentences]
        sentence_vectors = _check_vectors(embedder.encode(flat), len(flat), embedder)

        plans = []  # (chunk texts, per chunk: a reusable sentence vector or None)
        offset = 0
        for sentences in sentence_lists:
            if len(sentences) <= 1:
                plans.append((sentences, [None] * len(sentences)))
                continue
            vectors = sentence_vectors[offset : offset + len(sentences)]
            offset += len(sentences)
            spans = semantic_chunk_spans(
                sentences,
                vectors,
                percentile=self.chunk_percentile,
                max_sentences=self.max_sentences,
                max_chars=self.max_chars,
            )
            texts_ = [" ".join(sentences[a:b]) for a, b in spans]
            # A one-sentence chunk has exactly that sentence's vector already.
            reuse = [vectors[a] if b - a == 1 else None for a, b in spans]
            plans.append((texts_, reuse))

        to_encode = [
            t for chunks, reuse in plans for t, v in zip(chunks, reuse, strict=True) if v is None
        ]
        encoded = iter(_check_vectors(embedder.encode(to_encode), len(to_encode), embedder))
        prepared = []
        for chunks, reuse in plans:
            rows = [v if v is not None else next(encoded) for v in reuse]
            matrix = np.vstack(rows) if rows else np.zeros((0, embedder.dim), np.float32)
            prepared.append((chunks, matrix))
        return prepared

    def _remove(self, doc_id: str) -> list[int]:
        """Remove a document's chunks; return their ids."""
        record = self._documents.get(doc_id)
        if record is None:
            return []
        for chunk_id in record["chunk_ids"]:
            self._text_index.unindex_doc(chunk_id)
            self._chunks.pop(chunk_id, None)
            self._vectors.pop(chunk_id, None)
        del self._documents[doc_id]
        self._chunk_count -= len(record["chunk_ids"])
        return list(record["chunk_ids"])

    def _begin_change(self) -> None:
        # The generation this transaction started from: the shared indexes hold
        # committed changes only; later ones are searched beside them.
        if not self.changed_in_this_transaction():
            self._v_base_generation = self._generation
        self._v_changed_in = _current_transaction(self)

    def changed_in_this_transaction(self) -> bool:
        """True when this connection's transaction has changed the catalog.

        ``_p_changed`` alone would miss a change made before a savepoint.
        """
        if self._p_changed:
            return True
        changed_in = self.__dict__.get("_v_changed_in")
        return changed_in is not None and changed_in is _current_transaction(self)

    def logged_changes(self, since: int, until: int) -> list[tuple[Any, str]] | None:
        """The logged ``(change, stamp)`` of every generation after ``since`` up to ``until``;
        None when the log does not reach back that far."""
        if since < 0 or self._changes is None:
            return None
        entries = [self._changes.get(g) for g in range(since + 1, until + 1)]
        return None if any(entry is None for entry in entries) else entries

    def _log_change(self, added: list[int] | None, removed: list[int] | None) -> None:
        """Record one change (None: every vector changed) and move to the next generation."""
        if self._changes is None:
            self._changes = LOBTree()
        self._generation += 1
        self._stamp = secrets.token_hex(8)
        entry = None if added is None else (tuple(added), tuple(removed or ()))
        self._changes[self._generation] = (entry, self._stamp)
        self._changes.pop(self._generation - _LOG_KEPT, None)

    def _doc_metadata(self, doc_id: str) -> dict[str, Any]:
        record = self._documents.get(doc_id)
        return copy.deepcopy(record["metadata"]) if record is not None else {}

    def _resolve(self, embedder: Embedder | None) -> Embedder:
        if embedder is not None:
            return embedder
        if self.embedder_name is None:
            return default_embedder("auto")
        if self.embedder_name not in _resolved_embedders:
            _resolved_embedders[self.embedder_name] = embedder_from_name(self.embedder_name)
        return _resolved_embedders[self.embedder_name]

    def _check_embedder(self, embedder: Embedder, *, adopt: bool) -> None:
        if self.embedder_name is None or (adopt and self._chunk_count == 0):
            return
        if embedder.name != self.embedder_name or int(embedder.dim) != self.dim:
            raise EmbedderMismatchError(
                f"this catalog's {self._chunk_count} chunks were embedded with "
                f"{self.embedder_name!r} (dim {self.dim}), not {embedder.name!r} "
                f"(dim {embedder.dim}). Search with the same embedder, or switch: "
                f"call store.reindex(new_embedder) and commit the transaction."
            )

    def _vector(self, chunk_id: int) -> np.ndarray:
        return np.frombuffer(self._vectors[chunk_id], dtype=_VECTOR_DTYPE).astype(np.float32)

    def _text_hits(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Ascending ids and BM25 scores of the chunks holding a word of the query."""
        scored = text_scores(self, query)  # the same scores, from the process's arrays
        if scored is not None:
            return scored
        # OR over the query's words (stop words dropped by the lexicon); None
        # means the query had no indexable word at all.
        results = self._text_index.search(query)
        if not results:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        ids = np.fromiter(results.keys(), dtype=np.int64, count=len(results))
        scores = np.fromiter(results.values(), dtype=np.float64, count=len(results))
        return ids, scores


def _current_transaction(store: Any) -> Any:
    """The transaction of the store's connection, or None (none begun, or no connection)."""
    jar = store._p_jar
    if jar is None:
        return None
    try:
        return jar.transaction_manager.get()
    except NoTransaction:
        return None


def _best(scores: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` highest scores (in no particular order)."""
    if len(scores) <= count:
        return np.arange(len(scores))
    return np.argpartition(-scores, count - 1)[:count]


def _check_vectors(vectors: Any, count: int, embedder: Embedder) -> np.ndarray:
    """Validate an embedder's output and re-normalise its rows."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.shape != (count, int(embedder.dim)):
        raise ValueError(
            f"embedder {embedder.name!r} returned shape {array.shape}, "
            f"expected ({count}, {embedder.dim})"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"embedder {embedder.name!r} returned non-finite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return array / norms
