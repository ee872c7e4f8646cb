"""The Persistence Guardian: an AST policy for generated method source.

Generated methods are untrusted input. Before one is installed into a live
object the Guardian checks that the source

* defines exactly one function, named like the selector, whose first
  parameter is ``self`` (module level may also hold a docstring and imports);
* imports only allow-listed modules and reaches no private or dunder name,
  no frame/code internals, no format-string attribute lookup and none of the
  builtins that open a way out of the restricted namespace;
* assigns and deletes attributes of ``self`` only (aliases included).

The Persistence Covenant is the kernel's rule since methods run in cells: a
method changes only its receiver, and the kernel records what changed, so
``self._p_changed = True`` is no longer needed (older methods that still set
it keep working). The Guardian is the fast first filter that gives the model
precise feedback; the cell is what contains the code.

This module imports only the standard library and aliases.py; see
docs/GUARDIAN.md.
"""

from __future__ import annotations

import ast
import keyword
import threading

from .aliases import Aliases, flatten, is_clean_statement, show

__all__ = [
    "ALLOWED_MODULES",
    "ATTRIBUTE_FUNCTIONS",
    "FORBIDDEN_ATTRIBUTES",
    "FORBIDDEN_NAMES",
    "FORMAT_ATTRIBUTES",
    "MAX_SOURCE_CHARS",
    "SAFE_BUILTIN_NAMES",
    "GuardianViolation",
    "audit",
    "find_violations",
]

MAX_SOURCE_CHARS = 100_000

#: Modules generated code may import (top-level names only; no submodules).
ALLOWED_MODULES: frozenset[str] = frozenset(
    "base64 bisect cmath collections datetime decimal fractions functools hashlib heapq "
    "itertools json math operator random re statistics string textwrap time uuid".split()
)

#: Builtins handed to generated code as they are.
SAFE_BUILTIN_NAMES: frozenset[str] = frozenset(
    "abs all any ascii bin bool bytearray bytes callable chr complex dict divmod enumerate "
    "filter float frozenset hash hex id int isinstance issubclass iter len list map max min "
    "next oct ord pow print range repr reversed round set slice sorted str sum tuple zip "
    "Ellipsis NotImplemented ArithmeticError AssertionError AttributeError Exception "
    "IndexError KeyError LookupError NotImplementedError OverflowError RecursionError "
    "RuntimeError StopIteration TypeError UnicodeDecodeError UnicodeEncodeError UnicodeError "
    "ValueError ZeroDivisionError".split()
)

#: Builtins replaced at run time by guarded versions (see restricted.py).
# CPython 3.11 keeps the AST converter's recursion counter per interpreter, so
# two threads parsing at once can fail with "AST constructor recursion depth
# mismatch"; the kernel parses in method threads and on its event loop.
PARSE_LOCK = threading.Lock()

ATTRIBUTE_FUNCTIONS: frozenset[str] = frozenset({"getattr", "hasattr", "setattr", "delattr"})

#: Names generated code may not mention at all.
FORBIDDEN_NAMES: frozenset[str] = frozenset(
    "exec eval compile open __import__ globals locals vars dir breakpoint input help exit "
    "quit memoryview type object super classmethod staticmethod property __build_class__".split()
)

#: Attribute names that format a string by attribute lookup (reach dunders).
FORMAT_ATTRIBUTES: frozenset[str] = frozenset({"format", "format_map", "vformat"})

#: Public attribute names that still lead out of the sandbox or into kernel state:
#: frames, code and generator internals; getattr-by-string helpers; annotation
#: evaluators; functions that may spawn processes or change thread-wide state.
FORBIDDEN_ATTRIBUTES: frozenset[str] = frozenset(
    "gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await ag_frame ag_code ag_await f_back "
    "f_globals f_locals f_builtins f_code f_trace tb_frame tb_next co_code co_consts mro "
    "attrgetter methodcaller Formatter singledispatch singledispatchmethod getnode uuid1 "
    "getcontext setcontext DefaultContext "
    # copy arbitrary (also private) attributes from one object onto another
    "update_wrapper wraps partialmethod RLock "
    # the image's own operations: only the kernel installs and reverts methods
    "install_method install_primitive revert_method remove_method".split()
)


class GuardianViolation(Exception):
    """One breach of the code policy, with a stable rule id and a source line."""

    def __init__(self, rule: str, line: int, message: str) -> None:
        super().__init__(rule, line, message)
        self.rule, self.line, self.message = rule, line, message

    def __str__(self) -> str:
        return f"{self.rule} (line {self.line}): {self.message}"


def audit(source: str, selector: str) -> ast.FunctionDef:
    """Return the method's AST, or raise the first violation (by line)."""
    tree, violations = _inspect(source, selector)
    if violations:
        raise violations[0]
    assert tree is not None
    return _method(tree, selector)  # type: ignore[return-value]


