"""BM25 scores of catalog queries from per-word arrays shared by the process's connections.

zope.index's Okapi index scores a query word by walking the word's whole posting
list in Python: about a millisecond per 6,000 chunks, on every search. Here each
word's postings are kept as arrays (chunk ids, frequencies, chunk lengths), one
cache per (database, catalog), and a query is scored with a few vector operations
that give zope.index's very numbers: Okapi BM25 with K1 = 1.2, B = 0.75 and
idf = log(1 + N / df), each word's scores computed in double precision and
stored as float32, and the words added up pairwise, smallest first, in float32
(a word the query repeats counts once for each time).

The cached arrays follow the catalog's change log, like its vector index: a
write appends the chunks it added to the words they hold and drops those it
removed, so the first search after a write costs about what any search does.
Only committed states are cached. zope.index itself answers (``text_scores``
returns None) a transaction that has changed the catalog, a connection that
sees an older state than the cache, and a query of more than
``MAX_CACHED_QUERY_WORDS`` different words (which would crowd out the words
people search for).
"""

from __future__ import annotations

import math
import threading
import weakref
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["B", "K1", "MAX_CACHED_POSTINGS", "MAX_CACHED_QUERY_WORDS", "text_scores"]

K1 = 1.2  # zope.index.text.okapiindex.OkapiIndex.K1 (its C scorer hard-codes it too)
B = 0.75  # OkapiIndex.B
MAX_CACHED_POSTINGS = 2_000_000  # per catalog, 16 bytes each: at most ~32 MB of arrays
MAX_CACHED_QUERY_WORDS = 64  # different words in one query; beyond: zope.index
_RELOAD_PAST = 2_000  # chunks added since an entry was cached: past this, reload the word


@dataclass(frozen=True)
class _Postings:
    ids: np.ndarray  # int64, ascending, read-only
    freqs: np.ndarray  # float32, read-only
    lengths: np.ndarray  # float32 (as zope.index stores them), read-only
    generation: int

    def __post_init__(self) -> None:
        for array in (self.ids, self.freqs, self.lengths):
            array.flags.writeable = False  # shared by every connection of the process

    @property
    def size(self) -> int:
        return len(self.ids)


class _WordCache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = -1  # the newest committed generation seen
        self.stamp = ""  # and its stamp, which tells one history of the catalog from another
        self.words: OrderedDict[int, _Postings] = OrderedDict()
        self.size = 0

    def keep(self, wid: int, postings: _Postings) -> None:
        old = self.words.pop(wid, None)
        self.size += postings.size - (old.size if old is not None else 0)
        self.words[wid] = postings
        while self.size > MAX_CACHED_POSTINGS and len(self.words) > 1:
            _, evicted = self.words.popitem(last=False)
            self.size -= evicted.size

    def clear(self) -> None:
        self.words.clear()
        self.size = 0


_caches_lock = threading.Lock()
_caches: weakref.WeakKeyDictionary[Any, dict[bytes, _WordCache]] = weakref.WeakKeyDictionary()


