"""The kernel's own overhead per cognitive cycle, everything except the model.

    python bench/cycle.py [--cycles 200] [--zeo unix|off] [--embedder auto|minilm|hashing]
                          [--catalog]

The kernel runs with its default settings (its image served over ZEO on a unix
socket, the MiniLM embedder) unless told otherwise. A replay backend answers
instantly, so what is measured is the kernel: records and commits, catalog
search and indexing (query and skill embeddings included), the Guardian, the
trial run in its own process, installation. Prints min / p50 / p95 / max per
state and in total, the trial run's and the embedder's shares separately (on a
slow CPU the MiniLM embeddings are most of the rest), and the goals (p50 <=
80 ms with the trial run, <= 30 ms without it). The baseline, measured in the
same run between cycles, is one ZODB commit of one object on the kernel's own
storage: what any change of the image costs at least. ``--catalog`` also runs
bench/catalog.py over 10,000 chunks. Not a test: machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import transaction  # noqa: E402
from benchutil import machine_load  # noqa: E402

from batos_uvm.config import load_settings  # noqa: E402
from batos_uvm.kernel import Kernel  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def write_cassette(path: Path, count: int) -> None:
    lines = []
    for number in range(count):
        # a different research query every cycle: nothing is served from the query cache
        lines.append({"state": "DECOMPOSING", "prompt_contains": f'"m_{number}"',
                      "response": f'["arithmetic step {number}"]'})
        code = (
            f"```python\ndef m_{number}(self, x):\n    return x * {number} + 1\n```\n"
            f'```json\n[{{"args": [2], "expect": {2 * number + 1}}}]\n```'
        )
        lines.append({"state": "SYNTHESIZING", "prompt_contains": f"'m_{number}'",
                      "response": code})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def one_commit(kernel: Kernel, number: int) -> float:
    """The baseline: one transaction writing one small object, on the kernel's storage."""
    tm = transaction.TransactionManager()
    conn = kernel.image.db.open(transaction_manager=tm)
    started = time.perf_counter()
    conn.root()["bench_baseline"] = number
    tm.commit()
    seconds = time.perf_counter() - started
    conn.close()
    return seconds


class TimedEmbedder:
    """The kernel's embedder, adding up the time its calls take (in any thread)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.seconds = 0.0
        self._lock = threading.Lock()  # calls come from the loop and from threads

    def encode(self, texts: list[str]) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.encode(texts)
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - started


async def measure(cycles: int, workdir: Path, zeo: str, embedder: str) -> dict[str, list[float]]:
    cassette = workdir / "bench.jsonl"
    write_cassette(cassette, cycles)
    overrides = {
        "db": str(workdir / "live_image.fs"),
        "backend": f"replay:{cassette}",
        "metacognition_log": str(workdir / "audit.jsonl"),
    }
    if zeo != "default":
        overrides["zeo"] = zeo
    if embedder != "default":
        overrides["embedder"] = embedder
    settings = load_settings(None, overrides, environ={})
    kernel = Kernel(settings)
    await kernel.start(serve_bridge=False)
    kernel.embedder = timed = TimedEmbedder(kernel.embedder)

    async def ignore(event: dict) -> None:
        return None

    samples: dict[str, list[float]] = {"total": [], "trial": [], "without trial": [],
                                        "send round trip": [], "baseline: one commit": [],
                                        "embedding": [], "rest (lower bound)": []}
    try:
        for number in range(cycles):
            samples["baseline: one commit"].append(
                await asyncio.to_thread(one_commit, kernel, number))
            timed.seconds = 0.0
            started = time.perf_counter()
            reply = await kernel.send("genesis_obj", f"m_{number}", [3], {}, ignore)
            samples["send round trip"].append(time.perf_counter() - started)
            if reply.status != "COMPLETE":
                raise SystemExit(f"cycle {number} failed: {reply.error}")
            conn = kernel.image.db.open()
            data = dict(conn.root()["cycles"][reply.cycle_id].data)
            conn.close()
            llm = sum(call["seconds"] for call in data["llm_calls"])
            total = data["duration_s"] - llm
            trial = sum(a["trial"]["duration_s"] for a in data["attempts"] if a.get("trial"))
            samples["total"].append(total)
            samples["trial"].append(trial)
            samples["without trial"].append(total - trial)
            samples["embedding"].append(timed.seconds)
            samples["rest (lower bound)"].append(total - trial - timed.seconds)
            for entry in data["states"]:
                if entry["left"] is not None:
                    samples.setdefault(entry["state"], []).append(entry["left"] - entry["entered"])
            if (number + 1) % 50 == 0:
                print(f"  {number + 1}/{cycles} cycles", file=sys.stderr)
    finally:
        await kernel.stop()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kernel overhead per cognitive cycle")
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--zeo", default="default",
                        help="'off', 'unix' or HOST:PORT (default: the kernel's default)")
    parser.add_argument("--embedder", default="default",
                        help="'minilm', 'hashing' or 'auto' (default: the kernel's default)")
    parser.add_argument("--catalog", action="store_true", help="also run bench/catalog.py")
    args = parser.parse_args(argv)
    print(f"{machine_load()}; zeo={args.zeo}, embedder={args.embedder}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        samples = asyncio.run(measure(args.cycles, Path(tmp), args.zeo, args.embedder))
    print(f"\nkernel overhead per cycle over {args.cycles} cycles (replay backend, instant)")
    print(f"{'part':24} {'min ms':>9} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    order = ["IDLE", "DECOMPOSING", "DELEGATING", "SYNTHESIZING", "VALIDATING",
             "trial", "without trial", "embedding", "rest (lower bound)", "total",
             "send round trip", "baseline: one commit"]
    for name in order:
        values = samples.get(name)
        if values:
            print(f"{name:24} {min(values) * 1000:9.2f} {percentile(values, 0.5) * 1000:9.2f} "
                  f"{percentile(values, 0.95) * 1000:9.2f} {max(values) * 1000:9.2f}")
    p50_total = statistics.median(samples["total"]) * 1000
    p50_bare = statistics.median(samples["without trial"]) * 1000
    p50_base = statistics.median(samples["baseline: one commit"]) * 1000
    print(f"\ngoal: total p50 <= 80 ms: {p50_total:.1f} ms "
          f"({'ok' if p50_total <= 80 else 'MISSED'}); "
          f"without the trial run p50 <= 30 ms: {p50_bare:.1f} ms "
          f"({'ok' if p50_bare <= 30 else 'MISSED'}); "
          f"{p50_bare / p50_base:.1f}x one commit ({p50_base:.2f} ms)")
    print("(COMPLETE includes installing, indexing the skill and the commit. 'embedding' is\n"
          " the embedder's time; 'rest' is total minus trial minus embedding, a lower bound\n"
          " of the kernel's own work, as the skill's embedding runs beside the trial)")
    if args.catalog:
        print("\ncatalog search over 10,000 chunks:")
        from catalog import main as catalog_main

        catalog_main(["--chunks", "10000"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
