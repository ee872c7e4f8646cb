"""The wire protocol's models and helpers (no sockets here; see test_bridge.py)."""

from __future__ import annotations

import ormsgpack
import pytest

from batos_uvm.protocol import (
    ERR_INVALID,
    ERR_MALFORMED,
    ERR_TOO_LARGE,
    ERR_UNKNOWN_COMMAND,
    ERR_VERSION,
    CycleRequest,
    Heartbeat,
    ProgressEvent,
    ProtocolError,
    Reply,
    RequestHandler,
    SendRequest,
    decode_kernel_message,
    decode_request,
    encode,
    endpoint_is_local,
    parse_target,
    validate_request,
)


def req(**fields):
    return {"v": 1, "id": "r1", **fields}


@pytest.mark.parametrize(
    "obj, cls",
    [
        (req(command="ping"), "PingRequest"),
        (req(command="heartbeat"), "HeartbeatRequest"),
        (
            req(
                command="send",
                target="genesis_obj",
                selector="greet",
                args=["Bob"],
                kwargs={"loud": True},
            ),
            "SendRequest",
        ),
        (req(command="send", target="0x2a", selector="x"), "SendRequest"),
        (req(command="inspect", target="12345"), "InspectRequest"),
        (req(command="cycles"), "CyclesRequest"),
        (
            req(
                command="initiate_cognitive_cycle",
                target_oid="genesis_obj",
                mission_brief={
                    "type": "unhandled_message",
                    "selector": "greet_user",
                    "args": [],
                    "kwargs": {},
                },
            ),
            "CycleRequest",
        ),
    ],
)
def test_valid_requests(obj, cls):
    assert type(validate_request(obj)).__name__ == cls


def test_defaults_and_seed_payload():
    r = validate_request(req(command="send", target="genesis_obj", selector="f"))
    assert isinstance(r, SendRequest) and r.args == [] and r.kwargs == {}
    assert validate_request(req(command="cycles")).limit == 20
    c = validate_request(
        req(
            command="initiate_cognitive_cycle",
            target_oid="genesis_obj",
            mission_brief={"selector": "report_time"},
        )
    )
    assert isinstance(c, CycleRequest) and c.mission_brief.type == "unhandled_message"


@pytest.mark.parametrize(
    "obj, kind, fragment",
    [
        ([1, 2], ERR_MALFORMED, "must be a map"),
        ({"id": "r1", "command": "ping"}, ERR_INVALID, "'v'"),
        (req(v=2, command="ping"), ERR_VERSION, "version 2"),
        ({"v": True, "id": "r1", "command": "ping"}, ERR_VERSION, "True"),
        ({"v": 1.0, "id": "r1", "command": "ping"}, ERR_VERSION, "1.0"),
        (req(), ERR_INVALID, "command"),
        (req(command="rm -rf"), ERR_UNKNOWN_COMMAND, "known commands"),
        (req(command=5), ERR_UNKNOWN_COMMAND, "5"),
        ({"v": 1, "command": "ping"}, ERR_INVALID, "id"),
        ({"v": 1, "id": "", "command": "ping"}, ERR_INVALID, "id"),
        ({"v": 1, "id": "x" * 65, "command": "ping"}, ERR_INVALID, "id"),
        (req(command="cycles", limit="5"), ERR_INVALID, "limit"),
        (req(command="cycles", limit=True), ERR_INVALID, "limit"),
        (req(command="cycles", limit=0), ERR_INVALID, "limit"),
        (req(command="ping", extra=1), ERR_INVALID, "extra"),
        (req(command="send", target="genesis_obj"), ERR_INVALID, "selector"),
        (
            req(command="send", target="genesis_obj", selector="__import__('os')"),
            ERR_INVALID,
            "not a valid identifier",
        ),
        (req(command="send", target="genesis_obj", selector="class"), ERR_INVALID, "identifier"),
        (req(command="send", target="a b", selector="f"), ERR_INVALID, "neither a root name"),
        (req(command="send", target="genesis_obj", selector="f", args="x"), ERR_INVALID, "args"),
        (req(command="send", target="genesis_obj", selector="f", args=(1,)), ERR_INVALID, "args"),
        (req(command="inspect", target=["x"]), ERR_INVALID, "target"),
    ],
)
def test_invalid_requests_give_kind_and_reason(obj, kind, fragment):
    with pytest.raises(ProtocolError) as info:
        validate_request(obj)
    assert info.value.kind == kind
    assert fragment in info.value.reason


