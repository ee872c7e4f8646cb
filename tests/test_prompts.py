"""What the cycle asks a small code model (batos_uvm/prompts.py), unit and through a kernel.

The kernel tests answer from replay cassettes whose ``prompt_contains`` pins
the part of the prompt under test: if the prompt lacked it, no line would
answer and the cycle would fail quoting the prompt.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import transaction

from batos_uvm.config import load_settings
from batos_uvm.kernel import Kernel
from batos_uvm.objects import UvmObject
from batos_uvm.prompts import (
    CODE_STOPS,
    CODE_SYSTEM,
    PERSISTENCE_RULE,
    Skill,
    advice_for,
    code_prefix,
    decomposition_prompt,
    show_call,
    synthesis_prompt,
)

BRIEF = {"selector": "factorial", "args": [5], "kwargs": {},
         "intent": "create a method that returns the factorial of a number and call it with 5"}  # fmt: skip


def test_the_call_is_shown_as_the_user_would_write_it():
    assert show_call("factorial", [5], {}) == "self.factorial(5)"
    assert show_call("greet", ["Bruce"], {"loud": True}) == "self.greet('Bruce', loud=True)"
    long = show_call("count", ["x" * 120_000], {})
    assert len(long) < 250 and "abbreviated" in long and "120000" in long


def test_the_synthesis_prompt_is_short_and_carries_the_users_words():
    target = UvmObject(label="genesis_obj", visits=3, notes=["a"])
    prompt = synthesis_prompt(BRIEF, target)
    assert "'factorial'" in prompt  # replay cassettes key on it
    assert f"The user asked: {BRIEF['intent']}" in prompt
    assert "Example call: self.factorial(5). It takes 1 argument besides self" in prompt
    assert "*[5]" not in prompt and "**{}" not in prompt
    assert "visits=3" in prompt and "notes=['a']" in prompt and "label" not in prompt
    assert prompt.count(PERSISTENCE_RULE) == 1  # the covenant rule lives in one place
    assert len(prompt.split()) < 170  # about 250 tokens, not 600
    assert "BRICK" not in prompt and "Brick-Knight" not in CODE_SYSTEM


def test_without_words_the_selector_says_what_to_do_and_a_no_argument_call_takes_only_self():
    prompt = synthesis_prompt({"selector": "report_the_time", "args": [], "kwargs": {}},
                              UvmObject(label="x"))  # fmt: skip
    assert "What it should do: report the time." in prompt
    assert "It is called as self.report_the_time(), with no arguments besides self" in prompt
    assert code_prefix("report_the_time", 0) == "```python\ndef report_the_time(self):"
    assert code_prefix("factorial", 1) == "```python\ndef factorial(self,"


def test_skills_notes_and_feedback_when_there_are_some():
    skill = Skill("double", "def double(self, n):\n    return 2 * n\n")
    prompt = synthesis_prompt(BRIEF, UvmObject(label="x"), [skill], "trial run: self.factorial(5) "
                              "raised ValueError", "def factorial(self, n):\n    raise ValueError",
                              notes=["A factorial multiplies 1 to n."])  # fmt: skip
    assert "An earlier method, for reference:\n```python\ndef double(self, n):" in prompt
    assert "Notes from the knowledge catalog:\n- A factorial multiplies 1 to n." in prompt
    assert "Your previous attempt failed: trial run: self.factorial(5) raised ValueError" in prompt
    assert "raise ValueError\n```\nWrite a corrected method." in prompt


def test_failures_small_models_repeat_come_with_advice():
    missing_helper = ("trial run: self.nth_prime(5) raised AttributeError: UvmObject oid=0x10a "
                      "'t' has no slot or method 'is_prime' (at: if self.is_prime(num):)")
    assert advice_for(missing_helper) == (
        "self.is_prime does not exist: write def is_prime(...) inside the method, before the "
        "line that calls it, and call it as is_prime(...).")
    undefined = ("trial run: self.nth_prime(5) raised NameError: name 'is_prime' is not defined "
                 "(at: if is_prime(num):)")
    assert advice_for(undefined).startswith("is_prime is not defined: write def is_prime(...) "
                                            "inside the method, indented")
    assert advice_for("raised NameError: name 'total' is not defined (at: return total)") == ""
    unset = "raised AttributeError: 't' has no slot or method 'count' (at: return self.count + 1)"
    assert "getattr(self, 'count', default)" in advice_for(unset)
    private = ("Persistence Guardian: private-attribute (line 2): attribute '__dict__': names "
               "starting with '_' are private")
    assert "self.items = {}" in advice_for(private)
    assert advice_for("trial run: self.f(1) raised ZeroDivisionError") == ""
    prompt = synthesis_prompt(BRIEF, UvmObject(label="x"), [], missing_helper,
                              "def factorial(self, n):\n    return self.is_prime(n)")
    assert "```\nself.is_prime does not exist" in prompt
    assert prompt.index("does not exist") < prompt.index("Write a corrected method.")


def test_code_stops_end_the_method_at_column_zero():
    assert "\n```" in CODE_STOPS and "\ndef" not in CODE_STOPS  # "\nd" covers it
    for follower in ("\nclass A:", "\nprint(x)", "\n# Example", "\nobj = A()", "\n@cache"):
        assert any(follower.startswith(stop) for stop in CODE_STOPS), follower
    assert not any("\n    return 1".startswith(stop) for stop in CODE_STOPS)


def test_the_planner_sees_the_users_words():
    assert "The user asked: \"create a method that returns" in decomposition_prompt(BRIEF)
    assert "The user asked" not in decomposition_prompt({"selector": "f", "args": []})


# -- through a kernel, with replayed answers --------------------------------------------------


def kernel_with(tmp_path: Path, lines: list[dict[str, Any]], embedder: str = "hashing") -> Kernel:
    cassette = tmp_path / "cassette.jsonl"
    cassette.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return Kernel(load_settings(None, {
        "db": str(tmp_path / "live_image.fs"), "zeo": "off", "embedder": embedder,
        "backend": f"replay:{cassette}", "metacognition_log": str(tmp_path / "audit.jsonl"),
        "trial_wall_seconds": 3.0, "max_attempts": 1}, environ={}))  # fmt: skip


async def _ignore(event: dict[str, Any]) -> None:
    return None


def record(kernel: Kernel, cycle_id: str) -> dict[str, Any]:
    connection = kernel.image.db.open(transaction_manager=transaction.TransactionManager())
    try:
        return dict(connection.root()["cycles"][cycle_id].data)
    finally:
        connection.close()


def test_the_intent_reaches_planner_and_writer_and_stays_with_the_method(tmp_path):
    intent = "I need a method that doubles a number; call it with 21"
    kernel = kernel_with(tmp_path, [
        {"state": "DECOMPOSING", "prompt_contains": f'The user asked: "{intent}"',
         "response": '["doubling"]'},
        {"state": "SYNTHESIZING", "prompt_contains": f"The user asked: {intent}",
         "response": "```python\ndef double(self, n):\n    return 2 * n\n```"},
    ])  # fmt: skip

    async def scenario():
        await kernel.start(serve_bridge=False)
        try:
            reply = await kernel.send("genesis_obj", "double", [21], {}, _ignore, intent=intent)
            connection = kernel.image.db.open(transaction_manager=transaction.TransactionManager())
            try:
                version = connection.root()["genesis_obj"].method_history("double")[-1]
                return reply, version.note, record(kernel, reply.cycle_id)
            finally:
                connection.close()
        finally:
            await kernel.stop()

    reply, note, data = asyncio.run(scenario())
    assert reply.status == "COMPLETE" and reply.result == 42
    assert note == f"brief: {intent}"
    assert data["brief"]["intent"] == intent and data["research_plan"][0] == intent
    call = data["llm_calls"][1]
    assert call["persona"] == "BRICK" and call["prefixed"] is False  # a replay cannot force it


def test_an_earlier_skill_is_shown_as_code_and_unrelated_lore_is_not(tmp_path):
    kernel = kernel_with(tmp_path, [
        {"state": "DECOMPOSING", "prompt_contains": "", "response": '["factorial"]'},
        {"state": "SYNTHESIZING", "prompt_contains": "'factorial'",
         "response": "```python\ndef factorial(self, n):\n    import math\n"
                     "    return math.factorial(n)\n```"},
        {"state": "SYNTHESIZING",
         "prompt_contains": "An earlier method, for reference:\n```python\ndef factorial(self, n):",
         "response": "```python\ndef binomial(self, n, k):\n    return self.factorial(n) // "
                     "(self.factorial(k) * self.factorial(n - k))\n```"},
    ], embedder="minilm")  # fmt: skip

    async def scenario():
        await kernel.start(serve_bridge=False)
        try:
            first = await kernel.send("genesis_obj", "factorial", [5], {}, _ignore,
                                      intent="a method that returns the factorial of n")
            second = await kernel.send("genesis_obj", "binomial", [5, 2], {}, _ignore,
                                       intent="a method for the binomial coefficient n over k, "
                                       "using factorials")  # fmt: skip
            return first, second, record(kernel, second.cycle_id)
        finally:
            await kernel.stop()

    first, second, data = asyncio.run(scenario())
    assert first.result == 120 and second.status == "COMPLETE" and second.result == 10
    assert data["attempts"][0]["skills"] == ["factorial"]
    lore = [c for c in data["retrieved_context"] if c["doc_id"].startswith("golden_dataset")]
    assert all(c["similarity"] < 0.45 for c in lore)  # the persona lore stayed out
