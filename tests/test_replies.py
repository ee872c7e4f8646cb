"""Reading methods out of what small code models really answer (batos_uvm/replies.py).

The replies are recorded from Qwen2.5-Coder 0.5B/1.5B runs of the cycle
(tests/cassettes/small_models.jsonl, a replay cassette); each parsing rule is
checked on them, and every repaired method must pass the Persistence Guardian.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batos_uvm.guardian import GuardianViolation, audit
from batos_uvm.replies import parse_queries, parse_synthesis, public_attributes, read_examples
from batos_uvm.state_repairs import drop_flag_misuse, initialise_slots, repair_state

CASSETTE = Path(__file__).parent / "cassettes" / "small_models.jsonl"


def recorded() -> list[dict]:
    lines = [json.loads(line) for line in CASSETTE.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("state") == "SYNTHESIZING"]


def selector_of(line: dict) -> str:
    return line["prompt_contains"].strip("'")


def verdict(line: dict) -> str:
    """How the cycle reads a recorded reply: accepted, or refused by which rule."""
    selector = selector_of(line)
    parsed = parse_synthesis(line["response"], selector)
    if parsed.problem:
        return f"problem: {parsed.problem}"
    code, _ = repair_state(parsed.code, set())
    try:
        audit(code, selector)
        return "accepted"
    except GuardianViolation as violation:
        return f"refused: {violation.rule}"


@pytest.mark.parametrize("line", recorded(), ids=lambda line: line["comment"].split(" | ")[1])
def test_each_recorded_reply_still_reads_as_declared(line):
    assert verdict(line) == line["comment"].split(" | ")[0]


def test_the_recorded_replies_cover_the_messy_kinds():
    replies = [line["response"] for line in recorded()]
    assert len(replies) >= 15
    assert any("```" not in r.split("\n", 1)[1] for r in replies)  # cut at the closing fence
    declared = {line["comment"].split(" | ")[0] for line in recorded()}
    assert "accepted" in declared
    assert any(d.startswith("refused: ") for d in declared)


def test_the_method_is_taken_out_of_a_class_followed_by_usage():
    reply = """Here is the method:

