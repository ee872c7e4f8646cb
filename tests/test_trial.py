"""The trial: a candidate method runs in a cell exactly as the installed method would.

Real cells, a real FileStorage image; every call runs in a savepoint that is
rolled back, so the receiver is unchanged afterwards.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from batos_uvm.cells.pool import CellConfig, CellPool
from batos_uvm.objects import UvmObject
from batos_uvm.trial import run_trial, same

FACTORIAL = "def fact(self, n):\n    return 1 if n <= 1 else n * self.fact(n - 1)\n"


@pytest.fixture
def image(tmp_path):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "trial.fs")))
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(transaction_manager=tm)
    tm.begin()
    conn.root()["obj"] = UvmObject(label="target", items=[1, 2], name="t")
    tm.commit()
    tm.begin()
    yield conn
    tm.abort()
    conn.close()
    db.close()


def trial(conn, source, selector, examples=None, requested=None, timeout=5.0):
    async def scenario():
        pool = CellPool(CellConfig(), size=1)
        try:
            return await run_trial(
                pool, conn, conn.root()["obj"], selector, textwrap.dedent(source),
                examples, requested, timeout=timeout,
            )
        finally:
            await pool.close()

    return asyncio.run(asyncio.wait_for(scenario(), 120))


def test_the_requested_call_and_examples_pass(image) -> None:
    result = trial(image, FACTORIAL, "fact",
                   [{"args": [5], "expect": 120}, {"args": [0], "expect": 1}],
                   {"args": [3], "kwargs": {}})
    assert result.ok, result.reason
    assert [e.requested for e in result.examples] == [True, False, False]
    assert [e.got for e in result.examples] == [6, 120, 1]
    assert "seccomp" in result.protections


def test_wrong_result_names_the_example_and_the_call(image) -> None:
    result = trial(image, FACTORIAL, "fact", [{"args": [4], "expect": 25}], {"args": [2]})
    assert not result.ok
    assert result.reason == "example 2 fact(4): expected 25, got 24"


def test_a_raising_method_reports_its_own_traceback(image) -> None:
    source = "def grow(self, x):\n    y = x * 2\n    return y / 0\n"
    result = trial(image, source, "grow", None, {"args": [1]})
    assert not result.ok and result.reason.startswith("the requested call grow(1): raised")
    assert "ZeroDivisionError" in result.reason
    assert 'File "<method grow>", line 3' in result.traceback
    assert "runtime.py" not in result.traceback  # only the method's own frames


def test_the_requested_call_always_runs(image) -> None:
    # no examples, no arguments: the method still runs, so a failure cannot hide
    result = trial(image, "def grow(self):\n    raise ValueError('hidden')\n", "grow", [],
                   {"args": [], "kwargs": {}})
    assert not result.ok and "hidden" in result.reason
    assert trial(image, "def grow(self):\n    return 1\n", "grow", None, None).ok is False


def test_every_call_sees_the_receiver_as_it_is(image) -> None:
    source = "def grow(self, x):\n    self.items.append(x)\n    return len(self.items)\n"
    result = trial(image, source, "grow",
                   [{"args": [7], "expect": 3}, {"args": [8], "expect": 3}], {"args": [9]})
    assert result.ok, result.reason
    assert image.root()["obj"].items == [1, 2]  # rolled back


def test_the_trial_and_a_real_call_look_alike(image) -> None:
    probe = ("def probe(self):\n"
             "    return [hasattr(self, 'clone'), repr(self)[:10], sorted(self.slot_names()),\n"
             "            len(self.parents), self.responds_to('probe')]\n")
    result = trial(image, probe, "probe", None, {"args": []})
    assert result.ok, result.reason
    obj = image.root()["obj"]
    obj.install_method("probe", probe)
    assert obj.probe() == result.examples[0].got


def test_slots_holding_other_objects_and_nested_sends(image) -> None:
    obj = image.root()["obj"]
    helper = UvmObject(label="helper", base=10)
    helper.install_method("plus", "def plus(self, n):\n    return self.base + n\n")
    obj.helper = helper
    source = "def grow(self, n):\n    return self.helper.plus(n)\n"
    result = trial(image, source, "grow", [{"args": [5], "expect": 15}], {"args": [1]})
    assert result.ok, result.reason


def test_limits_fail_the_trial_with_their_name(image) -> None:
    spin = trial(image, "def grow(self):\n    while True:\n        pass\n", "grow", None,
                 {"args": []}, timeout=1.0)
    assert "time limit (1 s)" in spin.reason
    memory = trial(image, "def grow(self):\n    return len(bytearray(2 ** 31))\n", "grow",
                   None, {"args": []})
    assert "MemoryError" in memory.reason and "512 MiB" in memory.reason


def test_a_large_argument_is_no_limit_of_its_own(image) -> None:
    big = "x" * 120_000
    result = trial(image, "def echo(self, text):\n    return text\n", "echo", None,
                   {"args": [big]})
    assert result.ok, result.reason and result.examples[0].got == big


def test_malformed_examples_are_a_failed_trial(image) -> None:
    result = trial(image, FACTORIAL, "fact", [{"args": 5}], {"args": [1]})
    assert not result.ok and "malformed" in result.reason


def test_output_and_record_are_kept(image) -> None:
    source = "def grow(self):\n    print('hello from the trial')\n    return {1, 2}\n"
    result = trial(image, source, "grow", [{"expect": [1, 2]}], {"args": []})
    assert result.ok, result.reason
    assert result.stdout.count("hello from the trial") == 2
    record = result.to_record()
    assert json.loads(json.dumps(record))["examples"][0]["got"] == [1, 2]


def test_same() -> None:
    assert same(0.3, 0.1 + 0.2) and same(1e-13, 0.0) and not same(1.0, 1.001)
    assert same([1, 2], (1, 2)) and same([2, 1], {1, 2}) and not same([1, 1], {1})
    assert not same(True, 1) and not same(1, True) and same(1, 1.0)
    assert same({"a": [1.0]}, {"a": (1,)}) and not same({"a": 1}, {"b": 1})


def test_docs_example_runs() -> None:
    text = (Path(__file__).parents[1] / "docs" / "GUARDIAN.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "GUARDIAN.md", "exec"), namespace)
    assert namespace["obj"].items == [1, 5]
