"""The watchdog and starting kernels: one that refuses its settings (exit code 2) stops it
with the reason; one that dies while a health probe runs is restarted at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import datetime

from kernel_process import PYTHON, KernelProcess, run_env
from test_watchdog import WATCHDOG, runs, wait_for, wd  # noqa: F401 - runs is a fixture


def test_a_first_kernel_that_refuses_is_not_restarted(tmp_path, runs):  # noqa: F811
    run = runs(tmp_path, ["--crash-after", "0", "--crash-code", "2", "--crash-lines", "3"],
               ["--backoff-initial", "0.05"])
    assert run.wait_exit() == wd.EXIT_KERNEL_REFUSED == 2
    assert len(run.marks("start")) == 1
    (refused,) = run.events("kernel_refused")
    assert refused["details"]["log_tail"][-1] == "fake crash line 2"
    assert "the kernel refused to start" in run.stderr() and "fake crash line 2" in run.stderr()
    assert run.status()["state"] == "refused"


def test_a_refusal_after_the_kernel_was_up_is_an_ordinary_failure(tmp_path, runs):  # noqa: F811
    run = runs(tmp_path, ["--crash-after", "2.0", "--crash-code", "2"],
               ["--backoff-initial", "0.05", "--crash-loop-count", "50"])
    wait_for(lambda: len(run.marks("start")) >= 2)
    assert not run.events("kernel_refused") and run.events("kernel_failed")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_the_real_kernel_refusing_a_mistyped_db_stops_the_watchdog(tmp_path):
    kernel = KernelProcess(tmp_path, db=str(tmp_path / "typo" / "live_image.fs"))
    done = subprocess.run([PYTHON, str(WATCHDOG), "--log-dir", str(tmp_path / "logs"),
                           "--upgrade-dir", str(tmp_path), "--", *kernel.argv()[2:]],
                          capture_output=True, text=True, timeout=120, env=run_env(),
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"directory {tmp_path / 'typo'} does not exist" in done.stderr
    assert not (tmp_path / "typo").exists()


def test_a_kernel_dying_during_a_slow_probe_is_restarted_at_once(tmp_path, runs):  # noqa: F811
    slow_probe = [sys.executable, "-c", "import time; time.sleep(3)"]
    run = runs(tmp_path, ["--crash-after", "4.5"],
               ["--health-cmd", json.dumps(slow_probe), "--crash-loop-count", "50"])
    wait_for(lambda: run.events("kernel_failed"), timeout=30)
    died = run.marks("exit")[0]["t"]
    noticed = datetime.fromisoformat(run.events("kernel_failed")[0]["ts"]).timestamp()
    assert noticed - died < 1.0, noticed - died  # not after the 3 s probe finished
    assert not run.events("health_check_failed")  # a death is not a failed health check
