"""The demo: every brief its recording claims to know works, and a user is told which those are."""

from __future__ import annotations

import sys

import pexpect
from kernel_process import CHAT_CLIENT, DEMO_CASSETTE, KernelProcess, run_env

BRIEFS = DEMO_CASSETTE.with_suffix(".briefs.txt")


def listed_briefs() -> list[str]:
    lines = BRIEFS.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_listed_brief_completes_from_the_recording(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        status = kernel.status()
        assert status["briefs"] == listed_briefs()
        for brief in listed_briefs():
            done = kernel.chat("--once", brief)
            assert done.returncode == 0, (brief, done.stdout, done.stderr)
            assert "replayed from a recording" in done.stdout


def test_help_and_a_miss_name_the_briefs_once(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        child = pexpect.spawn(sys.executable, [str(CHAT_CLIENT), "--endpoint", kernel.endpoint],
                              env=run_env(), encoding="utf-8", timeout=60)
        child.expect_exact("The recording knows these briefs:")
        child.expect_exact("batos> ")
        child.sendline("/help")
        child.expect_exact("/quit")
        child.expect_exact("The recording knows these briefs:")
        child.expect_exact("call factorial on genesis_obj with 5")
        child.expect_exact("batos> ")
        child.sendline("call add on genesis_obj with 1, 2")  # docs/CHAT.md's own example
        child.expect_exact("batos> ")
        answer = child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    assert "no live model runs in a demo" in answer
    assert answer.count("create a method to say hello") == 1
    assert "replay cassette" not in answer  # the recording's internals stay inside


def test_a_one_shot_miss_names_the_briefs_too(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        done = kernel.chat("--once", "call add on genesis_obj with 1, 2")
    assert done.returncode == 1
    assert "The recording knows these briefs:" in done.stdout
    assert done.stdout.count("create a method to count my visits") == 1
    assert "replay cassette" not in done.stdout + done.stderr
