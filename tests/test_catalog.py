"""The knowledge catalog on a real FileStorage (batos_uvm.catalog)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import BTrees
import numpy as np
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from batos_uvm.catalog import CatalogStore, EmbedderMismatchError, Hit
from batos_uvm.text import HashingEmbedder, MiniLMEmbedder

EMB = HashingEmbedder()

DOCS = {
    "cats": (
        "Cats are small carnivorous mammals. A cat purrs when it is content. "
        "Domestic cats sleep for most of the day and hunt mice at night.",
        {"topic": "animals", "source": "encyclopedia"},
    ),
    "stocks": (
        "The stock market fell sharply on Monday. Investors sold shares of banks. "
        "Bond yields rose as traders expected higher interest rates.",
        {"topic": "finance"},
    ),
    "python": (
        "Python is a programming language. Its interpreter compiles source code to "
        "bytecode. Functions are first-class objects in Python.",
        {"topic": "software"},
    ),
    "zodb": (
        "ZODB stores persistent Python objects in a database. A FileStorage keeps "
        "every transaction in one file. BTrees hold large mappings efficiently.",
        {"topic": "software"},
    ),
}

QUERIES = ["cat mice", "python bytecode", "database transaction", "interest rates", "the"]


@contextmanager
def opened(path: Path) -> Iterator[tuple[ZODB.DB, object, transaction.TransactionManager]]:
    """A real FileStorage database with one connection and its own transaction manager."""
    db = ZODB.DB(FileStorage(str(path / "live_image.fs")))
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    try:
        yield db, conn, tm
    finally:
        tm.abort()
        conn.close()
        db.close()


def fill(store: CatalogStore, embedder=EMB) -> None:
    for doc_id, (text, meta) in DOCS.items():
        store.add_document(doc_id, text, meta, embedder)


def summary(hits: list[Hit]) -> list[tuple[int, str, float]]:
    return [(h.chunk_id, h.doc_id, round(h.score, 6)) for h in hits]


# ------------------------------------------------------------- persistence


def test_full_index_survives_restart(tmp_path: Path) -> None:
    with opened(tmp_path) as (_db, conn, tm):
        store = conn.root()["catalog"] = CatalogStore()
        fill(store)
        tm.commit()
        before = {q: summary(store.search(q, EMB, top_k=10)) for q in QUERIES}
        words = store._lexicon.wordCount()

    with opened(tmp_path) as (_db, conn, _tm):
        store = conn.root()["catalog"]
        assert store._p_jar is conn  # really loaded from the file
        assert len(store) == sum(len(store.get_document(d).chunk_ids) for d in DOCS)
        assert store.documents() == sorted(DOCS)
        # The text index and its lexicon are part of the pickled state.
        assert store._text_index.documentCount() == len(store)
        assert store._lexicon.wordCount() == words
        after = {q: summary(store.search(q, EMB, top_k=10)) for q in QUERIES}
    assert after == before
    assert after["cat mice"][0][1] == "cats"
    assert after["python bytecode"][0][1] == "python"
    assert after["interest rates"][0][1] == "stocks"


def test_search_without_embedder_uses_the_recorded_one(tmp_path: Path) -> None:
    with opened(tmp_path) as (_db, conn, tm):
        fill(conn.root().setdefault("catalog", CatalogStore()), HashingEmbedder(64))
        tm.commit()
    with opened(tmp_path) as (_db, conn, _tm):
        store = conn.root()["catalog"]
        assert store.embedder_name == "hashing-v1-64" and store.dim == 64
        assert store.search("persistent objects")[0].doc_id == "zodb"


def test_replace_and_remove_persist(tmp_path: Path) -> None:
    with opened(tmp_path) as (_db, conn, tm):
        store = conn.root()["catalog"] = CatalogStore()
        fill(store)
        tm.commit()
        old_ids = store.get_document("cats").chunk_ids
        new_ids = store.add_document("cats", "Kittens chase yarn.", {"v": 2}, EMB)
        assert set(new_ids).isdisjoint(old_ids)
        assert all(store.get_chunk(i) is None for i in old_ids)
        assert store.get_chunk(new_ids[0]).metadata == {"v": 2}
        assert store.remove_document("stocks") is True
        assert store.remove_document("stocks") is False
        assert store.remove_document("never-added") is False
        tm.commit()
        count = len(store)

    with opened(tmp_path) as (_db, conn, _tm):
        store = conn.root()["catalog"]
        assert len(store) == count
        assert "stocks" not in store and "cats" in store
        assert store.documents() == ["cats", "python", "zodb"]
        assert store._text_index.documentCount() == count
        # words only the old versions held find nothing any more
        assert all(h.doc_id != "stocks" for h in store.search("investors banks", EMB))
        assert store.search("purrs mice nocturnal", EMB, min_score=0.25) == []
        hit = store.search("kittens yarn", EMB)[0]
        assert (hit.doc_id, hit.text, hit.metadata) == ("cats", "Kittens chase yarn.", {"v": 2})


def test_abort_restores_and_drops_the_cache(tmp_path: Path) -> None:
    with opened(tmp_path) as (_db, conn, tm):
        store = conn.root()["catalog"] = CatalogStore()
        fill(store)
        tm.commit()
        assert store.search("cat", EMB)[0].doc_id == "cats"
        store.remove_document("cats")
        assert all(h.doc_id != "cats" for h in store.search("cat", EMB))
        tm.abort()  # the caller owns the transaction
        assert "cats" in store
        assert store.search("cat", EMB)[0].doc_id == "cats"


def test_commit_by_another_connection_is_seen(tmp_path: Path) -> None:
    db = ZODB.DB(FileStorage(str(tmp_path / "live_image.fs")))
    try:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        c1, c2 = db.open(transaction_manager=tm1), db.open(transaction_manager=tm2)
        c1.root()["catalog"] = CatalogStore()
        fill(c1.root()["catalog"])
        tm1.commit()
        s1 = c1.root()["catalog"]
        assert all(h.doc_id != "ferns" for h in s1.search("ferns spores", EMB))  # cache built

        tm2.begin()
        c2.root()["catalog"].add_document("ferns", "Ferns reproduce by spores.", None, EMB)
        tm2.commit()

        tm1.begin()  # a new transaction sees the other connection's commit
        assert s1.search("ferns spores", EMB)[0].doc_id == "ferns"
        c1.close()
        c2.close()
    finally:
        db.close()


def test_large_chunk_ids_are_safe(tmp_path: Path) -> None:
    with opened(tmp_path) as (_db, conn, tm):
        store = conn.root()["catalog"] = CatalogStore()
        assert store._text_index.family is BTrees.family64
        store._last_chunk_id = 2**40  # as after a very long life
        fill(store)
        tm.commit()
    with opened(tmp_path) as (_db, conn, tm):
        store = conn.root()["catalog"]
        hits = store.search("stock market", EMB)
        assert hits[0].doc_id == "stocks" and hits[0].chunk_id > 2**40
        assert hits[0].text_score == 1.0
        assert store.get_chunk(hits[0].chunk_id).doc_id == "stocks"
        assert store.remove_document("stocks")
        tm.commit()
        assert all(h.doc_id != "stocks" for h in store.search("stock market", EMB))


# ----------------------------------------------------------------- scoring


class TableEmbedder:
    """Test double: fixed vectors for known texts, so scores can be computed by hand."""

    name = "table-3"
    dim = 3

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = np.asarray([self.table[t] for t in texts], dtype=np.float32).reshape(-1, 3)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms == 0, 1, norms)


def test_keyword_only_and_meaning_only_hits_both_rank() -> None:
    table = {
        "zebra": [1, 0, 0],
        "Zebra is the name of a tractor factory.": [0, 1, 0],  # the word, not the meaning
        "Striped wild horses graze on the savanna.": [0.9, 0.1, 0],  # the meaning only
        "A zebra is a striped wild horse.": [0.8, 0.2, 0],  # both
        "Bond markets were calm.": [0, 0, 1],  # neither
    }
    emb = TableEmbedder(table)
    store = CatalogStore()
    for i, text in enumerate(list(table)[1:]):
        store.add_document(f"d{i}", text, None, emb)
    hits = store.search("zebra", emb, top_k=10)
    assert [h.doc_id for h in hits] == ["d2", "d0", "d1"]  # "neither" is left out
    both, word, meaning = hits
    assert word.text_score == 1.0 and word.vector_score == pytest.approx(0.0, abs=1e-6)
    assert meaning.text_score == 0.0 and meaning.vector_score > 0.9
    assert 0 < both.text_score <= 1.0 and both.vector_score > 0.9
    for h in hits:
        assert h.score == pytest.approx(0.5 * h.text_score + 0.5 * max(h.vector_score, 0))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_scores_are_ordered_and_top_k_respected() -> None:
    store = CatalogStore()
    store.add_document("a", "Gardening tips for roses.", None, EMB)
    store.add_document("b", "Roses, roses, roses: a rose garden of roses.", None, EMB)
    store.add_document("c", "Tulips and daffodils bloom in spring.", None, EMB)
    store.add_document("d", "Car engines need oil.", None, EMB)
    hits = store.search("roses", EMB, top_k=10)
    assert [h.doc_id for h in hits[:2]] == ["b", "a"]
    assert all(x.score >= y.score for x, y in zip(hits, hits[1:], strict=False))
    assert len(store.search("roses", EMB, top_k=1)) == 1
    assert store.search("roses", EMB, top_k=0) == []


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_blank_query_gives_nothing(query: str) -> None:
    store = CatalogStore()
    fill(store)
    assert store.search(query, EMB) == []


def test_stop_word_query_still_gets_vector_hits() -> None:
    store = CatalogStore()
    fill(store)
    assert store._text_index.search("the of is") is None  # nothing for the text index
    hits = store.search("the of is", EMB)
    assert hits and all(h.text_score == 0.0 and h.vector_score > 0 for h in hits)


def test_empty_store_searches_to_nothing() -> None:
    assert CatalogStore().search("anything", EMB) == []
    assert len(CatalogStore()) == 0 and bool(CatalogStore())


# ---------------------------------------------------------------- embedders


def test_embedder_mismatch_and_reindex(tmp_path: Path) -> None:
    other = HashingEmbedder(128)
    with opened(tmp_path) as (_db, conn, tm):
        store = conn.root()["catalog"] = CatalogStore()
        fill(store)
        tm.commit()
        with pytest.raises(EmbedderMismatchError, match=r"reindex\(") as err:
            store.search("cats", other)
        assert "hashing-v1-256" in str(err.value) and "hashing-v1-128" in str(err.value)
        with pytest.raises(EmbedderMismatchError):
            store.add_document("new", "New text here.", None, other)
        assert store.reindex(other) == len(store)
        tm.commit()
    with opened(tmp_path) as (_db, conn, _tm):
        store = conn.root()["catalog"]
        assert (store.embedder_name, store.dim) == ("hashing-v1-128", 128)
        assert store.search("cat mice", other)[0].doc_id == "cats"
        with pytest.raises(EmbedderMismatchError):
            store.search("cats", EMB)


def test_empty_store_adopts_a_new_embedder() -> None:
    store = CatalogStore()
    store.add_document("x", "Some text.", None, EMB)
    store.remove_document("x")
    store.add_document("y", "Other text.", None, HashingEmbedder(64))
    assert store.dim == 64


class BrokenEmbedder:
    name = "hashing-v1-256"
    dim = 256

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.full((len(texts), 3), np.nan, dtype=np.float32)


def test_failing_embedder_changes_nothing() -> None:
    store = CatalogStore()
    fill(store)
    before = (len(store), store.documents(), store._generation)
    with pytest.raises(ValueError, match="shape"):
        store.add_document("cats", "Replacement that never lands.", None, BrokenEmbedder())
    assert (len(store), store.documents(), store._generation) == before
    assert store.search("cat", EMB)[0].doc_id == "cats"


class CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return super().encode(texts)


def test_batch_add_embeds_in_few_calls() -> None:
    emb = CountingEmbedder()
    store = CatalogStore(max_sentences=2)
    items = [(f"doc{i}", text, meta) for i, (text, meta) in enumerate(DOCS.values())]
    items.append(("one", "A single sentence.", None))
    ids = store.add_documents(items, emb)
    assert len(ids) == 5 and len(store) == sum(map(len, ids))
    assert len(emb.calls) == 2  # all sentences once, then the multi-sentence chunks once
    # A one-sentence chunk reuses its sentence vector: nothing is embedded twice.
    assert sum(emb.calls) <= 12 + len(store)


# --------------------------------------------------------------- documents


def test_chunks_keep_order_and_text() -> None:
    text = " ".join(f"Sentence {i} talks about topic {i // 4}." for i in range(20))
    store = CatalogStore(max_sentences=4, max_chars=1000)
    ids = store.add_document("long", text, {"k": "v"}, EMB)
    assert len(ids) >= 5
    chunks = [store.get_chunk(i) for i in ids]
    assert [c.position for c in chunks] == list(range(len(ids)))
    assert " ".join(c.text for c in chunks) == text
    info = store.get_document("long")
    assert info.chunk_ids == tuple(ids) and info.chars == len(text) and info.metadata == {"k": "v"}


def test_metadata_is_copied_in_and_out() -> None:
    meta = {"tags": ["a"]}
    store = CatalogStore()
    store.add_document("m", "Metadata isolation matters.", meta, EMB)
    meta["tags"].append("changed-by-caller")
    hit = store.search("metadata", EMB)[0]
    hit.metadata["tags"].append("changed-by-reader")
    assert store.get_document("m").metadata == {"tags": ["a"]}


@pytest.mark.parametrize(
    ("doc_id", "text", "meta", "error"),
    [
        ("", "text.", None, ValueError),
        ("x" * 513, "text.", None, ValueError),
        ("ok", "   ", None, ValueError),
        ("ok", b"bytes", None, TypeError),
        ("ok", "text.", ["not", "a", "dict"], TypeError),
        ("ok", "x " * 1_000_001, None, ValueError),
    ],
)
def test_bad_documents_are_refused(doc_id, text, meta, error) -> None:
    store = CatalogStore()
    with pytest.raises(error):
        store.add_document(doc_id, text, meta, EMB)
    assert len(store) == 0 and store.embedder_name is None


def test_query_type_is_checked() -> None:
    with pytest.raises(TypeError):
        CatalogStore().search(None, EMB)  # type: ignore[arg-type]


# -------------------------------------------------------------------- docs


def test_docs_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The plain-Python example of docs/CATALOG.md, on an image laid out as the kernel does."""
    from batos_uvm.awakening import incarnate

    doc = (Path(__file__).resolve().parent.parent / "docs" / "CATALOG.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    example = next(b for b in blocks if "copy_of_live_image.fs" in b)
    db = ZODB.DB(FileStorage(str(tmp_path / "copy_of_live_image.fs")))
    with db.transaction() as conn:
        incarnate(conn.root())
        store = conn.root()["knowledge_catalog_obj"].store
        store.add_document("brick", "BRICK is the logical, architectural persona.", None, EMB)
        fill(store)
    db.close()

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "CATALOG.md", "exec"), namespace)
    namespace["db"].close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[1] == "brick"  # the best hit for "who is BRICK?"
    assert "Chunk(chunk_id=1, doc_id='brick'" in out[-1]


