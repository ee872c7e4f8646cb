"""UvmObject against plain ``persistent.Persistent`` objects and plain Python, in one run.

    python bench/objects.py [--objects 10000] [--samples 7]

Every figure is min / median / max over samples that alternate with their
baseline, and the ratio of the medians (goals in brackets):

* commit of N new objects and update of N objects, 1,000 per transaction,
  objects held in an LOBTree as an image holds many objects
  [<= 1.3x plain Persistent];
* a local slot read, against plain Persistent (whose attribute hook UvmObject
  skips) and against a plain Python object (the floor) [<= 1.5x Persistent];
* a slot found three parents up, read as an attribute (the cached copy) and
  through ``send()``, the path the kernel takes for every message
  [<= 5x a plain Persistent read];
* an installed method called as an attribute and through ``send()``, against
  a plain Python method call [<= 2x for the attribute call].

Objects live in a committed FileStorage image, as in the kernel. Not a test:
figures depend on the machine's load, which is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import transaction  # noqa: E402
import ZODB  # noqa: E402
import ZODB.FileStorage  # noqa: E402
from benchutil import Samples, alternate, machine_load  # noqa: E402
from BTrees.LOBTree import LOBTree  # noqa: E402
from persistent import Persistent  # noqa: E402

from batos_uvm.objects import UvmObject  # noqa: E402


class Plain(Persistent):
    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.name = "plain"

    def add(self, amount: int) -> int:
        return self.value + amount


class PlainPython:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def add(self, amount: int) -> int:
        return self.value + amount


def make_plain(number: int) -> Persistent:
    return Plain(number)


def make_uvm(number: int) -> UvmObject:
    return UvmObject(value=number, name="uvm")


def commit_and_update(make, count: int, per_transaction: int = 1000) -> tuple[float, float]:
    """Seconds to commit ``count`` new objects, then to update each of them."""
    with tempfile.TemporaryDirectory() as tmp:
        db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(tmp, "bench.fs")))
        conn = db.open()
        tree = conn.root()["objects"] = LOBTree()
        transaction.commit()
        objects = []
        started = time.perf_counter()
        for start in range(0, count, per_transaction):
            for number in range(start, min(start + per_transaction, count)):
                obj = make(number)
                tree[number] = obj
                objects.append(obj)
            transaction.commit()
        commit_s = time.perf_counter() - started
        started = time.perf_counter()
        for start in range(0, count, per_transaction):
            for obj in objects[start : start + per_transaction]:
                obj.value = obj.value + 1
            transaction.commit()
        update_s = time.perf_counter() - started
        db.close()
    return commit_s, update_s


def image_samples(count: int, samples: int) -> dict[str, Samples]:
    out: dict[str, list[float]] = {"plain commit": [], "uvm commit": [],
                                   "plain update": [], "uvm update": []}  # fmt: skip
    kinds = [("plain", make_plain), ("uvm", make_uvm)]
    for round_ in range(samples):
        for name, make in kinds if round_ % 2 == 0 else kinds[::-1]:
            commit_s, update_s = commit_and_update(make, count)
            out[f"{name} commit"].append(commit_s)
            out[f"{name} update"].append(update_s)
    return {name: Samples(values) for name, values in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args(argv)
    print(machine_load(), flush=True)

    rows = []
    image = image_samples(args.objects, max(3, args.samples // 2))
    for what in ("commit", "update"):
        rows.append((f"{what} {args.objects:,} objects (s)", image[f"plain {what}"],
                     image[f"uvm {what}"], 1.3, 1.0))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(tmp, "bench.fs")))
        root = db.open().root()
        top = UvmObject(value=1)
        child = UvmObject(parents=[UvmObject(parents=[UvmObject(parents=[top])])])
        local = UvmObject(value=1)
        local.install_method("add", "def add(self, amount):\n    return self.value + amount\n")
        plain = root["plain"] = Plain(1)
        root["child"], root["local"] = child, local
        transaction.commit()
        python = PlainPython(1)
        t = alternate(
            {
                "persistent read": lambda: plain.value,
                "python read": lambda: python.value,
                "local read": lambda: local.value,
                "delegated read": lambda: child.value,
                "delegated send": lambda: child.send("value"),
                "python call": lambda: python.add(1),
                "method call": lambda: local.add(1),
                "method send": lambda: local.send("add", 1),
            },
            samples=args.samples,
            number=100_000,
        )
        db.close()
    ns = 1e9
    rows += [
        ("local slot read vs Persistent (ns)", t["persistent read"], t["local read"], 1.5, ns),
        ("local slot read vs plain Python (ns)", t["python read"], t["local read"], None, ns),
        ("3 parents up, attribute (ns)", t["persistent read"], t["delegated read"], 5.0, ns),
        ("3 parents up, send() (ns)", t["persistent read"], t["delegated send"], 5.0, ns),
        ("method, attribute call (ns)", t["python call"], t["method call"], 2.0, ns),
        ("method, send() (ns)", t["python call"], t["method send"], None, ns),
    ]

    print(f"\n{'measure':38} {'baseline min/med/max':>26} {'UvmObject min/med/max':>26} "
          f"{'ratio':>7}  goal")  # fmt: skip
    for name, base, ours, goal, scale in rows:
        digits = 3 if scale == 1.0 else 0
        ratio = ours.median / base.median
        verdict = "" if goal is None else (f"<= {goal}x " + ("ok" if ratio <= goal else "MISSED"))
        print(f"{name:38} {base.summary(scale, digits):>26} {ours.summary(scale, digits):>26} "
              f"{ratio:6.2f}x  {verdict}")  # fmt: skip
    print(f"\n{machine_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