def find_violations(source: str, selector: str) -> list[GuardianViolation]:
    """Every violation found, ordered by line."""
    return _inspect(source, selector)[1]


def _method(tree: ast.Module, selector: str) -> ast.FunctionDef | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == selector:
            return node
    return None


def _inspect(source: str, selector: str) -> tuple[ast.Module | None, list[GuardianViolation]]:
    if len(source) > MAX_SOURCE_CHARS:
        return None, [
            GuardianViolation(
                "source-size",
                1,
                f"the source has {len(source)} characters; the limit is {MAX_SOURCE_CHARS}",
            )
        ]
    try:
        with PARSE_LOCK:
            tree = ast.parse(source)
    except SyntaxError as exc:
        return None, [GuardianViolation("syntax-error", exc.lineno or 1, exc.msg)]
    except (ValueError, RecursionError, MemoryError) as exc:
        return None, [GuardianViolation("syntax-error", 1, f"cannot parse: {exc}")]
    found: list[GuardianViolation] = []
    try:
        _check(tree, selector, found)
    except RecursionError:
        found.append(GuardianViolation("syntax-error", 1, "the source nests too deeply"))
    unique: dict[tuple[str, int, str], GuardianViolation] = {}
    for v in found:
        unique.setdefault((v.rule, v.line, v.message), v)
    return tree, sorted(unique.values(), key=lambda v: v.line)


def _check(tree: ast.Module, selector: str, found: list[GuardianViolation]) -> None:
    def add(rule: str, node: ast.AST | int, message: str) -> None:
        line = node if isinstance(node, int) else getattr(node, "lineno", 1)
        found.append(GuardianViolation(rule, line, message))

    if not selector.isidentifier() or keyword.iskeyword(selector) or selector.startswith("_"):
        add("missing-method", 1, f"selector {selector!r} is not a public Python identifier")
        return
    method = _check_module_shape(tree, selector, add)
    aliases = Aliases(method) if method else Aliases(None)
    _check_nodes(tree, method, aliases, add)


def _check_module_shape(tree: ast.Module, selector: str, add) -> ast.FunctionDef | None:
    method = _method(tree, selector)
    if not tree.body:
        add("missing-method", 1, f"no function named {selector!r} is defined (empty source)")
    for index, node in enumerate(tree.body):
        if isinstance(node, ast.FunctionDef):
            if node is method:
                continue
            if method is None and not any(
                isinstance(n, ast.FunctionDef) for n in tree.body[:index]
            ):
                add(
                    "method-name",
                    node,
                    f"the function is named {node.name!r} but the selector is {selector!r}",
                )
            else:
                add(
                    "module-shape",
                    node,
                    f"only one function may be defined; {node.name!r} is one too many",
                )
        elif isinstance(node, ast.AsyncFunctionDef):
            add("module-shape", node, f"async def {node.name!r}: methods must be plain functions")
        elif isinstance(node, ast.ClassDef):
            add("module-shape", node, f"class {node.name!r}: classes are not allowed")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            continue  # checked with every other import
        elif (
            index == 0
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            continue  # module docstring
        else:
            add(
                "module-shape",
                node,
                f"{type(node).__name__} statement at module level: only "
                "a docstring, imports and the method are allowed",
            )
    if (
        tree.body
        and method is None
        and not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in tree.body)
    ):
        add("missing-method", tree.body[0], f"no function named {selector!r} is defined")
    if method is None:
        return None
    if method.decorator_list:
        add("module-shape", method.decorator_list[0], "the method may not be decorated")
    params = method.args.posonlyargs + method.args.args
    if not params or params[0].arg != "self":
        add("self-parameter", method, f"the first parameter of {selector!r} must be 'self'")
    return method


