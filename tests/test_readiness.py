"""A kernel answers before it has loaded everything; work that needs a part waits for it."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from kernel_process import KernelProcess
from test_cycle import PLAN, TIME_CODE, Harness, synth

from batos_uvm.kernel import Kernel
from batos_uvm.readiness import NotReady, Readiness, in_daemon_thread


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_waiting_for_parts_and_what_status_says():
    async def scenario():
        readiness = Readiness()
        readiness.add("slow", "the slow part")
        readiness.add("broken", "the broken part")
        release = asyncio.Event()

        async def slow():
            await release.wait()

        async def broken():
            raise OSError("disk on fire")

        readiness.load_in_background("slow", slow)
        readiness.load_in_background("broken", broken)
        await asyncio.sleep(0.05)
        described = readiness.describe()
        assert described["ready"] is False and described["loading"] == ["the slow part"]
        assert described["parts"]["broken"]["state"] == "failed"
        assert "disk on fire" in described["parts"]["broken"]["error"]
        with pytest.raises(NotReady, match="the broken part could not be loaded: OSError"):
            await readiness.wait("broken")
        heard: list[tuple[str, float]] = []

        async def on_wait(what: str, waited: float) -> None:
            heard.append((what, waited))

        waiter = asyncio.create_task(readiness.wait_all(("slow",), on_wait, every=0.05))
        await asyncio.sleep(0.2)
        assert not waiter.done() and len(heard) >= 2 and heard[0][0] == "the slow part"
        blocked = threading.Event()
        threading.Thread(target=lambda: (readiness.wait_blocking("slow"), blocked.set()),
                         daemon=True).start()
        release.set()
        await waiter
        assert await asyncio.to_thread(blocked.wait, 5)
        assert readiness.describe()["parts"]["slow"]["state"] == "ready"
        await readiness.wait("no such part")  # not a part: nothing to wait for

    run(scenario())


def test_in_daemon_thread_returns_and_raises():
    async def scenario():
        names = await in_daemon_thread(lambda: threading.current_thread())
        assert names.daemon
        with pytest.raises(ZeroDivisionError):
            await in_daemon_thread(lambda: 1 / 0)

    run(scenario())


def test_a_brief_waits_for_the_catalog_and_says_so(tmp_path):
    harness = Harness(tmp_path, [PLAN, synth("report_the_current_system_time", TIME_CODE)])
    gate = threading.Event()

    async def scenario():
        kernel = Kernel(harness.settings)
        loading = kernel._load_catalog

        async def held_back() -> None:
            await asyncio.to_thread(gate.wait)
            await loading()

        kernel._load_catalog = held_back
        await kernel.start(serve_bridge=False, wait_loaded=False)
        harness.kernel = kernel
        try:
            assert not kernel.status()["ready"]
            assert "the knowledge catalog and its embedder" in kernel.status()["loading"]
            # objects are served meanwhile: a slot read needs no catalog
            inspect = await kernel.handle(
                _request("inspect", target="genesis_obj"), _ignore)
            assert inspect.ok
            sending = asyncio.create_task(harness.send("report_the_current_system_time"))
            await asyncio.sleep(2.5)
            assert not sending.done()
            waits = [e for e in harness.events if e["state"] == "WAITING"]
            assert waits and "still loading the knowledge catalog" in waits[0]["detail"]
            assert all(e.get("cycle_id") is None for e in waits)
            gate.set()
            reply = await sending
            assert reply.status == "COMPLETE", reply
            assert kernel.status()["ready"]
        finally:
            gate.set()
            await harness.stop()

    run(scenario())


async def _ignore(event):
    return None


def _request(command: str, **fields):
    from batos_uvm.protocol import REQUEST_ADAPTER

    return REQUEST_ADAPTER.validate_python({"v": 1, "id": "r1", "command": command, **fields})


@pytest.mark.slow
def test_a_real_kernel_answers_while_its_embedder_loads(tmp_path):
    """The default embedder (MiniLM, torch): ping answers long before it is loaded."""
    kernel = KernelProcess(tmp_path, embedder="auto")
    first = time.monotonic()
    kernel.launch()
    try:
        status = None
        while status is None and time.monotonic() - first < 60:
            status = kernel.status(timeout=1.0)
        assert status is not None
        answered = time.monotonic() - first
        assert status["ready"] is False and status["loading"], status  # torch takes longer
        while "the kernel" in status["loading"]:  # the lobby answered: the kernel imports
            status = kernel.status(timeout=1.0) or status
        assert any("embedder" in part for part in status["loading"]), status
        kernel.wait_ready(timeout=300)
        ready = kernel.status()
        assert ready["parts"]["catalog"]["state"] == "ready"
        assert time.monotonic() - first > answered
        log = kernel.log_path.read_text()
        assert "BAT OS kernel answering" in log and "BAT OS kernel ready" in log
        assert "pip install kernels" not in log  # third-party noise is filtered
        assert json.dumps(ready)  # plain data on the wire
    finally:
        kernel.stop()
