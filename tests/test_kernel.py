"""Kernel behaviour around installed methods: time limits, errors, inspection."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import transaction
from test_cycle import Harness, run


def install(harness: Harness, selector: str, source: str) -> None:
    conn = harness.kernel.image.db.open(transaction_manager=transaction.TransactionManager())
    conn.root()["genesis_obj"].install_method(selector, source)
    conn.transaction_manager.commit()
    conn.close()


def test_runaway_methods_are_killed_and_the_kernel_keeps_serving(tmp_path):
    harness = Harness(tmp_path, [], method_timeout=1.0)

    async def scenario():
        await harness.start()
        try:
            install(harness, "spin", "def spin(self):\n    while True:\n        pass\n")
            install(harness, "nap", "def nap(self):\n    import time\n    time.sleep(30)\n")
            install(harness, "double", "def double(self, x):\n    return 2 * x\n")
            for selector in ("spin", "nap"):  # Python loops and C code alike
                started = time.time()
                reply = await harness.send(selector)
                assert reply.status == "FAILED" and reply.error.kind == "method_timeout"
                assert "method_timeout" in reply.error.reason and "killed" in reply.error.reason
                assert time.time() - started < 5
            answers = await asyncio.gather(*(harness.send("double", n) for n in range(6)))
            assert [a.result for a in answers] == [0, 2, 4, 6, 8, 10]
            open_connections = [c for c in harness.kernel.image.db.connectionDebugInfo()
                                if c["opened"]]
            assert len(open_connections) == harness.settings.workers
            assert harness.kernel.cells.replaced >= 2
        finally:
            await harness.stop()

    run(scenario())


def test_a_call_after_every_idle_cell_was_killed_is_answered(tmp_path):
    # Cells killed while idle (the OOM killer, an operator) look alive until the
    # event loop hears of it: the pool must ask the system, not hand them out.
    harness = Harness(tmp_path, [])

    async def scenario():
        await harness.start()
        try:
            install(harness, "double", "def double(self, x):\n    return 2 * x\n")
            assert (await harness.send("double", 1)).result == 2
            for _ in range(10):
                await asyncio.sleep(0.3)  # the pool refills
                idle = list(harness.kernel.cells._idle)
                assert len(idle) >= 2
                for cell in idle:
                    os.killpg(cell.pid, signal.SIGKILL)
                reply = await harness.send("double", 21)
                assert reply.status == "COMPLETE" and reply.result == 42, reply
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
                "        except:\n"
                "            pass\n"))
            install(harness, "me", "def me(self):\n    return self\n")
            install(harness, "when", "def when(self):\n    import datetime\n"
                    "    return datetime.date(2026, 12, 1)\n")
            reply = await harness.send("stubborn")
            assert reply.status == "FAILED" and reply.error.kind == "method_timeout"
            mine = await harness.send("me")
            assert mine.status == "COMPLETE" and mine.result is None
            assert mine.result_repr.startswith("<UvmObject oid=")
            when = await harness.send("when")  # not plain data: its repr, made in the cell
            assert when.status == "COMPLETE" and when.result is None
            assert when.result_repr == "datetime.date(2026, 12, 1)"
        finally:
            await harness.stop()

    run(scenario())


def test_changes_to_self_are_committed_and_output_is_returned(tmp_path):
    harness = Harness(tmp_path, [])

    async def scenario():
        await harness.start()
        try:
            install(harness, "tally", (
                "def tally(self, item):\n"
                "    if not hasattr(self, 'items'):\n"
                "        self.items = []\n"
                "    self.items.append(item)\n"
                "    print('now', len(self.items))\n"
                "    return len(self.items)\n"))
            install(harness, "fail_after_change", (
                "def fail_after_change(self):\n"
                "    self.items = ['lost']\n"
                "    raise ValueError('no')\n"))
            first = await harness.send("tally", "a")
            second = await harness.send("tally", "b")
            assert (first.result, second.result) == (1, 2)
            assert second.output == "now 2\n"
            failed = await harness.send("fail_after_change")
            assert failed.status == "FAILED" and "ValueError: no" in failed.error.reason
            assert harness.read(lambda root: list(root["genesis_obj"].items)) == ["a", "b"]
        finally:
            await harness.stop()
        await harness.start()  # and after a restart
        try:
            assert (await harness.send("tally", "c")).result == 3
        finally:
            await harness.stop()

    run(scenario())


def test_keywords_starting_with_an_underscore_are_refused(tmp_path):
    harness = Harness(tmp_path, [])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.kernel.send(
                "genesis_obj", "clone", [], {"_methods": {}}, _no_progress
            )
            assert reply.status == "FAILED" and reply.error.kind == "invalid_arguments"
        finally:
            await harness.stop()

    run(scenario())


async def _no_progress(event):
    return None


def test_settings_of_earlier_versions_are_accepted_with_a_warning(tmp_path, caplog):
    from batos_uvm.config import ConfigError, load_settings

    config = tmp_path / "batos.toml"
    config.write_text("[kernel]\ntrial_cpu_seconds = 2.0\ncell_memory_mb = 256\n")
    settings = load_settings(str(config), environ={})
    assert settings.cell_memory_mb == 256
    assert "trial_cpu_seconds no longer has an effect" in caplog.text
    config.write_text("[kernel]\ncell_memory_mb = 16\n")
    try:
        load_settings(str(config), environ={})
    except ConfigError as exc:
        assert "at least 64" in str(exc)
    else:
        raise AssertionError("a cell of 16 MiB was accepted")


def test_no_method_is_grown_on_the_kernels_own_objects(tmp_path):
    harness = Harness(tmp_path, [])

    async def scenario():
        await harness.start()
        try:
            for target in ("traits_obj", "knowledge_catalog_obj", "psm_prototypes_obj"):
                reply = await harness.send("dismantle", target=target)
                assert reply.status == "FAILED" and reply.error.kind == "not_understood"
                assert "belongs to the kernel" in reply.error.reason
            assert harness.read(lambda root: len(root["cycles"])) == 0
        finally:
            await harness.stop()

    run(scenario())
