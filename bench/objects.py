"""UvmObject against a plain ``persistent.Persistent`` subclass, measured in one run.

    python bench/objects.py [--objects 10000]

Prints each figure for both and the ratio (goals in brackets): commit of new
objects [<= 1.3x], update [<= 1.3x], local slot read [<= 1.5x], a read
delegated through three parents [<= 5x], a call of an installed method
versus a plain Python method [<= 2x]. Not a test: machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transaction  # noqa: E402
import ZODB  # noqa: E402
import ZODB.FileStorage  # noqa: E402
from persistent import Persistent  # noqa: E402

from batos_uvm.objects import UvmObject  # noqa: E402


class Plain(Persistent):
    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.name = "plain"

    def add(self, amount: int) -> int:
        return self.value + amount


def make_plain(i: int) -> Persistent:
    return Plain(i)


def make_uvm(i: int) -> UvmObject:
    return UvmObject(value=i, name="uvm")


def commit_and_update(make, count: int, batches: int = 10) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(tmp, "bench.fs")))
        conn = db.open()
        root = conn.root()
        per_batch = count // batches
        started = time.perf_counter()
        objects = []
        for batch in range(batches):
            chunk = [make(batch * per_batch + i) for i in range(per_batch)]
            root[f"batch{batch}"] = chunk
            objects.extend(chunk)
            transaction.commit()
        commit_s = time.perf_counter() - started
        started = time.perf_counter()
        for batch in range(batches):
            for obj in objects[batch * per_batch : (batch + 1) * per_batch]:
                obj.value = obj.value + 1
            transaction.commit()
        update_s = time.perf_counter() - started
        db.close()
    return commit_s, update_s


def best(statement: str, namespace: dict, number: int = 200_000, repeat: int = 5) -> float:
    return min(timeit.repeat(statement, globals=namespace, number=number, repeat=repeat)) / number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000)
    args = parser.parse_args(argv)

    rows = []
    plain_commit, plain_update = commit_and_update(make_plain, args.objects)
    uvm_commit, uvm_update = commit_and_update(make_uvm, args.objects)
    rows.append((f"commit {args.objects} new objects", plain_commit, uvm_commit, 1.3))
    rows.append((f"update {args.objects} objects", plain_update, uvm_update, 1.3))

    plain = Plain(1)
    top = UvmObject(value=1)
    middle = UvmObject(parents=[top])
    lower = UvmObject(parents=[middle])
    child = UvmObject(parents=[lower])
    local = UvmObject(value=1)
    local.install_method("add", "def add(self, amount):\n    return self.value + amount\n")
    namespace = {"plain": plain, "child": child, "local": local}
    child.value  # noqa: B018 - the first read fills the delegation cache
    local.add(1)
    plain_read = best("plain.value", namespace)
    rows.append(("local slot read", plain_read, best("local.value", namespace), 1.5))
    rows.append(("read through three parents", plain_read, best("child.value", namespace), 5.0))
    rows.append(
        ("installed method call", best("plain.add(1)", namespace), best("local.add(1)", namespace), 2.0)
    )

    print(f"{'measure':34} {'baseline':>12} {'UvmObject':>12} {'ratio':>7}  goal")
    for name, base, ours, goal in rows:
        unit, scale = ("s", 1.0) if base > 1e-3 else ("ns", 1e9)
        ratio = ours / base
        verdict = "ok" if ratio <= goal else "MISSED"
        print(f"{name:34} {base * scale:10.3f}{unit:>2} {ours * scale:10.3f}{unit:>2} "
              f"{ratio:6.2f}x  <= {goal}x {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
