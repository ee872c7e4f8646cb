"""The Persistence Guardian: a table of accepted and rejected methods.

Every source is written as a list of lines, so line N of the source is entry
N of the list; every rejection is checked for its rule id and its line.
"""

from __future__ import annotations

import ast
import pickle

import pytest

from batos_uvm.guardian import (
    ALLOWED_MODULES,
    FORBIDDEN_NAMES,
    SAFE_BUILTIN_NAMES,
    GuardianViolation,
    audit,
    find_violations,
)


def src(*lines: str) -> str:
    return "\n".join(lines) + "\n"


ACCEPTED = {
    "immutable defaults": src(
        "def describe(self, n=1, name='x', pair=(1, -2), flag=None):", "    return n, name, pair"
    ),
    "getter": src("def describe(self):", "    return f'{self.name} has {len(self.items)} items'"),
    "mutation then flag": src(
        "def describe(self, x):",
        "    self.items.append(x)",
        "    self._p_changed = True",
        "    return x",
    ),
    "flag on both branches": src(
        "def describe(self, x):",
        "    if x:",
        "        self.items.append(x)",
        "        self._p_changed = True",
        "    else:",
        "        self.count += 1",
        "        self._p_changed = True",
        "    return x",
    ),
    "early return before any mutation": src(
        "def describe(self, x):",
        "    if x is None:",
        "        return None",
        "    self.items.append(x)",
        "    self._p_changed = True",
        "    return x",
    ),
    "for loop then flag": src(
        "def describe(self, xs):",
        "    for x in xs:",
        "        if x > 0:",
        "            self.items.append(x)",
        "    self._p_changed = True",
    ),
    "while loop then flag": src(
        "def describe(self):",
        "    while self.items:",
        "        self.items.pop()",
        "    self._p_changed = True",
    ),
    "endless loop left by return after flag": src(
        "def describe(self):",
        "    while True:",
        "        self.count += 1",
        "        if self.count > 3:",
        "            self._p_changed = True",
        "            return self.count",
    ),
    "finally sets the flag after a return": src(
        "def describe(self, x):",
        "    try:",
        "        self.items.append(x)",
        "        return len(self.items)",
        "    finally:",
        "        self._p_changed = True",
    ),
    "raising path is exempt": src(
        "def describe(self, x):",
        "    self.items.append(x)",
        "    if x < 0:",
        "        raise ValueError('negative')",
        "    self._p_changed = True",
    ),
    "with block": src(
        "import decimal",
        "def describe(self, x):",
        "    with decimal.localcontext(prec=5) as ctx:",
        "        self.total = decimal.Decimal(x) / 3 + ctx.Etiny()",
        "    self._p_changed = True",
        "    return self.total",
    ),
    "try/except then flag": src(
        "def describe(self, x):",
        "    try:",
        "        self.values[x] = 1 / x",
        "    except ZeroDivisionError:",
        "        self.values[x] = None",
        "    self._p_changed = True",
    ),
    "alias mutation then flag": src(
        "def describe(self, x):",
        "    items = self.items",
        "    items.append(x)",
        "    self._p_changed = True",
    ),
    "docstring and allowed imports": src(
        '"""Count words."""',
        "import math",
        "from collections import Counter",
        "def describe(self, text):",
        "    '''Counts words.'''",
        "    return math.floor(len(Counter(text.split())))",
    ),
    "import inside the method": src(
        "def describe(self):", "    import json", "    return json.dumps(self.data)"
    ),
    "getattr and hasattr with constant names": src(
        "def describe(self):",
        "    if hasattr(self, 'name'):",
        "        return getattr(self, 'name', 'anonymous')",
        "    return 'anonymous'",
    ),
    "setattr of self then flag": src(
        "def describe(self, value):",
        "    setattr(self, 'name', value)",
        "    self._p_changed = True",
    ),
    "local list needs no flag": src(
        "def describe(self):",
        "    result = []",
        "    result.append(len(self.items))",
        "    return result",
    ),
    "a copy of self's list needs no flag": src(
        "def describe(self, x):",
        "    items = list(self.items)",
        "    items.append(x)",
        "    return sorted(items)",
    ),
    "match with flags in every case": src(
        "def describe(self, command):",
        "    match command:",
        "        case 'reset':",
        "            self.items.clear()",
        "            self._p_changed = True",
        "        case _:",
        "            pass",
        "    return command",
    ),
    "del of a slot entry then flag": src(
        "def describe(self, key):", "    del self.cache[key]", "    self._p_changed = True"
    ),
    "nested helper that only reads": src(
        "def describe(self, xs):",
        "    def double(v):",
        "        return v * 2",
        "    return [double(x) for x in xs if x in self.allowed]",
    ),
    "break and continue with the flag where it belongs": src(
        "def describe(self, xs):",
        "    for x in xs:",
        "        if x is None:",
        "            continue",
        "        if x < 0:",
        "            break",
        "        self.items.append(x)",
        "        self._p_changed = True",
        "    return len(self.items)",
    ),
    "reading elements of self's data": src(
        "def describe(self):",
        "    total = 0",
        "    for item in self.items:",
        "        total += item['price']",
        "    return total",
    ),
    "percent formatting and format specs": src(
        "def describe(self):",
        "    return '%s: %.2f' % (self.name, self.total) + f'{self.total:>10.2f}'",
    ),
}


