"""The cognitive cycle through the kernel's Python API, with replay cassettes.

Each test runs a real kernel (real FileStorage, real cells for trials) in
this process without the bridge; tests/test_kernel_process.py drives a kernel
process through the bridge and the chat client.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import transaction

from batos_uvm.config import load_settings
from batos_uvm.kernel import Kernel

TIME_CODE = """```python
def report_the_current_system_time(self):
    import datetime
    return datetime.datetime.now().isoformat()
```"""


def cassette(tmp_path: Path, lines: list[dict[str, Any]]) -> str:
    path = tmp_path / "cassette.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def synth(selector: str, reply: str, contains: str | None = None) -> dict[str, Any]:
    return {"persona": "BRICK", "state": "SYNTHESIZING",
            "prompt_contains": contains or f"'{selector}'", "response": reply}


PLAN = {"persona": None, "state": "DECOMPOSING", "prompt_contains": "", "response": '["time"]'}


class Harness:
    def __init__(self, tmp_path: Path, lines: list[dict[str, Any]], **settings: Any) -> None:
        self.tmp_path = tmp_path
        self.settings = load_settings(None, {
            "db": str(tmp_path / "live_image.fs"), "zeo": "off", "embedder": "hashing",
            "backend": "replay:" + cassette(tmp_path, lines),
            "metacognition_log": str(tmp_path / "metacognition.jsonl"),
            "trial_wall_seconds": 3.0, "max_attempts": 1,
            **settings}, environ={})
        self.kernel: Kernel | None = None
        self.events: list[dict[str, Any]] = []

    async def start(self) -> Kernel:
        self.kernel = Kernel(self.settings)
        await self.kernel.start(serve_bridge=False)
        return self.kernel

    async def stop(self) -> None:
        if self.kernel is not None:
            await self.kernel.stop()
            self.kernel = None

    async def send(self, selector: str, *args: Any, target: str = "genesis_obj"):
        async def progress(event: dict[str, Any]) -> None:
            self.events.append(event)

        return await self.kernel.send(target, selector, list(args), {}, progress)

    async def submit_read(self, work):
        """Run ``work(connection)`` in a kernel worker, as the kernel's own jobs run."""
        return await self.kernel.submit(work)

    def record(self, cycle_id: str) -> dict[str, Any]:
        return self.read(lambda root: {"status": root["cycles"][cycle_id].status,
                                       **root["cycles"][cycle_id].data})

    def read(self, work):
        conn = self.kernel.image.db.open(transaction_manager=transaction.TransactionManager())
        try:
            return work(conn.root())
        finally:
            conn.transaction_manager.abort()
            conn.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_brief_grows_a_method_and_returns_its_result(tmp_path):
    harness = Harness(tmp_path, [PLAN, synth("report_the_current_system_time", TIME_CODE)])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("report_the_current_system_time")
            assert reply.status == "COMPLETE", reply
            assert reply.result.startswith("20") and "T" in reply.result
            assert reply.replayed and reply.cycle_id
            states = [e["state"] for e in harness.events]
            assert states == ["IDLE", "DECOMPOSING", "DELEGATING", "SYNTHESIZING",
                              "VALIDATING", "COMPLETE"]
            data = harness.record(reply.cycle_id)
            assert data["status"] == "COMPLETE"
            # the brief's own words are searched first, then the planner's queries
            assert data["research_plan"] == ["report the current system time", "time"]
            assert data["installed_version"] == 1
            assert [c["persona"] for c in data["llm_calls"]] == ["BABS", "BRICK"]
            assert all(c["replayed"] for c in data["llm_calls"])
            assert data["attempts"][0]["trial"]["ok"] is True
            assert harness.read(lambda root: len(root["active_cycles"])) == 0
            method = harness.read(lambda root: root["genesis_obj"].method_history(
                "report_the_current_system_time")[-1])
            assert method.cycle_id == reply.cycle_id and method.author == "BRICK"
            # the skill is in the catalog for later cycles
            hits = harness.read(lambda root: root["knowledge_catalog_obj"].store.search(
                "report current system time", harness.kernel.embedder, top_k=3))
            assert any(hit.doc_id.startswith("skill:") for hit in hits)
        finally:
            await harness.stop()
        # after a restart the method answers without a cycle
        await harness.start()
        try:
            harness.events.clear()
            again = await harness.send("report_the_current_system_time")
            assert again.status == "COMPLETE" and again.cycle_id is None
            assert harness.events == []
        finally:
            await harness.stop()
        lines = [json.loads(line) for line in
                 (tmp_path / "metacognition.jsonl").read_text().splitlines()]
        assert {"timestamp", "cycle_id", "mission_brief_hash", "event_type", "state"} <= set(lines[0])
        assert [line["event_type"] for line in lines][-1] == "FINAL_OUTCOME"

    run(scenario())


