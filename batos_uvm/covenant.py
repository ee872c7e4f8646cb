"""The Persistence Covenant: a dataflow check over one generated method.

A method that mutates state of ``self`` must set ``self._p_changed = True``
after its last mutation on every path that leaves it normally (paths that
raise are exempt: the transaction aborts). ZODB cannot see in-place changes to
plain containers, so a missing flag silently loses the change at commit.

The covenant is checked by a small path-sensitive dataflow over statements
(loops iterate to a fixpoint; try/except/else/finally, break and continue are
followed). A covenant violation is reported on the line of the offending exit:
the ``return`` statement, the ``yield``, or the function's last line when the
end of the body is reached. Mutations inside nested functions or lambdas are
reported on the mutation's line, since when they run cannot be known.

guardian.py runs this check after its policy checks and shares the AST
helpers defined here. Standard library only; see docs/GUARDIAN.md.
"""

from __future__ import annotations

import ast

TYPE_CHECKING = False
if TYPE_CHECKING:  # keep the trial child's start-up free of typing/dataclasses
    from collections.abc import Callable, Iterable, Iterator

    #: Reports one violation: (rule id, node or line, message).
    Report = Callable[[str, ast.AST | int, str], None]

MAX_ANALYSIS_STEPS = 50_000  # statement visits of the covenant check: bounds guardian time

#: Method names that change their receiver in place.
MUTATOR_METHODS: frozenset[str] = frozenset(
    "append extend insert remove pop popitem clear update setdefault add discard sort reverse "
    "difference_update intersection_update symmetric_difference_update appendleft extendleft "
    "popleft rotate move_to_end subtract".split()
)

#: Functions that change their first argument in place (heapq, bisect, random, operator).
MUTATING_FUNCTIONS: frozenset[str] = frozenset(
    "heappush heappop heapify heappushpop heapreplace insort insort_left insort_right shuffle "
    "setitem delitem iadd iconcat isub ior iand ixor imul".split()
)

# Calls whose result is still part of the receiver (self.d.get(k).append(x)).
_PASS_THROUGH_CALLS = frozenset({"get", "setdefault"})
# Iterating these yields elements that belong to self's data.
_ELEMENT_CALLS = frozenset(
    {"enumerate", "reversed", "sorted", "zip", "iter", "filter", "list", "tuple", "set"}
)
_ELEMENT_METHODS = frozenset({"items", "values", "keys", "copy"})

_SELF, _DATA = 1, 2  # what an expression is rooted at


class TooComplex(Exception):
    """The method's control flow exceeds MAX_ANALYSIS_STEPS."""


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


