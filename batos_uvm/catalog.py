"""The knowledge catalog ("Fractal Memory"): chunked documents, searchable
by keywords and by meaning, held entirely in the living image.

A :class:`CatalogStore` is one persistent object. Everything it needs to
answer a search after a restart is part of its pickled state: the documents,
the chunks, the full-text index (a zope.index Okapi BM25 index and its
lexicon) and one float32 embedding per chunk. Only a matrix of those
embeddings is volatile (a ``_v_`` attribute) and is rebuilt on demand.

The caller owns the transaction: nothing here commits or aborts.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import BTrees
import numpy as np
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from zope.index.text.lexicon import CaseNormalizer, Lexicon, Splitter, StopWordRemover
from zope.index.text.okapiindex import OkapiIndex

from batos_uvm.text import (
    Embedder,
    default_embedder,
    embedder_from_name,
    semantic_chunk_spans,
    split_long,
    split_sentences,
)

__all__ = ["CatalogStore", "Chunk", "DocumentInfo", "EmbedderMismatchError", "Hit"]

MAX_DOC_ID_CHARS = 512
MAX_DOCUMENT_CHARS = 2_000_000
MAX_QUERY_CHARS = 10_000
_VECTOR_DTYPE = np.dtype("<f4")  # fixed byte order: images move between machines


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
    ) -> list[int]:
        """Split, chunk, embed and index one document; return its chunk ids.

        Re-adding an existing ``doc_id`` replaces its old chunks. With no
        ``embedder``, the one the catalog was built with is used.
        """
        return self.add_documents([(doc_id, text, metadata)], embedder)[0]

    def add_documents(
        self,
        items: Iterable[tuple[str, str, dict[str, Any] | None]],
        embedder: Embedder | None = None,
    ) -> list[list[int]]:
        """Add many ``(doc_id, text, metadata)`` documents, embedding in batches.

        All embedding happens before anything in the store changes, so a
        failing embedder leaves the catalog as it was.
        """
        docs = [self._validate(doc_id, text, metadata) for doc_id, text, metadata in items]
        if not docs:
            return []
        embedder = self._resolve(embedder)
        self._check_embedder(embedder, adopt=True)
        prepared = self._prepare([text for _, text, _ in docs], embedder)

        if self.embedder_name is None or self._chunk_count == 0:
            self.embedder_name, self.dim = embedder.name, int(embedder.dim)
        all_ids = []
        for (doc_id, text, metadata), (chunks, vectors) in zip(docs, prepared, strict=True):
            self._remove(doc_id)
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
            all_ids.append(ids)
        self._generation += 1
        return all_ids

    def remove_document(self, doc_id: str) -> bool:
        """Remove a document and its chunks; False if there was none."""
        removed = self._remove(doc_id)
        if removed:
            self._generation += 1
        return removed

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
        for cid, blob in vectors.items():
            self._vectors[cid] = blob
        self.embedder_name, self.dim = embedder.name, int(embedder.dim)
        self._generation += 1
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

        ids, matrix = self._matrix()
        query_vector = _check_vectors(embedder.encode([query]), 1, embedder)[0]
        # einsum, not BLAS: on few cores, multi-threaded BLAS right after a torch
        # encode fights torch's still-spinning threads and gets 10-100x slower.
        cosine = np.einsum("ij,j->i", matrix, query_vector)
        text_norm = self._text_scores(query, ids)
        combined = self.text_weight * text_norm + (1.0 - self.text_weight) * np.clip(
            cosine, 0.0, 1.0
        )

        k = min(int(top_k), len(ids))
        top = np.argpartition(-combined, k - 1)[:k]
        order = sorted(top.tolist(), key=lambda row: (-combined[row], ids[row]))
        hits = []
        for row in order:
            if combined[row] <= min_score:
                break
            chunk_id = int(ids[row])
            record = self._chunks[chunk_id]
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

    def _prepare(self, texts: list[str], embedder: Embedder) -> list[tuple[list[str], np.ndarray]]:
        """Sentences -> semantic chunks -> chunk vectors, for many documents at once."""
        sentence_lists = [split_long(split_sentences(t), self.max_chars) for t in texts]
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

    def _remove(self, doc_id: str) -> bool:
        record = self._documents.get(doc_id)
        if record is None:
            return False
        for chunk_id in record["chunk_ids"]:
            self._text_index.unindex_doc(chunk_id)
            self._chunks.pop(chunk_id, None)
            self._vectors.pop(chunk_id, None)
        del self._documents[doc_id]
        self._chunk_count -= len(record["chunk_ids"])
        return True

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

    def _matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ids (ascending) and their embeddings as one (n, dim) matrix.

        Cached in a volatile attribute keyed by ``_generation``: ZODB drops
        ``_v_`` attributes when the object is invalidated by another
        connection's commit or by an abort, and a local change bumps the
        generation, so the cache is never stale.
        """
        cache = getattr(self, "_v_matrix", None)
        if cache is not None and cache[0] == self._generation:
            return cache[1], cache[2]
        ids = np.fromiter(self._vectors.keys(), dtype=np.int64, count=len(self._vectors))
        blob = b"".join(self._vectors.values())
        matrix = np.frombuffer(blob, dtype=_VECTOR_DTYPE).reshape(len(ids), int(self.dim))
        matrix = matrix.astype(np.float32)  # native order, writable, C-contiguous
        self._v_matrix = (self._generation, ids, matrix)
        return ids, matrix

    def _text_scores(self, query: str, ids: np.ndarray) -> np.ndarray:
        """Per-row BM25 scores for the query, divided by the best one."""
        scores = np.zeros(len(ids), dtype=np.float64)
        # OR over the query's words (stop words dropped by the lexicon); None
        # means the query had no indexable word at all.
        results = self._text_index.search(query)
        if not results:
            return scores
        hit_ids = np.fromiter(results.keys(), dtype=np.int64, count=len(results))
        hit_scores = np.fromiter(results.values(), dtype=np.float64, count=len(results))
        rows = np.searchsorted(ids, hit_ids)
        valid = rows < len(ids)
        valid[valid] = ids[rows[valid]] == hit_ids[valid]
        best = float(hit_scores.max())
        if best > 0 and math.isfinite(best):
            scores[rows[valid]] = hit_scores[valid] / best
        return scores


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
