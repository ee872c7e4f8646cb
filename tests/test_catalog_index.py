"""The catalog's vector index: incremental, shared by connections, approximate past a
threshold, and saved to a file so a restart does not rebuild it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from batos_uvm import catalog_index as catalog_module
from batos_uvm.catalog import CatalogStore, set_index_directory
from batos_uvm.text import HashingEmbedder
from batos_uvm.vector_index import VectorIndex

EMB = HashingEmbedder(dim=64)
WORDS = ("cat dog owl fox bread oven soup rain snow wind python bytecode ticket train "
         "piano drum rose tulip bank stock").split()  # fmt: skip


def sentence(n: int) -> str:
    rnd = np.random.default_rng(n)
    return " ".join(rnd.choice(WORDS, 6)) + f" number{n}."


@pytest.fixture
def db(tmp_path: Path):
    database = ZODB.DB(FileStorage(str(tmp_path / "live_image.fs")))
    yield database
    database.close()
    set_index_directory(None)


def fill(store: CatalogStore, start: int, count: int) -> None:
    store.add_documents([(f"d{n}", sentence(n), None) for n in range(start, start + count)], EMB)


def exact_ids(store: CatalogStore, query: str, k: int) -> list[int]:
    """The hybrid top k computed over every chunk, by brute force."""
    private = catalog_module.private_index(store)
    ids, cosine = private.all_cosines(EMB.encode([query])[0])
    text_ids, scores = store._text_hits(query)
    text = dict(zip(text_ids.tolist(), (scores / scores.max()).tolist(), strict=True))
    combined = [0.5 * text.get(int(i), 0.0) + 0.5 * max(float(c), 0.0)
                for i, c in zip(ids, cosine, strict=True)]  # fmt: skip
    return [int(ids[r]) for r in sorted(range(len(ids)), key=lambda r: (-combined[r], ids[r]))[:k]]


def test_a_write_updates_the_shared_index_without_a_rebuild(db) -> None:
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(transaction_manager=tm1), db.open(transaction_manager=tm2)
    store = c1.root()["catalog"] = CatalogStore()
    fill(store, 0, 300)
    tm1.commit()
    store.search("cat oven", EMB)
    index = catalog_module.shared_index(store)
    built_at = index.generation

    tm2.begin()
    other = c2.root()["catalog"]
    assert catalog_module.shared_index(other) is index  # one index for the process
    other.add_document("ferns", "Ferns reproduce by spores in the shade.", None, EMB)
    tm2.commit()
    tm1.begin()
    hits = store.search("ferns spores", EMB)
    assert hits[0].doc_id == "ferns"
    assert index.generation == built_at + 1 and len(index) == 301  # one change applied
    c1.close()
    c2.close()


def test_uncommitted_changes_are_searched_but_never_shared(db) -> None:
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(transaction_manager=tm1), db.open(transaction_manager=tm2)
    store = c1.root()["catalog"] = CatalogStore()
    fill(store, 0, 50)
    tm1.commit()
    store.add_document("ferns", "Ferns reproduce by spores.", None, EMB)
    store.remove_document("d3")
    assert store.search("ferns spores", EMB)[0].doc_id == "ferns"  # seen in its transaction
    assert all(hit.doc_id != "d3" for hit in store.search(sentence(3), EMB, top_k=50))
    tm2.begin()
    other = c2.root()["catalog"]
    assert all(hit.doc_id != "ferns" for hit in other.search("ferns spores", EMB))
    assert other.search(sentence(3), EMB)[0].doc_id == "d3"
    tm1.abort()
    assert len(catalog_module.shared_index(store)) == 50
    c1.close()
    c2.close()


def test_past_the_threshold_search_is_approximate_and_finds_the_exact_top(db) -> None:
    conn = db.open()
    store = conn.root()["catalog"] = CatalogStore()
    fill(store, 0, 3000)
    transaction.commit()
    index = catalog_module.shared_index(store)
    store.search("cat", EMB)
    index._to_ann()  # as if the catalog had grown past the real threshold
    assert index.approximate
    recall = []
    for n in range(0, 3000, 150):
        query = sentence(n + 7)
        want = exact_ids(store, query, 5)
        got = [hit.chunk_id for hit in store.search(query, EMB, top_k=5)]
        recall.append(len(set(want) & set(got)) / 5)
    assert np.mean(recall) >= 0.9
    fill(store, 5000, 10)  # incremental adds go into the graph
    transaction.commit()
    assert store.search(sentence(5003), EMB)[0].doc_id == "d5003"
    assert len(index) == 3010
    conn.close()


def test_a_saved_index_is_loaded_instead_of_rebuilt(db, tmp_path: Path, caplog) -> None:
    set_index_directory(tmp_path / "indexes")
    conn = db.open()
    store = conn.root()["catalog"] = CatalogStore()
    fill(store, 0, 1500)
    transaction.commit()
    store.search("cat", EMB)  # builds the index and saves it (>= 1,000 vectors)
    saved = list((tmp_path / "indexes").iterdir())
    assert any(p.name.endswith(".json") for p in saved)
    fill(store, 2000, 5)  # a change after the save: replayed from the log on load
    transaction.commit()
    conn.close()
    catalog_module._shared.clear()  # as after a restart

    conn = db.open()
    store = conn.root()["catalog"]
    with caplog.at_level(logging.INFO, logger="batos.catalog"):
        assert store.search(sentence(2002), EMB)[0].doc_id == "d2002"
    assert "loaded from" in caplog.text and "built" not in caplog.text
    assert len(catalog_module.shared_index(store)) == 1505
    conn.close()


def test_an_index_file_of_another_history_is_not_used(db, tmp_path: Path) -> None:
    set_index_directory(tmp_path / "indexes")
    conn = db.open()
    store = conn.root()["catalog"] = CatalogStore()
    fill(store, 0, 1200)
    transaction.commit()
    store.search("cat", EMB)
    path = catalog_module._index_path(store)
    stale, info = VectorIndex.load(path)
    stale.stamp = "another history"
    stale.save(path, {"embedder": info["embedder"]})
    catalog_module._shared.clear()
    assert catalog_module._load_saved(store, 20_000) is None
    assert store.search(sentence(5), EMB)[0].doc_id == "d5"
    conn.close()


def test_vector_index_exact_mode_adds_and_removes_in_place() -> None:
    index = VectorIndex(3, ann_threshold=10**9)
    index.add(np.array([5, 6, 7]), np.eye(3, dtype=np.float32))
    index.remove([6])
    index.add(np.array([8, 5]), np.array([[0, 1, 0], [0, 0, 1]], dtype=np.float32))
    ids, cosine = index.all_cosines(np.array([0, 0, 1], dtype=np.float32))
    assert dict(zip(ids.tolist(), cosine.tolist(), strict=True)) == {5: 1.0, 7: 1.0, 8: 0.0}
    assert len(index) == 3
    assert np.isnan(index.cosines(np.array([1, 0, 0], dtype=np.float32), np.array([6]))[0])


def test_a_whole_document_is_one_chunk_embedded_once() -> None:
    calls = []

    class Counting(HashingEmbedder):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    store = CatalogStore()
    source = "Skill m (m): a method. Source:\ndef m(self):\n    return self.x.y + 1.5\n"
    ids = store.add_document("skill", source, None, Counting(64), whole=True)
    assert len(ids) == 1 and store.get_chunk(ids[0]).text == source.strip()
    assert calls == [[], [source.strip()]]  # no sentence vectors; the text once
    long = "word " * 400  # longer than max_chars: chunked as usual
    assert len(store.add_document("long", long, None, EMB, whole=True)) > 1
