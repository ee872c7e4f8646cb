"""The restricted runtime namespace for installed (generated) methods.

Generated methods are compiled into a fresh globals dict whose ``__builtins__``
holds only the names in :data:`guardian.SAFE_BUILTIN_NAMES`, guarded versions of
getattr/hasattr/setattr/delattr, and a guarded ``__import__`` that admits only
:data:`guardian.ALLOWED_MODULES` and hands out read-only views of them (public,
non-module, non-container members only). Used by the kernel and by the trial
process alike.

This is the innermost layer of a cell (batos_uvm/cells), behind the
Guardian's AST audit and inside the operating-system layers: it decides which
names code can reach, not what the CPU, memory or the operating system will do
for it.
"""

from __future__ import annotations

import builtins
import types

from .guardian import (
    ALLOWED_MODULES,
    FORBIDDEN_ATTRIBUTES,
    FORMAT_ATTRIBUTES,
    PARSE_LOCK,
    SAFE_BUILTIN_NAMES,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_REAL_IMPORT = builtins.__import__
_REFUSED_ATTRIBUTES = FORBIDDEN_ATTRIBUTES | FORMAT_ATTRIBUTES
_CONSTANTS = (int, float, complex, str, bytes, bool, type(None))
_views: dict[str, types.ModuleType] = {}

#: Members a module defines that still change the machine or the process.
_WITHHELD = {
    "time": frozenset("clock_settime clock_settime_ns tzset pthread_getcpuclockid".split()),
    "decimal": frozenset({"BasicContext", "ExtendedContext"}),  # shared by every method
}

#: Builtins a cell adds for every method (the kernel services, ``batos``).
extra_builtins: dict[str, Any] = {}


class ModuleView(types.ModuleType):
    """A read-only copy of a module's public namespace."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"module {self.__name__!r} is read-only here")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"module {self.__name__!r} is read-only here")


def _view(name: str) -> types.ModuleType:
    view = _views.get(name)
    if view is None:
        module = _REAL_IMPORT(name)
        # a __name__ that matches no entry of sys.modules: "from json import decoder"
        # would otherwise fall back to sys.modules["json.decoder"], the real submodule
        view = ModuleView(f"{name} (restricted view)")
        withheld = _REFUSED_ATTRIBUTES | _WITHHELD.get(name, frozenset())
        members = {
            key: value
            for key, value in vars(module).items()
            if not key.startswith("_") and key not in withheld and _exported(name, value)
        }
        vars(view).update(members)
        _views[name] = view
    return view


def _exported(module: str, value: Any) -> bool:
    """Constants, and the functions, classes and values the module itself defines.

    Names a module merely imports from elsewhere (``uuid.Enum``), submodules and
    shared mutable containers stay behind: they lead into other modules or into
    state shared by every method.
    """
    kind = type(value)
    if kind in _CONSTANTS:
        return True
    if kind in (tuple, frozenset):
        return all(type(item) in _CONSTANTS for item in value)
    if isinstance(value, (types.ModuleType, list, dict, set, bytearray)):
        return False
    if callable(value) and _defined_in(module, getattr(value, "__module__", None)):
        return True
    owner = getattr(value, "__self__", None)  # random.random: a method of a module-level Random
    if owner is not None and not isinstance(owner, types.ModuleType):
        return _defined_in(module, type(owner).__module__)
    return _defined_in(module, kind.__module__)  # re.IGNORECASE, datetime.UTC, uuid.NAMESPACE_DNS


def _defined_in(module: str, origin: Any) -> bool:
    if not isinstance(origin, str):
        return False
    origin = origin.lstrip("_")
    return (
        origin == module
        or origin.startswith(module + ".")
        or origin == "py" + module
        or origin in _ACCELERATORS.get(module, ())
    )


_ACCELERATORS = {"hashlib": ("blake2", "md5", "sha1", "sha2", "sha256", "sha512", "sha3")}


def prepare_views() -> None:
    """Build every module view now (a cell does, before it may read files no more)."""
    for name in sorted(ALLOWED_MODULES):
        _view(name)


# Helpers the standard library's C code imports on behalf of allowed modules.
_IMPORTED_BY_C = frozenset({"_strptime"})
_EMPTY_MODULE = types.ModuleType("empty")


def guarded_import(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> types.ModuleType:
    """``__import__`` for generated code: allow-listed top-level modules only."""
    if level != 0:
        raise ImportError("relative imports are not allowed")
    if name in _IMPORTED_BY_C:
        # C code (time.strptime) imports these through the caller's __import__ and
        # then takes the module from sys.modules itself; the caller gets nothing.
        return _EMPTY_MODULE
    if name not in ALLOWED_MODULES:
        raise ImportError(f"module {name!r} is not on the allow-list")
    return _view(name)


def _check_name(name: Any, allow_p_changed: bool = False) -> str:
    if not isinstance(name, str):
        raise TypeError("attribute name must be a string")
    if allow_p_changed and name == "_p_changed":
        return name
    if name.startswith("_") or name in _REFUSED_ATTRIBUTES:
        raise AttributeError(f"access to attribute {name!r} is not allowed")
    return name


def safe_getattr(obj: Any, name: str, *default: Any) -> Any:
    return getattr(obj, _check_name(name), *default)


def safe_hasattr(obj: Any, name: str) -> bool:
    return hasattr(obj, _check_name(name))


def safe_setattr(obj: Any, name: str, value: Any) -> None:
    setattr(obj, _check_name(name, allow_p_changed=True), value)


def safe_delattr(obj: Any, name: str) -> None:
    delattr(obj, _check_name(name))


def make_builtins() -> dict[str, Any]:
    """A fresh builtins dict for one compiled method."""
    table = {name: getattr(builtins, name) for name in SAFE_BUILTIN_NAMES}
    table.update(
        getattr=safe_getattr,
        hasattr=safe_hasattr,
        setattr=safe_setattr,
        delattr=safe_delattr,
        __import__=guarded_import,
    )
    table.update(extra_builtins)
    return table


def compile_method(source: str, selector: str, filename: str = "<method>") -> types.FunctionType:
    """Compile ``source`` in a fresh restricted namespace; return the function ``selector``.

    Never audits: callers run the Guardian first. Module-level statements of the
    source (its imports) run here, under the guarded ``__import__``.
    """
    with PARSE_LOCK:
        code = compile(source, filename, "exec", dont_inherit=True)
    namespace: dict[str, Any] = {"__builtins__": make_builtins(), "__name__": "batos_method"}
    exec(code, namespace)
    function = namespace.get(selector)
    if not isinstance(function, types.FunctionType):
        raise ValueError(f"the source does not define a function named {selector!r}")
    return function
