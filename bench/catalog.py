"""Knowledge catalog search latency versus a brute-force scan, in one run.

Builds a catalog of N one-sentence documents (one chunk each) generated from a
fixed vocabulary, commits it to a FileStorage in a temporary directory, reopens
it read-only, and times ``CatalogStore.search``. Baselines, measured on the
same chunks, queries and embedder:

* pure Python scan: cosine of the query against every chunk vector held as a
  Python list, plus a substring count of the query's non-stop words in every
  chunk text, combined with the same 0.5/0.5 formula, top-k by heapq;
* numpy scan: the cosine computed by numpy over a prebuilt matrix, the text
  part still a substring count over every chunk.

Each is timed end to end (query embedded on every call) and "catalog only"
(query vectors computed in advance).

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
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import transaction  # noqa: E402
import ZODB  # noqa: E402
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


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def timed(fn, queries: list[str], rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        q = queries[i % len(queries)]
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return times


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--embedder", choices=["auto", "minilm", "hashing"], default="auto")
    parser.add_argument("--queries", type=int, default=200, help="timed search() calls")
    parser.add_argument("--baseline-queries", type=int, default=20, help="pure Python scans")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedder = default_embedder(args.embedder)
        embedder.encode(["warm up"])  # model load is not part of any timing
    print(f"embedder for build and queries: {embedder.name} (dim {embedder.dim})")

    sentences = make_sentences(args.chunks)
    results: dict[str, float] = {"chunks": float(args.chunks)}
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="batos-bench-catalog-") as tmp:
        path = str(Path(tmp) / "catalog.fs")
        seconds = build(path, sentences, embedder)
        results["build_chunks_per_s"] = len(sentences) / seconds
        print(
            f"built {len(sentences)} chunks in {seconds:.1f} s ({len(sentences) / seconds:.0f}"
            f" chunks/s, {Path(path).stat().st_size / 1e6:.1f} MB), reopened read-only"
        )

        db = ZODB.DB(FileStorage(path, read_only=True))
        conn = db.open()
        store = conn.root()["catalog"]
        assert len(store) == args.chunks, len(store)
        t0 = time.perf_counter()
        store.search(QUERIES[0], embedder, args.top_k)
        results["first_search_ms"] = (time.perf_counter() - t0) * 1e3

        pure, numpy_scan = PurePythonScan(store, args.top_k), NumpyScan(store, args.top_k)
        cached = PrecomputedQueries(embedder, QUERIES)
        n, nb, k = args.queries, args.baseline_queries, args.top_k
        samples["query embedding"] = timed(lambda q: embedder.encode([q]), QUERIES, n)
        for mode, emb in (("end to end", embedder), ("catalog only", cached)):
            samples[f"{mode}: search()"] = timed(lambda q, e=emb: store.search(q, e, k), QUERIES, n)
            samples[f"{mode}: pure Python scan"] = timed(lambda q, e=emb: pure(q, e), QUERIES, nb)
            samples[f"{mode}: numpy scan"] = timed(lambda q, e=emb: numpy_scan(q, e), QUERIES, n)
        overlap = statistics.mean(
            len({h.chunk_id for h in store.search(q, cached, k)} & set(pure(q, cached))) / k
            for q in QUERIES
        )
        conn.close()
        db.close()

    print(
        f"first search after reopening (loads index, builds matrix): "
        f"{results['first_search_ms']:.1f} ms"
    )
    print(f"{'':36}{'p50 ms':>9}{'p95 ms':>9}{'runs':>6}")
    for label, values in samples.items():
        p50, p95 = percentile(values, 50) * 1e3, percentile(values, 95) * 1e3
        key = re.sub(r"\W+", "_", label.replace("()", "")).strip("_").lower()
        results[f"{key}_p50_ms"], results[f"{key}_p95_ms"] = p50, p95
        print(f"{label:36}{p50:9.2f}{p95:9.2f}{len(values):6d}")
    for mode in ("end to end", "catalog only"):
        ours = samples[f"{mode}: search()"]
        for base in ("pure Python scan", "numpy scan"):
            theirs = samples[f"{mode}: {base}"]
            r50 = percentile(theirs, 50) / percentile(ours, 50)
            r95 = percentile(theirs, 95) / percentile(ours, 95)
            key = f"{mode}_vs_{base}".replace(" ", "_").lower()
            results[f"{key}_p50_ratio"], results[f"{key}_p95_ratio"] = r50, r95
            print(f"{mode}: search() is {r50:6.1f}x (p50) {r95:6.1f}x (p95) faster than the {base}")
    results["top_k_overlap_with_pure_scan"] = overlap
    print(
        f"top-{k} overlap with the pure Python scan: {overlap:.0%} "
        "(text scoring differs: BM25 vs substring counts; many generated chunks tie)"
    )
    return results


if __name__ == "__main__":
    main()
