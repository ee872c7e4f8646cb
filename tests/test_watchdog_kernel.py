"""The watchdog supervising the real kernel: crash, restart, graceful stop, upgrades."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel_process import CHAT_CLIENT, PYTHON, ROOT, free_port, run_env

WATCHDOG = ROOT / "min_watchdog_service.py"


class Supervised:
    """min_watchdog_service.py running batos.py on a temporary image."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.logs = tmp_path / "logs"
        self.repo = tmp_path / "repo"
        self.repo.mkdir()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, str(WATCHDOG), "--log-dir", str(self.logs), "--start-poll", "0.3",
             "--backoff-initial", "0.2", "--health-interval", "2", "--stop-timeout", "20",
             "--upgrade-dir", str(self.tmp_path), "--upgrade-poll", "0.3",
             "--repo", str(self.repo), "--backup-dir", str(self.tmp_path / "backups"),
             "--", "--db", str(self.tmp_path / "live_image.fs"), "--endpoint", self.endpoint,
             "--demo", "--embedder", "hashing", "--log-level", "WARNING"],
            cwd=self.tmp_path, env=run_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.wait_up()

    def status(self) -> dict:
        try:
            return json.loads((self.logs / "watchdog.status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_up(self, timeout: float = 90.0, not_pid: int | None = None) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status()
            pid = status.get("kernel_pid")
            if status.get("state") == "up" and pid and pid != not_pid and self.ping():
                return pid
            time.sleep(0.3)
        raise AssertionError(f"kernel not up; status {self.status()}")

    def client(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, str(CHAT_CLIENT), "--endpoint", self.endpoint, *args],
                              capture_output=True, text=True, timeout=120, env=run_env())

    def ping(self) -> bool:
        return self.client("--ping", "--timeout", "2").returncode == 0

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def cleanup(self) -> None:
        """Stop the watchdog (and so its kernel); kill both if that does not work."""
        if self.proc is None:
            return
        kernel_pid = self.status().get("kernel_pid")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if kernel_pid:
            try:
                os.killpg(kernel_pid, signal.SIGKILL)  # the kernel has its own group
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def supervised(tmp_path):
    watchdog = Supervised(tmp_path)
    yield watchdog
    watchdog.cleanup()


def test_sigkilled_kernel_comes_back_with_its_image(supervised):
    supervised.start()
    assert supervised.client("--call", "genesis_obj", "factorial", "5").returncode == 0
    first = supervised.status()["kernel_pid"]
    os.kill(first, signal.SIGKILL)
    started = time.time()
    second = supervised.wait_up(not_pid=first)
    assert time.time() - started < 30
    answer = supervised.client("--json", "--call", "genesis_obj", "factorial", "6")
    reply = json.loads(answer.stdout)
    assert reply["result"] == 720 and reply["cycle_id"] is None  # no new cycle: image intact
    assert supervised.status()["restarts"] >= 1 and second != first
    assert supervised.stop() == 0
    events = [json.loads(line)["event"] for line in
              (supervised.logs / "watchdog.jsonl").read_text().splitlines()]
    assert "kernel_failed" in events and "restart_scheduled" in events
    assert events[-1] == "kernel_stopped"


def test_graceful_stop_reaches_the_kernel(supervised):
    supervised.start()
    kernel_pid = supervised.status()["kernel_pid"]
    assert supervised.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(kernel_pid, 0)
    assert not (supervised.tmp_path / "live_image.fs.lock").exists() or \
        subprocess.run([PYTHON, "-c", "import ZODB.FileStorage as F, sys; "
                        "F.FileStorage(sys.argv[1]).close()",
                        str(supervised.tmp_path / "live_image.fs")], env=run_env()).returncode == 0


def _drop(supervised: Supervised, instructions: dict) -> dict:
    path = supervised.tmp_path / "update_instructions.json"
    path.write_text(json.dumps(instructions))
    deadline = time.time() + 120
    result = supervised.tmp_path / "update_instructions.result.json"
    consumed = [path.with_name(path.name + ".done"), path.with_name(path.name + ".failed")]
    while time.time() < deadline:
        if any(p.exists() for p in consumed) and result.exists():
            try:
                outcome = json.loads(result.read_text())
            except ValueError:
                outcome = {}
            if outcome.get("outcome") not in (None, "in_progress"):
                return outcome
        time.sleep(0.3)
    raise AssertionError("the upgrade did not finish")


def test_upgrade_runs_steps_and_keeps_the_image(supervised):
    supervised.start()
    assert supervised.client("--call", "genesis_obj", "factorial", "4").returncode == 0
    outcome = _drop(supervised, {"version": 1, "description": "marker", "steps": [
        {"kind": "run", "argv": ["python", "-c",
                                 "open('upgraded.txt', 'w').write('yes')"], "timeout": 60}]})
    assert outcome["outcome"] == "success", outcome
    assert (supervised.repo / "upgraded.txt").read_text() == "yes"
    assert (supervised.tmp_path / "update_instructions.json.done").exists()
    supervised.wait_up()
    reply = json.loads(supervised.client("--json", "--call", "genesis_obj", "factorial", "5").stdout)
    assert reply["result"] == 120 and reply["cycle_id"] is None


def test_failed_upgrade_rolls_back_and_the_kernel_runs_again(supervised):
    supervised.start()
    assert supervised.client("--call", "genesis_obj", "factorial", "4").returncode == 0
    image = supervised.tmp_path / "live_image.fs"
    outcome = _drop(supervised, {"version": 1, "steps": [
        {"kind": "run", "argv": ["python", "-c", "import sys; sys.exit(1)"], "timeout": 60}]})
    assert outcome["outcome"] == "rolled_back" and outcome.get("reason")
    assert (supervised.tmp_path / "update_instructions.json.failed").exists()
    supervised.wait_up()
    assert image.exists()
    reply = json.loads(supervised.client("--json", "--call", "genesis_obj", "factorial", "5").stdout)
    assert reply["result"] == 120


def test_malformed_instructions_leave_the_kernel_alone(supervised):
    supervised.start()
    before = supervised.status()["kernel_pid"]
    outcome = _drop(supervised, {"version": 1, "steps": [{"kind": "run", "argv": "rm -rf /"}]})
    assert outcome["outcome"] in {"rejected", "failed"}
    assert supervised.status()["kernel_pid"] == before and supervised.ping()


@pytest.mark.skipif(sys.platform != "linux", reason="process groups as on Linux")
def test_crash_loop_of_a_kernel_that_cannot_start(tmp_path):
    (tmp_path / "live_image.fs").write_bytes(b"damaged" * 100)
    done = subprocess.run(
        [PYTHON, str(WATCHDOG), "--log-dir", str(tmp_path / "logs"), "--backoff-initial", "0.1",
         "--backoff-max", "0.2", "--crash-loop-count", "3", "--crash-loop-window", "60",
         "--upgrade-dir", str(tmp_path), "--", "--db", str(tmp_path / "live_image.fs"),
         "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--embedder", "hashing"],
        cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 3
    assert "crash loop" in done.stderr.lower()
    assert "damaged or truncated" in done.stderr or "cannot be read" in done.stderr
    assert (tmp_path / "live_image.fs").read_bytes() == b"damaged" * 100