class RecordingEmbedder:
    """The kernel's embedder, noting each batch it is asked for and on which thread."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.calls: list[tuple[list[str], str]] = []

    def encode(self, texts: list[str]):
        self.calls.append((list(texts), threading.current_thread().name))
        return self.inner.encode(texts)


def test_the_research_plan_is_embedded_in_one_batch_off_the_event_loop(tmp_path):
    harness = Harness(tmp_path, [
        {**PLAN, "response": '["time", "clock", "date now"]'},
        synth("report_the_current_system_time", TIME_CODE),
    ])

    async def scenario():
        kernel = await harness.start()
        try:
            kernel.embedder = recording = RecordingEmbedder(kernel.embedder)
            reply = await harness.send("report_the_current_system_time")
            assert reply.status == "COMPLETE", reply
            plan = harness.record(reply.cycle_id)["research_plan"]
            assert plan == ["report the current system time", "time", "clock", "date now"]
            loop_thread = threading.current_thread().name
            assert (plan, loop_thread) not in recording.calls
            batches = [threads for texts, threads in recording.calls if texts == plan]
            assert len(batches) == 1 and batches[0] != loop_thread
            # the skill's text too: embedded while the trial runs, not again when indexed
            skills = [(texts, thread) for texts, thread in recording.calls
                      if texts and texts[0].startswith("Skill report_the_current_system_time")]
            assert len(skills) == 2, skills  # prepared, then indexed (a cache hit for MiniLM)
            assert skills[0][1] != loop_thread and skills[0][0] == skills[1][0]
        finally:
            await harness.stop()

    run(scenario())


def test_a_search_embeds_its_query_off_the_event_loop(tmp_path):
    # batos.search from a method comes here too: MiniLM must not stall the loop.
    harness = Harness(tmp_path, [])

    async def scenario():
        kernel = await harness.start()
        try:
            kernel.embedder = recording = RecordingEmbedder(kernel.embedder)
            query = "loopback ports " * 900  # cut to the catalog's 10,000 characters

            async def search(conn):
                conn.transaction_manager.begin()
                try:
                    store = conn.root()["knowledge_catalog_obj"].store
                    store.add_document("ports", "Loopback ports answer on 127.0.0.1.", None,
                                       kernel.embedder)
                    return await kernel.search(store, query, 3)
                finally:
                    conn.transaction_manager.abort()

            hits = await harness.submit_read(search)
            assert hits and hits[0].doc_id == "ports"
            cut = query[:10_000]
            threads = [thread for texts, thread in recording.calls if texts == [cut]]
            assert threads and threads[0] != threading.current_thread().name
        finally:
            await harness.stop()

    run(scenario())


FAILURES = {
    "private": ("""```python
def grow(self):
    return self._p_jar
```""", "no slot or method 'p_jar'"),  # read as a public name, which self does not have
    "raises": ("""```python
def grow(self):
    return 1 / 0
```""", "ZeroDivisionError"),
    "loops": ("""```python
def grow(self):
    while True:
        pass
```""", "time"),
    "memory": ("""```python
def grow(self):
    block = [0] * (10 ** 9)
    return len(block)
```""", "memory"),
    "socket": ("""```python
def grow(self):
    import socket
    return socket.socket()
```""", "socket"),
    "writes": ("""```python
def grow(self):
    return open("/tmp/batos-escape.txt", "w").write("x")
```""", "open"),
    "not code": ("I am sorry, I cannot help with that request today.", "syntax"),
    "empty": ("```python\n```", "no code"),
    "wrong name": ("""```python
def something_else(self):
    return 1
```""", "grow"),
    "asked call raises": ("""```python
def grow(self, n):
    return n / 0
```
```json
[{"args": [2], "expect": 4}]
```""", "ZeroDivisionError"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_bad_methods_fail_with_their_reason_and_install_nothing(tmp_path, case):
    reply_text, reason = FAILURES[case]
    harness = Harness(tmp_path, [PLAN, synth("grow", reply_text)])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("grow", 2) if case == "asked call raises" else \
                await harness.send("grow")
            assert reply.status == "FAILED"
            assert reason.lower() in reply.error.reason.lower(), reply.error.reason
            assert not harness.read(lambda root: root["genesis_obj"].responds_to("grow"))
            record = harness.record(reply.cycle_id)
            assert record["status"] == "FAILED" and record["attempts"][0]["ok"] is False
            assert record["attempts"][0]["code"] is not None
            assert harness.read(lambda root: len(root["active_cycles"])) == 0
        finally:
            await harness.stop()

    run(scenario())
    assert not Path("/tmp/batos-escape.txt").exists()


def test_a_failed_attempt_is_retried_with_the_reason(tmp_path):
    bad = """```python
def grow(self):
    import os
    self.size = 1
    self._p_changed = True
    return self.size / 0
```"""
    good = """```python
def grow(self):
    self.size = 1
    return self.size
```"""
    harness = Harness(tmp_path, [
        PLAN,
        synth("grow", good, contains="previous attempt failed: trial run: self.grow() raised ZeroDivisionError"),
        synth("grow", bad),
    ], max_attempts=3)

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("grow")
            assert reply.status == "COMPLETE" and reply.result == 1
            data = harness.record(reply.cycle_id)
            attempts = data["attempts"]
            assert [a["ok"] for a in attempts] == [False, True]
            assert "ZeroDivisionError" in attempts[0]["reason"]  # the unused import is dropped
            assert harness.read(lambda root: root["genesis_obj"].size) == 1
            # the retry sampled (seeded) instead of repeating the greedy answer
            retries = [(c["temperature"], c["seed"]) for c in data["llm_calls"][1:]]
            assert retries == [(None, None), (0.8, 2)]
        finally:
            await harness.stop()

    run(scenario())


def test_a_method_that_changes_self_needs_no_change_mark(tmp_path):
    forgetful = """```python
def grow(self, n):
    self.size = getattr(self, "size", 0) + n
    if self.size > 10:
        return "big"
    return self.size
```"""
    harness = Harness(tmp_path, [PLAN, synth("grow", forgetful)])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("grow", 4)
            assert reply.status == "COMPLETE" and reply.result == 4
            attempt = harness.record(reply.cycle_id)["attempts"][0]
            assert attempt["guardian"] == "passed"
            assert "_p_changed" not in attempt["code"]  # installed as written
            assert (await harness.send("grow", 7)).result == "big"  # the kernel kept size
        finally:
            await harness.stop()

    run(scenario())


def test_wrong_model_examples_do_not_fail_a_method_whose_asked_call_works(tmp_path):
    reply_text = """```python
def double(self, n):
    return n * 2
```
```json
[{"args": [5], "expect": 120}, {"args": [2], "expect": True}]
```"""
    harness = Harness(tmp_path, [PLAN, synth("double", reply_text)])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("double", 21)
            assert reply.status == "COMPLETE" and reply.result == 42
            attempt = harness.record(reply.cycle_id)["attempts"][0]
            assert attempt["ok"] is True
            assert len(attempt["warnings"]) == 2 and "expected 120" in attempt["warnings"][0]
            trial = attempt["trial"]["examples"]
            assert [e["requested"] for e in trial] == [True, False, False]
        finally:
            await harness.stop()

    run(scenario())


def test_invalid_selectors_are_refused_before_any_llm_call(tmp_path):
    harness = Harness(tmp_path, [])

    async def scenario():
        await harness.start()
        try:
            for selector in ("class", "__class__", "has space", "_p_jar"):
                reply = await harness.send(selector)
                assert reply.status == "FAILED" and reply.error.kind == "invalid_selector"
            assert harness.read(lambda root: len(root["cycles"])) == 0
        finally:
            await harness.stop()

    run(scenario())


def test_unmatched_prompt_fails_quoting_the_prompt(tmp_path):
    harness = Harness(tmp_path, [PLAN])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("grow")
            assert reply.status == "FAILED"
            assert "no answer for BRICK in SYNTHESIZING" in reply.error.reason
            assert "Write the Python method 'grow'" in reply.error.reason
        finally:
            await harness.stop()

    run(scenario())


def test_no_backend_fails_fast_saying_how_to_configure(tmp_path):
    harness = Harness(tmp_path, [])
    harness.settings.backend = ""
    harness.settings.model = "none"  # not even an installed default model

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("grow")
            assert reply.status == "FAILED"
            assert "--backend replay:" in reply.error.reason
            assert "models fetch" in reply.error.reason and "models add" in reply.error.reason
        finally:
            await harness.stop()

    run(scenario())


def test_bad_plan_falls_back_to_queries_from_the_brief(tmp_path):
    plan = {"persona": "BABS", "prompt_contains": "", "response": "Let me think... no JSON here"}
    harness = Harness(tmp_path, [plan, synth("report_the_current_system_time", TIME_CODE)])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("report_the_current_system_time")
            assert reply.status == "COMPLETE"
            data = harness.record(reply.cycle_id)
            assert data["plan_fallback"] is True
            assert data["research_plan"] == ["report the current system time"]
        finally:
            await harness.stop()

    run(scenario())


class SlowBackend:
    """A test double that records how many inferences overlap."""

    name = "slow-test-double"

    def __init__(self, replay):
        self.replay = replay
        self.active = 0
        self.peak = 0

    async def infer(self, request):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.3)
            return await self.replay.infer(request)
        finally:
            self.active -= 1

    def describe(self):
        return self.name

    async def close(self):
        return None


def test_identical_messages_join_one_cycle_and_different_targets_run_together(tmp_path):
    lines = [PLAN, synth("report_the_current_system_time", TIME_CODE)]
    harness = Harness(tmp_path, lines)

    async def scenario():
        kernel = await harness.start()
        from batos_uvm.cognition.replay import ReplayBackend

        slow = SlowBackend(ReplayBackend(harness.settings.backend.removeprefix("replay:")))

        async def backend_for(persona):
            return slow

        kernel.cognition.backend_for = backend_for
        try:
            first, second, third = await asyncio.gather(
                harness.send("report_the_current_system_time"),
                harness.send("report_the_current_system_time"),
                harness.send("report_the_current_system_time", target="brick_prototype_obj"),
            )
            assert first.status == second.status == third.status == "COMPLETE"
            assert first.cycle_id == second.cycle_id  # joined
            assert third.cycle_id != first.cycle_id
            assert harness.read(lambda root: len(root["cycles"])) == 2
            assert slow.peak == 2  # two cycles thought at the same time
        finally:
            await harness.stop()

    run(scenario())


def test_only_cycles_of_dead_kernels_are_marked_interrupted(tmp_path):
    import os
    import socket

    from batos_uvm.awakening import incarnate
    from batos_uvm.cycle import CycleRecord, mark_interrupted

    conn_db = __import__("ZODB").DB(None)
    conn = conn_db.open()
    root = conn.root()
    incarnate(root)
    host = socket.gethostname()
    owners = {
        "alive-here": {"boot_id": "a", "pid": os.getpid() + 0, "host": host},
        "dead-here": {"boot_id": "b", "pid": 2**22 + 17, "host": host},
        "elsewhere": {"boot_id": "c", "pid": 1, "host": "another-machine"},
    }
    for cycle_id, owner in owners.items():
        root["cycles"][cycle_id] = CycleRecord(cycle_id, {"selector": "x"})
        root["active_cycles"][cycle_id] = owner

    def alive(owner):
        if owner["host"] != host:
            return True
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        return True

    assert mark_interrupted(root, alive) == ["dead-here"]
    assert root["cycles"]["dead-here"].status == "INTERRUPTED"
    assert root["cycles"]["alive-here"].status == "ACTIVE"
    assert sorted(root["active_cycles"]) == ["alive-here", "elsewhere"]
    conn_db.close()


def test_a_model_example_that_hangs_the_trial_is_dropped_and_the_asked_call_decides(tmp_path):
    reply_text = """```python
def countdown(self, n):
    while n != 0:
        n -= 1
    return "done"
```
```json
[{"args": [-1], "expect": "done"}]
```"""
    harness = Harness(tmp_path, [PLAN, synth("countdown", reply_text)])

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("countdown", 3)
            assert reply.status == "COMPLETE" and reply.result == "done"
            attempt = harness.record(reply.cycle_id)["attempts"][0]
            assert attempt["trial"]["ok"] is False  # the model's example never ends
            assert attempt["trial_without_model_examples"]["ok"] is True
            assert "with the model's examples the trial failed" in attempt["warnings"][0]
        finally:
            await harness.stop()

    run(scenario())
