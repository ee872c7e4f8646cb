"""Cells benchmark: what running generated code outside the kernel costs.

    python bench/cells.py [--calls 2000] [--rounds 5] [--kills 20]

1. **Call overhead.** An installed method (``add(self, a, b)``) sent through
   the kernel's real path (``Kernel.send``: worker queue, transaction, lookup,
   a cell, the diff, commit) against a plain Python call of the same function,
   and against the in-process path BAT OS used before cells (the method
   compiled with restricted builtins in the kernel and run in a reusable
   thread on the worker's connection, as ``deadline.run_with_deadline`` did),
   reimplemented here as the reference. Samples alternate between the three.
   Goal: overhead (kernel path minus plain call) p50 <= 100 us, p99 <= 1 ms.
2. **Bridge throughput.** ``BridgeClient.send`` of that method to a kernel
   process against a raw pyzmq DEALER/ROUTER echo of an ormsgpack map served
   by another process; rounds alternate. Goal: send >= 0.15x raw echo.
3. **Replacement.** Every idle cell is SIGKILLed; time until a call through
   the kernel is answered again (the dead cells are noticed and replaced).
   Goal: p50 <= 150 ms.

Default kernel settings, except the hashing embedder (a method call never
embeds) and no bridge in part 1 (part 2 measures it). Not a test: it prints
min/median/p99/max and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import ormsgpack  # noqa: E402
import transaction  # noqa: E402
import zmq  # noqa: E402

from batos_uvm.config import load_settings  # noqa: E402
from batos_uvm.kernel import Kernel  # noqa: E402
from batos_uvm.restricted import compile_method  # noqa: E402

SOURCE = "def add(self, a, b):\n    return a + b\n"



def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "min": ordered[0],
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max": ordered[-1],
    }


def show(name: str, samples: list[float], unit: float = 1e6, suffix: str = "us") -> None:
    s = stats(samples)
    print(f"  {name:<34} min {s['min'] * unit:9.1f}  p50 {s['p50'] * unit:9.1f}  "
          f"p99 {s['p99'] * unit:9.1f}  max {s['max'] * unit:9.1f} {suffix}")


async def no_progress(event: dict) -> None:
    return None


class OldInProcessPath:
    """The reference: how the kernel ran installed methods before cells."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.thread = ThreadPoolExecutor(1)
        self.function = compile_method(SOURCE, "add")
        tm = transaction.TransactionManager(explicit=True)
        self.conn = kernel.image.db.open(transaction_manager=tm)

    async def call(self, a: int, b: int) -> int:
        tm = self.conn.transaction_manager
        tm.begin()
        receiver = self.conn.root()["genesis_obj"]
        found = receiver.lookup("add")
        assert found is not None
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.thread, self.function, receiver, a, b)
        tm.commit()
        return result

    def close(self) -> None:
        self.conn.close()
        self.thread.shutdown()


def install(kernel: Kernel) -> None:
    tm = transaction.TransactionManager(explicit=True)
    conn = kernel.image.db.open(transaction_manager=tm)
    tm.begin()
    conn.root()["genesis_obj"].install_method("add", SOURCE)
    tm.commit()
    conn.close()


