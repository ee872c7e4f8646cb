"""The shell (`batos.py shell`) on a living image, with and without a running kernel.

The live tests start a real kernel (tests/kernel_process.py) and drive it with
chat_client.py while the shell reads and writes the same image through the
kernel's ZEO server. The helper tests open a small image in-process.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
import ZODB
import ZODB.FileStorage

from batos_uvm.awakening import incarnate
from batos_uvm.config import load_settings
from batos_uvm.cycle import CycleRecord
from batos_uvm.shell import ReadOnlyShell, ShellError, open_session, run_code
from batos_uvm.text import HashingEmbedder

try:
    from tests.kernel_process import BATOS, PYTHON, KernelProcess, free_port, run_env, run_shell
except ImportError:  # tests/ itself on sys.path
    from kernel_process import BATOS, PYTHON, KernelProcess, free_port, run_env, run_shell

FACTORIAL_SOURCE = "return math.factorial(n)"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    with KernelProcess(tmp_path_factory.mktemp("live")) as running:
        yield running


# --- with a running kernel -------------------------------------------------------------


def test_shell_reads_live_objects_while_the_kernel_runs(kernel: KernelProcess):
    done = kernel.shell("print(ls(genesis))")
    assert done.returncode == 0, done.stderr
    assert "genesis_obj  oid=0x" in done.stdout
    assert "pLLM_obj" in done.stdout and "traits_obj" in done.stdout  # its parents
    assert "inherited:" in done.stdout and "doesNotUnderstand" in done.stdout
    assert f"running kernel (PID {kernel.pid})" in done.stderr
    assert "read-only" in done.stderr
    assert kernel.running and kernel.ping()


def test_shell_sees_a_method_the_kernel_just_installed(kernel: KernelProcess):
    before = kernel.shell("src(genesis, 'factorial')")
    assert before.returncode == 1
    assert "does not understand 'factorial'" in before.stderr

    reply = kernel.call("genesis_obj", "factorial", 5)
    assert reply.returncode == 0, reply.stdout + reply.stderr
    assert "COMPLETE" in reply.stdout and ": 120" in reply.stdout

    after = kernel.shell("src(genesis, 'factorial')")
    assert after.returncode == 0, after.stderr
    assert "def factorial(self, n):" in after.stdout
    assert FACTORIAL_SOURCE in after.stdout
    assert "by BRICK" in after.stdout
    listed = kernel.shell("cycles(5)")
    assert "COMPLETE" in listed.stdout and "factorial" in listed.stdout


def test_read_only_shell_refuses_commit(kernel: KernelProcess):
    done = kernel.shell("genesis.refused_slot = 1\ncommit()")
    assert done.returncode == 1
    assert "ReadOnlyShell" in done.stderr
    assert "read-only: nothing was written" in done.stderr
    assert "--write" in done.stderr
    check = kernel.shell("print('refused_slot' in genesis.slot_names())")
    assert check.stdout.strip() == "False"


def test_write_shell_sets_a_slot_the_kernel_then_sees(kernel: KernelProcess):
    done = kernel.shell("genesis.shell_motto = 'set from the shell'\nprint(commit())",
                        write=True)
    assert done.returncode == 0, done.stderr
    assert "committed 1 changed object(s)" in done.stdout
    assert "[--write]" in done.stderr
    reply = kernel.call_json("genesis_obj", "shell_motto")
    assert reply["status"] == "COMPLETE", reply
    assert reply["result"] == "set from the shell"
    assert reply["cycle_id"] is None  # a slot read, not a new method


def test_interactive_session_through_a_pseudo_terminal(kernel: KernelProcess, tmp_path: Path):
    pexpect = pytest.importorskip("pexpect")
    history = tmp_path / "shell_history"
    child = pexpect.spawn(
        PYTHON, [str(BATOS), "shell", "--db", kernel.db], cwd=str(kernel.workdir),
        env=run_env(BATOS_SHELL_HISTORY=str(history), TERM="dumb"), encoding="utf-8",
        timeout=60, dimensions=(40, 200))
    try:
        child.expect("BAT OS shell on the live image of the running kernel")
        child.expect("READ-ONLY")
        child.expect(">>> ")

        def run(line: str) -> str:
            child.sendline(line)
            child.expect(">>> ")
            return child.before

        assert "genesis_obj  oid=0x" in run("ls(genesis)")
        assert "False" in run("'count_my_visits' in genesis.methods()")
        reply = kernel.call("genesis_obj", "count_my_visits")
        assert reply.returncode == 0 and ": 1" in reply.stdout, reply.stdout + reply.stderr
        # The session still reads its own snapshot until it starts a new transaction.
        assert "False" in run("'count_my_visits' in genesis.methods()")
        assert "in sync with the image (live)" in run("sync()")
        assert "True" in run("'count_my_visits' in genesis.methods()")
        assert re.search(r"visits\s+= 1\r?\n", run("print(ls(genesis))"))
        assert "self._p_changed = True" in run("src(genesis, 'count_my_visits')")
        refused = run("commit()")
        assert "ReadOnlyShell: this shell is read-only" in refused
        assert "Traceback" not in refused  # a refusal is a message, not a crash
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "ls(genesis)" in history.read_text()


# --- without a running kernel ----------------------------------------------------------


def test_shell_opens_the_file_storage_when_no_kernel_runs(tmp_path: Path):
    kernel = KernelProcess(tmp_path)
    with kernel:
        assert kernel.call("genesis_obj", "say_hello", "Bruce").returncode == 0
    assert not kernel.running and kernel.zeo_address() is None

    done = run_shell(kernel.db, "print(src(genesis, 'say_hello'))")
    assert done.returncode == 0, done.stderr
    assert "opened directly: no kernel running" in done.stderr
    assert "def say_hello(self" in done.stdout

    wrote = run_shell(kernel.db, "genesis.offline_note = 'written offline'\nprint(commit())",
                      write=True)
    assert wrote.returncode == 0, wrote.stderr
    assert "committed 1" in wrote.stdout

    with kernel:  # the kernel starts on the changed image and sees the slot
        reply = kernel.call_json("genesis_obj", "offline_note")
        assert reply["result"] == "written offline"
    # A kernel holding the lock without a ZEO server: the shell says why it cannot open.
    without_zeo = KernelProcess(tmp_path, port=kernel.port, extra_args=["--zeo", "off"],
                                name="kernel-nozeo")
    with without_zeo:
        refused = run_shell(kernel.db, "1")
        assert refused.returncode == 2
        assert f"locked by PID {without_zeo.pid}" in refused.stderr
        assert "--zeo off" in refused.stderr


def test_shell_without_an_image_says_so(tmp_path: Path):
    done = run_shell(str(tmp_path / "missing.fs"), "1")
    assert done.returncode == 2
    assert "no image at" in done.stderr
    assert not (tmp_path / "missing.fs").exists()


# --- the helpers, in-process -----------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small image: the primordial objects, one method in two versions, two cycles."""
    path = tmp_path / "image.fs"
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    with db.transaction() as conn:
        root = conn.root()
        incarnate(root)
        root["cycles"]["20260101-000000-aaaaaa"] = CycleRecord("20260101-000000-aaaaaa",
                                                               {"selector": "double"})
        root["cycles"]["20260101-000000-aaaaaa"].status = "COMPLETE"
        root["cycles"]["20260101-000001-bbbbbb"] = CycleRecord("20260101-000001-bbbbbb",
                                                               {"selector": "broken"})
        root["cycles"]["20260101-000001-bbbbbb"].status = "FAILED"
        genesis = root["genesis_obj"]
        genesis.install_method("double", "def double(self, x):\n    return x + x\n",
                               author="BRICK", cycle_id="20260101-000000-aaaaaa")
        genesis.install_method("double", "def double(self, x):\n    return 2 * x\n")
        genesis.colour = "blue"
        root["knowledge_catalog_obj"].store.add_document(
            "doc-ports", "ZEO servers listen on loopback ports. The shell connects to them.",
            {}, HashingEmbedder())
    db.close()
    return path