# ------------------------------------------------------------ real MiniLM


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    emb = MiniLMEmbedder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb.encode(["warm up"])
    yield emb
    mp.undo()


@pytest.mark.slow
def test_minilm_finds_meaning_without_the_word(tmp_path: Path, minilm: MiniLMEmbedder) -> None:
    docs = dict(DOCS)
    docs["airline"] = ("Feline Airways flight 22 left Oslo on schedule.", {"topic": "travel"})
    docs["cats"] = (
        "Kittens and their mothers purr while they groom each other. "
        "House cats hunt mice and nap in the sun.",
        {"topic": "animals"},
    )
    with opened(tmp_path) as (_db, conn, tm):
        store = conn.root()["catalog"] = CatalogStore()
        for doc_id, (text, meta) in docs.items():
            store.add_document(doc_id, text, meta, minilm)
        tm.commit()
        before = summary(store.search("feline", minilm))
    assert "feline" not in docs["cats"][0].lower()

    with opened(tmp_path) as (_db, conn, _tm):
        store = conn.root()["catalog"]
        assert store.embedder_name == "all-MiniLM-L6-v2" and store.dim == 384
        hits = store.search("feline")  # the recorded embedder is used
        assert summary(hits) == before
        top = {h.doc_id: h for h in hits[:3]}
        assert "cats" in top and "airline" in top  # meaning and keyword both surface
        assert top["cats"].text_score == 0.0 and top["cats"].vector_score > 0.3
        assert top["airline"].text_score == 1.0
        # Stop words only, or a word nobody knows: the vectors still answer.
        assert store.search("what is it that they do", minilm)
        assert store.search("qzxv", minilm)
        assert store.search("kitty", minilm)[0].doc_id == "cats"
