"""A real kernel process driven through the bridge by chat_client.py, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from kernel_process import CHAT_CLIENT, PYTHON, KernelProcess, run_env

SLOW_CASSETTE = [
    {"state": "DECOMPOSING", "prompt_contains": "", "response": '["sleep"]'},
    {"state": "SYNTHESIZING", "prompt_contains": "'slow_method'", "response": (
        "```python\ndef slow_method(self):\n    import time\n    time.sleep(6)\n"
        "    return 'slept'\n```")},
]


def test_brief_to_progress_to_result_and_no_cycle_after_restart(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        done = kernel.chat("--once", "create a method to report the current system time")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("COMPLETE (cycle ")
        assert time.strftime("%Y-%m-%d") in done.stdout  # the method's real result
        assert "replayed from a recording" in done.stdout
        for state in ("DECOMPOSING", "DELEGATING", "SYNTHESIZING", "VALIDATING", "COMPLETE"):
            assert state in done.stderr
        kernel.stop()
        kernel.start()
        reply = kernel.call_json("genesis_obj", "report_the_current_system_time")
        assert reply["status"] == "COMPLETE" and reply["cycle_id"] is None
        assert reply["result"].startswith(time.strftime("%Y-"))


def test_failed_cycle_reports_the_reason_and_exit_code(tmp_path):
    cassette = tmp_path / "bad.jsonl"
    cassette.write_text(json.dumps(SLOW_CASSETTE[0]) + "\n" + json.dumps({
                                    "state": "SYNTHESIZING", "prompt_contains": "",
                                    "response": "```python\ndef broken(self):\n"
                                                "    if True: return self.x.append(1)\n```"})
                        + "\n")
    with KernelProcess(tmp_path, cassette=cassette) as kernel:
        done = kernel.call("genesis_obj", "broken")
        assert done.returncode == 1
        assert "persistence-covenant" in done.stdout + done.stderr
        cycles = kernel.chat("--json", "--call", "genesis_obj", "broken")
        assert json.loads(cycles.stdout)["status"] == "FAILED"
        listing = kernel.shell("print(cycles(5))")
        assert "FAILED" in listing.stdout


def test_many_clients_at_once(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        assert kernel.call("genesis_obj", "factorial", 3).returncode == 0

        def factorial(n: int) -> str:
            return kernel.call("genesis_obj", "factorial", n).stdout

        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(factorial, range(8)))
        expected = [1, 1, 2, 6, 24, 120, 720, 5040]
        assert [out.split(": ", 1)[1].strip() for out in outputs] == [str(e) for e in expected]


def test_kill_mid_cycle_leaves_no_method_and_the_client_says_so(tmp_path):
    cassette = tmp_path / "slow.jsonl"
    cassette.write_text("".join(json.dumps(line) + "\n" for line in SLOW_CASSETTE))
    config = tmp_path / "batos.toml"
    config.write_text("[kernel]\ntrial_wall_seconds = 20.0\ntrial_cpu_seconds = 10.0\n")
    kernel = KernelProcess(tmp_path, cassette=cassette, extra_args=["--config", str(config)])
    with kernel:
        client = subprocess.Popen(
            [PYTHON, str(CHAT_CLIENT), "--endpoint", kernel.endpoint, "--dead-after", "3",
             "--call", "genesis_obj", "slow_method"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
        deadline = time.time() + 30
        seen = ""
        while "VALIDATING" not in seen and time.time() < deadline:
            line = client.stderr.readline()
            seen += line
            if not line and client.poll() is not None:
                break
        assert "VALIDATING" in seen, seen
        kernel.kill()  # SIGKILL while the trial runs
        started = time.time()
        out, err = client.communicate(timeout=30)
        assert client.returncode in (2, 3), (out, err)
        assert time.time() - started < 15
        assert "kernel" in (out + err).lower()
        kernel.start()
        check = kernel.shell(
            "print(genesis.responds_to('slow_method'));"
            "print(cycles(5))")
        assert "False" in check.stdout and "INTERRUPTED" in check.stdout, check.stdout
        kernel.stop()
        fstest = subprocess.run([sys.executable, "-m", "ZODB.scripts.fstest", str(kernel.db_path)],
                                capture_output=True, text=True, timeout=120)
        assert fstest.returncode == 0, fstest.stdout + fstest.stderr


def test_kernel_without_a_model_serves_methods_and_fails_briefs_fast(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        assert kernel.call("genesis_obj", "factorial", 4).returncode == 0
    bare = KernelProcess(tmp_path, extra_args=["--backend", "none"])
    with bare:
        served = bare.call("genesis_obj", "factorial", 5)
        assert served.returncode == 0 and "120" in served.stdout
        started = time.time()
        brief = bare.call("genesis_obj", "something_new")
        assert brief.returncode == 1 and time.time() - started < 20
        assert "no language model is configured" in brief.stdout + brief.stderr


@pytest.mark.parametrize("target, selector, message", [
    ("no_such_obj", "x", "unknown target"),
    ("0xffffff", "x", "no object"),
])
def test_bad_targets_get_errors_and_the_kernel_keeps_running(tmp_path, target, selector, message):
    with KernelProcess(tmp_path) as kernel:
        done = kernel.call(target, selector)
        assert done.returncode == 1 and message in done.stdout + done.stderr
        assert kernel.ping()
