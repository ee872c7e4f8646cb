"""Cells: the plain-data codec, each operating-system layer on its own, the pool, and
what ``self`` is inside a cell.

Everything here runs real cell processes. Tests of a single layer start cells
with only that layer and with full builtins (``unrestricted``, never used by
the kernel), so the layer alone must refuse.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import ormsgpack
import pytest
import transaction
import ZODB
import ZODB.FileStorage

from batos_uvm.cells import invocation as invocation_module
from batos_uvm.cells import pool as pool_module
from batos_uvm.cells import wire
from batos_uvm.cells.invocation import Invocation, MethodFailed, Refused
from batos_uvm.cells.pool import CellConfig, CellCrashed, CellFailure, CellPool, CellTimeout
from batos_uvm.cells.sandbox import LAYERS, landlock_abi
from batos_uvm.objects import UvmObject


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def in_cell(
    source: str,
    *args,
    layers: tuple[str, ...] = LAYERS,
    unrestricted: bool = False,
    receiver: UvmObject | None = None,
    timeout: float = 10.0,
    **config,
):
    """Run ``source`` (a function named ``probe``) as a method of ``receiver`` in a cell."""
    pool = CellPool(CellConfig(layers=layers, unrestricted=unrestricted, **config), size=1)
    receiver = receiver if receiver is not None else UvmObject(label="probe target")
    source = textwrap.dedent(source)
    try:
        invocation = Invocation(pool, timeout=timeout, overlay={(id(receiver), "probe"): source})
        return await invocation.call(receiver, "probe", list(args), {})
    finally:
        await pool.close()


def outcome(source: str, *args, **kwargs):
    """The value, or the failure as (kind, message)."""
    try:
        return run(in_cell(source, *args, **kwargs))
    except MethodFailed as exc:
        return (exc.kind, exc.message)
    except (CellFailure, Refused) as exc:
        return (type(exc).__name__, str(exc))


# -- the codec ---------------------------------------------------------------------------
PLAIN_VALUES = [
    None, True, 0, -1, 2**64, -(2**200), 1.5, float("inf"), "text", "ünï", b"\x00\xff",
    [1, [2, [3]]], {"a": {"b": [1]}}, (1, (2, 3)), {1, 2}, frozenset({"x"}),
    {1: "one", (2, 3): "pair", None: 0}, [wire.Handle(3)],
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=repr)
def test_plain_values_round_trip_exactly(value) -> None:
    decoded = wire.decode(wire.encode(value))
    assert decoded == value and type(decoded) is type(value)


@pytest.mark.parametrize(
    "data, message",
    [
        (ormsgpack.packb(ormsgpack.Ext(wire.EXT_BIGINT, b"\x01" * 20_000)), "wider than"),
        (ormsgpack.packb(ormsgpack.Ext(99, b"")), "unknown extension"),
        (ormsgpack.packb(ormsgpack.Ext(wire.EXT_SET, ormsgpack.packb([[1], [2]]))), "malformed"),
        (ormsgpack.packb(ormsgpack.Ext(wire.EXT_HANDLE, b"\x00")), "malformed handle"),
        (b"\x91" * 5000 + b"\xc0", "not valid plain data"),
        (b"\xc1", "not valid plain data"),
        (b"", "not valid plain data"),
    ],
)
def test_hostile_frames_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(data)


def test_decoding_limits_nesting_and_size() -> None:
    nested: tuple = ()
    for _ in range(40):
        nested = (nested,)
    with pytest.raises(wire.WireError, match="nested"):
        wire.decode(wire.encode(nested))
    with pytest.raises(wire.WireError, match="limit"):
        wire.decode(wire.encode("x" * 100), wire.Limits(max_bytes=50))


def test_only_builtin_types_are_plain() -> None:
    import datetime
    import enum
    import uuid

    class Text(str):
        def __repr__(self) -> str:  # never runs: subclasses are not plain
            raise AssertionError

    Color = enum.Enum("Color", "RED")
    for value in (datetime.date(2026, 1, 1), uuid.uuid4(), Color.RED, Text("x"), object()):
        with pytest.raises(wire.WireError, match="not plain data"):
            wire.encode(value)


# -- each layer on its own ----------------------------------------------------------------
def test_seccomp_alone_denies_sockets_processes_and_writes(tmp_path) -> None:
    canary = tmp_path / "seccomp-canary"
    source = f"""
    def probe(self):
        import os, socket
        results = []
        for attempt in (lambda: socket.socket(),
                        lambda: os.fork(),
                        lambda: os.open({str(canary)!r}, os.O_WRONLY | os.O_CREAT),
                        lambda: os.execv("/bin/true", ["true"])):
            try:
                attempt()
                results.append("allowed")
            except PermissionError:
                results.append("denied")
        return results
    """
    assert outcome(source, layers=("seccomp", "no_new_privs"), unrestricted=True) == [
        "denied", "denied", "denied", "denied"
    ]
    assert not canary.exists()


@pytest.mark.skipif(landlock_abi() < 1, reason="this kernel has no Landlock")
def test_landlock_alone_denies_reads_and_writes_outside(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("image bytes")
    canary = tmp_path / "landlock-canary"
    source = f"""
    def probe(self):
        results = []
        for attempt in (lambda: open({str(secret)!r}).read(),
                        lambda: open({str(canary)!r}, "w"),
                        lambda: open("/etc/hostname").read()):
            try:
                attempt()
                results.append("allowed")
            except PermissionError:
                results.append("denied")
        import json
        results.append(bool(json.dumps([1])))  # the standard library is readable
        return results
    """
    assert outcome(source, layers=("landlock", "no_new_privs"), unrestricted=True) == [
        "denied", "denied", "denied", True
    ]
    assert not canary.exists()


@pytest.mark.skipif(landlock_abi() < 4, reason="Landlock without network rules")
def test_landlock_alone_denies_tcp() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        source = f"""
        def probe(self):
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
            except PermissionError:
                return "denied"
            return "connected"
        """
        assert outcome(source, layers=("landlock", "no_new_privs"), unrestricted=True) == "denied"


def test_network_namespace_alone_has_no_way_out() -> None:
    if os.geteuid() != 0:
        pytest.skip("a new network namespace needs root here")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        source = f"""
        def probe(self):
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
            except OSError as exc:
                return type(exc).__name__
            return "connected"
        """
        assert outcome(source, layers=("network",), unrestricted=True) in (
            "OSError", "ConnectionRefusedError", "TimeoutError"
        )


def test_rlimits_alone_bound_memory_and_file_size(tmp_path) -> None:
    kind, message = outcome(
        "def probe(self):\n    return len(bytearray(900 * 2**20))\n",
        layers=("rlimits",), unrestricted=True, memory_bytes=256 * 2**20,
    )
    assert kind == "MemoryError" and "256 MiB" in message
    canary = tmp_path / "big"
    kind, message = outcome(
        f"def probe(self):\n    f = open({str(canary)!r}, 'w')\n    f.write('x' * 10)\n"
        "    f.flush()\n",
        layers=("rlimits",), unrestricted=True,
    )
    assert kind == "OSError" and "File too large" in message  # Python ignores SIGXFSZ
    assert not canary.exists() or canary.stat().st_size == 0


def test_user_alone_is_nobody_without_capabilities(tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a kernel started as root switches its cells to nobody")
    secret = tmp_path / "root-only"
    secret.write_text("x")
    secret.chmod(0o600)
    source = f"""
    def probe(self):
        import os
        try:
            open({str(secret)!r}).read()
            readable = True
        except PermissionError:
            readable = False
        return [os.getuid(), os.getgid(), readable]
    """
    assert outcome(source, layers=("user",), unrestricted=True) == [65534, 65534, False]


def test_no_new_privs_alone_is_set() -> None:
    source = """
    def probe(self):
        for line in open("/proc/self/status"):
            if line.startswith("NoNewPrivs"):
                return line.split()[1]
    """
    assert outcome(source, layers=("no_new_privs",), unrestricted=True) == "1"


def test_restricted_builtins_alone_refuse_without_any_os_layer(tmp_path) -> None:
    canary = tmp_path / "builtins-canary"
    kind, message = outcome(
        f"def probe(self):\n    return open({str(canary)!r}, 'w')\n", layers=()
    )
    assert kind == "NameError" and "open" in message
    kind, message = outcome("def probe(self):\n    import socket\n", layers=())
    assert kind == "ImportError" and "allow-list" in message
    assert not canary.exists()


def test_every_layer_reports_its_status() -> None:
    async def scenario():
        pool = CellPool(CellConfig(), size=1)
        try:
            return await pool.ready()
        finally:
            await pool.close()

    layers = run(scenario())
    assert set(layers) == set(LAYERS)
    assert all(v.startswith(("active", "unavailable")) for v in layers.values())
    assert layers["no_new_privs"].startswith("active")
    assert layers["seccomp"].startswith("active")


# -- the pool -----------------------------------------------------------------------------
def test_a_crashed_or_timed_out_cell_is_replaced() -> None:
    async def scenario():
        pool = CellPool(CellConfig(), size=1)
        target = UvmObject(label="t")
        crash = "def probe(self):\n    t = ()\n    for i in range(300000):\n" \
                "        t = (t,)\n    return hash(t)\n"
        spin = "def probe(self):\n    while True:\n        pass\n"
        ok = "def probe(self, x):\n    return x + 1\n"
        try:
            for source, expected, limit in ((crash, CellCrashed, 20.0), (spin, CellTimeout, 1.0)):
                invocation = Invocation(pool, timeout=limit, overlay={(id(target), "probe"): source})
                with pytest.raises(expected) as caught:
                    await invocation.call(target, "probe", [], {})
                if expected is CellCrashed:
                    assert "SIGSEGV" in str(caught.value)
                again = Invocation(pool, timeout=5.0, overlay={(id(target), "probe"): ok})
                assert await again.call(target, "probe", [1], {}) == 2
            assert pool.replaced >= 2
        finally:
            await pool.close()

    run(scenario())


def test_a_cell_is_retired_after_max_calls() -> None:
    async def scenario():
        pool = CellPool(CellConfig(max_calls=3), size=1)
        target = UvmObject(label="t")
        source = "def probe(self):\n    return 1\n"
        pids = set()
        try:
            for _ in range(7):
                invocation = Invocation(pool, timeout=5.0, overlay={(id(target), "probe"): source})
                assert await invocation.call(target, "probe", [], {}) == 1
                pids |= {cell.pid for cell in pool._idle}
            return pids, pool.started
        finally:
            await pool.close()

    pids, started = run(scenario())
    assert started >= 3 and len(pids) >= 3


def test_cells_start_clean(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where working directories go
    source = """
    def probe(self):
        import os
        try:
            cwd = os.getcwd()
        except FileNotFoundError:
            cwd = None
        return [sorted(os.environ), os.listdir("/proc/self/fd"), cwd, os.listdir(".")]
    """
    environ, fds, cwd, listing = outcome(source, layers=(), unrestricted=True)
    assert environ == [] or environ == ["LC_CTYPE"]  # Python may set LC_CTYPE itself
    assert len(fds) <= 5  # stdin, stdout, stderr, its socket, the listing itself
    # Its private working directory is gone once it is ready: empty, and nothing can
    # be created there, even without the other layers.
    assert cwd is None and listing == []
    assert outcome("def probe(self):\n    open('x', 'w').write('y')\n",
                   layers=(), unrestricted=True)[0] == "FileNotFoundError"
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_directories_of_cells_a_killed_kernel_was_starting_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale, fresh, full = (tmp_path / f"batos-cell-{n}" for n in ("stale", "fresh", "full"))
    for path in (stale, fresh, full):
        path.mkdir()
    (full / "kept").write_text("not ours to judge")
    long_ago = time.time() - 3600
    for path in (stale, full):
        os.utime(path, (long_ago, long_ago))
    assert pool_module.sweep_stale_workdirs() == 1
    assert not stale.exists() and fresh.exists() and full.exists()


def test_dates_parse_in_cells() -> None:
    # strptime imports a private helper module from C, through the method's __import__.
    source = """
    def probe(self, text):
        import datetime, time
        first = datetime.datetime.strptime(text, "%Y-%m-%d")
        again = datetime.date.fromisoformat(text)
        return [(datetime.datetime(2024, 3, 1) - first).days, time.strptime(text, "%Y-%m-%d")[7],
                again.isoformat()]
    """
    assert outcome(source, "2024-01-01") == [60, 1, "2024-01-01"]


def test_killed_cells_leave_nothing_behind(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def scenario():
        pool = CellPool(CellConfig(), size=2)
        try:
            await pool.ready()
            for cell in list(pool._idle):
                os.killpg(cell.pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            await pool.ready()  # replacements started
        finally:
            await pool.close()
        assert pool.started >= 3

    run(scenario())
    assert list(tmp_path.iterdir()) == []


# -- self inside a cell -------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "cells.fs")))
    conn = db.open()
    yield conn
    transaction.abort()
    conn.close()
    db.close()


def test_writes_come_back_as_a_diff_of_the_receivers_own_slots(image) -> None:
    root = image.root()
    proto = UvmObject(label="proto", shared=[1, 2], greeting="hi")
    obj = proto.clone(count=0)
    root["proto"], root["obj"] = proto, obj
    transaction.commit()
    source = """
    def probe(self):
        self.count += 1
        self.shared.append(3)      # inherited: the receiver gets its own copy
        self.fresh = {"a": (1, 2)}
        return [self.count, self.greeting, sorted(self.slot_names())]
    """
    assert run(in_cell(source, receiver=obj)) == [1, "hi", ["count", "fresh", "shared"]]
    assert obj.count == 1 and obj.shared == [1, 2, 3] and obj.fresh == {"a": (1, 2)}
    assert proto.shared == [1, 2] and "count" not in proto.slot_names()


def test_parents_and_other_objects_are_read_only(image) -> None:
    proto = UvmObject(label="proto", level=1)
    obj = proto.clone()
    image.root()["obj"] = obj
    for source in (
        "def probe(self):\n    self.parents[0].level = 99\n",
        "def probe(self):\n    setattr(self.parents[0], 'level', 99)\n",
        "def probe(self):\n    self.parents = []\n",
        "def probe(self):\n    o = self if False else self.parents[0]\n    o.level = 99\n",
    ):
        with pytest.raises(MethodFailed, match="AttributeError"):
            run(in_cell(source, receiver=obj))
    assert proto.level == 1 and obj.parents == [proto]


def test_other_objects_answer_messages_through_the_kernel(image) -> None:
    other = UvmObject(label="other", value=41)
    other.install_method("plus", "def plus(self, n):\n    self.value += n\n    return self.value\n")
    obj = UvmObject(label="obj", friend=other)
    image.root()["obj"] = obj
    source = """
    def probe(self):
        friend = self.friend
        return [friend.value, friend.plus(1), friend.value, friend == self.friend]
    """
    assert run(in_cell(source, receiver=obj)) == [41, 42, 42, True]
    assert other.value == 42  # its own method changed it, in its own cell


def test_clone_from_a_cell_makes_a_child_of_self(image) -> None:
    obj = UvmObject(label="obj", kind="parent")
    image.root()["obj"] = obj
    source = "def probe(self):\n    self.child = self.clone(name='kid')\n    return self.child\n"
    child = run(in_cell(source, receiver=obj))
    assert isinstance(child, UvmObject) and obj.child is child
    assert child.name == "kid" and child.kind == "parent" and child.parents == [obj]
    with pytest.raises(MethodFailed, match="belong to the kernel"):
        run(in_cell("def probe(self):\n    return self.clone(_methods={})\n", receiver=obj))


def test_a_message_creates_a_bounded_number_of_objects(image, monkeypatch) -> None:
    monkeypatch.setattr(invocation_module, "MAX_CLONES", 5)
    obj = UvmObject(label="obj")
    image.root()["obj"] = obj
    for way in ("self.clone()", "self.send('clone')"):
        flood = f"def probe(self):\n    while True:\n        {way}\n"
        with pytest.raises(MethodFailed, match="at most 5 objects"):
            run(in_cell(flood, receiver=obj))
    assert run(in_cell("def probe(self):\n    return len([self.clone() for i in range(5)])\n",
                       receiver=obj)) == 5


def test_kernel_objects_in_slots_are_opaque(image) -> None:
    from BTrees.OOBTree import OOBTree

    obj = UvmObject(label="obj", index=OOBTree())
    image.root()["obj"] = obj
    with pytest.raises(MethodFailed, match="OOBTree, which generated methods cannot read"):
        run(in_cell("def probe(self):\n    return self.index\n", receiver=obj))


def test_the_old_persistence_flag_is_accepted_and_ignored(image) -> None:
    obj = UvmObject(label="obj", items=[])
    image.root()["obj"] = obj
    source = "def probe(self, x):\n    self.items.append(x)\n    self._p_changed = True\n" \
             "    return len(self.items)\n"
    assert run(in_cell(source, 5, receiver=obj)) == 1 and obj.items == [5]


def test_values_a_slot_cannot_hold_are_refused_on_the_line(image) -> None:
    obj = UvmObject(label="obj")
    image.root()["obj"] = obj
    source = "import datetime\ndef probe(self):\n    self.when = datetime.date(2026, 1, 1)\n"
    with pytest.raises(MethodFailed, match="cannot keep this value in a slot") as caught:
        run(in_cell(source, receiver=obj))
    assert "line 3" in caught.value.traceback
    assert "when" not in obj.slot_names()


def test_module_views_hold_back_what_changes_the_machine() -> None:
    for source in ("from time import clock_settime\n", "from time import tzset\n",
                   "from uuid import Enum\n", "from decimal import BasicContext\n"):
        kind, _ = outcome(source + "def probe(self):\n    return 1\n")
        assert kind == "ImportError"
    assert outcome("import re\ndef probe(self):\n    return bool(re.I) and re.sub('a', 'b', 'a')\n") \
        == "b"


def test_kernel_services_outside_a_kernel_say_so() -> None:
    kind, message = outcome("def probe(self):\n    return batos.search('x')\n")
    assert kind == "RuntimeError" and "only inside a running kernel" in message
    assert isinstance(outcome("def probe(self):\n    return batos.now()\n"), float)


def test_output_is_captured_and_bounded() -> None:
    async def scenario():
        pool = CellPool(CellConfig(), size=1)
        target = UvmObject(label="t")
        source = "def probe(self):\n    for i in range(100000):\n        print('x' * 100)\n" \
                 "    return 'done'\n"
        try:
            invocation = Invocation(pool, timeout=20, overlay={(id(target), "probe"): source})
            value = await invocation.call(target, "probe", [], {})
            return value, invocation.output
        finally:
            await pool.close()

    value, output = run(scenario())
    assert value == "done" and len(output) <= 17 * 1024 and "not kept" in output


def test_names_of_layers_match_the_docs() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "CELLS.md").read_text()
    for name in LAYERS:
        assert f"`{name}`" in docs


# -- a subverted cell: what the kernel accepts when the code inside escaped everything ------
SUBVERTED = """
def probe(self, what):
    import sys
    proxy = sys.modules["batos_uvm.cells.proxy"]
    wire = sys.modules["batos_uvm.cells.wire"]
    call = proxy.active()
    if what == "forged handle":
        return call.request("send", target=wire.Handle(99), selector="describe",
                            args=[], kwargs={})
    if what == "private slot":
        return call.cell.ask({"op": "request", "call": call.call_id, "kind": "describe",
                              "target": wire.Handle(0),
                              "diff": {"set": {"_methods": {"x": 1}}, "delete": []}})
    if what == "write parents":
        return call.cell.ask({"op": "request", "call": call.call_id, "kind": "describe",
                              "target": wire.Handle(0),
                              "diff": {"set": {"parents": []}, "delete": []}})
    if what == "kernel primitive":
        return call.request("send", target=wire.Handle(1), selector="doesNotUnderstand",
                            args=["x", [], {}], kwargs={})
    if what == "huge frame":
        import os
        os.write(call.cell.channel.fd, (2**31 - 1).to_bytes(4, "big"))
        return call.cell.channel.receive()
    if what == "unknown type":
        import os
        payload = bytes([0xd4, 99, 0])  # an extension type the kernel does not know
        os.write(call.cell.channel.fd, len(payload).to_bytes(4, "big") + payload)
        return call.cell.channel.receive()
"""


@pytest.mark.parametrize(
    "what, expected",
    [
        ("forged handle", "never given to this method"),
        ("private slot", "belong to the kernel"),
        ("write parents", "parents are read-only"),
        ("kernel primitive", "cannot call"),
        ("huge frame", "the limit is"),
        ("unknown type", "unknown extension type"),
    ],
)
def test_a_subverted_cell_cannot_forge_or_overstep(image, what: str, expected: str) -> None:
    proto = UvmObject(label="proto")
    proto.install_primitive("doesNotUnderstand", "doesNotUnderstand")
    obj = proto.clone(level=1)
    image.root()["obj"] = obj
    result = outcome(SUBVERTED, what, receiver=obj, unrestricted=True)
    assert expected in str(result), result
    assert obj.level == 1 and obj.parents == [proto] and "_methods" not in obj.__dict__
