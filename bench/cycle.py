"""The kernel's own overhead per cognitive cycle, everything except the model.

    python bench/cycle.py [--cycles 200] [--no-catalog]

A replay backend answers instantly, so what is measured is the kernel: records
and commits, catalog search and indexing, the Guardian, the trial run in its
own process, installation. Prints p50/p95 per state and in total, the trial
run's share separately, and the goals (p50 <= 150 ms with the trial run,
<= 30 ms without it). Then runs bench/catalog.py: search latency over 10,000
chunks against a brute-force baseline measured in the same run.
Not a test: machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batos_uvm.config import load_settings  # noqa: E402
from batos_uvm.kernel import Kernel  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def write_cassette(path: Path, count: int) -> None:
    lines = [{"state": "DECOMPOSING", "prompt_contains": "", "response": '["arithmetic"]'}]
    for number in range(count):
        code = (
            f"```python\ndef m_{number}(self, x):\n    return x * {number} + 1\n```\n"
            f'```json\n[{{"args": [2], "expect": {2 * number + 1}}}]\n```'
        )
        lines.append({"state": "SYNTHESIZING", "prompt_contains": f"'m_{number}'",
                      "response": code})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


async def measure(cycles: int, workdir: Path) -> dict[str, list[float]]:
    cassette = workdir / "bench.jsonl"
    write_cassette(cassette, cycles)
    settings = load_settings(None, {
        "db": str(workdir / "live_image.fs"), "zeo": "off", "embedder": "hashing",
        "backend": f"replay:{cassette}", "metacognition_log": str(workdir / "audit.jsonl"),
    }, environ={})
    kernel = Kernel(settings)
    await kernel.start(serve_bridge=False)

    async def ignore(event: dict) -> None:
        return None

    samples: dict[str, list[float]] = {"total": [], "trial": [], "without trial": [],
                                        "send round trip": []}
    try:
        for number in range(cycles):
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
    parser.add_argument("--no-catalog", action="store_true", help="skip the catalog benchmark")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        samples = asyncio.run(measure(args.cycles, Path(tmp)))
    print(f"\nkernel overhead per cycle over {args.cycles} cycles (replay backend, instant)")
    print(f"{'part':24} {'p50 ms':>9} {'p95 ms':>9}")
    order = ["IDLE", "DECOMPOSING", "DELEGATING", "SYNTHESIZING", "VALIDATING",
             "trial", "without trial", "total", "send round trip"]
    for name in order:
        values = samples.get(name)
        if values:
            print(f"{name:24} {percentile(values, 0.5) * 1000:9.2f} "
                  f"{percentile(values, 0.95) * 1000:9.2f}")
    p50_total = statistics.median(samples["total"]) * 1000
    p50_bare = statistics.median(samples["without trial"]) * 1000
    print(f"\ngoal: total p50 <= 150 ms: {p50_total:.1f} ms "
          f"({'ok' if p50_total <= 150 else 'MISSED'}); "
          f"without the trial run p50 <= 30 ms: {p50_bare:.1f} ms "
          f"({'ok' if p50_bare <= 30 else 'MISSED'})")
    print("(COMPLETE includes installing, indexing the skill and the commit)")
    if not args.no_catalog:
        print("\ncatalog search over 10,000 chunks:")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from catalog import main as catalog_main

        catalog_main(["--chunks", "10000"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
