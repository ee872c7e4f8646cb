"""BridgeClient against real bridges: helpers, errors, dead kernels, restarts, Lazy Pirate."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
from fake_kernel_bridge import FakeKernel, running_bridge, spawn

from batos_uvm.client import (
    BridgeClient,
    InvalidRequest,
    KernelUnreachable,
    RequestOutcomeUnknown,
    RequestTimeout,
)

FAST = {"dead_after": 1.0, "heartbeat_interval": 0.25}


@pytest.fixture
def kernel():
    return FakeKernel()


@pytest.fixture
def bridge(kernel):
    with running_bridge(kernel, heartbeat_interval=0.2, drain_timeout=0.2) as b:
        yield b


@pytest.fixture
def client(bridge):
    with BridgeClient(bridge.endpoint, **FAST) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def kernel_process(endpoint: str = "tcp://127.0.0.1:*"):
    proc, ep = spawn(endpoint, "--heartbeat-interval", "0.2")
    try:
        yield proc, ep
    finally:
        proc.kill()
        proc.wait(10)


def test_helpers(client, bridge):
    assert client.ping().result == {"pong": True}
    assert client.boot_id == bridge.boot_id
    assert client.send("genesis_obj", "add", [1, 2, 3]).result == 6
    r = client.send("genesis_obj", "echo", ["a"], {"k": [1]})
    assert r.result == {"args": ["a"], "kwargs": {"k": [1]}}
    assert client.inspect("genesis_obj").result["name"] == "genesis_obj"
    missing = client.inspect("missing_obj")
    assert missing.status == "ERROR" and missing.error.kind == "not_found"
    events = []
    r = client.initiate_cognitive_cycle("genesis_obj", "brew_tea", on_progress=events.append)
    assert r.status == "COMPLETE" and r.result == "result of brew_tea"
    assert [e.state for e in events][-1] == "COMPLETE" and events[0].cycle_id == r.cycle_id
    cycles = client.cycles(5).result
    assert cycles[0]["selector"] == "brew_tea"


def test_progress_arrives_in_order_before_the_reply(client):
    seen = []
    r = client.send("genesis_obj", "make_soup", on_progress=lambda e: seen.append(e.state))
    assert seen == ["DECOMPOSING", "DELEGATING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]
    assert r.ok


def test_invalid_requests_are_refused_before_sending(client, kernel):
    with pytest.raises(InvalidRequest, match="selector"):
        client.send("genesis_obj", "not-a-name")
    with pytest.raises(InvalidRequest, match="limit"):
        client.cycles(0)
    with pytest.raises(InvalidRequest, match="unknown|command"):
        client.request("format_disk", {})
    with pytest.raises(InvalidRequest, match="exceeds the limit"):
        client.send("genesis_obj", "echo", ["x" * (2 * 1024 * 1024)])
    assert not kernel.executions


def test_unattributable_error_reaches_the_waiting_request(kernel):
    with (
        running_bridge(kernel, max_message_bytes=2048) as b,
        BridgeClient(b.endpoint, max_message_bytes=1 << 20, **FAST) as c,
    ):
        r = c.send("genesis_obj", "echo", ["x" * 5000])
        assert r.status == "ERROR" and r.error.kind == "too_large" and r.id == ""
        assert c.ping().ok  # the conversation goes on


def test_timeout_while_the_kernel_is_alive(client):
    start = time.monotonic()
    with pytest.raises(RequestTimeout, match="may still complete"):
        client.send("genesis_obj", "sleep", [3], timeout=0.6)
    assert time.monotonic() - start < 2
    assert client.ping().ok


def test_no_kernel_is_reported_within_a_few_seconds():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with BridgeClient(endpoint, **FAST) as c:
        start = time.monotonic()
        with pytest.raises(KernelUnreachable, match="not answering") as info:
            c.send("genesis_obj", "add", [1])
        assert info.value.delivered is False
        assert time.monotonic() - start < 5
        with pytest.raises(KernelUnreachable):
            c.ping(timeout=0.5)


def test_lazy_pirate_resends_the_same_id_and_it_runs_once(kernel):
    # "freeze" blocks the kernel's event loop longer than dead_after: the client hears
    # nothing, reopens its socket and resends; the bridge deduplicates the retry
    with (
        running_bridge(kernel, heartbeat_interval=0.1) as b,
        BridgeClient(b.endpoint, dead_after=0.5, heartbeat_interval=0.15) as c,
    ):
        r = c.send("genesis_obj", "freeze", [1.0])
        assert r.ok and r.result == 1
        assert c.reconnects >= 1
        assert kernel.counters["frozen"] == 1
        assert b.stats["deduplicated"] >= 1
        assert c.send("genesis_obj", "add", [1, 1]).result == 2


@pytest.mark.slow
def test_killed_kernel_then_reconnect_after_restart():
    with kernel_process() as (proc, endpoint), BridgeClient(endpoint, **FAST) as c:
        first_boot = c.ping().boot_id
        threading.Timer(0.5, proc.kill).start()
        start = time.monotonic()
        with pytest.raises(KernelUnreachable, match="may or may not have run") as info:
            c.send("genesis_obj", "sleep", [30])
        elapsed = time.monotonic() - start
        assert info.value.delivered and elapsed < 5, elapsed
        proc.wait(10)
        with kernel_process(endpoint) as (_, same):
            assert same == endpoint
            r = c.ping()
            assert r.ok and r.boot_id != first_boot
            assert c.send("genesis_obj", "add", [2, 2]).result == 4


@pytest.mark.slow
def test_restart_under_a_state_changing_request_is_not_resent():
    holder = {}
    with (
        kernel_process() as (proc, endpoint),
        BridgeClient(endpoint, dead_after=4.0, heartbeat_interval=0.25) as c,
    ):
        c.ping()

        def restart() -> None:
            proc.kill()
            proc.wait(10)
            holder["ctx"] = kernel_process(endpoint)
            holder["ctx"].__enter__()

        threading.Timer(0.5, restart).start()
        try:
            with pytest.raises(RequestOutcomeUnknown, match="restarted"):
                c.send("genesis_obj", "sleep", [30])
            assert c.ping().ok  # the client carries on with the new kernel
        finally:
            for _ in range(100):
                if "ctx" in holder:
                    break
                time.sleep(0.1)
            holder["ctx"].__exit__(None, None, None)


@pytest.mark.slow
def test_restart_under_an_idempotent_request_is_resent():
    holder = {}
    with (
        kernel_process() as (proc, endpoint),
        BridgeClient(endpoint, dead_after=4.0, heartbeat_interval=0.25) as c,
    ):
        old_boot = c.ping().boot_id

        def restart() -> None:
            proc.kill()
            proc.wait(10)
            holder["ctx"] = kernel_process(endpoint)
            holder["ctx"].__enter__()

        threading.Timer(0.3, restart).start()
        try:
            r = c.inspect("slow15")  # 1.5 s per attempt
            assert r.ok and r.boot_id != old_boot
        finally:
            for _ in range(100):
                if "ctx" in holder:
                    break
                time.sleep(0.1)
            holder["ctx"].__exit__(None, None, None)


@pytest.mark.slow
def test_against_the_real_kernel(tmp_path):
    from kernel_process import KernelProcess

    kernel = KernelProcess(tmp_path).start()
    try:
        with BridgeClient(kernel.endpoint, dead_after=1.5, heartbeat_interval=0.3) as c:
            first = c.ping()
            assert first.ok and first.boot_id and c.boot_id == first.boot_id
            states = []
            r = c.send("genesis_obj", "report_the_current_system_time", on_progress=states.append)
            assert r.ok and r.cycle_id and r.replayed, r
            assert {"DECOMPOSING", "SYNTHESIZING", "VALIDATING"} <= {e.state for e in states}
            assert all(e.cycle_id == r.cycle_id for e in states)
            again = c.send("genesis_obj", "report_the_current_system_time")
            assert again.ok and again.cycle_id is None  # installed: runs directly
            assert "report_the_current_system_time" in str(c.inspect("genesis_obj").result)
            assert c.cycles(5).result[0]
            assert c.inspect("no_such_root").status == "ERROR"
            kernel.kill()
            start = time.monotonic()
            with pytest.raises(KernelUnreachable):
                c.ping()
            assert time.monotonic() - start < 5
            kernel.start()  # same image, same port: the client reconnects by itself
            back = c.send("genesis_obj", "report_the_current_system_time")
            assert back.ok and back.boot_id != first.boot_id and back.cycle_id is None
    finally:
        kernel.stop()