async def part_one(workdir: Path, calls: int, kills: int) -> None:
    settings = load_settings(None, {
        "db": str(workdir / "live_image.fs"), "embedder": "hashing",
        "metacognition_log": str(workdir / "metacognition.jsonl"),
    }, environ={})
    kernel = Kernel(settings)
    await kernel.start(serve_bridge=False)
    try:
        install(kernel)
        await kernel.cells.ready()
        old = OldInProcessPath(kernel)

        def plain_add(self: object, a: int, b: int) -> int:
            return a + b

        target = object()
        for _ in range(50):  # warm everything
            await kernel.send("genesis_obj", "add", [1, 2], {}, no_progress)
            await old.call(1, 2)
        samples: dict[str, list[float]] = {"plain": [], "old": [], "cells": []}
        clock = time.perf_counter
        for i in range(calls):
            for kind in ("plain", "old", "cells")[i % 3:] + ("plain", "old", "cells")[:i % 3]:
                started = clock()
                if kind == "plain":
                    plain_add(target, 1, 2)
                elif kind == "old":
                    await old.call(1, 2)
                else:
                    reply = await kernel.send("genesis_obj", "add", [1, 2], {}, no_progress)
                    assert reply.result == 3, reply
                samples[kind].append(clock() - started)
        old.close()
        print(f"1. a call of an installed method ({calls} samples each, alternating)")
        show("plain Python call", samples["plain"])
        show("before cells: in-process + thread", samples["old"])
        show("cells: Kernel.send", samples["cells"])
        plain = statistics.median(samples["plain"])
        overhead = [s - plain for s in samples["cells"]]
        show("overhead of the cells path", overhead)
        s = stats(overhead)
        print(f"  goal p50 <= 100 us: {s['p50'] * 1e6:.0f} us "
              f"({'met' if s['p50'] <= 100e-6 else 'NOT met'}); "
              f"p99 <= 1 ms: {s['p99'] * 1e3:.2f} ms "
              f"({'met' if s['p99'] <= 1e-3 else 'NOT met'})")
        ratio = statistics.median(samples["cells"]) / statistics.median(samples["old"])
        print(f"  cells / before-cells (p50): {ratio:.2f}x")

        print(f"3. all idle cells SIGKILLed until a call is answered again ({kills} runs)")
        replaced = []
        for _ in range(kills):
            await asyncio.sleep(0.5)  # let the pool refill
            idle = list(kernel.cells._idle)
            if not idle:
                continue
            for cell in idle:  # every warm cell: the call must wait for a replacement
                os.killpg(cell.pid, signal.SIGKILL)
            started = clock()
            reply = await kernel.send("genesis_obj", "add", [1, 2], {}, no_progress)
            assert reply.result == 3, reply
            replaced.append(clock() - started)
        show("kill -> answered again", replaced, 1e3, "ms")
        p50 = statistics.median(replaced)
        print(f"  goal p50 <= 150 ms: {p50 * 1e3:.0f} ms ({'met' if p50 <= 0.15 else 'NOT met'})")
    finally:
        await kernel.stop()


def part_two(workdir: Path, n: int, rounds: int) -> None:
    from bridge import RAW_ECHO, spawn_echo  # the bridge benchmark's baseline, as it is there
    from kernel_process import KernelProcess

    from batos_uvm.client import BridgeClient

    echo, echo_endpoint = spawn_echo(RAW_ECHO)
    kernel = KernelProcess(workdir / "kernel")
    try:
        kernel.start()
        done = kernel.shell(f"genesis.install_method('add', {SOURCE!r}); commit()", write=True)
        assert done.returncode == 0, done.stderr
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.connect(echo_endpoint)
        client = BridgeClient(kernel.endpoint, timeout=30)
        assert client.send("genesis_obj", "add", [1, 2]).result == 3

        def raw_round() -> float:
            started = time.perf_counter()
            for i in range(n):
                raw.send(ormsgpack.packb({"v": 1, "id": str(i), "command": "send",
                                          "target": "genesis_obj", "selector": "add",
                                          "args": [1, 2], "kwargs": {}}))
                ormsgpack.unpackb(raw.recv())
            return n / (time.perf_counter() - started)

        def send_round() -> float:
            started = time.perf_counter()
            for _ in range(n):
                client.send("genesis_obj", "add", [1, 2])
            return n / (time.perf_counter() - started)

        raw_rates, send_rates = [], []
        for r in range(rounds):
            first, second = (raw_round, send_round) if r % 2 == 0 else (send_round, raw_round)
            a, b = first(), second()
            (raw_rates, send_rates)[first is send_round].append(a)
            (raw_rates, send_rates)[second is send_round].append(b)
        client.close()
        raw.close(0)
        ctx.term()
        print(f"2. sequential round trips, {rounds} alternating rounds of {n}")
        for name, rates in (("raw pyzmq echo (other process)", raw_rates),
                            ("BridgeClient.send -> cell", send_rates)):
            print(f"  {name:<34} min {min(rates):8.0f}  p50 {statistics.median(rates):8.0f}  "
                  f"max {max(rates):8.0f} /s")
        ratio = statistics.median(send_rates) / statistics.median(raw_rates)
        print(f"  send / raw echo: {ratio:.2f}x (goal >= 0.15x: {'met' if ratio >= 0.15 else 'NOT met'})")
    finally:
        kernel.stop()
        echo.kill()
        echo.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="samples per path in part 1")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds in part 2")
    parser.add_argument("--n", type=int, default=1000, help="round trips per round in part 2")
    parser.add_argument("--kills", type=int, default=20, help="kills in part 3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batos-bench-cells-") as tmp:
        workdir = Path(tmp)
        asyncio.run(part_one(workdir, args.calls, args.kills))
        part_two(workdir, args.n, args.rounds)
    threading.Event().wait(0)


if __name__ == "__main__":
    main()