def session_for(path: Path, *, write: bool = False):
    settings = load_settings(None, {"db": str(path)}, environ={})
    return open_session(settings, write=write)


def test_helpers_show_objects_methods_and_cycles(image: Path):
    session = session_for(image)
    try:
        assert not session.live and session.read_only
        listing = session.ls("genesis")
        assert "colour = 'blue'" in listing and "double  v2 source" in listing
        assert repr(listing) == str(listing)  # the console shows it as text
        assert "return 2 * x" in session.src(session.root["genesis_obj"], "double")
        first = session.src("genesis_obj", "double", 1)
        assert "return x + x" in first and "cycle 20260101-000000-aaaaaa" in first
        with pytest.raises(ShellError, match="no version 7"):
            session.src("genesis", "double", 7)
        versions = session.history("genesis", "double")
        assert "v1" in versions and "v2" in versions and "architect" in versions
        table = session.cycles(10)
        assert table.index("bbbbbb") < table.index("aaaaaa")  # newest first
        assert session.cycle("bbbbbb")["status"] == "FAILED"
        assert session.cycle("20260101-000000")["selector"] == "double"
        with pytest.raises(ShellError, match="matches 2 cycles"):
            session.cycle("20260101")
        hits = session.find("loopback ports", k=3)
        assert hits and hits[0].doc_id == "doc-ports"
        assert "doc-ports" in repr(hits)
        assert "genesis_obj" in session.ls(session.root)
        assert session.get(session.root["genesis_obj"]._p_oid) is session.root["genesis_obj"]
    finally:
        session.close()


