"""Knowledge catalog search latency and recall versus brute-force scans, in one run.

Builds a catalog of N one-sentence documents (one chunk each) generated from a
fixed vocabulary, commits it to a FileStorage in a temporary directory, reopens
it read-only, and times ``CatalogStore.search`` in samples that alternate with
its baselines (min / median / max):

* numpy scan: the cosine of the query against every chunk, computed by numpy
  over a prebuilt matrix, plus a substring count of the query's non-stop words
  in every chunk text, combined with the same 0.5/0.5 formula;
* pure Python scan: the same with the cosine in pure Python (a few samples).

"End to end" embeds a new query text on every call (never a cached one);
"catalog only" uses query vectors computed in advance. Recall@k compares the
catalog's top k with an exact hybrid scan of every chunk (ties count as
right). Below 20,000 chunks the catalog searches exactly; the benchmark then
also moves the same chunks into the approximate (IVF) index and reports its
latency and recall. bench/scale.py measures 100,000 chunks.

Usage: python bench/catalog.py [--chunks 10000] [--embedder auto|minilm|hashing]
Building with MiniLM embeds every chunk (one to two minutes for 10,000 on 2 cores).
"""

from __future__ import annotations

import argparse
import heapq
import operator
import os
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
import transaction  # noqa: E402
import ZODB  # noqa: E402
from benchutil import alternate, machine_load  # noqa: E402
from ZODB.FileStorage import FileStorage  # noqa: E402
from zope.index.text.stopdict import get_stopdict  # noqa: E402

from batos_uvm.catalog import CatalogStore  # noqa: E402
from batos_uvm.text import default_embedder  # noqa: E402

TOPICS = {
    "animals": "cat kitten dog puppy horse zebra owl sparrow fox rabbit whiskers fur paws".split(),
    "finance": "stock bond market investor shares bank interest inflation dividend".split(),
    "software": "python compiler function database transaction object method bytecode".split(),
    "weather": "rain storm cloud thunder forecast humidity wind snow temperature".split(),
    "cooking": "bread oven flour butter recipe garlic onion soup roast spice".split(),
    "music": "guitar piano melody rhythm chord orchestra concert drum singer".split(),
    "travel": "train airport flight luggage hotel passport ticket harbour map".split(),
    "garden": "rose tulip soil seed compost hedge lawn fern blossom pruning".split(),
}
FILLER = (
    "the a one every some many this that with near under over after before while "
    "quietly often rarely carefully quickly brightly slowly loudly gently".split()
)
VERBS = "describes explains needs follows changes watches improves holds finds makes".split()

QUERIES = [
    "feline whiskers",
    "kitten paws",
    "stock market interest",
    "how do investors earn dividends",
    "python bytecode compiler",
    "database transaction object",
    "thunder storm forecast",
    "will it snow tomorrow",
    "garlic onion soup recipe",
    "baking bread in the oven",
    "piano chord melody",
    "loud drum concert",
    "passport at the airport",
    "train ticket to the harbour",
    "pruning roses and tulips",
    "compost for the soil",
    "the",
    "zebra",
    "what should I plant in spring",
    "a method that reports the current time",
]


