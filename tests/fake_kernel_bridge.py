"""A small stand-in kernel behind a real Bridge, for bridge, client and chat tests.

Run as a script it serves on a real socket and prints ``ENDPOINT <url>`` once bound:

    python tests/fake_kernel_bridge.py --endpoint tcp://127.0.0.1:* [--curve-dir DIR]

Imported, ``FakeKernel`` is a RequestHandler and ``running_bridge()`` serves one from a
background thread of the test process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batos_uvm.bridge import Bridge, CurveServerConfig  # noqa: E402
from batos_uvm.protocol import ProgressEvent, Reply  # noqa: E402

CYCLE_STATES = ("DECOMPOSING", "DELEGATING", "SYNTHESIZING", "VALIDATING", "COMPLETE")


class FakeKernel:
    """Answers like a kernel: built-in selectors, and a pretend cognitive cycle that
    'installs' any unknown selector (returning a canned value) with progress events."""

    def __init__(self, step_delay: float = 0.02) -> None:
        self.step_delay = step_delay
        self.executions: Counter[str] = Counter()  # request id -> times handled
        self.counters: Counter[str] = Counter()
        self.installed: dict[str, str] = {}
        self.cycles: list[dict[str, Any]] = []

    async def handle(self, request: Any, progress: Any) -> Reply:
        self.executions[request.id] += 1
        command = request.command
        if command == "ping":
            return Reply.complete({"pong": True})
        if command == "cycles":
            return Reply.complete(self.cycles[-request.limit :][::-1])
        if command == "inspect":
            if request.target == "missing_obj":  # as the kernel answers an unknown target
                return Reply.error_reply("not_found", "no object named missing_obj")
            if request.target.startswith("slow"):
                await asyncio.sleep(float(request.target[4:] or 1) / 10)
            return Reply.complete(
                {"name": request.target, "slots": {"installed": sorted(self.installed)}}
            )
        if command == "cancel":  # only the cycle "c-running" is running here
            if request.cycle_id == "c-running":
                return Reply.complete({"cycle_id": "c-running", "cancelling": True})
            return Reply.failed("not_found", f"cycle {request.cycle_id} is not running")
        if command == "initiate_cognitive_cycle":
            brief = request.mission_brief
            return await self._cycle(request.target_oid, brief.selector, brief.args, progress)
        return await self._send(
            request.target, request.selector, request.args, request.kwargs, progress
        )

    async def _send(
        self, target: str, selector: str, args: list[Any], kwargs: dict[str, Any], progress: Any
    ) -> Reply:
        if target == "knowledge_catalog_obj" and selector == "search":
            question = str(args[0]) if args else ""
            return Reply.complete([{"title": "living image", "score": 0.9, "text": question}])
        if target == "missing_obj":
            return Reply.error_reply("not_found", "no object named missing_obj")
        if selector == "echo":
            return Reply.complete({"args": args, "kwargs": kwargs})
        if selector == "add":
            return Reply.complete(sum(args))
        if selector == "count":  # side effect: tells how often a request really ran
            self.counters[str(args[0]) if args else "default"] += 1
            return Reply.complete(self.counters[str(args[0]) if args else "default"])
        if selector == "sleep":
            seconds = float(args[0]) if args else 1.0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await progress(
                    ProgressEvent(state="WORKING", detail=f"{end - time.monotonic():.1f}s left")
                )
                await asyncio.sleep(min(0.1, max(0.0, end - time.monotonic())))
            return Reply.complete("slept")
        if selector == "stream":  # a model writing its answer, chunk by chunk
            for chunk in args or ["def f(self):", "\n    return 1", "\n"]:
                await progress(ProgressEvent(cycle_id="c-stream", state="SYNTHESIZING",
                                             persona="BRICK", text=str(chunk)))
                await asyncio.sleep(float(kwargs.get("pause", 0.3)))
            return Reply.complete("streamed", cycle_id="c-stream")
        if selector == "freeze":  # blocks the whole event loop: the kernel falls silent
            time.sleep(float(args[0]) if args else 1.0)
            self.counters["frozen"] += 1
            return Reply.complete(self.counters["frozen"])
        if selector == "boom":
            raise RuntimeError("the fake kernel exploded on purpose")
        if selector == "bad_return":
            return "not a reply"  # type: ignore[return-value]
        if selector == "fail":
            return Reply.failed("cycle_failed", "the guardian rejected the method")
        if selector == "cancelled":
            return Reply.failed("cancelled", "cancelled on request; nothing was installed",
                                cycle_id="c-running")
        if selector == "replayed":
            return Reply.complete("from the cassette", replayed=True)
        if selector == "unserialisable":
            return Reply.complete({1, 2, 3})
        if selector == "huge":
            return Reply.complete("x" * (2 * 1024 * 1024))
        if selector in self.installed:
            return Reply.complete(self.installed[selector])
        return await self._cycle(target, selector, args, progress)

    async def _cycle(self, target: str, selector: str, args: list[Any], progress: Any) -> Reply:
        cycle_id = uuid.uuid4().hex[:12]
        for state in CYCLE_STATES:
            await progress(ProgressEvent(cycle_id=cycle_id, state=state, detail=f"{selector}"))
            await asyncio.sleep(self.step_delay)
        self.installed[selector] = f"result of {selector}"
        self.cycles.append(
            {"cycle_id": cycle_id, "selector": selector, "target": target, "state": "COMPLETE"}
        )
        return Reply.complete(self.installed[selector], cycle_id=cycle_id)


def spawn(
    endpoint: str = "tcp://127.0.0.1:*", *extra: str, timeout: float = 20.0
) -> tuple[subprocess.Popen[str], str]:
    """Start this script as a kernel process; returns it and the endpoint it bound."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--endpoint", endpoint, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    end = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if line.startswith("ENDPOINT "):
            return proc, line.split()[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"fake kernel did not start on {endpoint}")


@contextlib.contextmanager
def running_bridge(
    handler: Any = None, endpoint: str = "tcp://127.0.0.1:*", **kwargs: Any
) -> Iterator[Bridge]:
    """Serve ``handler`` (default: a FakeKernel) on a real socket from a background thread."""
    bridge = Bridge(handler or FakeKernel(), endpoint, **kwargs)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = asyncio.Event()
        try:
            await bridge.start()
        except BaseException as exc:
            box["error"] = exc
            ready.set()
            return
        ready.set()
        await box["stop"].wait()
        await bridge.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    if "error" in box:
        raise box["error"]
    try:
        yield bridge
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


async def _serve(args: argparse.Namespace) -> None:
    curve = CurveServerConfig.from_dir(args.curve_dir) if args.curve_dir else None
    bridge = Bridge(
        FakeKernel(),
        args.endpoint,
        curve=curve,
        boot_id=args.boot_id,
        heartbeat_interval=args.heartbeat_interval,
        drain_timeout=args.drain_timeout,
    )
    await bridge.start()
    print(f"ENDPOINT {bridge.endpoint}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def orphan_check() -> None:  # leave with the test run that started us
        while os.getppid() == parent:
            await asyncio.sleep(0.5)
        stop.set()

    watcher = asyncio.create_task(orphan_check())
    await stop.wait()
    watcher.cancel()
    await bridge.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:*")
    parser.add_argument("--curve-dir")
    parser.add_argument("--boot-id")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--drain-timeout", type=float, default=0.5)
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
