"""The chat client end to end: a REPL in a pseudo-terminal and the one-shot forms, against a
real bridge (the fake kernel) in another process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from fake_kernel_bridge import spawn

ROOT = Path(__file__).resolve().parent.parent
CHAT = [str(ROOT / "chat_client.py")]
UP = "\x1b[A"  # arrow up


@pytest.fixture(scope="module")
def endpoint():
    proc, ep = spawn()
    yield ep
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def env(tmp_path, endpoint):
    home = tmp_path / "home"
    home.mkdir()
    inputrc = tmp_path / "inputrc"
    inputrc.write_text("set enable-bracketed-paste off\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LLAMA_MODEL_PATH", "BATOS_HISTORY", "BATOS_ENDPOINT")
    }
    env.update(
        HOME=str(home),
        BATOS_ENDPOINT=endpoint,
        TERM="xterm",
        INPUTRC=str(inputrc),
        PYTHONPATH=str(ROOT),
    )
    return env


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def repl(env, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        CHAT + list(args),
        env=env,
        encoding="utf-8",
        timeout=15,
        dimensions=(40, 200),
    )
    child.expect("kernel is up|warning:")
    child.expect_exact("batos> ")
    return child


def run(child: pexpect.spawn, line: str, *expected: str) -> None:
    child.sendline(line)
    for text in expected:
        child.expect_exact(text)
    child.expect_exact("batos> ")


def test_repl_commands_progress_and_history(env):
    child = repl(env)
    run(child, "/help", "/call TARGET SELECTOR", "/inspect TARGET", "/cycles [N]", "/quit")
    run(
        child,
        "create a method to report the current system time",
        "-> send genesis_obj.report_the_current_system_time()",
        "DECOMPOSING",
        "DELEGATING",
        "SYNTHESIZING",
        "VALIDATING",
        "COMPLETE (cycle ",
        "result of report_the_current_system_time",
    )
    run(child, "/call genesis_obj add 1 2 39", "COMPLETE: 42")
    run(child, '/call genesis_obj echo "two words" 7 flag=true', '"two words"', '"flag": true')
    run(child, "call add on genesis_obj with 2, 3", "COMPLETE: 5")
    run(
        child,
        "/call genesis_obj replayed",
        "COMPLETE: from the cassette",
        "replayed from a recording",
    )
    run(child, "/call genesis_obj fail", "FAILED: cycle_failed: the guardian rejected")
    run(child, "/call genesis_obj bad-name", "not sent: invalid send request: selector")
    run(child, "what is the living image?", "knowledge_catalog_obj.search", "title: living image")
    run(child, "/inspect genesis_obj", '"report_the_current_system_time"')
    run(child, "/inspect missing_obj", "ERROR: not_found")
    run(child, "/cycles 5", "cycle", "selector", "report_the_current_system_time")
    run(child, "tell me a joke", "I did not understand that; try /help")
    child.sendline("/call genesis_obj sleep 30")
    child.expect_exact("WORKING")
    child.sendintr()  # Ctrl-C stops waiting, not the REPL
    child.expect_exact("stopped waiting")
    child.expect_exact("batos> ")
    run(child, "/call genesis_obj add 2 2", "COMPLETE: 4")
    run(child, "/frobnicate", "unknown command /frobnicate")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (Path(env["HOME"]) / ".batos_history").read_text()
    assert "/cycles 5" in history and "create a method to report" in history

    # a second session recalls the first one's lines with the arrow keys
    child = repl(env)
    lines = history.splitlines()
    child.send(UP)  # the newest line of the last session
    child.expect_exact("/quit")
    child.send(UP * (len(lines) - 1 - lines.index("/cycles 5")))
    child.expect_exact("/cycles 5")
    child.sendline("")
    child.expect_exact("report_the_current_system_time")
    child.expect_exact("batos> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_repl_history_location_from_environment(env, tmp_path):
    env["BATOS_HISTORY"] = str(tmp_path / "hist")
    child = repl(env)
    run(child, "/ping", "COMPLETE")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    assert "/ping" in (tmp_path / "hist").read_text()


def test_repl_without_a_kernel_says_so_and_keeps_going(env):
    child = repl(env, "--endpoint", free_endpoint(), "--dead-after", "0.5")
    assert "not answering" in child.before
    run(child, "/ping", "kernel unreachable")
    run(child, "/help", "/quit")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def one_shot(env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *CHAT, *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_one_shot_forms_and_exit_codes(env):
    r = one_shot(env, "--ping")
    assert r.returncode == 0 and "is up" in r.stdout
    r = one_shot(env, "--once", "create a method to brew some tea")
    assert r.returncode == 0 and "result of brew_some_tea" in r.stdout
    assert "VALIDATING" in r.stderr  # progress goes to stderr, the answer to stdout
    r = one_shot(env, "--call", "genesis_obj", "add", "1", "2", "--json")
    reply = json.loads(r.stdout)
    assert r.returncode == 0 and reply["result"] == 3 and reply["status"] == "COMPLETE"
    r = one_shot(env, "--call", "genesis_obj", "fail")
    assert r.returncode == 1 and "FAILED" in r.stdout
    r = one_shot(env, "--call", "genesis_obj", "boom")
    assert r.returncode == 1 and "ERROR: internal" in r.stdout
    r = one_shot(env, "--once", "sing me a song")
    assert r.returncode == 1 and "did not understand" in r.stderr
    r = one_shot(env, "--call", "genesis_obj", "replayed")
    assert r.returncode == 0 and "replayed from a recording" in r.stdout


def test_one_shot_exit_code_2_when_the_kernel_is_unreachable(env):
    dead = free_endpoint()
    r = one_shot(env, "--endpoint", dead, "--ping", "--timeout", "1")
    assert r.returncode == 2 and "not answering" in r.stderr
    r = one_shot(
        env, "--endpoint", dead, "--call", "genesis_obj", "add", "1", "--dead-after", "0.5"
    )
    assert r.returncode == 2 and "kernel unreachable" in r.stderr


def test_missing_model_file_is_a_clear_error(env, tmp_path):
    r = one_shot(env, "--model", str(tmp_path / "nope.gguf"), "--once", "what is x")
    assert r.returncode == 1 and "does not exist" in r.stderr


@pytest.mark.slow
def test_repl_against_the_real_kernel(env, tmp_path):
    from kernel_process import KernelProcess

    with KernelProcess(tmp_path / "kernel") as kernel:
        child = repl(env, "--endpoint", kernel.endpoint)
        run(
            child,
            "create a method to report the current system time",
            "DECOMPOSING",
            "VALIDATING",
            "COMPLETE (cycle ",
            "replayed from a recording",
        )
        run(child, "/call genesis_obj report_the_current_system_time", "COMPLETE: 20")
        run(child, "what is the living image?", "knowledge_catalog_obj.search", "1. ")
        run(child, "/cycles 1", "report_the_current_system_time")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
