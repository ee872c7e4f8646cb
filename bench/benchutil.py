"""Helpers every benchmark in bench/ shares: alternating samples and honest summaries.

A benchmark compares BAT OS against a baseline measured in the same run. To
keep a change of machine load from favouring one side, samples alternate
(baseline, ours, baseline, ours, ...) and each figure is printed as
min / median / max over its samples, with the ratio of the medians.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_code(path: str | None) -> None:
    """Import ``batos_uvm`` from ``path`` (another checkout) instead of this one."""
    where = str(Path(path).resolve()) if path else str(ROOT)
    if path and not (Path(where) / "batos_uvm" / "__init__.py").exists():
        raise SystemExit(f"--code {path}: no batos_uvm package there")
    sys.path.insert(0, where)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (where, os.environ.get("PYTHONPATH", "")) if p
    )


@dataclass
class Samples:
    """Seconds per operation, one entry per sample."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def summary(self, scale: float = 1e6, digits: int = 1) -> str:
        low, mid, high = min(self.values), self.median, max(self.values)
        return f"{low * scale:.{digits}f} / {mid * scale:.{digits}f} / {high * scale:.{digits}f}"


def per_call(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` calls."""
    started = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - started) / number


def alternate(
    fns: dict[str, Callable[[], object]], *, samples: int = 7, number: int = 1000, warm: int = 1
) -> dict[str, Samples]:
    """Time each function ``samples`` times, in alternating order, ``number`` calls per sample."""
    for fn in fns.values():
        for _ in range(warm):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(samples):
        # alternate which goes first, so neither always runs right after the other
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            out[name].append(per_call(fns[name], number))
    return {name: Samples(values) for name, values in out.items()}


def ratio(ours: Samples, base: Samples) -> str:
    return f"{ours.median / base.median:.2f}x" if base.median else "n/a"


def rss_mb() -> float:
    """Resident memory of this process now (not its peak), in MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def machine_load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load unknown"
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


class Table:
    """A fixed-width table printed row by row (so long runs show progress)."""

    def __init__(self, title: str, columns: list[tuple[str, int]]) -> None:
        self.columns = columns
        print(f"\n{title}", flush=True)
        print("  " + "".join(f"{name:>{width}}" for name, width in columns), flush=True)

    def row(self, *cells: object) -> None:
        text = "".join(
            f"{cell:>{width}}" for cell, (_, width) in zip(cells, self.columns, strict=True)
        )
        print("  " + text, flush=True)
