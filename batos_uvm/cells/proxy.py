"""What generated code holds inside a cell: ``self``, other objects, ``batos``.

``self`` is a :class:`Receiver` in front of the call's state (batos_uvm.cells.call);
other objects are :class:`ObjectRef` handles whose slots and methods are reached by
messages to the kernel; ``batos`` (a builtin of every method) offers the kernel
services. These classes keep their state in name-mangled slots, which generated
code cannot name (the Guardian refuses attributes starting with ``_``).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .call import Call

class Receiver:
    """``self`` inside a cell. See the module docstring."""

    __slots__ = ("__call",)

    def __init__(self, call: Call) -> None:
        object.__setattr__(self, "_Receiver__call", call)

    def __getattr__(self, name: str) -> Any:
        call: Call = object.__getattribute__(self, "_Receiver__call")
        return call.read(name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__getattribute__(self, "_Receiver__call").write(name, value)

    def __delattr__(self, name: str) -> None:
        object.__getattribute__(self, "_Receiver__call").delete(name)

    def __repr__(self) -> str:
        return f"<{object.__getattribute__(self, '_Receiver__call').label}>"

    def __dir__(self) -> list[str]:
        return sorted(object.__getattribute__(self, "_Receiver__call").visible())


class ObjectRef:
    """Another object of the image: its slots and methods are reached by messages."""

    __slots__ = ("__call", "__number")

    def __init__(self, call: Call, number: int) -> None:
        object.__setattr__(self, "_ObjectRef__call", call)
        object.__setattr__(self, "_ObjectRef__number", number)

    def __getattr__(self, name: str) -> Any:
        call: Call = object.__getattribute__(self, "_ObjectRef__call")
        return call.remote_get(object.__getattribute__(self, "_ObjectRef__number"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"cannot set {name!r} on {self!r}: a method changes only its own receiver; "
            "send the other object a message instead"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete {name!r} of {self!r}: a method changes only self")

    def __eq__(self, other: object) -> bool:
        return type(other) is ObjectRef and number_of(other) == number_of(self)

    def __hash__(self) -> int:
        return hash((ObjectRef, number_of(self)))

    def __repr__(self) -> str:
        call: Call = object.__getattribute__(self, "_ObjectRef__call")
        return f"<{call.names.get(number_of(self), 'UvmObject')}>"


def number_of(ref: ObjectRef) -> int:
    return object.__getattribute__(ref, "_ObjectRef__number")


class RemoteMethod:
    """A method of another object; calling it is a send performed by the kernel."""

    __slots__ = ("__call", "__number", "__selector")

    def __init__(self, call: Call, number: int, selector: str) -> None:
        object.__setattr__(self, "_RemoteMethod__call", call)
        object.__setattr__(self, "_RemoteMethod__number", number)
        object.__setattr__(self, "_RemoteMethod__selector", selector)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a method cannot be changed")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        get = object.__getattribute__
        return get(self, "_RemoteMethod__call").remote_send(
            get(self, "_RemoteMethod__number"), get(self, "_RemoteMethod__selector"), args, kwargs
        )

    def __repr__(self) -> str:
        return f"<method {object.__getattribute__(self, '_RemoteMethod__selector')}>"


class Services:
    """The kernel services generated code may use, as the builtin ``batos``."""

    __slots__ = ()

    def search(self, query: str, top_k: int = 5) -> list[dict[str, Any]]:
        """Search the knowledge catalog: a list of {"doc_id", "text", "score"}."""
        return active().service("search", [str(query), int(top_k)])

    def ask(self, persona: str, prompt: str) -> str:
        """Ask a persona (ALFRED, BRICK, ROBIN or BABS) and return its answer."""
        return active().service("ask", [str(persona), str(prompt)])

    def now(self) -> float:
        """The kernel's clock: seconds since the epoch."""
        return time.time()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("batos is read-only")

    def __repr__(self) -> str:
        return "<BAT OS kernel services: search(query, top_k), ask(persona, prompt), now()>"


SERVICES = Services()
calls: list[Call] = []  # the call being served (one at a time per cell)


def active() -> Call:
    if not calls:
        raise RuntimeError("kernel services are available only while a method runs")
    return calls[-1]


# -- one call -----------------------------------------------------------------------------
