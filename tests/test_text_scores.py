"""BM25 from the process's per-word arrays: the scores zope.index computes, kept up to
date by the catalog's change log, and never used for a view they do not describe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from batos_uvm import text_scores as scores_module
from batos_uvm.catalog import CatalogStore
from batos_uvm.text import HashingEmbedder
from batos_uvm.text_scores import text_scores

EMB = HashingEmbedder(dim=32)
WORDS = ("cat dog owl fox bread oven soup rain snow wind python bytecode ticket train "
         "piano drum rose tulip bank stock").split()  # fmt: skip
QUERIES = ["cat", "cat dog", "oven oven soup", "the cat and the rain", "python bytecode ticket",
           "rose unknownword", "number7", "zzz", "the and of"]  # fmt: skip


def sentence(rnd: np.random.Generator, n: int) -> str:
    return " ".join(rnd.choice(WORDS, int(rnd.integers(1, 12)))) + f" number{n}."


@pytest.fixture
def db(tmp_path: Path):
    database = ZODB.DB(FileStorage(str(tmp_path / "live_image.fs")))
    yield database
    database.close()


def committed_catalog(db, rnd: np.random.Generator, count: int) -> CatalogStore:
    store = db.open().root()["catalog"] = CatalogStore()
    store.add_documents([(f"d{n}", sentence(rnd, n), None) for n in range(count)], EMB)
    transaction.commit()
    return store


def two_connections(db):
    """Two connections; the first has committed a catalog holding "owl and fox"."""
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(transaction_manager=tm1), db.open(transaction_manager=tm2)
    store1 = c1.root()["catalog"] = CatalogStore()
    store1.add_document("a", "owl and fox", None, EMB)
    tm1.commit()
    return (tm1, c1, store1), (tm2, c2)


def zope_scores(store: CatalogStore, query: str) -> dict[int, float]:
    results = store._text_index.search(query)
    return {int(k): float(v) for k, v in (results or {}).items()}


def assert_same_as_zope(store: CatalogStore, query: str) -> None:
    scored = text_scores(store, query)
    assert scored is not None, "the shared arrays should answer a committed view"
    ids, values = scored
    assert list(ids) == sorted(ids)
    # the very same numbers, to the last bit: rankings must not change at ties
    assert dict(zip(ids.tolist(), values.tolist(), strict=True)) == zope_scores(store, query), query


def test_scores_are_zope_s_through_adds_removals_and_reindexing(db, monkeypatch) -> None:
    rnd = np.random.default_rng(7)
    store = committed_catalog(db, rnd, 300)
    for query in QUERIES:
        assert_same_as_zope(store, query)
    loads = []
    real_load = scores_module._load
    monkeypatch.setattr(scores_module, "_load", lambda *a: loads.append(a[1]) or real_load(*a))
    for step in range(40):
        action = rnd.integers(0, 4)
        if action == 0:
            n = 300 + step
            store.add_document(f"d{n}", sentence(rnd, n), None, EMB)
        elif action == 1:
            store.remove_document(f"d{int(rnd.integers(0, 300))}")
        elif action == 2:  # a document replaced: removed and added in one change
            n = int(rnd.integers(0, 300))
            store.add_document(f"d{n}", sentence(rnd, 1000 + step), None, EMB)
        else:
            store.reindex(EMB)  # every vector changes, the text does not
        transaction.commit()
        for query in QUERIES:
            assert_same_as_zope(store, query)
    # words searched before were brought up to date from the log, not loaded again
    assert not loads


def test_a_change_not_yet_committed_is_answered_by_zope(db) -> None:
    conn = db.open()
    store = conn.root()["catalog"] = CatalogStore()
    store.add_document("a", "the cat sat on the mat", None, EMB)
    transaction.commit()
    assert text_scores(store, "cat") is not None
    store.add_document("b", "a cat and a cat", None, EMB)
    assert text_scores(store, "cat") is None
    hits = store.search("cat", EMB, top_k=5)
    assert {hit.doc_id for hit in hits} == {"a", "b"}  # the uncommitted chunk is found
    transaction.abort()
    assert_same_as_zope(store, "cat")


def test_an_older_view_is_answered_by_zope_and_a_newer_one_catches_up(db) -> None:
    (tm1, c1, store1), (tm2, c2) = two_connections(db)
    tm2.begin()
    store2 = c2.root()["catalog"]
    assert_same_as_zope(store2, "owl")  # c2's view, the latest
    store1.add_document("b", "owl owl owl", None, EMB)
    tm1.commit()
    assert_same_as_zope(store1, "owl")  # c1 moves the cache to the newer state
    assert text_scores(store2, "owl") is None  # c2 still sees the older one
    assert [hit.doc_id for hit in store2.search("owl", EMB)] == ["a"]
    tm2.abort()
    tm2.begin()
    assert_same_as_zope(store2, "owl")
    assert [hit.doc_id for hit in store2.search("owl", EMB)][0] == "b"


def test_the_cache_keeps_at_most_its_budget(db, monkeypatch) -> None:
    monkeypatch.setattr(scores_module, "MAX_CACHED_POSTINGS", 500)
    store = committed_catalog(db, np.random.default_rng(3), 400)
    for word in WORDS:
        assert_same_as_zope(store, word)
    cache = scores_module._cache_of(db, store._p_oid)
    assert cache.size == sum(p.size for p in cache.words.values()) <= 500
    assert 0 < len(cache.words) < len(WORDS)


def test_sparse_chunk_ids_are_summed_without_a_dense_array(db) -> None:
    conn = db.open()
    store = conn.root()["catalog"] = CatalogStore()
    store.add_document("old", "cat and dog", None, EMB)
    store._last_chunk_id = 2**40  # as after a very long life
    store.add_documents([("new", "cat cat", None), ("other", "dog only", None)], EMB)
    transaction.commit()
    for query in ("cat dog", "dog cat cat", "cat"):
        assert_same_as_zope(store, query)
    ids, _ = text_scores(store, "cat dog")
    assert len(ids) == 3 and ids[-1] > 2**40


def test_an_undone_change_does_not_leave_its_scores_behind(db) -> None:
    conn = db.open()
    store = conn.root()["catalog"] = CatalogStore()
    store.add_document("a", "fox and hound", None, EMB)
    transaction.commit()
    store.add_document("b", "owl", None, EMB)
    transaction.commit()
    assert_same_as_zope(store, "owl fox")  # cached with b in it
    db.undo(db.undoLog(0, 1)[0]["id"])  # the catalog goes back: no b
    transaction.commit()
    conn.sync()
    assert "b" not in store and text_scores(store, "owl fox") is None
    store.add_document("c", "owl owl owl", None, EMB)  # the same generation as b's, anew
    transaction.commit()
    assert_same_as_zope(store, "owl fox")
    assert [hit.doc_id for hit in store.search("owl", EMB)] == ["c"]


def test_long_queries_over_many_chunks_score_as_zope_to_the_last_bit(db) -> None:
    # Words of Zipf-like frequencies over 3,000 chunks: scores of many words added up
    # in another order would differ in the last bits and reorder near-ties.
    rnd = np.random.default_rng(5)
    words = np.array([f"w{i}" for i in range(400)])
    weights = 1.0 / np.arange(1, 401) ** 0.8
    weights /= weights.sum()
    store = db.open().root()["catalog"] = CatalogStore()
    store.add_documents([(f"d{n}", " ".join(rnd.choice(words, int(rnd.integers(1, 40)), p=weights)),
                          None) for n in range(3000)], EMB, whole=True)  # fmt: skip
    transaction.commit()
    for _ in range(150):
        assert_same_as_zope(store, " ".join(rnd.choice(words, int(rnd.integers(2, 12)))))


def test_a_change_before_a_savepoint_is_still_not_committed(db) -> None:
    (tm1, c1, store1), (tm2, c2) = two_connections(db)
    store1.add_document("b", "owl owl owl", None, EMB)
    tm1.savepoint()  # the store's _p_changed is False from here on
    assert store1.changed_in_this_transaction()
    assert text_scores(store1, "owl") is None
    assert {hit.doc_id for hit in store1.search("owl", EMB)} == {"a", "b"}
    tm1.abort()
    tm2.begin()
    store2 = c2.root()["catalog"]
    assert_same_as_zope(store2, "owl")  # nothing uncommitted reached the shared arrays
    assert [hit.doc_id for hit in store2.search("owl", EMB)] == ["a"]


def test_a_query_of_many_words_is_left_to_zope_and_leaves_the_cache_alone(db) -> None:
    store = committed_catalog(db, np.random.default_rng(2), 200)
    assert_same_as_zope(store, "cat dog")
    cache = scores_module._cache_of(db, store._p_oid)
    before = dict(cache.words)
    many = " ".join(f"number{n}" for n in range(scores_module.MAX_CACHED_QUERY_WORDS + 1))
    assert text_scores(store, many) is None
    assert cache.words == before
    hits = store.search(many, EMB, top_k=3)
    assert len(hits) == 3 and all(hit.text_score > 0 for hit in hits)
