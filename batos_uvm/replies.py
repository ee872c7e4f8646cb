"""Reading what the personas answer: catalog queries, and a method out of a messy reply.

Small models wrap the method in a class, follow it with example usage, put
imports at the top or forget them, recurse with a bare ``factorial(n - 1)``,
and write examples with Python's ``True`` where JSON wants ``true``.
:func:`parse_synthesis` keeps only the function named after the selector
(wherever it is), takes the imports it needs along, adds missing imports of
standard modules, makes bare recursive calls ``self.NAME(...)``, and reads
examples leniently. What it cannot repair it reports as a problem; the
Guardian and the trial judge the rest. See docs/CYCLE.md.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from .guardian import ALLOWED_MODULES, PARSE_LOCK

MAX_CODE_CHARS = 20_000
MAX_EXAMPLES = 20

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)

# Names small models use without importing them, and the import that provides them.
_BARE_NAMES = {
    "Counter": "from collections import Counter",
    "defaultdict": "from collections import defaultdict",
    "OrderedDict": "from collections import OrderedDict",
    "deque": "from collections import deque",
    "reduce": "from functools import reduce",
    "timedelta": "from datetime import timedelta",
    "date": "from datetime import date",
    "Decimal": "from decimal import Decimal",
    "Fraction": "from fractions import Fraction",
}
# ``datetime.now()`` without an import means the class, not the module.
_DATETIME_CLASS_ATTRS = {"now", "today", "utcnow", "strptime", "fromtimestamp", "fromisoformat",
                         "combine", "min", "max"}  # fmt: skip


@dataclass
class SynthesisReply:
    """A method read out of a reply: its source, the model's examples, and what was repaired."""

    code: str
    examples: list[dict[str, Any]] | None = None
    problem: str | None = None
    repairs: list[str] = field(default_factory=list)
    dropped_examples: str | None = None  # why the model's examples were not used


def parse_queries(reply: str) -> list[str] | None:
    text = reply.strip()
    match = re.search(r"\[.*\]", text, re.S)
    try:
        value = json.loads(match.group(0) if match else text)
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(value, list) or not value or not all(isinstance(q, str) for q in value):
        return None
    queries = [q.strip()[:200] for q in value if q.strip()][:5]
    return queries or None


def parse_synthesis(reply: str, selector: str) -> SynthesisReply:
    """The method named ``selector`` from a SYNTHESIZING reply, repaired where that is safe."""
    blocks = _FENCE.findall(reply)
    code_blocks = [body for lang, body in blocks if lang.lower() in {"python", "py", "python3", ""}]
    json_blocks = [body for lang, body in blocks if lang.lower() == "json"]
    candidates = code_blocks or ([] if blocks else [reply])
    result: SynthesisReply | None = None
    for text in candidates:  # the first block that holds the method wins
        result = extract_method(text, selector)
        if result.problem is None:
            break
    if result is None:
        return SynthesisReply("", problem="the reply holds no code")
    if json_blocks and result.problem is None:
        result.examples, result.dropped_examples = read_examples(json_blocks[0])
    return result


def extract_method(text: str, selector: str) -> SynthesisReply:
    """Keep the function ``selector`` of ``text`` (top level or in a class) and what it needs."""
    text = text.strip("\n")
    if not text.strip():
        return SynthesisReply("", problem="the reply holds no code")
    if len(text) > MAX_CODE_CHARS:
        return SynthesisReply(
            text[:MAX_CODE_CHARS], problem=f"the code is longer than {MAX_CODE_CHARS} characters"
        )
    tree, source = _parse_leniently(text)
    found = _find_function(tree, selector) if tree is not None else None
    if tree is None or found is None:
        return SynthesisReply(text)  # the Guardian names the syntax error or what is missing
    function, owner = found
    lines = source.splitlines()
    # lineno is the ``def`` line: decorators (which the Guardian refuses) stay behind
    body = textwrap.dedent("\n".join(lines[function.lineno - 1 : function.end_lineno]))
    repairs = []
    if owner is not None:
        repairs.append(f"took the method out of class {owner.name}")
    elif len(tree.body) > 1 or function.decorator_list:
        repairs.append("kept only the function named after the selector")
    body, added = insert_first(body, _needed_helpers(tree, function, source, selector))
    body, fixed = _self_calls(body, selector)
    if fixed:
        repairs.append(f"called {selector} through self")
    body, renamed = public_attributes(body)
    repairs += renamed
    body, unused = drop_unused_imports(body)
    repairs += unused
    method = parse_code(body)
    if method is not None and isinstance(method.body[0], ast.FunctionDef):
        body, imports = insert_first(body, _needed_imports(tree, method.body[0], source))
        added += imports
    if added:
        repairs.append("added " + "; ".join(a.splitlines()[0] for a in added))
    return SynthesisReply(body.rstrip() + "\n", repairs=repairs)