def test_request_id_recovered_when_possible():
    with pytest.raises(ProtocolError) as info:
        validate_request(req(command="cycles", limit="x"))
    assert info.value.request_id == "r1"
    with pytest.raises(ProtocolError) as info:
        validate_request({"v": 1, "id": 7, "command": "ping"})
    assert info.value.request_id == ""


def test_decode_request_limits_and_garbage():
    frame = ormsgpack.packb(req(command="ping"))
    assert decode_request(frame).command == "ping"
    with pytest.raises(ProtocolError) as info:
        decode_request(frame, max_bytes=len(frame) - 1)
    assert info.value.kind == ERR_TOO_LARGE and "exceeds the limit" in info.value.reason
    for garbage in (b"", b"\xc1", b"\x81\x01\x02", b"\xd4\x01\x00", b"\x91" * 5000 + b"\xc0"):
        with pytest.raises(ProtocolError) as info:
            decode_request(garbage)
        assert info.value.kind in (ERR_MALFORMED,)


def test_parse_target():
    assert parse_target("genesis_obj") == "genesis_obj"
    assert parse_target("0x2a") == 42
    assert parse_target("42") == 42
    for bad in ("0x", "1" * 25, "a-b", "", "class", "0x" + "f" * 17):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_endpoint_is_local():
    assert endpoint_is_local("tcp://127.0.0.1:5555")
    assert endpoint_is_local("tcp://127.0.0.1:*")
    assert endpoint_is_local("tcp://localhost:5555")
    assert endpoint_is_local("tcp://[::1]:5555")
    assert endpoint_is_local("ipc:///tmp/batos.sock")
    assert endpoint_is_local("inproc://x")
    for remote in (
        "tcp://0.0.0.0:5555",
        "tcp://*:5555",
        "tcp://eth0:5555",
        "tcp://192.168.1.5:5555",
        "ws://127.0.0.1:5555",
        "nonsense",
    ):
        assert not endpoint_is_local(remote), remote


def test_kernel_messages_round_trip():
    reply = Reply.complete({"t": 1}, cycle_id="c1", replayed=True)
    back = decode_kernel_message(encode(reply))
    assert back == reply and back.ok and back.replayed
    failed = decode_kernel_message(encode(Reply.failed("cycle_failed", "no")))
    assert failed.status == "FAILED" and failed.error.kind == "cycle_failed"
    ev = decode_kernel_message(encode(ProgressEvent(id="r", state="DECOMPOSING", detail="d")))
    assert isinstance(ev, ProgressEvent) and ev.state == "DECOMPOSING" and ev.ts > 0
    hb = decode_kernel_message(encode(Heartbeat(boot_id="b")))
    assert isinstance(hb, Heartbeat) and hb.boot_id == "b"
    with pytest.raises(ProtocolError):
        decode_kernel_message(b"\xc1")
    with pytest.raises(ProtocolError):
        decode_kernel_message(ormsgpack.packb({"v": 1, "type": "gossip"}))


def test_error_reply_reason_is_bounded():
    r = Reply.error_reply("invalid", "x" * 10_000, "id1")
    assert r.status == "ERROR" and r.id == "id1" and len(r.error.reason) <= 2000


def test_request_handler_protocol_is_runtime_checkable():
    class Handler:
        async def handle(self, request, progress):
            return Reply.complete(None)

    assert isinstance(Handler(), RequestHandler)
    assert not isinstance(object(), RequestHandler)
