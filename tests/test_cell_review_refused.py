"""A security review of the cell boundary: attacks the layers correctly refuse.

Cases not covered by test_cells.py and test_cell_attacks.py: an escaped cell
against every operating-system layer together, frames that lie, requests and
diffs that overstep the receiver, a flood of a cell's stderr. The attackers
are described in tests/cell_attackers.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import transaction
from cell_attackers import Image, call_in_cell, outcome, run, subverted

from batos_uvm.cells.pool import CellConfig, CellPool
from batos_uvm.objects import UvmObject


@pytest.fixture
def image(tmp_path):
    image = Image(str(tmp_path / "review.fs"))
    yield image
    image.close()


ESCAPES = """
def probe(self, image, kernel_pid):
    import os, sys, signal
    ctypes = sys.modules["ctypes"]
    resource = sys.modules["resource"]
    libc = ctypes.CDLL(None, use_errno=True)

    def c(result):
        if result < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return result

    attempts = {
        "read the image": lambda: open(image, "rb").read(16),
        "write next to the image": lambda: open(image + ".canary", "w"),
        "write in the working directory": lambda: open("canary", "w"),
        "fill an anonymous file": lambda: os.write(os.memfd_create("x"), b"x" * 10),
        "open a TCP socket": lambda: c(libc.socket(2, 1, 0)),
        "open a unix socket": lambda: c(libc.socket(1, 1, 0)),
        "kill the kernel": lambda: os.kill(kernel_pid, signal.SIGKILL),
        "signal the kernel's group": lambda: os.killpg(os.getpgid(kernel_pid), signal.SIGTERM),
        "read the kernel's environment": lambda: open(f"/proc/{kernel_pid}/environ").read(),
        "open the kernel's memory": lambda: open(f"/proc/{kernel_pid}/mem", "rb"),
        "list the kernel's descriptors": lambda: os.listdir(f"/proc/{kernel_pid}/fd"),
        "trace the kernel": lambda: c(libc.ptrace(16, kernel_pid, 0, 0)),
        "start a thread": lambda: sys.modules["_thread"].start_new_thread(print, ()),
        "fork": lambda: os.fork(),
        "exec": lambda: os.execv("/bin/true", ["true"]),
        "become root": lambda: os.setuid(0),
        "lift the memory limit": lambda: resource.setrlimit(resource.RLIMIT_AS, (-1, -1)),
        "read /etc/passwd": lambda: open("/etc/passwd").read(),
    }
    results = {}
    for name, attempt in attempts.items():
        try:
            results[name] = "allowed: " + repr(attempt())[:80]
        except BaseException as exc:
            results[name] = "refused: " + type(exc).__name__
    return results
