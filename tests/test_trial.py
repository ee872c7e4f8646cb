"""Trial runs in real child processes: verdicts, limits and refusals."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import OrderedDict, UserList
from pathlib import Path

import pytest

from batos_uvm import trial_runner
from batos_uvm.trial import (
    TrialLimits,
    TrialResult,
    run_trial,
    run_trial_sync,
    same,
    to_plain,
)
from batos_uvm.trial_runner import pack, unpack

FACTORIAL = "import math\ndef fact(self, n):\n    return math.factorial(n)\n"


def trial(
    source: str,
    selector: str = "probe",
    slots: dict | None = None,
    examples: list[dict] | None = None,
    **kwargs,
) -> TrialResult:
    return run_trial_sync(textwrap.dedent(source), selector, slots or {}, examples, **kwargs)


# -- verdicts -------------------------------------------------------------------------
def test_passing_examples() -> None:
    result = trial(
        FACTORIAL,
        "fact",
        examples=[{"args": [5], "expect": 120}, {"args": [], "kwargs": {"n": 0}, "expect": 1}],
    )
    assert result.ok and result.reason is None
    assert [(e.args, e.kwargs, e.got, e.ok) for e in result.examples] == [
        ([5], {}, 120, True),
        ([], {"n": 0}, 1, True),
    ]
    assert "network-namespace" in result.protections or os.geteuid() != 0
    assert 0 < result.duration_s < 5


def test_wrong_result_names_the_example() -> None:
    result = trial(
        FACTORIAL, "fact", examples=[{"args": [5], "expect": 120}, {"args": [4], "expect": 120}]
    )
    assert not result.ok
    assert result.reason == "example 2: expected 120, got 24"
    assert [e.ok for e in result.examples] == [True, False]


def test_raising_method_reports_exception_and_traceback() -> None:
    result = trial(
        """
        def probe(self, x):
            y = x + 1
            return y / 0
        """,
        examples=[{"args": [1], "expect": 2}],
    )
    assert result.reason == "example 1: raised ZeroDivisionError: division by zero"
    assert 'File "<method>", line 4, in probe' in result.traceback
    assert "return y / 0" in result.traceback
    assert "trial_runner" not in result.traceback  # only the method's own frames


def test_example_without_expect_only_must_not_raise() -> None:
    result = trial("def probe(self, x):\n    return [x, x]\n", examples=[{"args": [3]}])
    assert result.ok and result.examples[0].got == [3, 3]
    assert result.examples[0].has_expect is False


def test_no_argument_method_is_called_without_examples() -> None:
    result = trial(
        """
        def probe(self):
            print('total is', self.total)
            return self.total * 2
        """,
        slots={"total": 21},
    )
    assert result.ok and [e.got for e in result.examples] == [42]
    assert result.stdout == "total is 21\n"
    failing = trial("def probe(self):\n    return self.missing\n", slots={"total": 1})
    assert failing.reason == "raised AttributeError: trial copy of the target has no slot 'missing'"


def test_method_with_arguments_and_no_examples_is_only_compiled() -> None:
    result = trial("def probe(self, x):\n    return 1 / 0\n")
    assert result.ok and result.examples == []
    broken = trial("def probe(self, x):\n    return (\n")
    assert not broken.ok and broken.reason.startswith("does not compile: raised SyntaxError")


def test_sibling_method_call() -> None:
    result = trial(
        "def probe(self, x):\n    return self.helper(x) * 2\n",
        slots={"k": 3},
        examples=[{"args": [2], "expect": 10}],
        methods={"helper": "def helper(self, x):\n    return x + self.k\n"},
    )
    assert result.ok, result.reason


def test_slots_are_copied_fresh_for_every_example() -> None:
    source = """
        def probe(self, x):
            self.items.append(x)
            self._p_changed = True
            return list(self.items)
        """
    result = trial(
        source,
        slots={"items": UserList([1])},
        examples=[{"args": [2], "expect": [1, 2]}, {"args": [3], "expect": [1, 3]}],
    )
    assert result.ok, result.reason


def test_changing_a_slot_without_the_flag_fails() -> None:
    result = trial("def probe(self):\n    self.items.append(1)\n", slots={"items": []})
    assert result.reason == "changed slot 'items' without setting self._p_changed = True"


def test_results_compare_as_plain_data() -> None:
    source = "def probe(self):\n    return {'sum': 0.1 + 0.2, 'pair': (1, 2), 'set': {3, 4}}\n"
    result = trial(source, examples=[{"expect": {"sum": 0.3, "pair": [1, 2], "set": [4, 3]}}])
    assert result.ok, result.reason


def test_import_outside_the_allow_list_fails_to_compile() -> None:
    result = trial("import os\ndef probe(self):\n    return 1\n")
    assert (
        result.reason == "does not compile: raised ImportError: module 'os' is not on "
        "the allow-list"
    )


def test_malformed_examples_are_a_failed_trial() -> None:
    result = trial(FACTORIAL, "fact", examples=[{"argz": [1]}])
    assert not result.ok and result.reason.startswith("example 1 is malformed")


def test_record_is_json() -> None:
    result = trial("def probe(self):\n    return {(1, 2): b'x', 'n': float('nan')}\n")
    record = result.to_record()
    assert json.loads(json.dumps(record))["examples"][0]["got"] == {"(1, 2)": "b'x'", "n": "nan"}
    assert record["ok"] is True and record["protections"]


# -- limits ---------------------------------------------------------------------------
def test_endless_sleep_hits_the_wall_time() -> None:
    result = trial(
        "import time\ndef probe(self):\n    time.sleep(30)\n", limits=TrialLimits(wall_seconds=1.0)
    )
    assert result.reason == "timeout after 1.0 s wall time"
    assert result.duration_s < 3


def test_infinite_loop_times_out() -> None:
    result = trial(
        "def probe(self):\n    while True:\n        pass\n",
        limits=TrialLimits(cpu_seconds=30, wall_seconds=1.0),
    )
    assert result.reason == "timeout after 1.0 s wall time"


def test_busy_loop_hits_the_cpu_limit() -> None:
    result = trial(
        "def probe(self):\n    while True:\n        pass\n",
        limits=TrialLimits(cpu_seconds=1, wall_seconds=10),
    )
    assert result.reason == "CPU time limit exceeded"


def test_big_allocation_hits_the_memory_limit() -> None:
    result = trial("def probe(self):\n    return len(bytearray(2 * 1024**3))\n")
    assert result.reason == "memory limit exceeded (MemoryError)"


def test_huge_result_is_output_too_large() -> None:
    result = trial("def probe(self):\n    return 'x' * 200_000\n")
    assert result.reason == "output too large (more than 65536 bytes)"


def test_deep_recursion_is_an_ordinary_error() -> None:
    result = trial("def probe(self):\n    return self.probe()\n")
    assert result.reason.startswith("raised RecursionError")


# -- the process sandbox on its own (full builtins: what an escape would have) -----------
def test_socket_is_refused() -> None:
    result = trial(
        """
        def probe(self):
            import socket
            return socket.create_connection(('127.0.0.1', 9)).fileno()
        """,
        restricted=False,
    )
    assert result.reason == "network access refused (import of socket)"


def test_swallowed_refusal_still_fails_the_trial() -> None:
    result = trial(
        """
        def probe(self):
            try:
                import socket
            except Exception:
                return 'nothing happened'
        """,
        restricted=False,
    )
    assert result.reason == "network access refused (import of socket)"


def test_writing_outside_the_working_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    result = trial(
        f"def probe(self):\n    open({str(target)!r}, 'w').write('x')\n", restricted=False
    )
    assert result.reason == f"write outside the working directory refused: {target}"
    assert not target.exists()
    via_tmp = trial("def probe(self):\n    open('/tmp/outside', 'w')\n", restricted=False)
    assert via_tmp.reason == "write outside the working directory refused: /tmp/outside"


def test_writing_inside_the_working_directory_is_allowed_and_cleaned_up() -> None:
    result = trial(
        """
        import os
        def probe(self):
            with open('note.txt', 'w') as f:
                f.write('kept')
            with open('note.txt') as f:
                return [f.read(), os.getcwd()]
        """,
        examples=[{"args": []}],
        restricted=False,
    )
    assert result.ok, result.reason
    text, workdir = result.examples[0].got
    assert text == "kept" and "batos-trial-" in workdir
    assert not os.path.exists(workdir)  # the temporary directory is gone


def test_reading_outside_allowed_directories_is_refused() -> None:
    result = trial("def probe(self):\n    return open('/etc/hostname').read()\n", restricted=False)
    assert result.reason == "read outside the allowed directories refused: /etc/hostname"


def test_process_creation_is_refused() -> None:
    result = trial("import os\ndef probe(self):\n    return os.system('true')\n", restricted=False)
    assert result.reason == "process creation refused (os.system)"


def test_crash_by_signal() -> None:
    result = trial("import os\ndef probe(self):\n    os.kill(os.getpid(), 9)\n", restricted=False)
    assert result.reason == "crashed with signal 9 (SIGKILL)"


def test_child_is_isolated_with_a_minimal_environment() -> None:
    result = trial(
        """
        import os, sys
        def probe(self):
            return [sorted(os.environ), sys.flags.isolated, sys.flags.no_site,
                    'batos_uvm.objects' in sys.modules]
        """,
        restricted=False,
    )
    names, isolated, no_site, kernel_loaded = result.examples[0].got
    assert set(names) <= {"PATH", "LC_ALL", "LC_CTYPE"}
    assert (isolated, no_site, kernel_loaded) == (1, 1, False)


def test_trials_run_concurrently_without_blocking_the_loop() -> None:
    async def both() -> list[TrialResult]:
        slow = run_trial(
            "import time\ndef probe(self):\n    time.sleep(0.5)\n    return 1\n", "probe", {}
        )
        fast = run_trial(FACTORIAL, "fact", {}, [{"args": [3], "expect": 6}])
        return await asyncio.gather(slow, fast)

    slow, fast = asyncio.run(both())
    assert slow.ok and fast.ok and fast.duration_s < slow.duration_s


def _run_runner(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child that has trial_runner loaded the way trials load it."""
    bootstrap = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType('batos_uvm')
        package.__path__ = [{str(Path(trial_runner.__file__).parent)!r}]
        sys.modules['batos_uvm'] = package
        from batos_uvm import trial_runner
    """) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", bootstrap], capture_output=True, text=True, timeout=30
    )


def test_audit_hook_refuses_socket_creation(tmp_path: Path) -> None:
    done = _run_runner(f"""
        import socket, os
        trial_runner.install_audit_hook({str(tmp_path)!r}, (), frozenset())
        try:
            socket.socket()
        except PermissionError as exc:
            print('refused:', exc)
        try:
            os.open('/tmp/x-batos', os.O_WRONLY | os.O_CREAT)
        except PermissionError as exc:
            print('refused:', exc)
    """)
    assert done.stdout.splitlines() == [
        "refused: network access refused (socket.__new__)",
        "refused: write outside the working directory refused: /tmp/x-batos",
    ], done.stderr


def test_network_namespace_has_no_route_to_the_host() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        done = _run_runner(f"""
            import socket
            print('isolated' if trial_runner.enter_network_namespace() else 'shared')
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=2).close()
                print('connected')
            except OSError as exc:
                print('failed', exc.errno)
        """)
    lines = done.stdout.split()
    if lines[:1] == ["shared"]:
        pytest.skip("no permission to create a network namespace here (needs root)")
    assert lines[0] == "isolated" and lines[1] == "failed", done.stdout + done.stderr


# -- plain data -------------------------------------------------------------------------
def test_to_plain_converts_and_bounds() -> None:
    class Opaque:
        def __getattr__(self, name):  # must never be consulted
            raise AssertionError(name)

    value = {
        "l": UserList([1, (2, 3)]),
        "m": OrderedDict(a={1, 2}),
        "o": Opaque(),
        "b": bytearray(b"x"),
        "r": range(3),
    }
    assert to_plain(value) == {
        "l": [1, (2, 3)],
        "m": {"a": {1, 2}},
        "o": "<opaque Opaque>",
        "b": b"x",
        "r": [0, 1, 2],
    }
    nested: list = []
    for _ in range(100):
        nested = [nested]
    assert "<too deep>" in json.dumps(to_plain(nested))
    assert to_plain(list(range(50)), max_nodes=10) == [*range(9), "<truncated>"]
    assert to_plain({"a": list(range(20)), "b": 2}, max_nodes=8) == {
        "a": [*range(5), "<truncated>"],
        "<truncated>": "<truncated>",
    }
    assert len(to_plain("y" * 100, max_chars=10)) == 10
    assert to_plain(10**5000).startswith("<int of")


def test_pack_round_trip() -> None:
    value = [
        None,
        True,
        1,
        2.5,
        "s",
        b"\x00",
        (1, [2]),
        {3, 4},
        frozenset({5}),
        {"k": {1: "v", (1, 2): []}},
    ]
    assert unpack(json.loads(json.dumps(pack(value)))) == value


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
    assert namespace["result"].ok and callable(namespace["method"])


@pytest.mark.parametrize(
    ("forged", "reason"),
    [
        (
            b'{"examples": [{"got": 999, "error": null}], "called": true}',
            "example 1: expected 120, got 999",
        ),
        (
            b'{"examples": [{"got": {"x": 1, "y": 2}, "error": null}], "called": true}',
            "trial produced a malformed outcome (ValueError)",
        ),
        (
            b'{"examples": [7], "called": true}',
            "trial produced a malformed outcome (AttributeError)",
        ),
        (b"[" * 60_000, "trial runner failed (exit status 0)"),
    ],
)
def test_parent_judges_what_a_subverted_child_sends(forged: bytes, reason: str) -> None:
    # an escaped method writing its own "outcome" and leaving: the parent still compares
    result = trial(
        f"""
        import os
        def fact(self, n):
            os.write(1, {forged!r})
            os._exit(0)
        """,
        "fact",
        examples=[{"args": [5], "expect": 120}],
        restricted=False,
    )
    assert result.reason == reason and not result.ok
