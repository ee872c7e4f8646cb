"""Synaptic bridge benchmark: round trips through BridgeClient + Bridge versus raw ZeroMQ.

    python bench/bridge.py [--n 3000] [--rounds 5] [--clients 1,4,16,64] [--fake]

Baseline, measured in the same run: a raw pyzmq DEALER -> ROUTER echo that decodes and
re-encodes an ormsgpack map, served by another process, as the kernel is. For reference
it also measures a bare zmq.asyncio echo in another process: what an event loop costs
before any protocol work (the kernel pays it too). Measured:

* ping: BridgeClient.ping() against a real kernel (``batos.py`` with the demo replay
  cassette and a fresh image): validation, dedup bookkeeping, one task per request,
  the kernel's ping handler (its status) and the reply;
* send: BridgeClient.send() of a method installed in the image (the demo's
  report_the_current_system_time), which the kernel runs in a cell.

Sequential measurements are interleaved in ``--rounds`` rounds, so a change of machine
load hits baseline and bridge alike; rates are min / median / max over rounds. Then each
is run from 1, 4, 16 and 64 client processes at once (``--clients``): total throughput
over the window in which all clients ran, and p50/p99 latency. ``--fake`` (or a kernel
that does not start) measures tests/fake_kernel_bridge.py instead, whose send handler
adds numbers in-process; the output says which was measured.
Goals: ping >= 0.5x raw, send >= 0.3x. Not a test: it prints figures and ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ormsgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from benchutil import machine_load  # noqa: E402

from batos_uvm.client import BridgeClient  # noqa: E402

ASYNCIO_ECHO = """
import asyncio, zmq, zmq.asyncio
async def main():
    sock = zmq.asyncio.Context().socket(zmq.ROUTER)
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        await sock.send_multipart(await sock.recv_multipart())
asyncio.run(main())
"""


RAW_ECHO = """
import ormsgpack, zmq
sock = zmq.Context().socket(zmq.ROUTER)
print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    ident, frame = sock.recv_multipart()
    msg = ormsgpack.unpackb(frame)
    reply = {"v": 1, "type": "reply", "id": msg["id"], "result": msg}
    sock.send_multipart([ident, ormsgpack.packb(reply)])
"""


def spawn_echo(script: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"tcp://127.0.0.1:{proc.stdout.readline().strip()}"


class RawCaller:
    """One DEALER doing msgpack round trips (the baseline and the asyncio floor)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint)

    def __call__(self) -> None:
        self.sock.send(ormsgpack.packb({"v": 1, "id": uuid.uuid4().hex, "command": "ping"}))
        ormsgpack.unpackb(self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class BridgeCaller:
    def __init__(self, endpoint: str, what: str, spec: tuple) -> None:
        self.client = BridgeClient(endpoint)
        target, selector, args = spec
        self.call: Callable[[], Any] = (
            self.client.ping if what == "ping" else lambda: self.client.send(target, selector, args)
        )

    def __call__(self) -> None:
        reply = self.call()
        assert reply.ok, reply

    def close(self) -> None:
        self.client.close()


def timed(call: Callable[[], None], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def make_caller(kind: str, endpoint: str, spec: tuple) -> Any:
    return RawCaller(endpoint) if kind == "raw" else BridgeCaller(endpoint, kind, spec)


def _worker(kind: str, endpoint: str, n: int, spec: tuple, ready: Any, go: Any,
            queue: Any) -> None:  # fmt: skip
    caller = make_caller(kind, endpoint, spec)
    timed(caller, 20)  # connect and warm up outside the measurement
    ready.release()
    go.wait()
    started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    times = timed(caller, n)
    queue.put((started, time.perf_counter(), times))
    caller.close()


def concurrent(kind: str, endpoint: str, n: int, clients: int, spec: tuple) -> dict:
    """All clients start together; throughput is over the window in which they ran."""
    ctx = mp.get_context("spawn")
    queue, ready, go = ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(kind, endpoint, n, spec, ready, go, queue))
             for _ in range(clients)]  # fmt: skip
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=600):
            raise RuntimeError("a client process did not start")
    go.set()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    times = [t for _, _, r in results for t in r]
    window = max(end for _, end, _ in results) - min(start for start, _, _ in results)
    return stats(times, len(times) / window)


def pct(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] * 1e6


def stats(times: list[float], rate: float, rates: list[float] | None = None) -> dict:
    return {"p50": pct(times, 50), "p99": pct(times, 99), "rate": rate, "rates": rates or [rate]}


def show(name: str, row: dict) -> None:
    spread = "/".join(f"{r:.0f}" for r in (min(row["rates"]), row["rate"], max(row["rates"])))
    print(
        f"  {name:<36} p50 {row['p50']:7.0f} us   p99 {row['p99']:7.0f} us"
        f"   {spread:>20} round trips/s (min/median/max)"
    )


