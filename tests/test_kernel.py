"""Kernel behaviour around installed methods: time limits, errors, inspection."""

from __future__ import annotations

import asyncio
import time

import pytest
import transaction
from test_cycle import Harness, run


def install(harness: Harness, selector: str, source: str) -> None:
    conn = harness.kernel.image.db.open(transaction_manager=transaction.TransactionManager())
    conn.root()["genesis_obj"].install_method(selector, source)
    conn.transaction_manager.commit()
    conn.close()


def test_runaway_methods_are_stopped_and_the_kernel_keeps_serving(tmp_path):
    harness = Harness(tmp_path, [], method_timeout=1.0)

    async def scenario():
        await harness.start()
        try:
            install(harness, "spin", "def spin(self):\n    while True:\n        pass\n")
            install(harness, "nap", "def nap(self):\n    import time\n    time.sleep(4)\n")
            install(harness, "double", "def double(self, x):\n    return 2 * x\n")
            started = time.time()
            reply = await harness.send("spin")
            assert reply.status == "FAILED" and "was stopped" in reply.error.reason
            assert time.time() - started < 5
            stuck = await harness.send("nap")  # C code ignores the stop request
            assert stuck.status == "FAILED" and "abandoned" in stuck.error.reason
            answers = await asyncio.gather(*(harness.send("double", n) for n in range(6)))
            assert [a.result for a in answers] == [0, 2, 4, 6, 8, 10]
            await asyncio.sleep(2.5)  # the abandoned nap ends; its connection is closed
            open_connections = [c for c in harness.kernel.image.db.connectionDebugInfo()
                                if c["opened"]]
            assert len(open_connections) == harness.settings.workers
        finally:
            await harness.stop()

    run(scenario())


def test_method_errors_and_slot_reads(tmp_path):
    harness = Harness(tmp_path, [])

    async def scenario():
        await harness.start()
        try:
            install(harness, "divide", "def divide(self, a, b):\n    return a / b\n")
            reply = await harness.send("divide", 1, 0)
            assert reply.status == "FAILED" and reply.error.kind == "method_raised"
            assert "ZeroDivisionError" in reply.error.reason
            name = await harness.send("name", target="brick_prototype_obj")
            assert name.status == "COMPLETE" and name.result == "BRICK"
        finally:
            await harness.stop()

    run(scenario())


def test_methods_cannot_swallow_the_stop_and_results_are_plain(tmp_path):
    harness = Harness(tmp_path, [], method_timeout=1.0)

    async def scenario():
        await harness.start()
        try:
            install(harness, "stubborn", (
                "def stubborn(self):\n"
                "    while True:\n"
                "        try:\n"
                "            while True:\n"
                "                pass\n"
                "        except Exception:\n"
                "            pass\n"))
            install(harness, "me", "def me(self):\n    return self\n")
            reply = await harness.send("stubborn")
            assert reply.status == "FAILED" and reply.error.kind == "method_timeout"
            mine = await harness.send("me")
            assert mine.status == "COMPLETE" and mine.result is None
            assert mine.result_repr.startswith("<UvmObject oid=")
        finally:
            await harness.stop()

    run(scenario())


def test_runaway_methods_are_capped():
    from batos_uvm import deadline

    async def scenario():
        started = []
        for _ in range(deadline.MAX_RUNAWAYS):
            try:
                await deadline.run_with_deadline(lambda: __import__("time").sleep(1.5), 0.05,
                                                 grace=0.05)
            except deadline.MethodAbandoned:
                started.append(1)
        assert len(started) == deadline.MAX_RUNAWAYS
        with pytest.raises(deadline.MethodTimeout, match="still run"):
            await deadline.run_with_deadline(lambda: 1, 1.0)
        await asyncio.sleep(2.0)  # they end; methods run again
        assert await deadline.run_with_deadline(lambda: 2, 1.0) == 2

    run(scenario())