REJECTED = {
    # (source, rule, line)
    "mutable default": (
        src("def describe(self, seen=[]):", "    return seen"),
        "mutable-default",
        1,
    ),
    "mutable default in a lambda": (
        src("def describe(self):", "    f = lambda x, acc={}: acc", "    return f(1)"),
        "mutable-default",
        2,
    ),
    "installing a method from a method": (
        src("def describe(self):", "    return self.install_method('x', 'def x(self): 1')"),
        "forbidden-attribute",
        2,
    ),
    "installing a primitive from a method": (
        src("def describe(self):", "    return self.install_primitive('x', 'orchestrator.start')"),
        "forbidden-attribute",
        2,
    ),
    "copying attributes with update_wrapper": (
        src(
            "import functools",
            "def describe(self):",
            "    return functools.update_wrapper(self, self.send, assigned=('x',), updated=())",
        ),
        "forbidden-attribute",
        3,
    ),
    "syntax error": (src("def describe(self):", "    return (", ""), "syntax-error", 2),
    "empty source": ("", "missing-method", 1),
    "only a docstring": (src('"""nothing here"""'), "missing-method", 1),
    "wrong function name": (src("def other(self):", "    return 1"), "method-name", 1),
    "two functions": (
        src("def describe(self):", "    return 1", "def helper(self):", "    return 2"),
        "module-shape",
        3,
    ),
    "first parameter not self": (src("def describe(this):", "    return 1"), "self-parameter", 1),
    "no parameters": (src("def describe():", "    return 1"), "self-parameter", 1),
    "async method": (src("async def describe(self):", "    return 1"), "module-shape", 1),
    "class at module level": (
        src("class Describe:", "    pass", "def describe(self):", "    return 1"),
        "module-shape",
        1,
    ),
    "statement at module level": (
        src("X = 1", "def describe(self):", "    return X"),
        "module-shape",
        1,
    ),
    "decorated method": (
        src("import functools", "@functools.cache", "def describe(self):", "    return 1"),
        "module-shape",
        2,
    ),
    "import os": (src("import os", "def describe(self):", "    return 1"), "import", 1),
    "import of a submodule": (
        src("import os.path", "def describe(self):", "    return 1"),
        "import",
        1,
    ),
    "from os import path": (
        src("def describe(self):", "    from os import path", "    return path"),
        "import",
        2,
    ),
    "star import": (src("from math import *", "def describe(self):", "    return pi"), "import", 1),
    "relative import": (
        src("from . import objects", "def describe(self):", "    return 1"),
        "import",
        1,
    ),
    "import inside the method": (
        src("def describe(self):", "    import subprocess", "    return 1"),
        "import",
        2,
    ),
    "eval": (src("def describe(self, text):", "    return eval(text)"), "forbidden-name", 2),
    "open": (
        src("def describe(self):", "    return open('/etc/passwd').read()"),
        "forbidden-name",
        2,
    ),
    "__import__": (src("def describe(self):", "    return __import__('os')"), "forbidden-name", 2),
    "type()": (src("def describe(self):", "    return type(self)"), "forbidden-name", 2),
    "dunder name": (src("def describe(self):", "    return __builtins__"), "dunder-name", 2),
    "dunder nested function": (
        src("def describe(self):", "    def __init__(x):", "        return x", "    return 1"),
        "dunder-name",
        2,
    ),
    "dunder attribute": (
        src("def describe(self):", "    return self.__class__"),
        "private-attribute",
        2,
    ),
    "subclasses walk": (
        src(
            "def describe(self):",
            "    x = 1",
            "    return ().__class__.__bases__[0].__subclasses__()",
        ),
        "private-attribute",
        3,
    ),
    "private module internal": (
        src("import random", "def describe(self):", "    return random._os.system('id')"),
        "private-attribute",
        3,
    ),
    "match class keyword reaching a dunder": (
        src(
            "def describe(self, x):",
            "    match x:",
            "        case int(__class__=c):",
            "            return c",
        ),
        "private-attribute",
        3,
    ),
    "str.format": (
        src("def describe(self):", "    return '{0.__init__}'.format(self)"),
        "format-string",
        2,
    ),
    "format_map": (
        src("def describe(self, d):", "    return '{x}'.format_map(d)"),
        "format-string",
        2,
    ),
    "generator frame": (
        src("def describe(self):", "    g = (i for i in [1])", "    return g.gi_frame"),
        "forbidden-attribute",
        3,
    ),
    "attrgetter": (
        src("import operator", "def describe(self):", "    return operator.attrgetter('x')(self)"),
        "forbidden-attribute",
        3,
    ),
    "getattr with a computed name": (
        src("def describe(self, name):", "    return getattr(self, name)"),
        "dynamic-attribute",
        2,
    ),
    "getattr of a dunder": (
        src("def describe(self):", "    return getattr(self, '__dict__')"),
        "dynamic-attribute",
        2,
    ),
    "getattr passed around": (
        src("def describe(self):", "    g = getattr", "    return g(self, 'x')"),
        "dynamic-attribute",
        2,
    ),
    "setattr of _p_changed": (
        src("def describe(self):", "    self.x = 1", "    setattr(self, '_p_changed', True)"),
        "dynamic-attribute",
        3,
    ),
    "global statement": (
        src("def describe(self):", "    global counter", "    counter = 1"),
        "global-statement",
        2,
    ),
    "nonlocal statement": (
        src(
            "def describe(self):",
            "    n = 0",
            "    def bump():",
            "        nonlocal n",
            "        n += 1",
            "    return n",
        ),
        "global-statement",
        4,
    ),
    "nested class": (
        src("def describe(self):", "    class Box:", "        pass", "    return 1"),
        "nested-class",
        2,
    ),
    "nested async function": (
        src("def describe(self):", "    async def later():", "        return 1", "    return 1"),
        "async-code",
        2,
    ),
    "assigning another object's attribute": (
        src("def describe(self, other):", "    other.name = 'x'"),
        "attribute-assignment",
        2,
    ),
    "assigning a module attribute": (
        src("import math", "def describe(self):", "    math.pi = 3"),
        "attribute-assignment",
        3,
    ),
    "rebinding self": (
        src("def describe(self, other):", "    self = other", "    return self"),
        "self-parameter",
        2,
    ),
    "_p_changed = False": (
        src("def describe(self):", "    self.x = 1", "    self._p_changed = False", "    return 1"),
        "private-attribute",
        3,
    ),
    "reading _p_changed": (
        src("def describe(self):", "    return self._p_changed"),
        "private-attribute",
        2,
    ),
    "too large": ("x = 1\n" * 20_000, "source-size", 1),
}


