"""The restricted runtime namespace for installed (generated) methods.

Generated methods are compiled into a fresh globals dict whose ``__builtins__``
holds only the names in :data:`guardian.SAFE_BUILTIN_NAMES`, guarded versions of
getattr/hasattr/setattr/delattr, and a guarded ``__import__`` that admits only
:data:`guardian.ALLOWED_MODULES` and hands out read-only views of them (public,
non-module, non-container members only). Used by the kernel and by the trial
process alike.

This is a second line behind the Guardian's AST audit, not a sandbox of its
own: it decides which names code can reach, not what the CPU, memory or the
operating system will do for it (that is trial.py's job).
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
_MUTABLE_CONTAINERS = (list, dict, set, bytearray)
_views: dict[str, types.ModuleType] = {}


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
        # module attributes (submodules), shared mutable containers, private and
        # refused names stay behind: they are ways into other modules or kernel state
        members = {
            key: value
            for key, value in vars(module).items()
            if not key.startswith("_")
            and key not in _REFUSED_ATTRIBUTES
            and not isinstance(value, (types.ModuleType, *_MUTABLE_CONTAINERS))
        }
        vars(view).update(members)
        _views[name] = view
    return view


def guarded_import(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> types.ModuleType:
    """``__import__`` for generated code: allow-listed top-level modules only."""
    if level != 0:
        raise ImportError("relative imports are not allowed")
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
