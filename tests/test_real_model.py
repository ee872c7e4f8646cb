"""Briefs answered by the real code model that ./puter.sh setup installs (no replay).

A kernel process with nothing configured thinks with the installed model
(stored in its image from the model cache); briefs are typed into
``chat_client.py --once`` as a user would, translated by the same model.
These tests need the model installed (``python batos.py models fetch``): CI's
set-up installs it; elsewhere they are skipped with that reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kernel_process import KernelProcess

from batos_uvm.model_catalog import MODELS
from batos_uvm.model_fetch import installed

pytestmark = [pytest.mark.model, pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture
def model(real_model_dir: Path) -> Path:
    for entry in MODELS:
        path = installed(entry, real_model_dir)
        if path is not None:
            return path
    pytest.skip("no code model is installed: run ./puter.sh setup (python batos.py models fetch)")


class ThinkingKernel(KernelProcess):
    """A kernel with no backend configured: it thinks with the installed model."""

    def argv(self) -> list[str]:
        argv = super().argv()
        at = argv.index("--backend")
        return argv[:at] + argv[at + 2 :]


def methods_of_genesis(kernel: KernelProcess) -> list[str]:
    done = kernel.shell("print(sorted(genesis.methods()))")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().replace("'", '"'))


def answer(done) -> str:
    match = re.search(r"^COMPLETE \(cycle [^)]+\): (.*)$", done.stdout, re.M)
    assert match, f"no COMPLETE answer:\n{done.stdout}\n{done.stderr[-3000:]}"
    return match.group(1)


def test_a_typed_brief_becomes_a_working_installed_method(tmp_path, model):
    with ThinkingKernel(tmp_path) as kernel:
        done = kernel.chat("--once", "create a method that returns the factorial of a number "
                           "and call it with 5", timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        assert answer(done) == "120"
        assert "replayed" not in done.stdout  # a live model answered
        [selector] = [m for m in methods_of_genesis(kernel) if "fact" in m]
        again = kernel.call_json("genesis_obj", selector, 6)
        assert again["status"] == "COMPLETE" and again["result"] == 720
        assert again["cycle_id"] is None  # installed: no cycle the second time


def test_a_method_keeping_state_counts_on_across_a_restart(tmp_path, model):
    with ThinkingKernel(tmp_path) as kernel:
        done = kernel.chat("--once", "create a method that counts how often it has been "
                           "called and returns the count", timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        first = int(answer(done))
        [selector] = [m for m in methods_of_genesis(kernel) if "count" in m]
        assert kernel.call_json("genesis_obj", selector)["result"] == first + 1
        kernel.stop()
        kernel.start()
        reply = kernel.call_json("genesis_obj", selector)
        assert reply["status"] == "COMPLETE" and reply["result"] == first + 2
