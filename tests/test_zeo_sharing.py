"""Two kernels, one image: kernel A owns the FileStorage and serves it over ZEO,
kernel B opens ``zeo://HOST:PORT``. A method grown through either kernel is
answered by the other without a new cycle.

How B stores blobs: ``image._open_uri`` gives a ``zeo://`` kernel a ZEO client
with a private, non-shared blob cache: ``--blob-dir`` if given, else
``.zeo-client-blobs`` in B's working directory. Blobs travel over the ZEO
connection, so B needs no access to A's files. B does not serve ZEO itself and
writes no address file (``open_image`` returns before looking at ``--zeo``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

try:
    from tests.kernel_process import KernelProcess, free_port
except ImportError:  # tests/ itself on sys.path
    from kernel_process import KernelProcess, free_port


@pytest.fixture
def kernels(tmp_path: Path):
    zeo_port = free_port()
    # A fixed ZEO port, so B finds A again after A restarts.
    a = KernelProcess(tmp_path / "a", name="kernel-a",
                      extra_args=["--zeo", f"127.0.0.1:{zeo_port}"])
    a.start()
    b = KernelProcess(tmp_path / "b", db=f"zeo://127.0.0.1:{zeo_port}", name="kernel-b")
    try:
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_a_method_grown_through_one_kernel_is_answered_by_the_other(kernels, tmp_path: Path):
    a, b = kernels
    assert a.zeo_address() is not None
    uri = "zeo://{}:{}".format(*a.zeo_address())

    grown = a.call_json("genesis_obj", "factorial", 5)
    assert grown["status"] == "COMPLETE" and grown["result"] == 120
    assert grown["cycle_id"]  # A ran a cycle
    answered = b.call_json("genesis_obj", "factorial", 6)
    assert answered["status"] == "COMPLETE" and answered["result"] == 720
    assert answered["cycle_id"] is None  # B found A's method: no cycle

    grown = b.call_json("genesis_obj", "say_hello", "Bruce")
    assert grown["status"] == "COMPLETE" and grown["cycle_id"]
    assert grown["result"] == "Hello, Bruce. BRICK and ROBIN are at your service."
    answered = a.call_json("genesis_obj", "say_hello", "Robin")
    assert answered["result"] == "Hello, Robin. BRICK and ROBIN are at your service."
    assert answered["cycle_id"] is None

    # Both cycles are recorded in the one image; the shell reads it through the same server.
    shell = a.shell("print(sorted((r.data['selector'], r.status) for r in root['cycles'].values()))",
                    db=uri)
    assert shell.returncode == 0, shell.stderr
    assert "('factorial', 'COMPLETE')" in shell.stdout
    assert "('say_hello', 'COMPLETE')" in shell.stdout
    assert "ZEO server 127.0.0.1" in shell.stderr

    # B keeps no image file of its own, only its blob cache.
    b_dir = tmp_path / "b"
    assert not list(b_dir.glob("*.fs")) and not list(b_dir.glob("*.zeo.json"))
    assert (b_dir / ".zeo-client-blobs").is_dir()
    status = b.chat("--ping", "--json")
    assert f"ZEO server 127.0.0.1:{a.zeo_address()[1]}" in status.stdout


def test_a_slot_written_through_b_is_read_through_a(kernels):
    a, b = kernels
    assert b.call_json("genesis_obj", "count_my_visits")["result"] == 1
    assert a.call_json("genesis_obj", "count_my_visits")["result"] == 2
    assert b.call_json("genesis_obj", "visits")["result"] == 2
    assert a.call_json("genesis_obj", "visits")["result"] == 2


def test_b_reconnects_when_a_restarts_on_the_same_zeo_port(kernels):
    a, b = kernels
    assert a.call_json("genesis_obj", "factorial", 3)["result"] == 6
    a.kill()
    a.start()
    deadline = time.monotonic() + 30
    reply: dict = {}
    while time.monotonic() < deadline:
        reply = b.call_json("genesis_obj", "factorial", 4, timeout=30)
        if reply.get("status") == "COMPLETE":
            break
        time.sleep(0.5)  # B's ZEO client reconnects in the background
    assert reply.get("status") == "COMPLETE" and reply["result"] == 24, reply