def make_sentences(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    names = list(TOPICS)
    out = []
    for i in range(n):
        words = TOPICS[names[i % len(names)]]
        parts = [
            rnd.choice(FILLER),
            rnd.choice(words),
            rnd.choice(VERBS),
            rnd.choice(FILLER),
            rnd.choice(words),
            rnd.choice(FILLER),
            rnd.choice(words),
            f"number {i}",
        ]
        out.append(" ".join(parts).capitalize() + ".")
    return out


_WORD = re.compile(r"\w+")
STOP_WORDS = frozenset(get_stopdict())  # the words the catalog's lexicon drops


class PrecomputedQueries:
    """The embedder with the benchmark's query vectors computed in advance.

    Timing with it isolates the catalog's own work from the query embedding,
    whose latency on a busy CPU varies far more than the search around it.
    """

    def __init__(self, embedder, queries: list[str]) -> None:
        self.base, self.name, self.dim = embedder, embedder.name, embedder.dim
        self.table = dict(zip(queries, embedder.encode(queries), strict=True))

    def encode(self, texts: list[str]) -> np.ndarray:
        if all(t in self.table for t in texts):
            return np.stack([self.table[t] for t in texts])
        return self.base.encode(texts)


class PurePythonScan:
    """Linear scan with pure Python cosine and substring text matching."""

    def __init__(self, store: CatalogStore, top_k: int) -> None:
        self.top_k = top_k
        self.rows = []
        for chunk_id in store._chunks.keys():
            record = store._chunks[chunk_id]
            vector = np.frombuffer(store._vectors[chunk_id], dtype="<f4").tolist()
            self.rows.append((chunk_id, record["text"].lower(), vector))

    def text_counts(self, query: str) -> list[int]:
        words = [w for w in (w.lower() for w in _WORD.findall(query)) if w not in STOP_WORDS]
        return [sum(text.count(w) for w in words) for _, text, _ in self.rows]

    def __call__(self, query: str, embedder) -> list[int]:
        q = embedder.encode([query])[0].tolist()
        counts = self.text_counts(query)
        best = max(counts) or 1
        scored = []
        for (chunk_id, _text, vector), count in zip(self.rows, counts, strict=True):
            cosine = sum(map(operator.mul, vector, q))
            scored.append((0.5 * count / best + 0.5 * max(cosine, 0.0), chunk_id))
        return [cid for _, cid in heapq.nlargest(self.top_k, scored)]


class NumpyScan(PurePythonScan):
    """The same scan with the cosine computed by numpy over a prebuilt matrix."""

    def __init__(self, store: CatalogStore, top_k: int) -> None:
        super().__init__(store, top_k)
        self.ids = np.asarray([r[0] for r in self.rows])
        self.matrix = np.asarray([r[2] for r in self.rows], dtype=np.float32)

    def __call__(self, query: str, embedder) -> list[int]:
        q = embedder.encode([query])[0]
        counts = np.asarray(self.text_counts(query), dtype=np.float64)
        cosine = np.einsum("ij,j->i", self.matrix, q)  # the same kernel search() uses
        scores = 0.5 * counts / (counts.max() or 1) + 0.5 * np.clip(cosine, 0, None)
        top = np.argsort(-scores, kind="stable")[: self.top_k]
        return self.ids[top].tolist()


def build(path: str, sentences: list[str], embedder) -> float:
    db = ZODB.DB(FileStorage(path))
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    store = conn.root()["catalog"] = CatalogStore()
    t0 = time.perf_counter()
    for start in range(0, len(sentences), 1000):
        batch = sentences[start : start + 1000]
        docs = [(f"doc-{start + i}", s, {"n": start + i}) for i, s in enumerate(batch)]
        store.add_documents(docs, embedder)
        tm.commit()
    seconds = time.perf_counter() - t0
    conn.close()
    db.close()
    return seconds


def recall_at(store: CatalogStore, query: str, vector: np.ndarray, got: list[int],
              k: int, ids: np.ndarray, matrix: np.ndarray) -> float | None:  # fmt: skip
    """Share of ``got`` whose exact hybrid score reaches the exact k-th best score.

    The exact scores come from a brute-force scan of every chunk (BM25 from the
    catalog's own text index). Not a set comparison: generated chunks often tie,
    and any of the tied chunks is a right answer.
    """
    cosine = matrix @ vector
    text = np.zeros(len(ids))
    results = store._text_index.search(query)
    if results:
        rows = {int(cid): row for row, cid in enumerate(ids)}
        best = max(results.values())
        for cid, score in results.items():
            if best > 0 and int(cid) in rows:
                text[rows[int(cid)]] = score / best
    combined = 0.5 * text + 0.5 * np.clip(cosine, 0.0, 1.0)
    relevant = min(k, int((combined > 0).sum()))  # chunks scoring 0 are never hits
    if not relevant:
        return None
    kth = np.sort(combined)[-relevant]
    score = dict(zip(ids.tolist(), combined.tolist(), strict=True))
    return sum(score.get(cid, -1.0) >= kth - 1e-6 for cid in got[:relevant]) / relevant


def stored_matrix(store: CatalogStore) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter(store._vectors.keys(), dtype=np.int64)
    return ids, np.vstack([np.frombuffer(store._vectors[int(i)], "<f4") for i in ids])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--embedder", choices=["auto", "minilm", "hashing"], default="auto")
    parser.add_argument("--samples", type=int, default=7, help="alternating samples per figure")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedder = default_embedder(args.embedder)
        embedder.encode(["warm up"])  # model load is not part of any timing
    print(f"{machine_load()}; embedder {embedder.name} (dim {embedder.dim})", flush=True)

    sentences = make_sentences(args.chunks)
    results: dict[str, float] = {"chunks": float(args.chunks)}
    k = args.top_k
    with tempfile.TemporaryDirectory(prefix="batos-bench-catalog-") as tmp:
        path = str(Path(tmp) / "catalog.fs")
        seconds = build(path, sentences, embedder)
        results["build_chunks_per_s"] = len(sentences) / seconds
        print(f"built {len(sentences)} chunks in {seconds:.1f} s ({len(sentences) / seconds:.0f}"
              f" chunks/s, {Path(path).stat().st_size / 1e6:.1f} MB), reopened read-only")

        db = ZODB.DB(FileStorage(path, read_only=True))
        conn = db.open()
        store = conn.root()["catalog"]
        t0 = time.perf_counter()
        store.search(QUERIES[0], embedder, k)
        results["first_search_ms"] = (time.perf_counter() - t0) * 1e3

        pure, numpy_scan = PurePythonScan(store, k), NumpyScan(store, k)
        cached = PrecomputedQueries(embedder, QUERIES)
        queries = iter(QUERIES * 100_000)
        uncached = iter(f"{q} {n}" for n in range(10**9) for q in QUERIES)  # never repeated

        timings = alternate(
            {
                "query embedding (new text each time)": lambda: embedder.encode([next(uncached)]),
                "end to end: search()": lambda: store.search(next(uncached), embedder, k),
                "catalog only: search()": lambda: store.search(next(queries), cached, k),
                "catalog only: numpy scan": lambda: numpy_scan(next(queries), cached),
            },
            samples=args.samples,
            number=10,
        )
        timings["catalog only: pure Python scan"] = alternate(
            {"pure": lambda: pure(next(queries), cached)}, samples=3, number=2
        )["pure"]
        ids, matrix = stored_matrix(store)
        vectors = dict(zip(QUERIES, cached.encode(QUERIES), strict=True))

        def recall() -> float:
            shares = [recall_at(store, q, vectors[q], [h.chunk_id for h in store.search(q, cached, k)],
                                k, ids, matrix) for q in QUERIES]  # fmt: skip
            return float(np.mean([s for s in shares if s is not None]))

        from batos_uvm.catalog_index import current_index

        index = current_index(store)[0]
        results["recall_at_k"] = recall()
        mode = "approximate (IVF)" if index.approximate else "exact"
        if not index.approximate:  # also measure the approximate path on the same chunks
            with index.lock:
                index._to_ann()
            timings["catalog only: search(), IVF"] = alternate(
                {"ivf": lambda: store.search(next(queries), cached, k)},
                samples=args.samples, number=10,
            )["ivf"]  # fmt: skip
            results["ivf_recall_at_k"] = recall()
        conn.close()
        db.close()

    print(f"first search after reopening (loads the index): {results['first_search_ms']:.1f} ms")
    print(f"search mode at {args.chunks:,} chunks: {mode}")
    print(f"{'':40}{'min / median / max ms':>26}")
    for label, values in timings.items():
        key = re.sub(r"\W+", "_", label.replace("()", "")).strip("_").lower()
        results[f"{key}_p50_ms"] = values.median * 1e3
        print(f"{label:40}{values.summary(1e3, 2):>26}")
    ours = timings["catalog only: search()"]
    for base in ("numpy scan", "pure Python scan"):
        theirs = timings[f"catalog only: {base}"]
        print(f"catalog only: search() takes {ours.median / theirs.median:.2f}x the time of the {base}")
    print(f"recall@{k} against an exact hybrid scan: {results['recall_at_k']:.3f} ({mode})")
    if "ivf_recall_at_k" in results:
        print(f"recall@{k} with the IVF index on the same chunks: {results['ivf_recall_at_k']:.3f}")
    print(machine_load())
    return results


if __name__ == "__main__":
    main()
