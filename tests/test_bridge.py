"""The bridge on real loopback sockets, driven by raw DEALER peers and the fake kernel."""

from __future__ import annotations

import argparse
import os
import stat
import threading
import time
import uuid

import ormsgpack
import pytest
import zmq
from fake_kernel_bridge import FakeKernel, running_bridge

from batos_uvm.bridge import Bridge, BridgeError, CurveServerConfig, InsecureBindError
from batos_uvm.client import AuthenticationFailed, BridgeClient, CurveClientConfig
from batos_uvm.keys import add_keys_parser, run_keys_command
from batos_uvm.protocol import Heartbeat, ProgressEvent, Reply, decode_kernel_message


class Peer:
    """A raw DEALER: sends whatever frames a test wants and reads the kernel's messages."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def request(self, **fields) -> str:
        rid = fields.pop("id", None) or uuid.uuid4().hex
        self.send(ormsgpack.packb({"v": 1, "id": rid, **fields}))
        return rid

    def recv(self, timeout: float = 5.0):
        if not self.sock.poll(timeout * 1000):
            raise TimeoutError("no message from the bridge")
        return decode_kernel_message(self.sock.recv())

    def reply(self, timeout: float = 5.0) -> Reply:
        """The next Reply, skipping heartbeats and progress."""
        end = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, end - time.monotonic()))
            if isinstance(msg, Reply):
                return msg

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def kernel():
    return FakeKernel()


@pytest.fixture
def bridge(kernel):
    with running_bridge(kernel, heartbeat_interval=0.2, max_message_bytes=64 * 1024) as b:
        yield b


@pytest.fixture
def peer(bridge):
    p = Peer(bridge.endpoint)
    yield p
    p.close()


def test_binds_an_ephemeral_loopback_port(bridge):
    assert bridge.endpoint.startswith("tcp://127.0.0.1:") and not bridge.endpoint.endswith("*")


def test_progress_then_final_reply(peer, bridge):
    rid = peer.request(command="send", target="genesis_obj", selector="make_tea")
    events = []
    while True:
        msg = peer.recv()
        if isinstance(msg, Heartbeat):
            continue
        events.append(msg)
        if isinstance(msg, Reply):
            break
    progress, reply = events[:-1], events[-1]
    assert [e.state for e in progress] == [
        "DECOMPOSING",
        "DELEGATING",
        "SYNTHESIZING",
        "VALIDATING",
        "COMPLETE",
    ]
    assert all(isinstance(e, ProgressEvent) and e.id == rid for e in progress)
    assert len({e.cycle_id for e in progress}) == 1
    assert reply.id == rid and reply.status == "COMPLETE"
    assert reply.result == "result of make_tea" and reply.result_repr == "'result of make_tea'"
    assert reply.cycle_id == progress[0].cycle_id and reply.boot_id == bridge.boot_id
    assert reply.replayed is False


def test_heartbeat_is_answered_with_boot_id(peer, bridge):
    peer.request(command="heartbeat")
    msg = peer.recv()
    assert isinstance(msg, Heartbeat) and msg.boot_id == bridge.boot_id


def test_heartbeats_flow_while_a_request_is_in_flight(peer):
    peer.request(command="send", target="genesis_obj", selector="sleep", args=[0.7])
    beats = 0
    while not isinstance(msg := peer.recv(), Reply):
        beats += isinstance(msg, Heartbeat)
    assert beats >= 2 and msg.result == "slept"


@pytest.mark.parametrize(
    "frames, kind, fragment",
    [
        ([b"\xc1 not msgpack"], "malformed", "not a msgpack"),
        ([b"plain text"], "malformed", "must be a map"),
        ([b""], "malformed", "not a msgpack"),
        ([ormsgpack.packb([1, 2, 3])], "malformed", "must be a map"),
        ([ormsgpack.packb("ping")], "malformed", "must be a map"),
        ([ormsgpack.packb({"v": 1, "command": "ping"})], "invalid", "id"),
        ([ormsgpack.packb({"v": 1, "id": "a", "command": "launch"})], "unknown_command", "launch"),
        ([ormsgpack.packb({"v": 9, "id": "a", "command": "ping"})], "unsupported_version", "9"),
        (
            [ormsgpack.packb({"v": 1, "id": "a", "command": "cycles", "limit": "ten"})],
            "invalid",
            "limit",
        ),
        (
            [ormsgpack.packb({"v": 1, "id": "a", "command": "send", "target": 5, "selector": "x"})],
            "invalid",
            "target",
        ),
        ([b"a", b"b"], "malformed", "one frame"),
        ([b"x" * (64 * 1024 + 1)], "too_large", "exceeds the limit"),
    ],
)
def test_malformed_frames_get_error_replies_and_bridge_keeps_serving(peer, frames, kind, fragment):
    peer.send(*frames)
    reply = peer.reply()
    assert reply.status == "ERROR" and reply.error.kind == kind
    assert fragment in reply.error.reason
    obj = (
        ormsgpack.unpackb(frames[0])
        if kind in ("invalid", "unknown_command", "unsupported_version")
        else {}
    )
    assert reply.id == (obj.get("id", "") if isinstance(obj, dict) else "")
    rid = peer.request(command="ping")
    ok = peer.reply()
    assert ok.id == rid and ok.status == "COMPLETE"


def test_frames_far_over_the_limit_drop_the_connection_not_the_bridge(bridge):
    p = Peer(bridge.endpoint)
    p.send(b"x" * (1024 * 1024))  # > 4x the limit: ZeroMQ disconnects this peer
    p.close()
    q = Peer(bridge.endpoint)
    rid = q.request(command="ping")
    assert q.reply().id == rid
    q.close()


def test_handler_failures_become_error_replies(peer):
    peer.request(command="send", target="genesis_obj", selector="boom")
    r = peer.reply()
    assert r.status == "ERROR" and r.error.kind == "internal" and "exploded" in r.error.reason
    peer.request(command="send", target="genesis_obj", selector="bad_return")
    r = peer.reply()
    assert r.error.kind == "internal" and "instead of a Reply" in r.error.reason
    peer.request(command="send", target="genesis_obj", selector="fail")
    r = peer.reply()
    assert r.status == "FAILED" and r.error.kind == "cycle_failed"
    peer.request(command="ping")
    assert peer.reply().status == "COMPLETE"


def test_unserialisable_and_oversized_results_travel_as_repr(peer):
    peer.request(command="send", target="genesis_obj", selector="unserialisable")
    r = peer.reply()
    assert r.status == "COMPLETE" and r.result is None and r.result_repr == "{1, 2, 3}"
    peer.request(command="send", target="genesis_obj", selector="huge")
    r = peer.reply()
    assert r.status == "COMPLETE" and r.result is None
    assert r.result_repr.startswith("'xxx") and len(r.result_repr) < 64 * 1024


def test_replayed_flag_is_passed_through(peer):
    peer.request(command="send", target="genesis_obj", selector="replayed")
    assert peer.reply().replayed is True


def test_requests_run_concurrently_for_many_clients(bridge):
    n, results, errors = 20, [], []

    def one(i: int) -> None:
        try:
            with BridgeClient(bridge.endpoint, dead_after=3, heartbeat_interval=0.5) as c:
                r = c.send("genesis_obj", "sleep", [0.5])
                assert r.result == "slept"
                results.append(c.send("genesis_obj", "echo", [i]).result["args"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    assert not errors and sorted(r[0] for r in results) == list(range(n))
    assert elapsed < 5.0, f"20 x 0.5 s requests took {elapsed:.1f}s: not concurrent"


def test_duplicate_id_in_flight_runs_once_and_answers_every_identity(bridge, kernel):
    a, b = Peer(bridge.endpoint), Peer(bridge.endpoint)
    rid = uuid.uuid4().hex
    frame = ormsgpack.packb(
        {
            "v": 1,
            "id": rid,
            "command": "send",
            "target": "genesis_obj",
            "selector": "sleep",
            "args": [0.4],
        }
    )
    a.send(frame)
    time.sleep(0.1)
    b.send(frame)  # a retry from a reopened socket while the first is running
    ra, rb = a.reply(), b.reply()
    assert ra.id == rb.id == rid and ra.result == rb.result == "slept"
    assert kernel.executions[rid] == 1
    assert bridge.stats["deduplicated"] >= 1
    a.close()
    b.close()


def test_duplicate_id_after_completion_gets_the_cached_reply(peer, kernel):
    rid = peer.request(command="send", target="genesis_obj", selector="count", args=["d"])
    first = peer.reply()
    peer.request(id=rid, command="send", target="genesis_obj", selector="count", args=["d"])
    second = peer.reply()
    assert first == second and first.result == 1
    assert kernel.executions[rid] == 1 and kernel.counters["d"] == 1


def test_reused_id_with_other_content_is_refused(peer, kernel):
    rid = peer.request(command="send", target="genesis_obj", selector="count", args=["e"])
    assert peer.reply().result == 1
    peer.request(id=rid, command="send", target="genesis_obj", selector="count", args=["f"])
    r = peer.reply()
    assert r.status == "ERROR" and r.error.kind == "duplicate_id" and r.id == rid
    assert kernel.counters["f"] == 0


def test_too_many_in_flight_is_refused_as_busy(kernel):
    with running_bridge(kernel, max_in_flight=2) as b:
        p = Peer(b.endpoint)
        for _ in range(2):
            p.request(command="send", target="genesis_obj", selector="sleep", args=[0.5])
        p.request(command="ping")
        r = p.reply()
        assert r.status == "ERROR" and r.error.kind == "busy"
        assert [p.reply().result, p.reply().result] == ["slept", "slept"]
        p.close()


def test_stop_answers_unfinished_requests(kernel):
    with running_bridge(kernel, drain_timeout=0.2) as b:
        p = Peer(b.endpoint)
        p.request(command="send", target="genesis_obj", selector="sleep", args=[5])
        time.sleep(0.2)
    r = p.reply(timeout=5)  # leaving the block stopped the bridge
    assert r.status == "ERROR" and r.error.kind == "shutting_down"
    p.close()


def test_non_loopback_bind_without_curve_is_refused():
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.0.10:5555"):
        with pytest.raises(InsecureBindError, match="without CURVE"):
            Bridge(FakeKernel(), endpoint)
    Bridge(FakeKernel(), "tcp://0.0.0.0:5555", allow_insecure_remote=True)  # explicit opt-in


def test_address_in_use_is_a_clear_error(bridge):
    with pytest.raises(BridgeError, match="cannot bind"), running_bridge(endpoint=bridge.endpoint):
        pass


def _generate_keys(directory, *clients):
    parser = argparse.ArgumentParser()
    keys = parser.add_subparsers(dest="command").add_parser("keys")
    add_keys_parser(keys.add_subparsers(dest="keys_command", required=True))
    argv = ["keys", "generate", str(directory)]
    for c in clients:
        argv += ["--client", c]
    return run_keys_command(parser.parse_args(argv))


def test_keys_generate_layout(tmp_path, capsys):
    assert _generate_keys(tmp_path / "k", "alice", "bob") == 0
    k = tmp_path / "k"
    for name in ("server", "alice", "bob"):
        assert (k / f"{name}.key").is_file() and (k / f"{name}.key_secret").is_file()
        assert stat.S_IMODE(os.stat(k / f"{name}.key_secret").st_mode) == 0o600
    assert sorted(p.name for p in (k / "authorized_clients").iterdir()) == ["alice.key", "bob.key"]
    before = (k / "server.key_secret").read_bytes()
    assert _generate_keys(k, "alice") == 0  # existing keys are kept
    assert (k / "server.key_secret").read_bytes() == before
    assert "kept" in capsys.readouterr().out


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_authorised_client_works_others_are_refused(tmp_path):
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    _generate_keys(keys)
    _generate_keys(stranger)
    server = CurveServerConfig.from_dir(keys)
    # CURVE on a non-loopback address would be allowed; a loopback one keeps the test local
    with running_bridge(curve=server) as b:
        with BridgeClient(
            b.endpoint,
            curve=CurveClientConfig.from_dir(keys),
            dead_after=1.0,
            heartbeat_interval=0.3,
        ) as good:
            assert good.ping().status == "COMPLETE"
        # a client whose key is not authorised: the handshake is refused
        other = CurveClientConfig(stranger / "client.key_secret", keys / "server.key")
        start = time.monotonic()
        with (
            BridgeClient(
                b.endpoint, curve=other, dead_after=1.0, heartbeat_interval=0.3, retries=1
            ) as bad,
            pytest.raises(AuthenticationFailed, match="refused"),
        ):
            bad.ping()
        assert time.monotonic() - start < 6
        # no CURVE at all: no answer either
        with (
            BridgeClient(b.endpoint, dead_after=1.0, heartbeat_interval=0.3, retries=1) as plain,
            pytest.raises(AuthenticationFailed),
        ):
            plain.ping()
        # and the authorised client still works afterwards
        with BridgeClient(
            b.endpoint,
            curve=CurveClientConfig.from_dir(keys),
            dead_after=1.0,
            heartbeat_interval=0.3,
        ) as good:
            assert good.send("genesis_obj", "add", [2, 3]).result == 5
    assert Bridge(FakeKernel(), "tcp://0.0.0.0:5555", curve=server)  # CURVE allows remote


def test_curve_config_errors_say_how_to_make_keys(tmp_path):
    with pytest.raises(BridgeError, match="keys generate"):
        CurveServerConfig.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="keys generate"):
        CurveClientConfig.from_dir(tmp_path)