def parse_code(text: str) -> ast.Module | None:
    try:
        with PARSE_LOCK:
            return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _parse_leniently(text: str) -> tuple[ast.Module | None, str]:
    """Parse ``text``; if it fails, drop trailing lines (cut-off usage, prose) until it parses."""
    tree = parse_code(text)
    if tree is not None:
        return tree, text
    lines = text.splitlines()
    for end in range(len(lines) - 1, 0, -1):
        candidate = "\n".join(lines[:end])
        if not re.search(r"^\s*def ", candidate, re.M):
            break
        tree = parse_code(candidate)
        if tree is not None:
            return tree, candidate
    return None, text


def _find_function(
    tree: ast.Module, selector: str
) -> tuple[ast.FunctionDef, ast.ClassDef | None] | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == selector:
            return node, None
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == selector:
                    params = item.args.posonlyargs + item.args.args
                    if params and params[0].arg == "self":
                        return item, node
    return None


def _bound_names(function: ast.FunctionDef) -> set[str]:
    names = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.Lambda)) and node is not function:
            if isinstance(node, ast.FunctionDef):
                names.add(node.name)
            names.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _free_names(function: ast.FunctionDef) -> dict[str, set[str]]:
    """Names read but never bound in the function, each with the attributes read from it."""
    bound = _bound_names(function)
    free: dict[str, set[str]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
            free.setdefault(node.id, set())
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id not in bound:
                free.setdefault(node.value.id, set()).add(node.attr)
    return free


def _needed_helpers(
    tree: ast.Module, function: ast.FunctionDef, source: str, selector: str
) -> list[str]:
    """Top-level helper functions the method calls, to be nested inside it."""
    free = _free_names(function)
    return [
        textwrap.dedent(ast.get_source_segment(source, node) or "")
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name != selector and node.name in free
    ]


def _needed_imports(tree: ast.Module, function: ast.FunctionDef, source: str) -> list[str]:
    """Import statements the function needs: the reply's own top-level ones, else standard ones."""
    free = _free_names(function)
    wanted: list[str] = []
    provided: set[str] = set()
    for node in tree.body:  # imports the model wrote at the top of the reply
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = {(a.asname or a.name).split(".")[0] for a in node.names}
            if names & set(free):
                wanted.append(ast.get_source_segment(source, node) or "")
                provided |= names
    for name, attrs in free.items():
        if name in provided:
            continue
        if name == "datetime" and attrs and attrs <= _DATETIME_CLASS_ATTRS:
            wanted.append("from datetime import datetime")
        elif name in ALLOWED_MODULES:
            wanted.append(f"import {name}")
        elif name in _BARE_NAMES:
            wanted.append(_BARE_NAMES[name])
    return [w for w in dict.fromkeys(wanted) if w]


def _unfold(body: str, function: ast.FunctionDef) -> str | None:
    """``def f(self): a = 1; return a`` as a def line and an indented body; None if it isn't one."""
    if function.end_lineno != function.lineno:
        return None
    lines = body.splitlines()
    line = lines[function.lineno - 1].encode()
    header = line[: function.body[0].col_offset].decode(errors="replace").rstrip()
    indent = " " * (function.col_offset + 4)
    statements = [ast.get_source_segment(body, node) for node in function.body]
    if not header.endswith(":") or not all(statements):
        return None
    lines[function.lineno - 1 : function.lineno] = [header, *(indent + s for s in statements)]
    return "\n".join(lines)


def insert_first(body: str, statements: list[str]) -> tuple[str, list[str]]:
    """Insert ``statements`` (imports, helper functions) at the start of the function body."""
    if not statements:
        return body, []
    tree = parse_code(body)
    if tree is None or not tree.body or not isinstance(tree.body[0], ast.FunctionDef):
        return body, []
    function = tree.body[0]
    first = function.body[0]
    if first.lineno == function.lineno:  # ``def f(self): return 1`` on one line
        unfolded = _unfold(body, function)
        return insert_first(unfolded, statements) if unfolded else (body, [])
    is_doc = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    if is_doc and len(function.body) > 1:
        anchor = function.body[1]
        index, indent = anchor.lineno - 1, " " * anchor.col_offset
    elif is_doc:
        index, indent = first.end_lineno, " " * first.col_offset
    else:
        index, indent = first.lineno - 1, " " * first.col_offset
    lines = body.splitlines()
    block = [indent + line if line.strip() else "" for s in statements for line in s.splitlines()]
    lines[index:index] = block
    fixed = "\n".join(lines)
    return (fixed, statements) if parse_code(fixed) is not None else (body, [])


def _self_calls(body: str, selector: str) -> tuple[str, bool]:
    """``factorial(n - 1)`` inside method ``factorial`` becomes ``self.factorial(n - 1)``."""
    tree = parse_code(body)
    if tree is None or not tree.body or not isinstance(tree.body[0], ast.FunctionDef):
        return body, False
    function = tree.body[0]
    if selector in _bound_names(function):
        return body, False
    spots = sorted(
        ((node.func.lineno, node.func.col_offset) for node in ast.walk(function)
         if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == selector),
        reverse=True,
    )  # fmt: skip
    if not spots:
        return body, False
    lines = body.splitlines()
    for lineno, col in spots:
        line = lines[lineno - 1]
        # ast offsets count UTF-8 bytes; convert to a character index
        prefix = line.encode("utf-8")[:col].decode("utf-8", "replace")
        lines[lineno - 1] = line[: len(prefix)] + "self." + line[len(prefix) :]
    fixed = "\n".join(lines)
    return (fixed, True) if parse_code(fixed) is not None else (body, False)


def read_examples(text: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The model's examples, read leniently; (None, why) when they are unusable.

    Examples are advisory: unusable ones are dropped, never a reason to refuse code.
    """
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text.strip())  # True/None/'single quotes': Python literals
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None, "the examples block is neither JSON nor a Python literal"
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return None, "the examples block is not a list"
    kept = []
    for example in value[:MAX_EXAMPLES]:
        if not isinstance(example, dict) or set(example) - {"args", "kwargs", "expect"}:
            continue
        args, kwargs = example.get("args", []), example.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            continue
        if not all(isinstance(k, str) for k in kwargs):
            continue
        kept.append(example)
    if not kept:
        return None, 'no example has the form {"args": [...], "expect": ...}'
    return kept, None


_PRIVATE_SELF = re.compile(r"\bself\._(?!p_changed\b)([A-Za-z]\w*)")
_PRIVATE_NAME_ARG = re.compile(
    r"((?:get|has|set|del)attr\(\s*self\s*,\s*)(['\"])_(?!p_changed)([A-Za-z]\w*)\2"
)


def public_attributes(code: str) -> tuple[str, list[str]]:
    """``self._count`` -> ``self.count`` (and in getattr/hasattr/setattr of self).

    Models write private names out of habit; the Guardian refuses them. The
    object's data lives in public slots anyway, so dropping the underscore
    keeps the meaning.
    """
    renamed = sorted(
        set(_PRIVATE_SELF.findall(code)) | {m[2] for m in _PRIVATE_NAME_ARG.findall(code)}
    )
    if not renamed:
        return code, []
    fixed = _PRIVATE_NAME_ARG.sub(
        lambda m: f"{m[1]}{m[2]}{m[3]}{m[2]}", _PRIVATE_SELF.sub(r"self.\1", code)
    )
    if parse_code(fixed) is None:
        return code, []
    return fixed, [f"renamed self._{name} to self.{name}" for name in renamed]


def drop_unused_imports(code: str) -> tuple[str, list[str]]:
    """Remove imports at the top of the method that nothing in it uses.

    Small models import every module the prompt names, and some it does not
    (one added ``import sqlite3`` to a method that only read the clock); an
    unused import can only get a correct method refused.
    """
    tree = parse_code(code)
    if tree is None or not tree.body or not isinstance(tree.body[0], ast.FunctionDef):
        return code, []
    function = tree.body[0]
    used = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
    lines = code.splitlines()
    dropped: list[str] = []
    for node in reversed(function.body):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno != node.end_lineno:
            continue
        names = [(a.asname or a.name).split(".")[0] for a in node.names]
        if any(name in used for name in names):
            continue
        dropped += [a.name for a in node.names]
        del lines[node.lineno - 1]
    if not dropped:
        return code, []
    fixed = "\n".join(lines) + "\n"
    if parse_code(fixed) is None:  # the method held nothing but imports
        return code, []
    return fixed, [f"dropped unused imports: {', '.join(sorted(dropped))}"]
