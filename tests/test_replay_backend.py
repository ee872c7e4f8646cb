"""The replay backend: cassette parsing, matching rules, and backend conformance."""

from __future__ import annotations

import asyncio
import json

import pytest
from backend_conformance import BackendConformance

from batos_uvm.cognition import Cognition, parse_spec
from batos_uvm.cognition.base import CognitionError, CognitionUnavailable, InferenceRequest
from batos_uvm.cognition.replay import ReplayBackend, load_cassette

LINES = [
    {"comment": "documentation only"},
    {"persona": "BRICK", "state": "SYNTHESIZING", "prompt_contains": "factorial",
     "response": "brick factorial"},
    {"persona": None, "prompt_contains": "factorial", "response": "anyone factorial"},
    {"persona": "BABS", "prompt_contains": "", "response": "babs default"},
    {"prompt_contains": "The living image", "response": "one two three four five six"},
]


@pytest.fixture
def cassette(tmp_path):
    path = tmp_path / "cassette.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return path


def ask(backend, persona, prompt, state=None, max_tokens=100):
    return asyncio.run(backend.infer(InferenceRequest(persona=persona, prompt=prompt,
                                                      state=state, max_tokens=max_tokens)))


def test_first_matching_line_answers(cassette):
    backend = ReplayBackend(cassette)
    assert ask(backend, "BRICK", "the factorial of 5", "SYNTHESIZING").text == "brick factorial"
    assert ask(backend, "brick", "the factorial of 5", "DECOMPOSING").text == "anyone factorial"
    assert ask(backend, "ROBIN", "factorial please").text == "anyone factorial"
    answer = ask(backend, "BABS", "anything at all")
    assert answer.text == "babs default" and answer.replayed and answer.backend == "replay"
    assert answer.details["line"] == 4


def test_unmatched_prompt_quotes_its_start(cassette):
    with pytest.raises(CognitionError, match='ROBIN in VALIDATING; the prompt starts: "Write'):
        ask(ReplayBackend(cassette), "ROBIN", "Write a poem", "VALIDATING")


def test_budget_is_kept_in_words(cassette):
    answer = ask(ReplayBackend(cassette), "ALFRED", "The living image", max_tokens=3)
    assert answer.text == "one two three" and answer.completion_tokens == 3


@pytest.mark.parametrize("content, message", [
    ("not json\n", ":1: not JSON"),
    ('{"prompt_contains": "x"}\n', "must be text"),
    ('{"response": "x", "persona": 3}\n', "'persona' must be a string"),
    ('{"response": "x", "surprise": 1}\n', "unknown key"),
    ("[1, 2]\n", "must be a JSON object"),
])
def test_bad_cassettes_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CognitionError, match=message):
        load_cassette(path)
    with pytest.raises(CognitionError, match="cannot read"):
        load_cassette(tmp_path / "missing.jsonl")


def test_routing_by_persona_and_fail_fast_without_configuration(cassette):
    cognition = Cognition({"BRICK": f"replay:{cassette}", "ROBIN": ""})
    answer = asyncio.run(cognition.infer(InferenceRequest("BRICK", "factorial", state="X")))
    assert answer.text == "anyone factorial"
    with pytest.raises(CognitionUnavailable, match="no language model is configured for ROBIN"):
        asyncio.run(cognition.infer(InferenceRequest("ROBIN", "hello")))
    assert parse_spec("openai:http://127.0.0.1:8000/v1#qwen") == {
        "backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "qwen"}
    with pytest.raises(CognitionError, match="unknown cognition backend"):
        parse_spec("telepathy:now")


class TestReplayConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, cassette):
        return lambda: ReplayBackend(cassette)

    @pytest.fixture
    def broken_backend_factory(self, tmp_path):
        return lambda: ReplayBackend(tmp_path / "no-such-cassette.jsonl")
