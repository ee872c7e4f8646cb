"""Repairs of what a small model writes about the object's own state.

An object has no data before a method first stores some, and small models
still write ``self.notes.append(text)`` on the first call; some, taught by old
code, also treat ``self._p_changed`` as data (the kernel records changes of
self itself: the flag is never needed). These repairs fix those ways
mechanically, and the Guardian reads the result.
See docs/CYCLE.md ("Reading the reply").
"""

from __future__ import annotations

import ast

from .replies import insert_first, parse_code


def _own_nodes(function: ast.FunctionDef) -> list[ast.AST]:
    """The nodes of ``function`` outside nested functions, lambdas and classes."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
            ):
                stack.append(child)
    return found


_LIST_METHODS = {"append", "extend", "insert", "pop", "remove", "sort", "reverse", "index"}
_DICT_METHODS = {"get", "keys", "values", "items", "update", "setdefault"}
_SET_METHODS = {"add", "discard"}


def initialise_slots(code: str, existing: set[str] | frozenset[str]) -> tuple[str, list[str]]:
    """Give data the method reads from self, but never initialises, a starting value.

    On its first call an object has no ``notes`` yet, and small models write
    ``self.notes.append(text)`` all the same. For each such attribute not in
    ``existing`` whose kind shows in its use (``.append`` -> [], ``.get`` or
    ``[key] =`` -> {}, ``+= 1`` -> 0), the method starts with
    ``if not hasattr(self, "notes"): self.notes = []``.
    """
    tree = parse_code(code)
    if tree is None or not tree.body or not isinstance(tree.body[-1], ast.FunctionDef):
        return code, []
    function = tree.body[-1]
    checked = _checked_names(function)
    first_use: dict[str, int] = {}
    kinds: dict[str, str] = {}
    assigned_first: set[str] = set()
    for node in function.body:  # an unconditional ``self.x = ...`` first: nothing to do
        if isinstance(node, ast.Assign) and all(_self_attr(t) for t in node.targets):
            assigned_first.update(_self_attr(t) for t in node.targets)
        else:
            break
    for node in ast.walk(function):
        name = _self_attr(node)
        if name is None:
            continue
        first_use[name] = min(first_use.get(name, node.lineno), node.lineno)
        kind = _kind_of_use(node, function)
        if kind and name not in kinds:
            kinds[name] = kind
    fresh = sorted(
        (name for name in kinds
         if name not in existing and name not in checked and name not in assigned_first
         and not name.startswith("_")),
        key=lambda n: first_use[n],
    )  # fmt: skip
    if not fresh:
        return code, []
    statements = [
        f"if not hasattr(self, {name!r}):\n    self.{name} = {kinds[name]}" for name in fresh
    ]
    fixed, added = insert_first(code, statements)
    return fixed, [f"self.{name} starts as {kinds[name]}" for name in fresh] if added else []


def _self_attr(node: ast.AST) -> str | None:
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    ):
        return node.attr
    return None


def _checked_names(function: ast.FunctionDef) -> set[str]:
    """Attributes the method itself looks up with a default (getattr/hasattr/try)."""
    names = set()
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            names.add(str(node.args[1].value))
        if isinstance(node, ast.Try):
            names.update(n for t in node.body for s in ast.walk(t) if (n := _self_attr(s)))
    return names


def _kind_of_use(node: ast.Attribute, function: ast.FunctionDef) -> str | None:
    """The starting value a use of ``self.x`` implies, or None when it shows none."""
    parent = _parents(function).get(id(node))
    if isinstance(parent, ast.Attribute) and parent.value is node:
        method = parent.attr
        if method in _LIST_METHODS:
            return "[]"
        if method in _DICT_METHODS:
            return "{}"
        if method in _SET_METHODS:
            return "set()"
    if isinstance(parent, ast.Subscript) and parent.value is node:
        if isinstance(parent.ctx, ast.Store):
            return "{}"
    if isinstance(parent, ast.AugAssign) and parent.target is node:
        value = parent.value
        if isinstance(value, ast.JoinedStr) or (
            isinstance(value, ast.Constant) and isinstance(value.value, str)
        ):
            return "''"
        if isinstance(value, (ast.List, ast.ListComp)):
            return "[]"
        return "0"
    return None


def _parents(function: ast.FunctionDef) -> dict[int, ast.AST]:
    return {id(child): node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}


def drop_flag_misuse(code: str) -> tuple[str, list[str]]:
    """Remove statements that treat ``self._p_changed`` as data.

    Told to set the flag, small models also write ``self._p_changed = False``
    or ``if not hasattr(self, '_p_changed'): ...``. Those statements go (the
    Guardian refuses them).
    """
    tree = parse_code(code)
    if tree is None or not tree.body or not isinstance(tree.body[-1], ast.FunctionDef):
        return code, []
    doomed: list[tuple[int, int]] = []
    for node in _own_nodes(tree.body[-1]):
        if _misuses_flag(node):
            doomed.append((node.lineno, node.end_lineno or node.lineno))
    if not doomed:
        return code, []
    outermost = [
        r for r in doomed if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in doomed)
    ]
    lines = code.splitlines()
    for start, end in sorted(set(outermost), reverse=True):
        del lines[start - 1 : end]
    fixed = "\n".join(lines) + "\n"
    if parse_code(fixed) is None:
        return code, []
    return fixed, ["dropped statements that used self._p_changed as data"]


def _misuses_flag(node: ast.AST) -> bool:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        flag = _self_attr(target) == "_p_changed"
        return flag and not (isinstance(node.value, ast.Constant) and node.value.value is True)
    if isinstance(node, ast.If) and not node.orelse:
        mentions = any(
            (isinstance(n, ast.Constant) and n.value == "_p_changed")
            or _self_attr(n) == "_p_changed"
            for n in ast.walk(node.test)
        )
        return mentions and all(_misuses_flag(s) or _is_flag_true(s) for s in node.body)
    return False


def _is_flag_true(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and _self_attr(node.targets[0]) == "_p_changed"
        and isinstance(node.value, ast.Constant)
        and node.value.value is True
    )


def repair_state(code: str, existing: set[str] | frozenset[str]) -> tuple[str, list[str]]:
    """The state repairs made before the Guardian reads a method (see docs/CYCLE.md)."""
    code, dropped = drop_flag_misuse(code)
    code, started = initialise_slots(code, existing)
    return code, dropped + started
