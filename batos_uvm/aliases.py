"""Which names in a generated method stand for ``self`` or for data reached from it.

The Guardian uses this to tell the model precisely when code assigns attributes
of something other than self (``o = self.parents[0]; o.x = 1``): in a cell such
a write would fail at run time; the audit says so before any run. Standard
library only; see docs/GUARDIAN.md.
"""

from __future__ import annotations

import ast

TYPE_CHECKING = False
if TYPE_CHECKING:  # a cell imports this module: keep its start-up free of typing
    from collections.abc import Iterable, Iterator

# Calls whose result is still part of the receiver (self.d.get(k).append(x)).
_PASS_THROUGH_CALLS = frozenset({"get", "setdefault"})
# Iterating these yields elements that belong to self's data.
_ELEMENT_CALLS = frozenset(
    {"enumerate", "reversed", "sorted", "zip", "iter", "filter", "list", "tuple", "set"}
)
_ELEMENT_METHODS = frozenset({"items", "values", "keys", "copy"})

_SELF, _DATA = 1, 2  # what an expression is rooted at


def is_clean_statement(node: ast.AST) -> bool:
    """Whether ``node`` is exactly ``self._p_changed = True``."""
    return (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Attribute)
        and node.targets[0].attr == "_p_changed"
        and isinstance(node.targets[0].value, ast.Name)
        and node.targets[0].value.id == "self"
        and isinstance(node.value, ast.Constant)
        and node.value.value is True
    )


def flatten(targets: Iterable[ast.expr]) -> Iterator[ast.expr]:
    """Assignment targets with tuple/list unpacking and starred names taken apart."""
    for t in targets:
        if isinstance(t, (ast.Tuple, ast.List)):
            yield from flatten(t.elts)
        elif isinstance(t, ast.Starred):
            yield from flatten([t.value])
        else:
            yield t


def show(node: ast.AST, limit: int = 40) -> str:
    """``node`` as source, shortened for a violation message."""
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."



class Aliases:
    """Local names bound to self (``s = self``) or to self's data (``items = self.items``).

    Flow-insensitive: a name that is ever bound to self's data counts as an
    alias everywhere in the method, which errs on the side of reporting.
    """

    def __init__(self, method: ast.FunctionDef | None) -> None:
        self.of_self: set[str] = set()
        self.of_data: set[str] = set()
        if method is None:
            return
        nodes = list(ast.walk(method))
        changed = True
        while changed:
            before = len(self.of_self) + len(self.of_data)
            for node in nodes:
                self._collect(node)
            changed = len(self.of_self) + len(self.of_data) != before

    def _collect(self, node: ast.AST) -> None:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                self._bind(target, node.value)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
            self._bind(node.target, node.value)
        elif isinstance(node, (ast.For, ast.comprehension)):
            if self.element_root(node.iter):
                self._bind_all(node.target, _DATA)
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            self._bind(node.optional_vars, node.context_expr)
        elif isinstance(node, ast.Match) and self.root(node.subject):
            for case in node.cases:
                for sub in ast.walk(case.pattern):
                    if isinstance(sub, (ast.MatchAs, ast.MatchStar)) and sub.name:
                        self.of_data.add(sub.name)

    def _bind(self, target: ast.expr, value: ast.expr) -> None:
        if (
            isinstance(target, (ast.Tuple, ast.List))
            and isinstance(value, (ast.Tuple, ast.List))
            and len(target.elts) == len(value.elts)
            and not any(isinstance(e, ast.Starred) for e in target.elts + value.elts)
        ):
            for t, v in zip(target.elts, value.elts, strict=True):
                self._bind(t, v)
            return
        root = self.root(value)
        if isinstance(target, ast.Name):
            if root == _SELF and target.id != "self":
                self.of_self.add(target.id)
            elif root == _DATA:
                self.of_data.add(target.id)
        elif root:
            self._bind_all(target, _DATA)

    def _bind_all(self, target: ast.expr, root: int) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and node.id != "self":
                (self.of_self if root == _SELF else self.of_data).add(node.id)

    def root(self, expr: ast.expr) -> int | None:
        """_SELF for self (or an alias), _DATA for anything reached from it, else None."""
        stepped = False
        while True:
            if isinstance(expr, (ast.Attribute, ast.Subscript)):
                expr, stepped = expr.value, True
            elif (
                isinstance(expr, ast.Call)
                and isinstance(expr.func, ast.Attribute)
                and expr.func.attr in _PASS_THROUGH_CALLS
            ):
                if self.root(expr.func.value) != _DATA:
                    return None
                return _DATA
            elif isinstance(expr, (ast.NamedExpr, ast.Starred)):
                expr = expr.value
            elif isinstance(expr, ast.IfExp):
                return self._widest(self.root(expr.body), self.root(expr.orelse))
            elif isinstance(expr, ast.BoolOp):
                return self._widest(*(self.root(v) for v in expr.values))
            elif isinstance(expr, ast.Name):
                if expr.id == "self" or expr.id in self.of_self:
                    return _DATA if stepped else _SELF
                return _DATA if expr.id in self.of_data else None
            else:
                return None

    @staticmethod
    def _widest(*roots: int | None) -> int | None:
        return _DATA if _DATA in roots else (_SELF if _SELF in roots else None)

    def element_root(self, iterable: ast.expr) -> bool:
        """Whether iterating ``iterable`` yields pieces of self's data."""
        if self.root(iterable):
            return True
        if isinstance(iterable, ast.Call):
            func = iterable.func
            if isinstance(func, ast.Name) and func.id in _ELEMENT_CALLS:
                return any(self.element_root(a) for a in iterable.args)
            if isinstance(func, ast.Attribute) and func.attr in _ELEMENT_METHODS:
                return self.root(func.value) is not None
        return False
