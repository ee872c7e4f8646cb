"""Logs a user can read: expected events at DEBUG, noise nobody can act on filtered,
a notice before a slow wait, and nothing left behind by a clean stop."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kernel_process import KernelProcess

from batos_uvm import logs


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_shell_sessions_leave_no_errors_in_the_kernel_log(tmp_path, level):
    kernel = KernelProcess(tmp_path, extra_args=["--log-level", level])
    with kernel:
        for _ in range(3):
            done = kernel.shell("print(len(ls(genesis)))")
            assert done.returncode == 0, done.stderr
        kernel.shell("sync()")
    log = kernel.log_path.read_text()
    assert "ERROR" not in log, log
    if level == "DEBUG":  # it happened, and was logged as what it is: routine
        assert "DEBUG ZEO.asyncio.server: Disconnected" in log


def test_a_clean_stop_leaves_no_socket_behind(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        socket_path = kernel.zeo_address()
        assert isinstance(socket_path, str)
        assert Path(socket_path).exists()
    assert not Path(socket_path).exists()


def test_demoted_records_show_only_at_debug(caplog):
    logs.quiet_third_party()
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.INFO):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                      "make sure you already `pip install kernels`", "offline")
        noisy.warning("something else entirely")
    assert [r.getMessage() for r in caplog.records] == ["something else entirely"]


@pytest.mark.slow
def test_the_shell_says_before_find_loads_its_model(tmp_path):
    with KernelProcess(tmp_path, embedder="minilm") as kernel:
        done = kernel.shell("find('living image', k=1)", timeout=300)
    assert done.returncode == 0, done.stderr
    notice = "loading the embedding model all-MiniLM-L6-v2 for the search"
    assert notice in done.stderr
    assert "pip install kernels" not in done.stderr + done.stdout
    assert done.stdout.startswith("1. ")


def test_a_kernel_stopped_while_loading_stops_quietly_and_at_once(tmp_path):
    kernel = KernelProcess(tmp_path, embedder="minilm").launch()
    try:
        status = None
        while status is None or "the kernel" in status.get("loading", ()):
            status = kernel.status(timeout=1.0)  # the kernel itself answers
        assert not status["ready"]
    finally:
        assert kernel.stop(timeout=30) == 0
    log = kernel.log_path.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log
