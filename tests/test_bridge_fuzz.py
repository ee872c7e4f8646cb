"""Thousands of random, mutated and hostile frames against a real bridge; it must keep serving."""

from __future__ import annotations

import logging
import random
import time
import uuid

import ormsgpack
import pytest
import zmq
from fake_kernel_bridge import FakeKernel, running_bridge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batos_uvm.client import BridgeClient
from batos_uvm.protocol import COMMANDS, decode_kernel_message

pytestmark = pytest.mark.slow

LIMIT = 16 * 1024


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.crashes = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("bridge: unexpected error"):
            self.crashes += 1


STATE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def fuzz_bridge():
    counter = _Counter()
    logging.getLogger("batos.bridge").addHandler(counter)
    with running_bridge(
        FakeKernel(step_delay=0), max_message_bytes=LIMIT, heartbeat_interval=0.2
    ) as bridge:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(bridge.endpoint)
        STATE.update(bridge=bridge, sock=sock, sent=0, replies=0, counter=counter)
        yield
        sock.close()
        ctx.term()
    logging.getLogger("batos.bridge").removeHandler(counter)


def drain(wait: float = 0.0) -> None:
    sock = STATE["sock"]
    while sock.poll(wait * 1000):
        decode_kernel_message(sock.recv())  # whatever the bridge sends must be valid protocol
        STATE["replies"] += 1
        wait = 0.0


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
names = st.from_regex(r"\A[a-z_][a-z0-9_]{0,20}\Z") | st.text(max_size=12)
targets = names | st.from_regex(r"\A0x[0-9a-f]{1,18}\Z") | st.integers(0, 2**64).map(str)


@st.composite
def requests(draw):
    command = draw(st.sampled_from(COMMANDS))
    req = {"v": 1, "id": uuid.uuid4().hex, "command": command}
    if command == "send":
        req.update(
            target=draw(targets),
            selector=draw(names),
            args=draw(st.lists(values, max_size=3)),
            kwargs=draw(st.dictionaries(st.text(max_size=5), values, max_size=2)),
        )
    elif command == "initiate_cognitive_cycle":
        req.update(
            target_oid=draw(targets),
            mission_brief={
                "type": draw(st.sampled_from(["unhandled_message", "x"])),
                "selector": draw(names),
                "args": draw(st.lists(values, max_size=2)),
                "kwargs": {},
            },
        )
    elif command == "inspect":
        req["target"] = draw(targets)
    elif command == "cycles" and draw(st.booleans()):
        req["limit"] = draw(st.integers(-5, 2000))
    return req


@st.composite
def mutated(draw):
    req = draw(requests())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "set", "add"]))
        key = draw(st.sampled_from(sorted(req))) if req else "id"
        if op == "drop":
            req.pop(key, None)
        elif op == "set":
            req[key] = draw(values)
        else:
            req[draw(st.text(max_size=6))] = draw(values)
    return req


def _pack(obj) -> bytes:
    try:
        return ormsgpack.packb(obj, option=ormsgpack.OPT_NON_STR_KEYS)
    except (TypeError, ValueError):
        return b"\xc1"


frames = st.one_of(
    st.binary(max_size=64).map(lambda b: [b]),
    values.map(lambda v: [_pack(v)]),
    requests().map(lambda r: [_pack(r)]),
    mutated().map(lambda r: [_pack(r)]),
    st.tuples(requests(), st.integers(0, 40)).map(lambda t: [_pack(t[0])[: t[1]]]),
    st.lists(st.binary(max_size=16), min_size=2, max_size=4),
    st.integers(LIMIT + 1, LIMIT + 4096).map(lambda n: [b"\x91" + b"\x00" * n]),
)


@settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames)
def test_random_and_mutated_frames(message):
    STATE["sock"].send_multipart(message)
    STATE["sent"] += 1
    drain()


def test_random_byte_flips_of_valid_frames():
    rng = random.Random(1234)
    base = [
        _pack(
            {
                "v": 1,
                "id": uuid.uuid4().hex,
                "command": c,
                "target": "genesis_obj",
                "selector": "echo",
                "args": [1, "two", [3]],
                "kwargs": {"k": None},
            }
        )
        for c in ("send", "inspect", "ping")
    ]
    for _ in range(3000):
        frame = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        STATE["sock"].send(bytes(frame))
        STATE["sent"] += 1
        if STATE["sent"] % 100 == 0:
            drain()


def test_bridge_still_serves_after_the_fuzzing():
    bridge = STATE["bridge"]
    # the bridge shares this process (and its GIL): wait until it has read every frame
    deadline = time.monotonic() + 60
    while bridge.stats["received"] < STATE["sent"] and time.monotonic() < deadline:
        drain(0.05)
    drain(0.5)
    assert bridge.stats["received"] == STATE["sent"]
    assert STATE["counter"].crashes == 0
    assert STATE["replies"] > STATE["sent"] // 2  # nearly every frame earns an answer
    with BridgeClient(bridge.endpoint, dead_after=2.0, heartbeat_interval=0.5) as c:
        start = time.monotonic()
        assert c.ping().ok
        assert c.send("genesis_obj", "add", [40, 2]).result == 42
        assert time.monotonic() - start < 2
