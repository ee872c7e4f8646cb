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
        src("def describe(self, seen=[]):", "    return seen"), "mutable-default", 1),
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
    # -- the Persistence Covenant ------------------------------------------------
    "append then return": (
        src("def describe(self, x):", "    self.items.append(x)", "    return x"),
        "persistence-covenant",
        3,
    ),
    "falling off the end": (
        src("def describe(self, x):", "    self.items.append(x)", "    print(x)"),
        "persistence-covenant",
        3,
    ),
    "flag on one branch only": (
        src(
            "def describe(self, x):",
            "    self.items.append(x)",
            "    if x:",
            "        self._p_changed = True",
            "    return x",
        ),
        "persistence-covenant",
        5,
    ),
    "mutation nested in if/for/while": (
        src(
            "def describe(self, xs):",
            "    if xs:",
            "        for x in xs:",
            "            while x > 0:",
            "                self.items.append(x)",
            "                x -= 1",
            "    return len(xs)",
        ),
        "persistence-covenant",
        7,
    ),
    "mutation inside with": (
        src(
            "import decimal",
            "def describe(self, x):",
            "    with decimal.localcontext():",
            "        self.total = decimal.Decimal(x)",
            "    return x",
        ),
        "persistence-covenant",
        5,
    ),
    "exception swallowed between mutation and flag": (
        src(
            "def describe(self, x):",
            "    try:",
            "        self.items.append(x)",
            "        self.check(x)",
            "        self._p_changed = True",
            "    except ValueError:",
            "        pass",
            "    return x",
        ),
        "persistence-covenant",
        8,
    ),
    "early return after the mutation": (
        src(
            "def describe(self, x):",
            "    self.items.append(x)",
            "    if not x:",
            "        return None",
            "    self._p_changed = True",
            "    return x",
        ),
        "persistence-covenant",
        4,
    ),
    "augmented assignment": (
        src("def describe(self):", "    self.count += 1", "    return self.count"),
        "persistence-covenant",
        3,
    ),
    "subscript assignment": (
        src("def describe(self, k, v):", "    self.data[k] = v"),
        "persistence-covenant",
        2,
    ),
    "attribute of a slot": (
        src("def describe(self, v):", "    self.config.level = v", "    return v"),
        "persistence-covenant",
        3,
    ),
    "del of a slot entry": (
        src("def describe(self, k):", "    del self.cache[k]", "    return k"),
        "persistence-covenant",
        3,
    ),
    "setattr on self": (
        src("def describe(self, v):", "    setattr(self, 'name', v)", "    return v"),
        "persistence-covenant",
        3,
    ),
    "alias mutation": (
        src(
            "def describe(self, x):",
            "    items = self.items",
            "    items.append(x)",
            "    return x",
        ),
        "persistence-covenant",
        4,
    ),
    "alias through a loop variable": (
        src(
            "def describe(self):",
            "    for row in self.rows:",
            "        row.append(0)",
            "    return 1",
        ),
        "persistence-covenant",
        4,
    ),
    "flag inside the loop before a later mutation": (
        src(
            "def describe(self, xs):",
            "    for x in xs:",
            "        self._p_changed = True",
            "        self.items.append(x)",
            "    return len(self.items)",
        ),
        "persistence-covenant",
        5,
    ),
    "break skips the flag": (
        src(
            "def describe(self, xs):",
            "    for x in xs:",
            "        self.items.append(x)",
            "        if x is None:",
            "            break",
            "        self._p_changed = True",
            "    return len(xs)",
        ),
        "persistence-covenant",
        7,
    ),
    "continue skips the flag": (
        src(
            "def describe(self, xs):",
            "    for x in xs:",
            "        self.items.append(x)",
            "        if x is None:",
            "            continue",
            "        self._p_changed = True",
        ),
        "persistence-covenant",
        6,
    ),
    "finally mutates after the flag": (
        src(
            "def describe(self):",
            "    try:",
            "        self._p_changed = True",
            "        return 1",
            "    finally:",
            "        self.log.append('done')",
        ),
        "persistence-covenant",
        4,
    ),
    "heapq push into a slot": (
        src("import heapq", "def describe(self, x):", "    heapq.heappush(self.queue, x)"),
        "persistence-covenant",
        3,
    ),
    "mutation in a match case": (
        src(
            "def describe(self, command):",
            "    match command:",
            "        case 'reset':",
            "            self.items.clear()",
            "        case _:",
            "            self._p_changed = True",
            "    return command",
        ),
        "persistence-covenant",
        7,
    ),
    "mutation inside a nested function": (
        src(
            "def describe(self, x):",
            "    def add():",
            "        self.items.append(x)",
            "    add()",
            "    self._p_changed = True",
        ),
        "persistence-covenant",
        3,
    ),
    "mutation inside a lambda": (
        src(
            "def describe(self, xs):",
            "    list(map(lambda v: self.items.append(v), xs))",
            "    self._p_changed = True",
        ),
        "persistence-covenant",
        2,
    ),
    "yield after a mutation": (
        src(
            "def describe(self):",
            "    self.items.append(1)",
            "    yield 1",
            "    self._p_changed = True",
        ),
        "persistence-covenant",
        3,
    ),
    "too large": ("x = 1\n" * 20_000, "source-size", 1),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted(name: str) -> None:
    source = ACCEPTED[name]
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
    assert len(ACCEPTED) + len(REJECTED) >= 40
    assert len({rule for _, rule, _ in REJECTED.values()}) >= 15


def test_covenant_message_names_mutation_and_exit() -> None:
    source = src("def add(self, x):", "    self.items.append(x)", "    return x")
    [violation] = find_violations(source, "add")
    assert str(violation) == (
        "persistence-covenant (line 3): self.items is mutated on line 2 by .append() but "
        "self._p_changed = True is not set afterwards on every path (the return on line 3 "
        "can be reached without it)"
    )


def test_every_offending_exit_is_reported() -> None:
    source = src(
        "def add(self, x):",
        "    self.items.append(x)",
        "    if x:",
        "        return 1",
        "    if x is None:",
        "        return 2",
        "    self._p_changed = True",
        "    return 3",
    )
    found = find_violations(source, "add")
    assert [(v.rule, v.line) for v in found] == [
        ("persistence-covenant", 4),
        ("persistence-covenant", 6),
    ]


def test_flag_false_is_rejected_and_does_not_count() -> None:
    source = REJECTED["_p_changed = False"][0]
    rules = [(v.rule, v.line) for v in find_violations(source, "describe")]
    assert rules == [("private-attribute", 3), ("persistence-covenant", 4)]


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
    outcomes = [[(v.rule, v.line) for v in find_violations(s, "add")] for s in sources]
    assert outcomes == [[("persistence-covenant", 4)], [("persistence-covenant", 5)], []]
