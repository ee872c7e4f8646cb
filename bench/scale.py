"""How BAT OS's costs grow with the image: the growth tables.

    python bench/scale.py [--quick] [--only image,depth,writes,methods,catalog]
                          [--code DIR] [--samples 7]

Five tables, each against a baseline measured in the same run, samples
alternating with the baseline, figures as min / median / max:

image       10k / 100k / 1M objects in an LOBTree (one shared prototype per
            100 objects), committed 10,000 at a time: commit time per object;
            then, in a fresh process, opening the image and reading every
            object once through delegation, and the RSS left after
            ``cacheMinimize()``. Baseline: plain ``Persistent`` objects that
            reach their prototype through an attribute.
depth       a slot and a method found 1 / 3 / 10 / 30 parents up, through
            ``send()`` (the kernel's path): cold (first send of a new child)
            and warm. Baseline: a plain Python method call.
writes      write one object's slot, then read a delegated slot of another,
            with 1k / 10k / 100k objects holding cached values. Baseline: the
            same on plain ``Persistent`` objects.
methods     an object holding 10 / 100 / 1,000 / 10,000 methods: installing one
            more (commit time and file growth, against the new source's size),
            a warm ``send()`` of one of them, and loading the object for its
            first send. Baseline: the object holding 10 methods.
catalog     1k / 10k / 100k chunks: indexing cost per chunk, search p50 with
            the query embedding computed in advance (the catalog's own work),
            the first search after adding a document, recall@5 against an
            exact hybrid scan. Baseline: a numpy brute-force scan. Built with
            a 384-dimension hashing embedder, so the table measures the index
            and not the embedding model (bench/catalog.py measures MiniLM).

``--quick`` runs the smallest size of each table (under a minute).
``--code DIR`` imports ``batos_uvm`` from another checkout, to print the same
tables for an older version. Not a test: figures depend on the machine's load,
which is printed first.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchutil import Table, alternate, machine_load, per_call, rss_mb, use_code  # noqa: E402

SIZES = {
    "image": [10_000, 100_000, 1_000_000],
    "depth": [1, 3, 10, 30],
    "writes": [1_000, 10_000, 100_000],
    "methods": [10, 100, 1_000, 10_000],
    "catalog": [1_000, 10_000, 100_000],
}
QUICK = {
    "image": [10_000],
    "depth": [1, 3, 10, 30],
    "writes": [1_000],
    "methods": [10, 100],
    "catalog": [1_000],
}
PROTOTYPES = 100  # objects per shared prototype in the image table
METHOD_SOURCE = (
    "def {name}(self, x=1):\n"
    '    """Scale x by {number} and add one; a method of typical size (~230 bytes)."""\n'
    "    if not isinstance(x, (int, float)):\n"
    '        raise TypeError("x must be a number")\n'
    "    return x * {number} + 1\n"
)


def open_db(path: Path, **kwargs: Any) -> Any:
    import ZODB
    import ZODB.FileStorage

    return ZODB.DB(ZODB.FileStorage.FileStorage(str(path)), **kwargs)


# --- image ---------------------------------------------------------------------------


def plain_classes() -> tuple[type, type]:
    from persistent import Persistent

    class PlainPrototype(Persistent):
        def __init__(self) -> None:
            self.kind = "bench"

    class PlainObject(Persistent):
        def __init__(self, proto: Any, n: int) -> None:
            self.proto = proto
            self.n = n

    for cls in (PlainPrototype, PlainObject):
        cls.__module__, cls.__qualname__ = "scale_objects", cls.__name__
    return PlainPrototype, PlainObject


def install_plain_module() -> None:
    """Plain classes under a stable module name, so a child process can load them."""
    import types

    module = types.ModuleType("scale_objects")
    proto, obj = plain_classes()
    module.PlainPrototype, module.PlainObject = proto, obj
    sys.modules["scale_objects"] = module


def build_image(path: Path, count: int, kind: str) -> float:
    """Seconds to create and commit ``count`` objects, 10,000 per transaction."""
    import transaction
    from BTrees.LOBTree import LOBTree

    from batos_uvm.objects import UvmObject

    module = sys.modules["scale_objects"]
    db = open_db(path)
    conn = db.open()
    root = conn.root()
    tree = root["objects"] = LOBTree()
    if kind == "plain":
        protos = [module.PlainPrototype() for _ in range(max(1, count // PROTOTYPES))]
    else:
        protos = [UvmObject(kind="bench") for _ in range(max(1, count // PROTOTYPES))]
    started = time.perf_counter()
    for number in range(count):
        proto = protos[number % len(protos)]
        if kind == "plain":
            tree[number] = module.PlainObject(proto, number)
        else:
            tree[number] = UvmObject(parents=[proto], n=number)
        if number % 10_000 == 9_999:
            transaction.commit()
            conn.cacheMinimize()
    transaction.commit()
    seconds = time.perf_counter() - started
    db.close()
    return seconds


def child_image(path: str, kind: str) -> dict[str, float]:
    """In a fresh process: open, read every object once through delegation, minimise."""
    started = time.perf_counter()
    db = open_db(Path(path))
    conn = db.open()
    tree = conn.root()["objects"]
    tree._p_activate()
    opened = time.perf_counter() - started
    started = time.perf_counter()
    if kind == "plain":
        for obj in tree.values():
            assert obj.proto.kind == "bench"
    else:
        for obj in tree.values():
            assert obj.kind == "bench"
    read = (time.perf_counter() - started) / len(tree)
    conn.cacheMinimize()
    gc.collect()
    result = {
        "open_s": opened,
        "read_us": read * 1e6,
        "rss_mb": rss_mb(),
        "non_ghosts": conn._cache.cache_non_ghost_count,
        "in_memory": len(conn._cache),
    }
    db.close()
    return result


def run_child(args: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_image(sizes: list[int], samples: int, workdir: Path) -> None:
    table = Table(
        "image: N objects, each reading its prototype's slot once (min / median / max)",
        [("objects", 10), ("kind", 6), ("commit us/obj", 15), ("open ms", 28),
         ("read us/obj", 28), ("RSS MB after min.", 20), ("in memory", 12), ("RSS ratio", 11)],
    )  # fmt: skip
    for count in sizes:
        paths = {kind: workdir / f"image-{kind}-{count}.fs" for kind in ("plain", "uvm")}
        build = {kind: build_image(paths[kind], count, kind) / count for kind in paths}
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "uvm": []}
        for number in range(1 if count >= 1_000_000 else min(samples, 3)):
            for kind in ("plain", "uvm") if number % 2 == 0 else ("uvm", "plain"):
                runs[kind].append(run_child(["image", str(paths[kind]), kind]))
        base_rss = _median([r["rss_mb"] for r in runs["plain"]])
        for kind in ("plain", "uvm"):
            rows = runs[kind]
            table.row(
                f"{count:,}", kind, f"{build[kind] * 1e6:.1f}",
                _mmm([r["open_s"] * 1e3 for r in rows]),
                _mmm([r["read_us"] for r in rows], 2),
                _mmm([r["rss_mb"] for r in rows], 0),
                f"{int(rows[0]['in_memory']):,}",
                f"{_median([r['rss_mb'] for r in rows]) / base_rss:.2f}x",
            )  # fmt: skip
        for path in paths.values():
            for suffix in ("", ".index", ".lock", ".tmp"):
                Path(str(path) + suffix).unlink(missing_ok=True)


# --- delegation depth ----------------------------------------------------------------


class PlainCallee:
    def __init__(self) -> None:
        self.value = 42

    def answer(self, x: int = 1) -> int:
        return x + 41


def table_depth(depths: list[int], samples: int, workdir: Path) -> None:
    table = Table(
        "delegation depth: send() of a slot and of a method found N parents up (us per call)",
        [("depth", 6), ("plain call", 22), ("cold slot", 24), ("warm slot", 24),
         ("warm method", 24), ("warm method / plain", 21)],
    )  # fmt: skip
    db = open_db(workdir / "depth.fs")
    conn = db.open()
    for depth in depths:
        timings = depth_row(conn, depth, samples)
        table.row(
            depth, timings["plain"].summary(digits=2), timings["cold"].summary(digits=2),
            timings["slot"].summary(digits=2), timings["method"].summary(digits=2),
            f"{timings['method'].median / timings['plain'].median:.1f}x",
        )  # fmt: skip
    db.close()


def depth_row(conn: Any, depth: int, samples: int) -> dict[str, Any]:
    import transaction

    from batos_uvm.objects import UvmObject

    top = UvmObject(value=42)
    top.install_method("answer", "def answer(self, x=1):\n    return x + 41\n")
    chain = [top]
    for _ in range(depth - 1):
        chain.append(UvmObject(parents=[chain[-1]]))
    child = UvmObject(parents=[chain[-1]])
    conn.root()[f"depth{depth}"] = child
    transaction.commit()
    number = 2000
    fresh = iter([UvmObject(parents=[chain[-1]]) for _ in range(number * (samples + 2))])
    timings = alternate(
        {
            "plain": PlainCallee().answer,
            "cold": lambda: next(fresh).send("value"),
            "slot": lambda: child.send("value"),
            "method": lambda: child.send("answer"),
        },
        samples=samples,
        number=number,
    )
    transaction.abort()
    return timings


# --- write then read -----------------------------------------------------------------


def table_writes(sizes: list[int], samples: int, workdir: Path) -> None:
    table = Table(
        "write a slot, then read a delegated slot, with N objects holding cached values (us)",
        [("objects", 10), ("plain Persistent", 26), ("UvmObject", 34), ("ratio", 9),
         ("write prototype, read", 34)],
    )  # fmt: skip
    for count in sizes:
        results = writes_row(workdir / f"writes-{count}.fs", count, samples)
        table.row(
            f"{count:,}", _mmm([v * 1e6 for v in results["plain"]], 2),
            _mmm([v * 1e6 for v in results["uvm"]], 2),
            f"{_median(results['uvm']) / _median(results['plain']):.1f}x",
            _mmm([v * 1e6 for v in results["proto"]], 2),
        )  # fmt: skip


def writes_row(path: Path, count: int, samples: int) -> dict[str, list[float]]:
    """Each sample: every object holds its cached value, then one write and one read."""
    import transaction
    from BTrees.LOBTree import LOBTree

    from batos_uvm.objects import UvmObject

    module = sys.modules["scale_objects"]
    db = open_db(path, cache_size=count * 3)
    root = db.open().root()
    proto = root["proto"] = UvmObject(kind="bench")
    plain_proto = module.PlainPrototype()
    root["uvm"] = LOBTree({i: UvmObject(parents=[proto], n=i) for i in range(count)})
    root["plain"] = LOBTree({i: module.PlainObject(plain_proto, i) for i in range(count)})
    transaction.commit()
    uvm, plain = list(root["uvm"].values()), list(root["plain"].values())
    step = [0]

    def next_index() -> int:
        step[0] = (step[0] + 7919) % count
        return step[0]

    def uvm_op() -> None:
        i = next_index()
        uvm[i].n = i
        assert uvm[(i + 1) % count].kind == "bench"

    def proto_op() -> None:
        i = next_index()
        proto.counter = i  # a slot of the prototype nobody reads
        assert uvm[(i + 1) % count].kind == "bench"

    def plain_op() -> None:
        i = next_index()
        plain[i].n = i
        assert plain[(i + 1) % count].proto.kind == "bench"

    results: dict[str, list[float]] = {"plain": [], "uvm": [], "proto": []}
    ops = [("plain", plain_op), ("uvm", uvm_op), ("proto", proto_op)]
    for round_ in range(max(samples, 5) * 3):
        for name, op in ops if round_ % 2 == 0 else ops[::-1]:
            for obj in uvm:
                obj.kind  # noqa: B018 - every object holds a cached value before each sample
            results[name].append(per_call(op, 1))
    transaction.abort()
    db.close()
    return results


# --- methods per object --------------------------------------------------------------


def method_source(number: int) -> str:
    return METHOD_SOURCE.format(name=f"m_{number}", number=number)


def table_methods(sizes: list[int], samples: int, workdir: Path) -> None:
    import transaction

    from batos_uvm.objects import UvmObject

    table = Table(
        "methods per object: install one more and commit; call one; load the object",
        [("methods", 8), ("install+commit ms", 26), ("file growth B (x source)", 26),
         ("call us", 22), ("call vs 10", 11), ("load + first call ms", 26)],
    )  # fmt: skip
    path = workdir / "methods.fs"
    db = open_db(path)
    conn = db.open()
    root = conn.root()
    for count in sorted(set(sizes) | {10}):
        obj = root[f"obj{count}"] = UvmObject(label=f"holds {count}")
        for number in range(count):
            obj.install_method(f"m_{number}", method_source(number))
        transaction.commit()
    for count in sizes:
        obj = root[f"obj{count}"]
        install_ms, growth = [], []
        for number in range(count, count + samples):
            source = method_source(number)
            before = path.stat().st_size
            started = time.perf_counter()
            obj.install_method(f"m_{number}", source)
            transaction.commit()
            install_ms.append((time.perf_counter() - started) * 1e3)
            growth.append(path.stat().st_size - before)
        calls = alternate(
            {"base": partial(root["obj10"].send, "m_1", 2), "ours": partial(obj.send, "m_1", 2)},
            samples=samples,
            number=2000,
        )
        loads = []
        for _ in range(min(samples, 5)):
            conn.cacheMinimize()
            started = time.perf_counter()
            assert root[f"obj{count}"].send("m_1", 2) == 3
            loads.append((time.perf_counter() - started) * 1e3)
        table.row(
            f"{count:,}", _mmm(install_ms, 2),
            f"{_median(growth):,.0f} ({_median(growth) / len(source):.1f}x)",
            calls["ours"].summary(digits=2),
            f"{calls['ours'].median / calls['base'].median:.2f}x", _mmm(loads, 2),
        )  # fmt: skip
    db.close()


# --- catalog -------------------------------------------------------------------------


def table_catalog(sizes: list[int], samples: int, workdir: Path) -> None:
    table = Table(
        "catalog: N chunks (hashing embedder, dim 384; query vectors computed in advance)",
        [("chunks", 8), ("index us/chunk", 15), ("numpy scan ms", 26), ("search ms", 26),
         ("ratio", 8), ("after a write ms", 28), ("after / steady", 15), ("recall@5", 9)],
    )  # fmt: skip
    for count in sizes:
        row = catalog_row(workdir / f"catalog-{count}.fs", count, samples)
        table.row(
            f"{count:,}", f"{row['per_chunk'] * 1e6:.0f}", row["scan"].summary(1e3, 2),
            row["search"].summary(1e3, 2),
            f"{row['search'].median / row['scan'].median:.2f}x",
            _mmm([a * 1e3 for a in row["after"]], 2),
            f"{_median(row['after']) / row['search'].median:.2f}x", f"{row['recall']:.3f}",
        )  # fmt: skip


def catalog_row(path: Path, count: int, samples: int) -> dict[str, Any]:
    import numpy as np
    import transaction
    from catalog import QUERIES, PrecomputedQueries, make_sentences, recall_at, stored_matrix

    from batos_uvm.catalog import CatalogStore
    from batos_uvm.text import HashingEmbedder

    embedder = HashingEmbedder(dim=384)
    cached = PrecomputedQueries(embedder, QUERIES)
    vectors = dict(zip(QUERIES, embedder.encode(QUERIES), strict=True))
    db = open_db(path, cache_size=20_000)  # the kernel's object cache size
    store = db.open().root()["catalog"] = CatalogStore()
    sentences = make_sentences(count + 1000)
    started = time.perf_counter()
    for start in range(0, count, 1000):
        batch = sentences[start : min(start + 1000, count)]
        store.add_documents(
            [(f"doc-{start + i}", text, {"n": start + i}) for i, text in enumerate(batch)],
            embedder,
        )
        transaction.commit()
    per_chunk = (time.perf_counter() - started) / count
    ids, matrix = stored_matrix(store)
    queries = iter(QUERIES * 10_000)

    def scan() -> None:
        scores = matrix @ vectors[next(queries)]
        np.argpartition(-scores, 5)[:5]

    store.search(QUERIES[0], cached, 5)  # load what a first search loads
    timings = alternate(
        {"scan": scan, "search": lambda: store.search(next(queries), cached, 5)},
        samples=samples,
        number=20,
    )
    after = []
    for number, text in enumerate(sentences[count : count + samples * 2]):
        store.add_document(f"extra-{number}", text, {}, embedder)
        transaction.commit()
        started = time.perf_counter()
        store.search(next(queries), cached, 5)
        after.append(time.perf_counter() - started)
    ids, matrix = stored_matrix(store)
    recall = []
    for query in QUERIES:
        got = [hit.chunk_id for hit in store.search(query, cached, 5)]
        share = recall_at(store, query, vectors[query], got, 5, ids, matrix)
        if share is not None:
            recall.append(share)
    transaction.abort()
    db.close()
    return {"per_chunk": per_chunk, "scan": timings["scan"], "search": timings["search"],
            "after": after, "recall": float(np.mean(recall))}  # fmt: skip


# --- main ----------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _mmm(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f} / {_median(values):.{digits}f} / {max(values):.{digits}f}"


TABLES = {
    "image": table_image,
    "depth": table_depth,
    "writes": table_writes,
    "methods": table_methods,
    "catalog": table_catalog,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="growth tables of BAT OS (image, delegation, writes, methods, catalog)",
        epilog="Not a test: figures depend on the machine and its load.",
    )
    parser.add_argument("--quick", action="store_true", help="smallest sizes only (< 1 minute)")
    parser.add_argument(
        "--only", default=",".join(TABLES), help=f"comma-separated tables: {', '.join(TABLES)}"
    )
    parser.add_argument("--samples", type=int, default=7, help="samples per figure (default 7)")
    parser.add_argument("--code", help="import batos_uvm from this checkout instead")
    parser.add_argument("--workdir", help="directory for the images (default: a temporary one)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    use_code(args.code)
    install_plain_module()
    if args.child:
        kind, *rest = args.child
        if kind == "image":
            print(json.dumps(child_image(*rest)))
        return 0
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in TABLES]
    if unknown:
        parser.error(f"unknown table(s) {', '.join(unknown)}; choose from {', '.join(TABLES)}")
    import batos_uvm

    print(f"batos_uvm from {Path(batos_uvm.__file__).parent}; {machine_load()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="batos-scale-", dir=args.workdir) as tmp:
        for name in chosen:
            sizes = (QUICK if args.quick else SIZES)[name]
            TABLES[name](sizes, args.samples, Path(tmp))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; {machine_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