# Methods that change their receiver in any way: accepted, the kernel records the
# change (the Persistence Covenant is the kernel's rule since methods run in cells).
MUTATING = {
    "append then return": "def describe(self, x):\n    self.items.append(x)\n    return x\n",
    "falling off the end": "def describe(self, x):\n    self.items.append(x)\n    print(x)\n",
    "flag on one branch only": "def describe(self, x):\n    self.items.append(x)\n    if x:\n        self._p_changed = True\n    return x\n",
    "mutation nested in if/for/while": "def describe(self, xs):\n    if xs:\n        for x in xs:\n            while x > 0:\n                self.items.append(x)\n                x -= 1\n    return len(xs)\n",
    "mutation inside with": "import decimal\ndef describe(self, x):\n    with decimal.localcontext():\n        self.total = decimal.Decimal(x)\n    return x\n",
    "exception swallowed between mutation and flag": "def describe(self, x):\n    try:\n        self.items.append(x)\n        self.check(x)\n        self._p_changed = True\n    except ValueError:\n        pass\n    return x\n",
    "early return after the mutation": "def describe(self, x):\n    self.items.append(x)\n    if not x:\n        return None\n    self._p_changed = True\n    return x\n",
    "augmented assignment": "def describe(self):\n    self.count += 1\n    return self.count\n",
    "subscript assignment": "def describe(self, k, v):\n    self.data[k] = v\n",
    "attribute of a slot": "def describe(self, v):\n    self.config.level = v\n    return v\n",
    "del of a slot entry": "def describe(self, k):\n    del self.cache[k]\n    return k\n",
    "setattr on self": "def describe(self, v):\n    setattr(self, 'name', v)\n    return v\n",
    "alias mutation": "def describe(self, x):\n    items = self.items\n    items.append(x)\n    return x\n",
    "alias through a loop variable": "def describe(self):\n    for row in self.rows:\n        row.append(0)\n    return 1\n",
    "flag inside the loop before a later mutation": "def describe(self, xs):\n    for x in xs:\n        self._p_changed = True\n        self.items.append(x)\n    return len(self.items)\n",
    "break skips the flag": "def describe(self, xs):\n    for x in xs:\n        self.items.append(x)\n        if x is None:\n            break\n        self._p_changed = True\n    return len(xs)\n",
    "continue skips the flag": "def describe(self, xs):\n    for x in xs:\n        self.items.append(x)\n        if x is None:\n            continue\n        self._p_changed = True\n",
    "finally mutates after the flag": "def describe(self):\n    try:\n        self._p_changed = True\n        return 1\n    finally:\n        self.log.append('done')\n",
    "heapq push into a slot": "import heapq\ndef describe(self, x):\n    heapq.heappush(self.queue, x)\n",
    "mutation in a match case": "def describe(self, command):\n    match command:\n        case 'reset':\n            self.items.clear()\n        case _:\n            self._p_changed = True\n    return command\n",
    "mutation inside a nested function": "def describe(self, x):\n    def add():\n        self.items.append(x)\n    add()\n    self._p_changed = True\n",
    "mutation inside a lambda": "def describe(self, xs):\n    list(map(lambda v: self.items.append(v), xs))\n    self._p_changed = True\n",
    "yield after a mutation": "def describe(self):\n    self.items.append(1)\n    yield 1\n    self._p_changed = True\n",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED | MUTATING))
