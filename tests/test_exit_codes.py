"""Every exit code docs/CHAT.md documents, produced by running chat_client.py as a script does.

The cases run against the stand-in kernel (tests/fake_kernel_bridge.py, a real bridge
in another process) and, for "the kernel restarted", against a real kernel under the
real watchdog with the client's default patience.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fake_kernel_bridge import spawn
from kernel_process import CHAT_CLIENT, PYTHON, KernelProcess, free_port, run_env

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "CHAT.md"


@pytest.fixture(scope="module")
def endpoint():
    """The stand-in kernel's address (one process for the module)."""
    proc, address = spawn()
    yield address
    proc.terminate()
    proc.wait(10)


def chat(endpoint: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, str(CHAT_CLIENT), "--endpoint", endpoint, *args],
                          capture_output=True, text=True, timeout=timeout, env=run_env(),
                          stdin=subprocess.DEVNULL)


def documented_codes() -> dict[int, str]:
    """The exit-code table of docs/CHAT.md: {code: meaning}."""
    text = DOC.read_text()
    table = text[text.index("## Exit codes"):]
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"^\| (\d+) \| (.+) \|$", table, re.MULTILINE)}


# (code, what the doc's row must mention, arguments after --endpoint, text in the output)
CASES = [
    (0, "COMPLETE", ["--call", "genesis_obj", "add", "1", "2"], "COMPLETE: 3"),
    (0, "kernel answered", ["--ping"], "is up"),
    (0, "cancelling", ["--cancel", "c-running"], "cancelling cycle c-running"),
    (1, "FAILED", ["--call", "genesis_obj", "fail"], "FAILED: cycle_failed"),
    (1, "ERROR", ["--call", "genesis_obj", "boom"], "ERROR: internal"),
    (1, "not understood", ["--once", "sing me a song"], "did not understand"),
    (1, "refused before sending", ["--call", "genesis_obj", "bad-name"], "not sent: invalid"),
    (1, "bad options", ["--timeout", "-1", "--ping"], "must be greater than 0"),
    (1, "not running", ["--cancel", "c-finished"], "is not running"),
    (2, "could not be reached", None, "not answering"),
    (2, "within `--timeout`", ["--call", "genesis_obj", "sleep", "30", "--timeout", "1"],
     "no final reply from the kernel"),
    (4, "cancelled", ["--call", "genesis_obj", "cancelled"], "CANCELLED (cycle c-running)"),
]


def test_every_documented_code_has_a_case_here():
    documented = documented_codes()
    assert set(documented) == {0, 1, 2, 3, 4, 130}, documented
    for code, mention, _, _ in CASES:
        assert mention in documented[code], (code, mention, documented[code])


@pytest.mark.parametrize(("code", "mention", "args", "says"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_documented_exit_code(endpoint, code, mention, args, says):
    if args is None:  # nothing listens there
        args, endpoint = ["--ping", "--timeout", "1"], f"tcp://127.0.0.1:{free_port()}"
    done = chat(endpoint, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert says in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_refused_before_sending_a_request_that_is_too_large(endpoint):
    big = ["x" * 100_000] * 11  # over 1 MiB in all; one argv string may not exceed 128 KiB
    done = chat(endpoint, "--call", "genesis_obj", "echo", *big)
    assert done.returncode == 1 and "exceeds the limit" in done.stderr


def test_130_when_ctrl_c_stops_the_wait(endpoint):
    proc = subprocess.Popen([PYTHON, str(CHAT_CLIENT), "--endpoint", endpoint, "--call",
                             "genesis_obj", "sleep", "30"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=run_env(),
                            stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    assert "WORKING" in proc.stderr.readline()  # the request is running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "stopped waiting" in err, (out, err)


def test_3_when_the_stand_in_kernel_restarts_under_a_request():
    port = free_port()
    first, endpoint = spawn(f"tcp://127.0.0.1:{port}", "--boot-id", "first")
    client = subprocess.Popen([PYTHON, str(CHAT_CLIENT), "--endpoint", endpoint, "--call",
                               "genesis_obj", "sleep", "30"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=run_env(),
                              stdin=subprocess.DEVNULL)
    second = None
    try:
        assert client.stderr is not None and "WORKING" in client.stderr.readline()
        first.kill()
        first.wait(10)
        second, _ = spawn(endpoint, "--boot-id", "second")
        out, err = client.communicate(timeout=60)
        assert client.returncode == 3, (out, err)
        assert "restarted" in err and "was not resent" in err
    finally:
        client.kill()
        if second is not None:
            second.terminate()
            second.wait(10)


@pytest.mark.slow
def test_3_when_the_watchdog_restarts_the_kernel_under_a_request(tmp_path):
    """The real thing with every default: the client's patience outlasts the restart."""
    cassette = tmp_path / "slow.jsonl"
    cassette.write_text(json.dumps({"state": "DECOMPOSING", "prompt_contains": "",
                                    "response": '["sleep"]'}) + "\n" + json.dumps({
        "state": "SYNTHESIZING", "prompt_contains": "",
        "response": "```python\ndef slow_method(self):\n    import time\n    time.sleep(8)\n"
                    "    return 'slept'\n```"}) + "\n")
    config = tmp_path / "batos.toml"
    config.write_text("[kernel]\ntrial_wall_seconds = 20.0\ntrial_cpu_seconds = 10.0\n")
    kernel = KernelProcess(tmp_path, cassette=cassette, extra_args=["--config", str(config)])
    logs = tmp_path / "logs"
    watchdog = subprocess.Popen(
        [PYTHON, str(ROOT / "min_watchdog_service.py"), "--log-dir", str(logs),
         "--upgrade-dir", str(tmp_path), "--backup-dir", str(tmp_path / "backups"), "--",
         *kernel.argv()[2:]], cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        kernel.proc = watchdog  # while waiting, "running" means: the watchdog still runs
        kernel.wait_ready(timeout=120)
        client = subprocess.Popen([PYTHON, str(CHAT_CLIENT), "--endpoint", kernel.endpoint,
                                   "--call", "genesis_obj", "slow_method"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=run_env(), stdin=subprocess.DEVNULL)
        assert client.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "VALIDATING" not in client.stderr.readline():
            pass
        status = json.loads((logs / "watchdog.status.json").read_text())
        os.kill(status["kernel_pid"], signal.SIGKILL)
        out, err = client.communicate(timeout=120)
        assert client.returncode == 3, (out, err)
        assert "restarted" in err
    finally:
        watchdog.send_signal(signal.SIGTERM)
        watchdog.wait(timeout=60)