def _walk_scope(node: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``node`` that run with it: no nested function or lambda bodies."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        for child in ast.iter_child_nodes(current):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                # decorators and defaults run here; the body does not
                stack.extend(getattr(child, "decorator_list", []))
                stack.extend(child.args.defaults if hasattr(child, "args") else [])
                continue
            stack.append(child)


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


State = frozenset  # of (line, what, how): mutations not yet followed by _p_changed = True


def _join(*states: State | None) -> State | None:
    result = None
    for s in states:
        if s is not None:
            result = s if result is None else result | s
    return result


class _Flow:
    """How control leaves a block: each exit kind with the joined state reaching it."""

    __slots__ = ("normal", "breaks", "continues", "returns", "raises")

    def __init__(
        self,
        normal: State | None,
        breaks: State | None = None,
        continues: State | None = None,
        returns: list[tuple[State, int]] | None = None,
        raises: State | None = None,
    ) -> None:
        self.normal, self.breaks, self.continues = normal, breaks, continues
        self.returns = returns if returns is not None else []
        self.raises = raises

    def absorb(self, other: _Flow) -> None:
        """Take over ``other``'s non-normal exits."""
        self.breaks = _join(self.breaks, other.breaks)
        self.continues = _join(self.continues, other.continues)
        self.returns.extend(r for r in other.returns if r not in self.returns)
        self.raises = _join(self.raises, other.raises)


class Covenant:
    """Path-sensitive check that every normal exit follows ``self._p_changed = True``."""

    def __init__(self, method: ast.FunctionDef, aliases: Aliases, add: Report) -> None:
        self.method, self.aliases, self.add = method, aliases, add
        self.yield_issues: dict[int, State] = {}
        # (statement, entry state) -> flow: nested loops re-run their bodies while
        # iterating to a fixpoint; without this the work grows exponentially with depth
        self.seen: dict[tuple[int, State], _Flow] = {}
        self.budget = MAX_ANALYSIS_STEPS

    def run(self) -> None:
        """Report every breach of the covenant in the method through ``add``."""
        for node in ast.walk(self.method):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and (
                node is not self.method
            ):
                body = node.body if isinstance(node.body, list) else [node.body]
                for stmt in body:
                    for line, what, _how in self._mutations(stmt):
                        self.add(
                            "persistence-covenant",
                            line,
                            f"{what} is mutated inside a "
                            "nested function or lambda; mutate self in the method body, "
                            "followed by self._p_changed = True",
                        )
        flow = self.block(self.method.body, frozenset())
        exits = [(state, line, f"the return on line {line}") for state, line in flow.returns]
        if flow.normal:
            end = self.method.end_lineno or self.method.lineno
            exits.append((flow.normal, end, "the end of the method"))
        exits += [(s, line, f"the yield on line {line}") for line, s in self.yield_issues.items()]
        for state, line, where in exits:
            if state:
                self.add(
                    "persistence-covenant",
                    line,
                    f"{_describe(state)} but "
                    "self._p_changed = True is not set afterwards on every path "
                    f"({where} can be reached without it)",
                )

    # -- blocks and statements ------------------------------------------------
    def block(self, stmts: list[ast.stmt], state: State | None) -> _Flow:
        flow = _Flow(normal=state)
        for stmt in stmts:
            if flow.normal is None:
                break  # unreachable
            inner = self.stmt(stmt, flow.normal)
            flow.absorb(inner)
            flow.normal = inner.normal
        return flow

    def stmt(self, node: ast.stmt, state: State) -> _Flow:
        key = (id(node), state)
        flow = self.seen.get(key)
        if flow is None:
            self.budget -= 1
            if self.budget < 0:
                raise TooComplex
            handler = getattr(self, "_" + type(node).__name__, self._simple)
            flow = self.seen[key] = handler(node, state)
        return flow

    def _simple(self, node: ast.stmt, state: State) -> _Flow:
        after = self._effect(node, state)
        if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in _walk_scope(node)):
            # a consumer may stop iterating here: the yield is an exit
            self.yield_issues[node.lineno] = _join(self.yield_issues.get(node.lineno), after)
        return _Flow(normal=after, raises=_join(state, after))

    def _Assign(self, node: ast.Assign, state: State) -> _Flow:
        if is_clean_statement(node):
            return _Flow(normal=frozenset(), raises=state)
        return self._simple(node, state)

    def _Return(self, node: ast.Return, state: State) -> _Flow:
        after = self._effect(node, state)
        return _Flow(normal=None, returns=[(after, node.lineno)], raises=_join(state, after))

    def _Raise(self, node: ast.Raise, state: State) -> _Flow:
        return _Flow(normal=None, raises=self._effect(node, state))

    def _Break(self, node: ast.Break, state: State) -> _Flow:
        return _Flow(normal=None, breaks=state)

    def _Continue(self, node: ast.Continue, state: State) -> _Flow:
        return _Flow(normal=None, continues=state)

    def _If(self, node: ast.If, state: State) -> _Flow:
        state = self._effect(node.test, state)
        body, orelse = self.block(node.body, state), self.block(node.orelse, state)
        flow = _Flow(normal=_join(body.normal, orelse.normal), raises=state)
        flow.absorb(body)
        flow.absorb(orelse)
        return flow

    def _loop(self, node: ast.For | ast.While, state: State) -> _Flow:
        is_for = isinstance(node, ast.For)
        entry = self._effect(node.iter, state) if is_for else state
        head: State = entry
        while True:
            cond = head if is_for else self._effect(node.test, head)
            body_entry = self._effect(node.target, cond, target=True) if is_for else cond
            body = self.block(node.body, body_entry)
            new_head = _join(entry, body.normal, body.continues)
            if new_head == head:
                break
            head = new_head
        endless = not is_for and isinstance(node.test, ast.Constant) and bool(node.test.value)
        orelse = self.block(node.orelse, None if endless else cond)
        flow = _Flow(
            normal=_join(orelse.normal, body.breaks),
            returns=list(body.returns),
            raises=_join(body.raises, cond),
        )
        flow.absorb(orelse)
        return flow

    _For = _While = _loop

    def _With(self, node: ast.With, state: State) -> _Flow:
        for item in node.items:
            state = self._effect(item.context_expr, state)
            if item.optional_vars is not None:
                state = self._effect(item.optional_vars, state, target=True)
        body = self.block(node.body, state)
        body.raises = _join(body.raises, state)
        return body

    def _Try(self, node: ast.Try, state: State) -> _Flow:
        body = self.block(node.body, state)
        caught = _join(state, body.raises)
        flow = _Flow(
            normal=None,
            breaks=body.breaks,
            continues=body.continues,
            returns=list(body.returns),
            raises=caught,
        )
        orelse = self.block(node.orelse, body.normal)
        flow.normal = orelse.normal
        flow.absorb(orelse)
        for handler in node.handlers:
            entry = self._effect(handler.type, caught) if handler.type else caught
            handled = self.block(handler.body, entry)
            flow.normal = _join(flow.normal, handled.normal)
            flow.absorb(handled)
        if node.finalbody:
            flow = self._finally(node.finalbody, flow)
        return flow

    _TryStar = _Try

    def _finally(self, final: list[ast.stmt], flow: _Flow) -> _Flow:
        """Run the finally block on every way out of the try statement."""
        out = _Flow(normal=None)

        def through(state: State | None) -> State | None:
            if state is None:
                return None
            ran = self.block(final, state)
            out.absorb(
                _Flow(
                    normal=None,
                    returns=ran.returns,
                    breaks=ran.breaks,
                    continues=ran.continues,
                    raises=ran.raises,
                )
            )
            return ran.normal

        out.normal = through(flow.normal)
        out.breaks = _join(out.breaks, through(flow.breaks))
        out.continues = _join(out.continues, through(flow.continues))
        for state, line in flow.returns:
            after = through(state)
            if after is not None and (after, line) not in out.returns:
                out.returns.append((after, line))
        out.raises = _join(out.raises, through(flow.raises))  # re-raised afterwards
        return out

    def _Match(self, node: ast.Match, state: State) -> _Flow:
        state = self._effect(node.subject, state)
        flow = _Flow(normal=None, raises=state)
        for case in node.cases:
            entry = self._effect(case.guard, state) if case.guard else state
            ran = self.block(case.body, entry)
            flow.normal = _join(flow.normal, ran.normal)
            flow.absorb(ran)
        last = node.cases[-1] if node.cases else None
        irrefutable = (
            last is not None
            and last.guard is None
            and isinstance(last.pattern, ast.MatchAs)
            and last.pattern.pattern is None
        )
        if not irrefutable:
            flow.normal = _join(flow.normal, state)
        return flow

    def _FunctionDef(self, node: ast.AST, state: State) -> _Flow:
        # only decorators and defaults run here; nested bodies are checked in run()
        args = getattr(node, "args", None)
        exprs = list(getattr(node, "decorator_list", [])) + (list(args.defaults) if args else [])
        for expr in exprs:
            state = self._effect(expr, state)
        return _Flow(normal=state, raises=state)

    _AsyncFunctionDef = _ClassDef = _FunctionDef

    # -- effects ----------------------------------------------------------------
    def _effect(self, node: ast.AST, state: State, target: bool = False) -> State:
        """State after ``node`` runs: a fresh mutation replaces what came before."""
        if target:
            found = list(self._target_mutations(node, augmented=False))
        else:
            found = list(self._mutations(node))
        if found:
            return frozenset({max(found)})
        return state

    def _mutations(self, node: ast.AST) -> Iterator[tuple[int, str, str]]:
        for n in _walk_scope(node):
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    yield from self._target_mutations(t, augmented=False)
            elif isinstance(n, ast.AugAssign):
                yield from self._target_mutations(n.target, augmented=True)
            elif isinstance(n, ast.AnnAssign) and n.value is not None:
                yield from self._target_mutations(n.target, augmented=False)
            elif isinstance(n, ast.Delete):
                for t in n.targets:
                    yield from self._target_mutations(t, augmented=False)
            elif isinstance(n, ast.comprehension):
                yield from self._target_mutations(n.target, augmented=False)
            elif isinstance(n, ast.Call):
                yield from self._call_mutation(n)

    def _target_mutations(self, target: ast.AST, augmented: bool) -> Iterator[tuple[int, str, str]]:
        for t in flatten([target]):  # type: ignore[list-item]
            if isinstance(t, ast.Attribute) and t.attr == "_p_changed":
                continue
            if isinstance(t, (ast.Attribute, ast.Subscript)) and self.aliases.root(t.value):
                yield t.lineno, show(t), ""
            elif augmented and isinstance(t, ast.Name) and t.id in self.aliases.of_data:
                yield t.lineno, t.id, " (a name bound to self's data)"

    def _call_mutation(self, call: ast.Call) -> Iterator[tuple[int, str, str]]:
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in MUTATOR_METHODS:
            if self.aliases.root(func.value) == _DATA:
                yield call.lineno, show(func.value), f" by .{func.attr}()"
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name in ("setattr", "delattr") and call.args and self.aliases.root(call.args[0]):
            yield call.lineno, show(call.args[0]), f" by {name}()"
        elif name in MUTATING_FUNCTIONS and call.args and self.aliases.root(call.args[0]) == _DATA:
            yield call.lineno, show(call.args[0]), f" by {name}()"


def _describe(state: State) -> str:
    parts = [f"{what} is mutated on line {line}{how}" for line, what, how in sorted(state)]
    return ", ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")
