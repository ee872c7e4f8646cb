"""Waiting on a model that does not answer: the wait is visible, and the cycle can be cancelled.

The kernel is real and thinks through its OpenAI-compatible backend, pointed at a
server that accepts connections and never answers: the way a stuck model server
looks from the kernel. Cancelling from another client, from the REPL's Ctrl-C and
with /cancel each end the cycle CANCELLED, recorded, with nothing installed.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pexpect
import pytest
from kernel_process import CHAT_CLIENT, PYTHON, KernelProcess, run_env

from batos_uvm.client import BridgeClient

CYCLE = re.compile(r"\[cycle (\d{8}-\d{6}-[0-9a-f]{6})\]")


@pytest.fixture
def silent_model() -> Iterator[str]:
    """An HTTP 'model server' that accepts every connection and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"openai:http://127.0.0.1:{server.getsockname()[1]}/v1#silent"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def kernel(tmp_path, silent_model) -> Iterator[KernelProcess]:
    with KernelProcess(tmp_path, extra_args=["--backend", silent_model]) as running:
        yield running


def installed(kernel: KernelProcess, selector: str) -> bool:
    done = kernel.shell(f"print({selector!r} in genesis.methods())")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def last_cycle_status(kernel: KernelProcess) -> dict:
    done = kernel.shell("import json; c = cycle(cycles(1).splitlines()[1].split()[0]); "
                        "print(json.dumps({'status': c['status'], 'reason': c['reason']}))")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_kernel_keeps_talking_while_a_model_thinks(kernel):
    events = []
    with BridgeClient(kernel.endpoint) as client:
        def collect(event):
            events.append(event)
            if len([e for e in events if e.state == "DECOMPOSING"]) >= 3:
                raise KeyboardInterrupt  # seen enough: stop waiting
        with pytest.raises(KeyboardInterrupt):
            client.send("genesis_obj", "brew_some_tea", on_progress=collect)
        cycle_id = events[-1].cycle_id
        assert client.sibling().cancel(cycle_id).ok
    thinking = [e for e in events if e.state == "DECOMPOSING"]
    assert all(e.persona == "BABS" for e in thinking)
    times = [e.elapsed_s for e in thinking]
    assert times == sorted(times) and times[-1] - times[0] >= 3.0, times  # every ~2 s


def test_cancel_from_another_client_ends_the_cycle_cancelled(kernel):
    brief = subprocess.Popen(
        [PYTHON, str(CHAT_CLIENT), "--endpoint", kernel.endpoint, "--once",
         "create a method to brew some tea"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
    assert brief.stderr is not None
    cycle_id = None
    deadline = time.monotonic() + 60
    while cycle_id is None and time.monotonic() < deadline:
        line = brief.stderr.readline()
        if "DECOMPOSING" in line and (match := CYCLE.search(line)):
            cycle_id = match.group(1)
    assert cycle_id, "no DECOMPOSING line"
    unknown = kernel.chat("--cancel", "20000101-000000-abcdef")
    assert unknown.returncode == 1 and "is not running in this kernel" in unknown.stderr
    done = kernel.chat("--cancel", cycle_id[-6:])  # the unique end of an id is enough
    assert done.returncode == 0, done.stderr
    assert f"cancelling cycle {cycle_id}" in done.stdout
    out, err = brief.communicate(timeout=60)
    assert brief.returncode == 4, (out, err)
    assert out.startswith(f"CANCELLED (cycle {cycle_id}): cancelled on request; nothing was "
                          "installed")
    assert "CANCELLED" in err  # the progress line of the final state
    assert not installed(kernel, "brew_some_tea")
    assert last_cycle_status(kernel) == {
        "status": "CANCELLED", "reason": "cancelled on request; nothing was installed"}


def repl(kernel: KernelProcess) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, [str(CHAT_CLIENT), "--endpoint", kernel.endpoint],
                          env=run_env(), encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect_exact("batos> ")
    return child


def test_ctrl_c_in_the_repl_asks_and_cancels_the_cycle(kernel):
    child = repl(kernel)
    child.sendline("create a method to brew some tea")
    child.expect(r"\d+\.\ds \[cycle [^\]]+\] DECOMPOSING  BABS")
    child.expect(r"[2-9]\.\ds \[cycle [^\]]+\] DECOMPOSING")  # the time keeps counting
    child.sendintr()
    child.expect(r"Cancel cycle (\S+)\? \[y/N\] ")
    cycle_id = child.match.group(1)
    child.sendline("y")
    child.expect_exact(f"CANCELLED (cycle {cycle_id}): cancelled on request")
    child.expect_exact("batos> ")
    child.sendline("/cycles 1")
    child.expect_exact(cycle_id)
    child.expect_exact("CANCELLED")
    child.expect_exact("batos> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    assert not installed(kernel, "brew_some_tea")


def test_ctrl_c_answered_no_stops_waiting_and_slash_cancel_stops_the_cycle(kernel):
    child = repl(kernel)
    child.sendline("create a method to brew some tea")
    child.expect(r"\[cycle (\S+)\] DECOMPOSING")
    cycle_id = child.match.group(1)
    child.sendintr()
    child.expect_exact("[y/N] ")
    child.sendline("n")
    child.expect_exact(f"stopped waiting; cycle {cycle_id} carries on in the kernel")
    child.expect_exact("batos> ")
    child.sendline("/cancel")  # the last cycle this session saw
    child.expect_exact(f"cancelling cycle {cycle_id}")
    child.expect_exact("batos> ")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if last_cycle_status(kernel)["status"] == "CANCELLED":
            break
        time.sleep(0.5)
    assert last_cycle_status(kernel)["status"] == "CANCELLED"
    child.sendline("/quit")
    child.expect(pexpect.EOF)