def _check_nodes(tree: ast.Module, method: ast.FunctionDef | None, aliases: Aliases, add) -> None:
    self_arg = None
    if method is not None:
        params = method.args.posonlyargs + method.args.args
        self_arg = params[0] if params else None
    # calls whose func is an attribute function, checked as a whole
    attr_calls = {
        id(n.func)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name)
        and n.func.id in ATTRIBUTE_FUNCTIONS
    }
    # targets of the one allowed use of a private name: self._p_changed = True
    clean_targets = (
        {id(n.targets[0]) for n in ast.walk(method) if is_clean_statement(n)}
        if method is not None
        else set()
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            _check_name(node.id, node, add)
            if node.id in ATTRIBUTE_FUNCTIONS and id(node) not in attr_calls:
                add("dynamic-attribute", node, f"{node.id} may only be called directly")
            if node.id == "self" and isinstance(node.ctx, (ast.Store, ast.Del)):
                add("self-parameter", node, "self must not be rebound or deleted")
        elif isinstance(node, ast.arg):
            _check_name(node.arg, node, add)
            if node.arg == "self" and node is not self_arg:
                add("self-parameter", node, "only the method's first parameter may be named self")
        elif isinstance(node, ast.Attribute):
            if node.attr != "_p_changed":
                _check_attribute(node.attr, node, add)
            elif id(node) not in clean_targets:
                add(
                    "private-attribute",
                    node,
                    "the only allowed use of _p_changed is the statement "
                    "'self._p_changed = True' (not needed: the kernel records changes)",
                )
        elif isinstance(node, ast.MatchClass):
            for name in node.kwd_attrs:
                _check_attribute(name, node, add)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for default in [*node.args.defaults, *node.args.kw_defaults]:
                if default is not None and not _is_immutable_default(default):
                    add(
                        "mutable-default",
                        default,
                        "a default value is shared by every call and every object; "
                        "use None and create the value inside the method",
                    )
            if not isinstance(node, ast.Lambda):
                _check_name(node.name, node, add)
            if isinstance(node, ast.AsyncFunctionDef) and node not in tree.body:
                add("async-code", node, "async functions are not allowed")
        elif isinstance(node, ast.ClassDef):
            _check_name(node.name, node, add)
            if node not in tree.body:
                add("nested-class", node, f"class {node.name!r}: classes are not allowed")
        elif isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            add("async-code", node, "async code is not allowed")
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            kind = "global" if isinstance(node, ast.Global) else "nonlocal"
            add("global-statement", node, f"'{kind} {', '.join(node.names)}' is not allowed")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(node, add)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            _check_name(node.name, node, add)
            if node.name == "self":
                add("self-parameter", node, "self must not be rebound")
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            _check_name(node.name, node, add)
        elif isinstance(node, ast.Call) and id(node.func) in attr_calls:
            _check_attribute_call(node, aliases, add)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in flatten(targets):
                if isinstance(target, ast.Attribute) and aliases.root(target.value) is None:
                    add(
                        "attribute-assignment",
                        target,
                        f"{show(target)}: only attributes of self may be assigned or deleted",
                    )


def _is_immutable_default(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Tuple):
        return all(_is_immutable_default(item) for item in node.elts)
    if isinstance(node, ast.UnaryOp):
        return _is_immutable_default(node.operand)
    return isinstance(node, ast.Name) and node.id in {"None", "True", "False"}


def _check_name(name: str, node: ast.AST, add) -> None:
    if name in FORBIDDEN_NAMES:
        add("forbidden-name", node, f"{name!r} is not available to generated code")
    elif name.startswith("__"):
        add("dunder-name", node, f"{name!r}: names starting with '__' are not allowed")


def _check_attribute(name: str, node: ast.AST, add) -> None:
    if name.startswith("_"):
        add("private-attribute", node, f"attribute {name!r}: names starting with '_' are private")
    elif name in FORMAT_ATTRIBUTES:
        add(
            "format-string",
            node,
            f".{name}() looks attributes up by name inside the format "
            "string; use an f-string or % formatting",
        )
    elif name in FORBIDDEN_ATTRIBUTES:
        add("forbidden-attribute", node, f"attribute {name!r} is not available to generated code")


def _check_import(node: ast.Import | ast.ImportFrom, add) -> None:
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level or module not in ALLOWED_MODULES:
            add("import", node, f"module {'.' * node.level + module!r} is not on the allow-list")
            return
        for alias in node.names:
            if alias.name == "*":
                add("import", node, f"'from {module} import *' is not allowed")
            elif alias.name in ATTRIBUTE_FUNCTIONS:
                add("import", node, f"{alias.name!r} may not be imported")
            else:
                _check_attribute(alias.name, node, add)
            if alias.asname:
                _check_name(alias.asname, node, add)
        return
    for alias in node.names:
        if alias.name not in ALLOWED_MODULES:
            add("import", node, f"module {alias.name!r} is not on the allow-list")
        if alias.asname:
            _check_name(alias.asname, node, add)


def _check_attribute_call(call: ast.Call, aliases: Aliases, add) -> None:
    fname = call.func.id  # type: ignore[attr-defined]
    wanted = {"getattr": (2, 3), "hasattr": (2, 2), "setattr": (3, 3), "delattr": (2, 2)}[fname]
    args = call.args
    if (
        call.keywords
        or any(isinstance(a, ast.Starred) for a in args)
        or not wanted[0] <= len(args) <= wanted[1]
    ):
        add("dynamic-attribute", call, f"{fname} needs {wanted[0]} plain positional arguments")
        return
    name = args[1]
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        add("dynamic-attribute", call, f"{fname} with a computed attribute name is not allowed")
        return
    if name.value.startswith("_"):
        add(
            "dynamic-attribute",
            call,
            f"{fname} of {name.value!r}: names starting with '_' "
            "are private",
        )
        return
    _check_attribute(name.value, call, add)
    if fname in ("setattr", "delattr") and aliases.root(args[0]) is None:
        add(
            "attribute-assignment",
            call,
            f"{fname} on {show(args[0])}: only attributes of self may be assigned or deleted",
        )
