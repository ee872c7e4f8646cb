"""The restricted runtime namespace: builtins, import guard, fresh globals."""

from __future__ import annotations

import builtins
import math

import pytest

from batos_uvm import restricted
from batos_uvm.guardian import SAFE_BUILTIN_NAMES, GuardianViolation, audit
from batos_uvm.restricted import compile_method, guarded_import, make_builtins


def test_builtins_are_the_safe_set_plus_guarded_functions() -> None:
    table = make_builtins()
    assert set(table) == SAFE_BUILTIN_NAMES | {
        "getattr",
        "hasattr",
        "setattr",
        "delattr",
        "__import__",
    }
    for name in (
        "open",
        "eval",
        "exec",
        "compile",
        "globals",
        "vars",
        "type",
        "object",
        "__build_class__",
        "input",
        "breakpoint",
    ):
        assert name not in table
    assert table["__import__"] is guarded_import
    assert table["getattr"] is not builtins.getattr
    assert make_builtins() is not make_builtins()  # one fresh dict per method


@pytest.mark.parametrize(
    "body",
    [
        "open('/etc/passwd')",
        "eval('1')",
        "exec('x = 1')",
        "globals()",
        "type(self)",
        "object()",
        "compile('1', 'x', 'eval')",
    ],
)
def test_missing_builtins_raise_name_error(body: str) -> None:
    function = compile_method(f"def probe(self):\n    return {body}\n", "probe")
    with pytest.raises(NameError):
        function(None)


def test_allowed_import_gives_a_read_only_view() -> None:
    function = compile_method(
        "import math\nfrom json import dumps\n"
        "def probe(self, x):\n    return dumps([math.sqrt(x)])\n",
        "probe",
    )
    assert function(None, 16) == "[4.0]"
    poke = compile_method("import math\ndef probe(self):\n    math.pi = 3\n", "probe")
    with pytest.raises(AttributeError, match="read-only"):
        poke(None)
    assert math.pi == pytest.approx(3.14159265)  # the real module is untouched


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import os.path",
        "from os import path",
        "import subprocess",
        "import socket",
        "from . import guardian",
        "import collections.abc",
    ],
)
def test_import_guard_refuses(source: str) -> None:
    with pytest.raises(ImportError):
        compile_method(f"{source}\ndef probe(self):\n    return 1\n", "probe")


@pytest.mark.parametrize(
    "source",
    [
        "from json import decoder",  # a submodule: would otherwise come from sys.modules
        "from random import _os",  # private
        "from operator import attrgetter",  # getattr by string
        "from hashlib import algorithms_available",  # a shared mutable set
    ],
)
def test_views_hold_back_submodules_private_and_refused_members(source: str) -> None:
    with pytest.raises(ImportError, match="cannot import name"):
        compile_method(f"{source}\ndef probe(self):\n    return 1\n", "probe")


def test_guarded_attribute_functions() -> None:
    class Target:
        name = "x"

    target = Target()
    table = make_builtins()
    assert table["getattr"](target, "name") == "x"
    assert table["hasattr"](target, "name")
    for name in ("__class__", "_private", "format", "gi_frame", "mro"):
        with pytest.raises(AttributeError, match="not allowed"):
            table["getattr"](target, name)
        with pytest.raises(AttributeError):
            table["hasattr"](target, name)
    table["setattr"](target, "_p_changed", True)  # the one private name a method may set
    assert target._p_changed is True
    with pytest.raises(AttributeError):
        table["setattr"](target, "_secret", 1)
    with pytest.raises(AttributeError):
        table["delattr"](target, "_p_changed")
    with pytest.raises(TypeError):
        table["getattr"](target, 3)


def test_namespace_is_fresh_and_not_the_kernels() -> None:
    source = "import math\ndef probe(self):\n    return math.tau\n"
    first, second = compile_method(source, "probe"), compile_method(source, "probe")
    assert first.__globals__ is not second.__globals__
    assert first.__globals__ is not globals()
    assert first.__globals__ is not vars(restricted)
    assert first.__globals__["__name__"] == "batos_method"
    assert first.__globals__["__builtins__"] is not vars(builtins)
    assert set(first.__globals__) == {"__builtins__", "__name__", "math", "probe"}
    assert "probe" not in globals() and "math" in first.__globals__
    assert first.__code__.co_filename == "<method>"


def test_missing_selector_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="does not define a function named 'probe'"):
        compile_method("def other(self):\n    return 1\n", "probe")
    with pytest.raises(ValueError):
        compile_method("probe = 3\n", "probe")


def test_the_namespace_leans_on_the_guardian() -> None:
    # Builtin functions carry the real builtins module in __self__; the restricted
    # namespace alone would hand it out. The Guardian's dunder rule is what stops it.
    source = "def probe(self):\n    return len.__self__.open\n"
    assert compile_method(source, "probe")(None) is builtins.open
    with pytest.raises(GuardianViolation) as caught:
        audit(source, "probe")
    assert caught.value.rule == "private-attribute"