```python
import math

class BATOS:
    def factorial(self, n):
        \"\"\"n!\"\"\"
        if n == 0:
            return 1
        return n * factorial(n - 1)

# Example usage
obj = BATOS()
print(obj.factorial(5))
```"""
    parsed = parse_synthesis(reply, "factorial")
    assert parsed.code.splitlines()[0] == "def factorial(self, n):"
    assert "return n * self.factorial(n - 1)" in parsed.code  # a bare recursive call
    assert "BATOS" not in parsed.code and "print" not in parsed.code
    assert "took the method out of class BATOS" in parsed.repairs
    audit(parsed.code, "factorial")


def test_only_the_function_named_after_the_selector_is_kept_with_its_helpers_and_imports():
    reply = """```python
def is_prime(self, n):
    return check(n)

def check(n):
    if n < 2:
        return False
    return all(n % d for d in range(2, int(math.sqrt(n)) + 1))

def unrelated():
    return 1

print(is_prime(None, 7))"""  # a reply cut off before its closing fence
    parsed = parse_synthesis(reply, "is_prime")
    assert "def check(n):" in parsed.code and "unrelated" not in parsed.code
    assert "    import math" in parsed.code
    audit(parsed.code, "is_prime")
    namespace: dict = {}
    exec(parsed.code, namespace)  # noqa: S102 - our own test input
    assert namespace["is_prime"](None, 97) is True


@pytest.mark.parametrize(
    "body, added",
    [
        ("return datetime.now().strftime('%H:%M')", "from datetime import datetime"),
        ("return datetime.date.today().isoformat()", "import datetime"),
        ("return Counter(text.split())", "from collections import Counter"),
        ("return math.sqrt(16)", "import math"),
        ("return sorted(set(re.findall(r'\\w+', text)))", "import re"),
    ],
)
def test_missing_standard_imports_are_added_inside_the_method(body, added):
    reply = f"```python\ndef f(self, text=''):\n    {body}\n```"
    parsed = parse_synthesis(reply, "f")
    assert parsed.code.splitlines()[1] == f"    {added}"
    audit(parsed.code, "f")


def test_a_one_line_method_gets_its_missing_import_too():
    reply = "```python\ndef today(self): return datetime.datetime.now().strftime('%Y-%m-%d')\n```"
    parsed = parse_synthesis(reply, "today")
    assert parsed.code.splitlines()[:3] == [
        "def today(self):", "    import datetime",
        "    return datetime.datetime.now().strftime('%Y-%m-%d')"]  # fmt: skip
    audit(parsed.code, "today")
    several = parse_synthesis("```python\ndef f(self, x): y = math.sqrt(x); return y\n```", "f")
    namespace: dict = {}
    exec(several.code, namespace)  # noqa: S102 - our own test input
    assert namespace["f"](None, 16) == 4.0


def test_imports_the_reply_wrote_at_the_top_go_with_the_method():
    reply = "```python\nimport random as rnd\nimport os\n\ndef roll(self):\n    return rnd.randint(1, 6)\n```"
    parsed = parse_synthesis(reply, "roll")
    assert "import random as rnd" in parsed.code and "import os" not in parsed.code


def test_private_attributes_of_self_become_public():
    code = (
        "def count(self):\n    if not hasattr(self, '_counts'):\n        self._counts = 0\n"
        "    self._counts += 1\n    self._p_changed = True\n    return self._counts\n"
    )
    fixed, repairs = public_attributes(code)
    assert "_counts" not in fixed and "self._p_changed = True" in fixed
    assert repairs == ["renamed self._counts to self.counts"]
    audit(fixed, "count")


def test_text_without_code_and_empty_blocks_are_problems():
    assert parse_synthesis("", "f").problem == "the reply holds no code"
    assert parse_synthesis("```python\n```", "f").problem == "the reply holds no code"
    # prose without a method goes to the Guardian, which names what is missing
    parsed = parse_synthesis("I cannot help with that.", "f")
    with pytest.raises(GuardianViolation):
        audit(parsed.code, "f")


def test_model_examples_are_read_leniently_and_dropped_when_unusable():
    examples, why = read_examples('[{"args": [2], "expect": True}, {"args": [3], "expect": None}]')
    assert why is None and examples == [
        {"args": [2], "expect": True},
        {"args": [3], "expect": None},
    ]
    examples, why = read_examples('{"args": [1], "expect": 1}')
    assert examples == [{"args": [1], "expect": 1}]
    assert read_examples("not json at all")[0] is None
    assert read_examples('[{"input": 1, "output": 2}]')[0] is None
    reply = (
        "```python\ndef f(self, n):\n    return n\n```\n```json\n[{'args': [1], 'expect': 1}]\n```"
    )
    assert parse_synthesis(reply, "f").examples == [{"args": [1], "expect": 1}]


def test_queries_are_a_json_list_of_strings():
    assert parse_queries('Sure! ["factorial", "math module"]') == ["factorial", "math module"]
    assert parse_queries("no list here") is None
    assert parse_queries("[1, 2]") is None


@pytest.mark.parametrize(
    "line, start",
    [
        ("self.notes.append(text)", "[]"),
        ("self.totals[text] = 1", "{}"),
        ("self.seen.add(text)", "set()"),
        ("self.total += 1", "0"),
        ("self.log += f'{text}; '", "''"),
        ("self.index.get(text)", "{}"),
    ],
)
def test_data_an_object_does_not_have_yet_gets_a_starting_value(line, start):
    code = f"def remember(self, text):\n    {line}\n    return text\n"
    fixed, repairs = initialise_slots(code, set())
    name = line.split(".")[1].split()[0].split("[")[0]
    assert fixed.splitlines()[1:3] == [
        f"    if not hasattr(self, {name!r}):",
        f"        self.{name} = {start}",
    ]
    assert repairs == [f"self.{name} starts as {start}"]
    audit(fixed, "remember")


def test_data_that_exists_or_is_looked_up_with_a_default_is_left_alone():
    code = "def add(self, x):\n    self.items.append(x)\n    return x\n"
    assert initialise_slots(code, {"items"}) == (code, [])
    looked_up = "def add(self, x):\n    n = getattr(self, 'n', 0)\n    self.n += x\n    return n\n"
    assert initialise_slots(looked_up, set()) == (looked_up, [])
    reset = "def count(self):\n    self.calls = 0\n    self.calls += 1\n    return self.calls\n"
    assert initialise_slots(reset, set()) == (reset, [])


def test_the_change_flag_used_as_data_is_dropped():
    code = (
        "def count_calls(self):\n    if not hasattr(self, '_p_changed'):\n"
        "        self._p_changed = False\n    self.calls = getattr(self, 'calls', 0) + 1\n"
        "    return self.calls\n"
    )  # recorded from Qwen2.5-Coder-1.5B
    fixed, repairs = drop_flag_misuse(code)
    assert "_p_changed" not in fixed and repairs
    audit(fixed, "count_calls")
    still_data = "def f(self):\n    self._p_changed = False\n    return self._p_changed\n"
    assert drop_flag_misuse(still_data)[0] == "def f(self):\n    return self._p_changed\n"


def test_imports_the_method_does_not_use_are_dropped():
    reply = (  # recorded from Qwen2.5-Coder-0.5B, which copied the prompt's module list
        "```python\ndef report_time(self):  # Importing necessary modules\n    import math\n"
        "    import re\n    import datetime\n    import sqlite3\n\n"
        "    current_time = datetime.datetime.now()\n    return current_time"
    )
    parsed = parse_synthesis(reply, "report_time")
    assert "sqlite3" not in parsed.code and "    import datetime" in parsed.code
    assert "dropped unused imports: math, re, sqlite3" in parsed.repairs
    audit(parsed.code, "report_time")