def text_scores(store: Any, query: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Ascending chunk ids holding a word of ``query``, and their BM25 scores;
    None when zope.index must answer (see the module's documentation)."""
    jar, oid = store._p_jar, store._p_oid
    if jar is None or oid is None or store.changed_in_this_transaction():
        return None
    index = store._text_index
    wids = index._remove_oov_wids(index._lexicon.termToWordIds(query))
    if not wids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    distinct = list(dict.fromkeys(wids))
    if len(distinct) > MAX_CACHED_QUERY_WORDS:
        return None
    generation = store._generation
    cache = _cache_of(jar.db(), oid)
    with cache.lock:
        if generation < cache.generation:
            return None  # an older view than the cache's: zope.index answers it
        if not _same_history(store, cache, generation):
            cache.clear()  # an undo, say: the arrays describe another history
        cache.generation, cache.stamp = generation, store._stamp
        cached = {wid: cache.words.get(wid) for wid in distinct}
    # Loading reads this connection's objects: outside the lock, so a slow load
    # does not hold up other connections' searches.
    postings = {wid: _current(cached[wid], store, index, wid, generation) for wid in distinct}
    with cache.lock:
        if (cache.generation, cache.stamp) == (generation, store._stamp):
            for wid, word in postings.items():
                cache.keep(wid, word)
    count = float(index.documentCount())
    mean_length = float(index._totaldoclen()) / count
    return _union([(postings[wid].ids, _word_scores(postings[wid], count, mean_length))
                   for wid in wids])  # fmt: skip


def _word_scores(word: _Postings, count: float, mean_length: float) -> np.ndarray:
    """One word's BM25 per chunk, computed as zope.index's C scorer does (okascore.c)."""
    idf = math.log(1.0 + count / word.size)
    freqs = word.freqs.astype(np.float64)
    length_weight = (1.0 - B) + B * word.lengths.astype(np.float64) / mean_length
    tf = freqs * (K1 + 1.0) / (freqs + K1 * length_weight)
    return (tf * idf).astype(np.float32)


def _union(words: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Every word's chunks, scores added as zope.index's mass_weightedUnion adds them:
    the two smallest sets first, in float32."""
    queue: list[tuple[np.ndarray, np.ndarray]] = []
    sizes: list[int] = []
    for word in words:
        _enqueue(queue, sizes, word)
    while len(queue) > 1:
        (a_ids, a_scores), (b_ids, b_scores) = queue.pop(0), queue.pop(0)
        del sizes[:2]
        ids = np.concatenate([a_ids, b_ids])
        ids.sort(kind="stable")  # two ascending runs: merged in one pass
        ids = ids[np.concatenate([[True], ids[1:] != ids[:-1]])]
        scores = np.zeros(len(ids), dtype=np.float32)
        scores[np.searchsorted(ids, a_ids)] = a_scores
        scores[np.searchsorted(ids, b_ids)] += b_scores
        _enqueue(queue, sizes, (ids, scores))
    ids, scores = queue[0]
    return ids, scores.astype(np.float64)


def _enqueue(queue: list, sizes: list[int], word: tuple[np.ndarray, np.ndarray]) -> None:
    at = bisect_left(sizes, len(word[0]))  # before equal sizes, as zope.index's NBest
    sizes.insert(at, len(word[0]))
    queue.insert(at, word)


def _cache_of(db: Any, oid: bytes) -> _WordCache:
    with _caches_lock:
        per_db = _caches.setdefault(db, {})
        cache = per_db.get(oid)
        if cache is None:
            cache = per_db[oid] = _WordCache()
        return cache


def _same_history(store: Any, cache: _WordCache, generation: int) -> bool:
    """True when the catalog's log leads from the cache's state to ``generation``."""
    if generation == cache.generation:
        return store._stamp == cache.stamp
    own = store.logged_changes(cache.generation - 1, cache.generation)  # the cache's entry
    return (own is not None and own[0][1] == cache.stamp
            and store.logged_changes(cache.generation, generation) is not None)  # fmt: skip


def _current(
    cached: _Postings | None, store: Any, index: Any, wid: int, generation: int
) -> _Postings:
    if cached is not None and cached.generation != generation:
        cached = _advance(cached, store, index, wid, generation)
    return cached if cached is not None else _load(index, wid, generation)


def _load(index: Any, wid: int, generation: int) -> _Postings:
    frequencies = index._wordinfo[wid]  # chunk id -> times the word occurs in it
    ids = np.fromiter(frequencies.keys(), dtype=np.int64, count=len(frequencies))
    freqs = np.fromiter(frequencies.values(), dtype=np.float32, count=len(frequencies))
    lengths = _lengths(index, ids)
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):  # a small postings dict
        order = np.argsort(ids)
        ids, freqs, lengths = ids[order], freqs[order], lengths[order]
    return _Postings(ids, freqs, lengths, generation)


def _lengths(index: Any, ids: np.ndarray) -> np.ndarray:
    weights = index._docweight
    return np.fromiter((weights[int(i)] for i in ids), dtype=np.float32, count=len(ids))


def _advance(
    cached: _Postings, store: Any, index: Any, wid: int, generation: int
) -> _Postings | None:
    """``cached`` brought to ``generation`` from the change log; None: load it again."""
    entries = store.logged_changes(cached.generation, generation)
    if entries is None:
        return None
    added: set[int] = set()
    removed: set[int] = set()
    for change, _ in entries:
        if change is not None:  # None: every vector changed, the text did not
            added.update(change[0])
            removed.update(change[1])
    if len(added) > _RELOAD_PAST:
        return None
    ids, freqs, lengths = cached.ids, cached.freqs, cached.lengths
    if removed:
        keep = ~np.isin(ids, np.fromiter(removed, dtype=np.int64, count=len(removed)))
        ids, freqs, lengths = ids[keep], freqs[keep], lengths[keep]
    frequencies = index._wordinfo.get(wid)
    if frequencies is None:
        return None
    new = sorted(c for c in added - removed if frequencies.get(c) is not None)
    if new:
        new_ids = np.asarray(new, dtype=np.int64)
        if len(ids) and new_ids[0] <= ids[-1]:
            return None  # chunk ids only grow; anything else: load it again
        ids = np.concatenate([ids, new_ids])
        freqs = np.concatenate([freqs, np.asarray([frequencies[c] for c in new], np.float32)])
        lengths = np.concatenate([lengths, _lengths(index, new_ids)])
    if len(ids) != len(frequencies):
        return None  # not what the index holds: load it again
    return _Postings(ids, freqs, lengths, generation)