"""


def test_an_escaped_cell_is_still_contained_by_every_layer_together(tmp_path) -> None:
    """Refused: with the restricted builtins gone, the operating-system layers hold.

    tests/test_cells.py shows each layer alone; this is the kernel's real
    configuration (every layer) against code with the cell's full powers,
    aimed at the image and at the kernel process (here: this test's process).
    """
    import os

    image = tmp_path / "live_image.fs"
    image.write_bytes(b"FS21 the image")
    results = outcome(ESCAPES, str(image), os.getpid(), unrestricted=True)
    allowed = {name: result for name, result in results.items() if not result.startswith("refused")}
    assert not allowed, allowed
    assert not (tmp_path / "live_image.fs.canary").exists()


LYING_CELLS = {
    # a length it never sends, then silence: the call's time limit ends it
    "short frame, then silence": ("os.write(fd, (1000).to_bytes(4, 'big') + b'x' * 10)\n"
                                  "import time\ntime.sleep(60)", "CellTimeout"),
    # a length it never sends, then exit
    "short frame, then exit": ("os.write(fd, (1000).to_bytes(4, 'big') + b'x' * 10)\n"
                               "os._exit(0)", "CellCrashed"),
    "not a map": ("send_raw(wire.encode([1, 2]))\nreturn call.cell.channel.receive()",
                  "CellProtocolError"),
    "an op the kernel does not expect": ("send_raw(wire.encode({'op': 'ready'}))\n"
                                         "return call.cell.channel.receive()",
                                         "CellProtocolError"),
    "a malformed diff": ("send_raw(wire.encode(done(1, ['x'])))\n"
                         "return call.cell.channel.receive()", "CellProtocolError"),
    "silence": ("import time\ntime.sleep(60)", "CellTimeout"),
}


@pytest.mark.parametrize("lie", list(LYING_CELLS))
def test_a_cell_that_breaks_the_protocol_is_stopped(lie: str) -> None:
    """Refused: frames that lie about their length or content stop the call, nothing else."""
    body, expected = LYING_CELLS[lie]
    receiver = UvmObject(label="receiver", level=1)
    result = outcome(subverted(body), receiver=receiver, unrestricted=True, timeout=2.0)
    assert result[0] == expected, result
    assert receiver.slot_names() == ["level"]


OVERSTEPS = {
    "delete a private slot": ({"diff": {"set": {}, "delete": ["_label"]}}, "belong to the kernel"),
    "delete parents": ({"diff": {"set": {}, "delete": ["parents"]}}, "parents are read-only"),
    "shadow an operation": ({"diff": {"set": {"describe": 1}, "delete": []}},
                            "operation of every object"),
    "a slot name that is not a name": ({"diff": {"set": {"a b": 1}, "delete": []}},
                                       "not a slot name"),
    "a very long slot name": ({"diff": {"set": {"x" * 5000: 1}, "delete": []}}, "at most 120"),
    "read a private slot of another object": ({"kind": "get", "target": 1, "name": "_methods"},
                                              "does not understand"),
    "send a private message": ({"kind": "send", "target": 1, "selector": "_p_activate",
                                "args": [], "kwargs": {}}, "does not understand"),
    "a private keyword": ({"kind": "send", "target": 1, "selector": "clone", "args": [],
                           "kwargs": {"_methods": {}}}, "reserved for the kernel"),
    "a primitive off the allow-list": ({"kind": "send", "target": 1, "selector": "index",
                                        "args": ["x", "y"], "kwargs": {}}, "cannot call"),
    "the source of a method not offered": ({"kind": "source", "key": "m" + "0" * 24},
                                           "no such method source"),
    "an unknown service": ({"kind": "service", "name": "shell", "args": ["id"]},
                           "unknown kernel service"),
    "the largest handle": ({"kind": "describe", "target": 2**32 - 1}, "never given"),
}


@pytest.mark.parametrize("attempt", list(OVERSTEPS))
def test_a_subverted_cell_cannot_overstep_its_receiver(image, attempt: str) -> None:
    """Refused by the kernel's checks of every request and diff (Invocation, Frame)."""
    request, expected = OVERSTEPS[attempt]
    proto = UvmObject(label="proto")
    proto.install_primitive("index", "catalog.index")
    obj = proto.clone(level=1)
    obj._label = "obj"
    image.root["obj"] = obj
    transaction.commit()
    body = """
    request = {"op": "request", "call": call.call_id, "kind": "describe",
               "diff": {"set": {}, "delete": []}, **args[0]}
    request["target"] = wire.Handle(request.get("target", 0))  # 1: the parent
    return call.cell.ask(request).get("error")
    """
    result = outcome(subverted(body), request, receiver=obj, unrestricted=True)
    assert expected in str(result), result
    assert sorted(obj.slot_names()) == ["level", "parents"] and obj.parents == [proto]
    assert obj.__dict__.get("_label") == "obj" and "index" in proto.methods()


def test_a_cell_flooding_its_stderr_does_not_slow_the_kernel() -> None:
    """Refused: the kernel drains a cell's stderr in 64 KiB reads and keeps a 4 KiB tail.

    A subverted cell writes to its stderr (the pipe the kernel drains, not the
    captured ``print``) as fast as it can; the event loop keeps turning.
    """
    body = """
    import time
    chunk, end, written = b"x" * 65536, time.time() + 3, 0
    while time.time() < end:
        written += os.write(2, chunk)
    return written
    """
    lags: list[float] = []

    async def watch() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.05)
            lags.append(time.monotonic() - started - 0.05)

    async def scenario():
        pool = CellPool(CellConfig(unrestricted=True), size=1)
        watcher = asyncio.ensure_future(watch())
        try:
            return await call_in_cell(pool, UvmObject(label="r"), subverted(body))
        finally:
            watcher.cancel()
            await pool.close()

    written = run(scenario())
    assert written > 10 * 2**20  # it did flood
    assert max(lags) < 0.5, f"the event loop stalled {max(lags):.2f} s"