def test_pending_changes_commit_abort_and_sync(image: Path):
    session = session_for(image)
    genesis = session.root["genesis_obj"]
    genesis.colour = "red"
    with pytest.raises(ReadOnlyShell, match="1 changed object"):
        session.commit()
    with pytest.raises(ShellError, match="commit\\(\\) or abort\\(\\) first"):
        session.sync()
    assert session.abort() == "discarded 1 changed object(s)"
    assert genesis.colour == "blue"
    session.close()

    writer = session_for(image, write=True)
    writer.root["genesis_obj"].colour = "green"
    assert writer.commit("repaint") == "committed 1 changed object(s)"
    writer.close()
    reader = session_for(image)
    try:
        assert reader.root["genesis_obj"].colour == "green"
        last = reader.db.storage.iterator(None, None)
        *_, txn = last
        assert txn.user == b"batos-shell" and txn.description == b"repaint"
    finally:
        reader.close()


def test_a_method_called_in_the_shell_runs_in_a_cell_and_its_change_commits(image: Path, capsys):
    writer = session_for(image, write=True)
    try:
        genesis = writer.root["genesis_obj"]
        genesis.install_method(
            "paint", "def paint(self, colour):\n    print('painting', colour)\n"
            "    self.colour = colour\n    return colour\n")
        assert run_code(writer, "genesis.paint('red')") == 0
        assert "painting red" in capsys.readouterr().out  # what the cell printed
        assert writer.namespace()["genesis"].colour == "red"
        assert writer.commit("paint").startswith("committed ")  # the method and the slot
    finally:
        writer.close()
    reader = session_for(image)
    try:
        assert reader.root["genesis_obj"].colour == "red"
    finally:
        reader.close()


def test_the_shell_s_cells_finish_starting_before_a_call_returns(image: Path):
    # The shell's cells have an event loop only while a call runs: a cell still
    # starting when the call returned found its time limit expired at the next call.
    from batos_uvm.cells import local

    session = session_for(image)
    try:
        assert run_code(session, "genesis.double(21)") == 0
        pool = local._local[threading.get_ident()]._pool
        assert pool is not None and not pool._tasks
        assert len(pool._idle) >= 2  # the cell that answered, and a fresh one for the next
    finally:
        session.close()


def test_run_code_exit_codes_and_expression_values(image: Path, capsys):
    session = session_for(image)
    try:
        assert run_code(session, "x = genesis.double(21)\nx") == 0
        assert capsys.readouterr().out.strip() == "42"
        assert run_code(session, "genesis.nothing_here") == 1
        err = capsys.readouterr().err
        assert "does not understand 'nothing_here'" in err
        assert "shell.py" not in err.splitlines()[1]  # the traceback starts at the user's code
        assert run_code(session, "raise SystemExit(3)") == 3
        # The catalog's own search method works in the shell as in the kernel.
        assert run_code(session, "catalog.search('loopback ports', 1)[0]['doc_id']") == 0
        assert capsys.readouterr().out.strip() == "'doc-ports'"
    finally:
        session.close()


def test_a_stale_address_file_with_a_reused_pid_is_ignored(image: Path):
    # A SIGKILLed kernel leaves its address file; here its PID is "reused" by this
    # process and nothing serves the port. Nobody holds the lock: open the file.
    address = image.with_name(image.name + ".zeo.json")
    address.write_text(json.dumps({"host": "127.0.0.1", "port": free_port(), "pid": os.getpid()}))
    session = session_for(image)
    try:
        assert not session.live and "opened directly" in session.description
    finally:
        session.close()


def test_the_batos_shell_command_line(image: Path):
    done = run_shell(str(image), "print(genesis.colour)")
    assert done.returncode == 0 and done.stdout.strip() == "blue"
    bad = run_shell(str(image), "1/0")
    assert bad.returncode == 1 and "ZeroDivisionError" in bad.stderr

