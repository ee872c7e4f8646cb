"""The kernel thinking with a real (tiny, locally built) model stored in its image."""

from __future__ import annotations

import logging

import pytest
from test_cycle import Harness, run
from tinymodel import build_tiny_llama

pytestmark = pytest.mark.model


def test_configured_model_is_stored_on_awakening_and_used_by_a_cycle(tmp_path, caplog):
    model = build_tiny_llama(tmp_path / "tiny")
    config = tmp_path / "batos.toml"
    config.write_text(
        "[personas.BRICK]\nbackend = \"transformers\"\n"
        f"model = \"{model}\"\nmax_new_tokens = 12\n"
        "[personas.BABS]\nbackend = \"transformers\"\n"
        "model = \"/nonexistent/model/dir\"\n"
    )
    harness = Harness(tmp_path, [])
    from batos_uvm.config import load_settings

    harness.settings = load_settings(config, {
        "db": str(tmp_path / "live_image.fs"), "zeo": "off", "embedder": "hashing",
        "metacognition_log": str(tmp_path / "audit.jsonl"), "max_attempts": 1}, environ={})

    async def scenario():
        with caplog.at_level(logging.INFO, logger="batos.awakening"):
            await harness.start()
        try:
            stored = harness.read(lambda root: sorted(root["pLLM_obj"].weights.models))
            assert stored == ["BRICK"]
            messages = caplog.text
            assert "BRICK: stored model" in messages
            assert "BABS: model /nonexistent/model/dir is not available locally" in messages
            assert "python batos.py models add BABS SOURCE" in messages
            # BABS has no model: the cycle fails fast and says how to fix it
            reply = await harness.send("grow_something")
            assert reply.status == "FAILED" and "models add BABS" in reply.error.reason
        finally:
            await harness.stop()

    run(scenario())


def test_a_cycle_thinks_with_the_stored_model(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny", context=4096)
    config = tmp_path / "batos.toml"
    config.write_text(
        "[kernel]\nbackend = \"transformers\"\n"
        + "".join(f"[personas.{p}]\nbackend = \"transformers\"\nmodel = \"{model}\"\n"
                  "max_new_tokens = 16\n" for p in ("BRICK", "BABS"))
    )
    from batos_uvm.config import load_settings

    harness = Harness(tmp_path, [])
    harness.settings = load_settings(config, {
        "db": str(tmp_path / "live_image.fs"), "zeo": "off", "embedder": "hashing",
        "metacognition_log": str(tmp_path / "audit.jsonl"), "max_attempts": 2}, environ={})

    async def scenario():
        await harness.start()
        try:
            reply = await harness.send("add_two_numbers", 1, 2)
            # A tiny untrained model writes no valid method: the cycle must fail
            # cleanly with a validation reason, having really asked the model.
            assert reply.status == "FAILED" and not reply.replayed
            record = harness.record(reply.cycle_id)
            calls = record["llm_calls"]
            assert {c["backend"] for c in calls} == {"transformers"}
            assert [c["persona"] for c in calls] == ["BABS", "BRICK", "BRICK"]
            assert all(0 < c["completion_tokens"] <= 16 for c in calls)
            assert len(record["attempts"]) == 2 and not any(a["ok"] for a in record["attempts"])
            assert not harness.read(lambda root: root["genesis_obj"].responds_to("add_two_numbers"))
        finally:
            await harness.stop()

    run(scenario())


def test_models_added_while_the_kernel_runs_are_used_without_a_restart(tmp_path):
    import json as _json

    from kernel_process import KernelProcess, run_env

    model = build_tiny_llama(tmp_path / "tiny", context=4096)
    config = tmp_path / "batos.toml"
    config.write_text('[kernel]\nbackend = "transformers"\nmax_attempts = 1\n')
    kernel = KernelProcess(tmp_path / "k", extra_args=["--config", str(config),
                                                       "--backend", "transformers"])
    with kernel:
        before = kernel.call("genesis_obj", "add_two_numbers", 1, 2)
        assert before.returncode == 1 and "models add" in before.stdout + before.stderr

        def models(*words):
            import subprocess
            import sys

            from kernel_process import BATOS

            return subprocess.run([sys.executable, str(BATOS), "--endpoint", kernel.endpoint,
                                   "models", *words, "--db", kernel.db],
                                  capture_output=True, text=True,
                                  timeout=300, env=run_env())

        added = models("add", "BRICK", str(model))
        assert added.returncode == 0, added.stderr
        shared = models("add", "BABS", "BRICK")
        assert shared.returncode == 0, shared.stderr
        listing = models("list")
        assert "BRICK" in listing.stdout and "same model as" in listing.stdout
        assert "in the running kernel" in listing.stdout
        reply = _json.loads(kernel.chat("--json", "--call", "genesis_obj", "add_two_numbers",
                                        "1", "2").stdout)
        # the model really answered (and, being tiny and untrained, wrote no valid method)
        assert reply["status"] == "FAILED" and not reply["replayed"]
        record = kernel.shell(f"print(cycle({reply['cycle_id']!r})['llm_calls'])")
        assert "'backend': 'transformers'" in record.stdout
        listing = models("list")
        assert "loaded:" in listing.stdout and "loaded: none" not in listing.stdout