def start_server(fake: bool, workdir: str) -> tuple[str, Callable[[], Any], tuple, str]:
    """A real kernel (with the demo method installed) or, failing that, the fake bridge."""
    if not fake:
        try:
            from kernel_process import KernelProcess

            kernel = KernelProcess(workdir).start()
            with BridgeClient(kernel.endpoint) as c:
                reply = c.send("genesis_obj", "report_the_current_system_time")
                if not reply.ok:
                    raise RuntimeError(f"installing the demo method failed: {reply.error}")
            label = (
                "real kernel (batos.py, demo replay cassette); send runs the installed "
                "report_the_current_system_time in a cell"
            )
            spec = ("genesis_obj", "report_the_current_system_time", [])
            return kernel.endpoint, kernel.stop, spec, label
        except Exception as exc:  # the benchmark still measures the bridge itself
            print(f"  (real kernel unavailable: {exc}; using the fake kernel bridge)")
    from fake_kernel_bridge import spawn

    proc, endpoint = spawn()

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    label = (
        "fake kernel bridge (tests/fake_kernel_bridge.py); send runs an in-process handler "
        "that adds numbers"
    )
    return endpoint, stop, ("genesis_obj", "add", [1, 2]), label


def sequential(endpoints: dict[str, str], spec: tuple, n: int, rounds: int) -> dict[str, dict]:
    callers = {name: make_caller(kind, ep, spec) for name, (kind, ep) in endpoints.items()}
    times: dict[str, list[float]] = {name: [] for name in callers}
    rates: dict[str, list[float]] = {name: [] for name in callers}
    try:
        for caller in callers.values():
            timed(caller, 200)  # connect and warm up
        for _ in range(rounds):
            for name, caller in callers.items():
                t = timed(caller, max(1, n // rounds))
                times[name] += t
                rates[name].append(len(t) / sum(t))
    finally:
        for caller in callers.values():
            caller.close()
    return {name: stats(times[name], statistics.median(rates[name]), rates[name])
            for name in callers}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="round trips per sequential measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--clients", default="1,4,16,64", help="client processes at once")
    ap.add_argument("--fake", action="store_true", help="measure the fake kernel bridge")
    args = ap.parse_args()
    client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    print(machine_load(), flush=True)

    raw, raw_endpoint = spawn_echo(RAW_ECHO)
    echo, echo_endpoint = spawn_echo(ASYNCIO_ECHO)
    con: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        endpoint, stop_server, spec, label = start_server(args.fake, workdir)
        try:
            print(f"bridge under test: {label}")
            print(f"sequential: {args.n} round trips each, in {args.rounds} interleaved rounds")
            seq = sequential(
                {
                    "raw": ("raw", raw_endpoint),
                    "floor": ("raw", echo_endpoint),
                    "ping": ("ping", endpoint),
                    "send": ("send", endpoint),
                },
                spec,
                args.n,
                args.rounds,
            )
            show("raw DEALER/ROUTER echo (baseline)", seq["raw"])
            show("asyncio echo (floor)", seq["floor"])
            show("bridge ping", seq["ping"])
            show(f"bridge send {spec[1]}", seq["send"])
            for clients in client_counts:
                m = max(50, args.n // max(clients, 2))
                print(f"{clients} concurrent client process(es), {m} round trips each:",
                      flush=True)  # fmt: skip
                con[clients] = {kind: concurrent(kind, ep, m, clients, spec)
                                for kind, ep in (("raw", raw_endpoint), ("ping", endpoint),
                                                 ("send", endpoint))}  # fmt: skip
                for kind in ("raw", "ping", "send"):
                    show(f"{kind}", con[clients][kind])
        finally:
            stop_server()
            raw.kill()
            echo.kill()

    def ratio(a: dict, b: dict) -> str:
        return f"{a['rate'] / b['rate']:.2f}x"

    print("ratios (throughput, bridge / raw; goals ping >= 0.5x, send >= 0.3x):")
    print(f"  sequential  ping {ratio(seq['ping'], seq['raw'])}   "
          f"send {ratio(seq['send'], seq['raw'])}")  # fmt: skip
    print(f"  floor / raw {ratio(seq['floor'], seq['raw'])}; "
          f"ping / floor {ratio(seq['ping'], seq['floor'])}")  # fmt: skip
    print(f"{'clients':>8} {'raw /s':>9} {'ping /s':>9} {'send /s':>9} {'send p99 us':>12}"
          f" {'send / raw':>11}")  # fmt: skip
    for clients, row in con.items():
        print(f"{clients:8d} {row['raw']['rate']:9.0f} {row['ping']['rate']:9.0f} "
              f"{row['send']['rate']:9.0f} {row['send']['p99']:12.0f} "
              f"{ratio(row['send'], row['raw']):>11}")  # fmt: skip
    print("(send runs the installed method in a cell: another process, so more cores let "
          "more sends run at once; the kernel's event loop and the client processes share them)")
    print(machine_load())


if __name__ == "__main__":
    main()