def test_accepted(name: str) -> None:
    source = (ACCEPTED | MUTATING)[name]
    assert find_violations(source, "describe") == []
    node = audit(source, "describe")
    assert isinstance(node, ast.FunctionDef) and node.name == "describe"


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected(name: str) -> None:
    source, rule, line = REJECTED[name]
    with pytest.raises(GuardianViolation) as caught:
        audit(source, "describe")
    violation = caught.value
    assert (violation.rule, violation.line) == (rule, line), str(violation)
    assert str(violation) == f"{rule} (line {line}): {violation.message}"
    assert violation.message
    found = find_violations(source, "describe")
    assert found[0].rule == rule and found[0].line == line
    assert [v.line for v in found] == sorted(v.line for v in found)


def test_table_is_big_enough() -> None:
    assert len(ACCEPTED) + len(MUTATING) + len(REJECTED) >= 40
    assert len({rule for _, rule, _ in REJECTED.values()}) >= 14


def test_flag_false_is_rejected() -> None:
    source = REJECTED["_p_changed = False"][0]
    rules = [(v.rule, v.line) for v in find_violations(source, "describe")]
    assert rules == [("private-attribute", 3)]


def test_selector_must_be_public_identifier() -> None:
    for selector in ("_hidden", "__init__", "not valid", "class", ""):
        with pytest.raises(GuardianViolation) as caught:
            audit("def x(self):\n    return 1\n", selector)
        assert caught.value.rule == "missing-method"


def test_violation_pickles() -> None:
    violation = GuardianViolation("import", 3, "module 'os' is not on the allow-list")
    copy = pickle.loads(pickle.dumps(violation))
    assert (copy.rule, copy.line, copy.message, str(copy)) == (
        violation.rule,
        violation.line,
        violation.message,
        str(violation),
    )


def test_deep_nesting_is_rejected_not_crashing() -> None:
    source = "def describe(self):\n    return " + "-" * 50_000 + "1\n"
    found = find_violations(source, "describe")
    assert found and found[0].rule == "syntax-error"


def test_constants_are_consistent() -> None:
    assert not SAFE_BUILTIN_NAMES & FORBIDDEN_NAMES
    assert {"os", "sys", "subprocess", "socket", "typing", "importlib"}.isdisjoint(ALLOWED_MODULES)
    assert all("." not in name for name in ALLOWED_MODULES)


def test_covenant_examples_in_the_docs() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "GUARDIAN.md").read_text()
    block = text.split("### The Persistence Covenant", 1)[1].split("```python\n", 1)[1]
    block = block.split("```", 1)[0]
    sources = ["def add" + part for part in block.split("def add")[1:]]
    assert len(sources) == 2
    assert [find_violations(s, "add") for s in sources] == [[], []]
