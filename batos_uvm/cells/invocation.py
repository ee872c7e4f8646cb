"""What the kernel does while cells run a call: snapshots, handles, requests, diffs.

An :class:`Invocation` is one message sent to a generated method, with every
call it makes in turn (nested sends run in other cells), all on one ZODB
connection and in the caller's transaction. Each method execution is a
:class:`~batos_uvm.cells.frame.Frame` (its receiver, handles and snapshot).

The kernel applies a method's diff to its receiver's own slots only, after
checking names and values; a cell's requests are answered from an allow-list
(read a slot, send a message, clone, describe, the kernel services). Nothing a
cell sends is trusted beyond plain data.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..objects import (
    MethodRecord,
    UvmObject,
    describe_briefly,
    holds_kernel_object,
    kernel_owned,
)
from .frame import Frame, Refused, check_slot_name
from .pool import Cell, CellCrashed, CellFailure, CellPool, CellProtocolError, CellTimeout

MAX_DEPTH = 8  # nested sends from generated code
ATTEMPTS_ON_DEAD_CELLS = 3  # tries beyond the idle cells, for a call that reached only dead ones
MAX_OUTPUT = 32 * 1024  # printed text kept per invocation (a cell keeps 16 KiB per call)
MAX_ITEMS = 500_000  # values (list items, dict entries ...) taken from cells per message
MAX_CLONES = 10_000  # objects a message may create: each lives in the kernel until commit
PRIMITIVES_FOR_METHODS = frozenset({"clone", "describe", "catalog.search", "infer"})


class Services(Protocol):
    """Kernel services generated code may use (as ``batos.search`` and ``batos.ask``)."""

    async def search(self, query: str, top_k: int) -> list[dict[str, Any]]: ...

    async def ask(self, persona: str, prompt: str) -> str: ...


class NoServices:
    """Outside a running kernel (the shell, tests): no catalog search, no personas."""

    async def search(self, query: str, top_k: int) -> list[dict[str, Any]]:
        raise Refused("RuntimeError", "catalog search is available only inside a running kernel")

    async def ask(self, persona: str, prompt: str) -> str:
        raise Refused("RuntimeError", "asking a persona is available only inside a running kernel")


class MethodFailed(Exception):
    """The method raised (in its cell); ``kind`` is the exception's class name."""

    def __init__(self, kind: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.traceback = kind, message, traceback


class Invocation:
    """One message to a generated method and everything it sends in turn."""

    def __init__(
        self,
        pool: CellPool,
        *,
        timeout: float,
        services: Services | None = None,
        overlay: dict[tuple[int, str], str] | None = None,
        progress: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        # The message's time runs on the wall clock (cells starting, the kernel's own
        # work, catalog searches, nested sends all count), except while a persona thinks.
        self.started = time.monotonic()
        self.in_services = 0.0
        self.wall_deadline = self.started + max(timeout * 20, 600.0)  # personas included
        self.services = services or NoServices()
        self.overlay = dict(overlay or {})  # (id(object), selector) -> source: a trial's candidate
        self.items_left = MAX_ITEMS  # values taken from cells (see spend_items)
        self.clones = 0
        self.output_parts: list[str] = []
        self.output_size = 0
        self._versions: dict[int, int] = {}
        self._ids = 0
        # (object, slot, had it, old value) for every change applied: a method that
        # raises, also one nested in another, takes its changes back with it.
        self.undo: list[tuple[UvmObject, str, bool, Any]] = []

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def output(self) -> str:
        return "".join(self.output_parts)

    def _keep_output(self, text: Any) -> None:
        if not isinstance(text, str) or not text or self.output_size > MAX_OUTPUT:
            return
        room = MAX_OUTPUT - self.output_size
        if len(text) > room:
            text = text[:room] + "\n... (more output of nested calls not kept)"
        self.output_parts.append(text)
        self.output_size += len(text)

    def spend_items(self, count: int) -> None:
        """Count items taken from cells; past the budget the message fails, naming it."""
        self.items_left -= count
        if self.items_left < 0:
            raise Refused(
                "MemoryError",
                f"the method handed the kernel more than {MAX_ITEMS} values in one message",
            )

    def time_left(self) -> float:
        return self.timeout - (time.monotonic() - self.started - self.in_services)

    def version(self, obj: Any) -> int:
        return self._versions.get(id(obj), 0)

    def _changed(self, obj: Any) -> None:
        self._versions[id(obj)] = self.version(obj) + 1

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -- finding what answers a selector -------------------------------------------------------
    def find(self, obj: UvmObject, selector: str) -> tuple[str, Any]:
        """("source", (source, key)), ("primitive", record), ("slot", value) or ("none", None)."""
        source = self.overlay.get((id(obj), selector))
        if source is not None:
            return "source", source
        found = obj.lookup(selector)
        if found is None:
            return "none", None
        if not found.is_method:
            return "slot", found.value
        record: MethodRecord = found.value
        if record.primitive:
            return "primitive", record
        return "source", record.source or ""

    # -- running methods -------------------------------------------------------------------
    async def call(
        self,
        receiver: UvmObject,
        selector: str,
        args: list[Any],
        kwargs: dict[str, Any],
        found: Any = None,
    ) -> Any:
        """Run the generated method ``selector`` of ``receiver``.

        ``found`` is the caller's lookup result, when it made one.
        """
        if found is not None and not self.overlay:
            kind, source = "source", found.value.source or ""
        else:
            kind, source = self.find(receiver, selector)
        if kind != "source":
            raise Refused("TypeError", f"{selector!r} of {describe_briefly(receiver)} is not a "
                          "generated method")
        return await self.run(receiver, selector, source, list(args), dict(kwargs), depth=0)

    async def run(
        self,
        receiver: UvmObject,
        selector: str,
        source: str,
        args: list[Any],
        kwargs: dict[str, Any],
        depth: int,
    ) -> Any:
        if depth > MAX_DEPTH:
            raise Refused("RecursionError", f"sends between methods nest more than {MAX_DEPTH} deep")
        mark = len(self.undo)
        try:
            # Every idle cell may have been killed at once (the OOM killer): each
            # costs at most one try, as a dead cell is discarded.
            attempts = self.pool.idle + ATTEMPTS_ON_DEAD_CELLS
            for attempt in range(1, attempts + 1):
                frame = Frame(self, receiver)
                cell = await self._acquire(receiver, nested=depth > 0)
                heard = [False]
                try:
                    return await self._run_in(
                        cell, frame, selector, source, args, kwargs, depth, heard
                    )
                except CellCrashed:
                    # A cell that died while idle (killed, OOM) never saw this call:
                    # nothing was applied or asked, so it runs again on another cell.
                    if attempt == attempts or heard[0]:
                        raise
            raise AssertionError("unreachable")
        except BaseException:
            self._take_back(mark)
            raise

    async def _acquire(self, receiver: UvmObject, *, nested: bool) -> Cell:
        """A cell for this receiver: one that served it before, or one never used.

        A cell that ran one object's methods never serves another's: should
        generated code escape everything Python-level in its cell, it can
        still reach only what that object's own methods could.
        """
        tag = receiver._p_oid or ("transient", id(receiver))
        try:
            async with asyncio.timeout(max(self.time_left(), 0.001)):
                return await self.pool.acquire(nested=nested, tag=tag)
        except TimeoutError:
            raise CellTimeout("no cell became free in time") from None

    def _take_back(self, mark: int) -> None:
        """Undo the changes applied since ``mark``, newest first."""
        while len(self.undo) > mark:
            obj, name, had, old = self.undo.pop()
            if had:
                setattr(obj, name, old)
            elif name in obj.slot_names():
                delattr(obj, name)
            self._changed(obj)

    async def _run_in(
        self,
        cell: Cell,
        frame: Frame,
        selector: str,
        source: str,
        args: list[Any],
        kwargs: dict[str, Any],
        depth: int,
        heard: list[bool],
    ) -> Any:
        key = frame.keep_source(source)
        healthy = False
        try:
            message = {
                "op": "call",
                "id": self._next_id(),
                "selector": selector,
                "key": key,
                "source": None if key in cell.known else source,
                "self": frame.snapshot(),
                "args": args,
                "kwargs": kwargs,
            }
            message["names"] = frame.names()
            await cell.send_bytes(frame.encode(message))
            cell.known.add(key)
            while True:
                reply = await self._receive(cell)
                heard[0] = True
                if reply.get("call", reply.get("id")) != message["id"]:
                    raise CellProtocolError("the cell answered another call than the one sent")
                op = reply.get("op")
                if op == "done":
                    break
                if op == "need_source":
                    message["source"] = source
                    await cell.send_bytes(frame.encode(message))
                elif op == "request":
                    answer = await self._serve(frame, reply, depth)
                    await cell.send_bytes(frame.encode(answer))
                else:
                    raise CellProtocolError(f"the cell sent an unexpected {op!r}")
            self._keep_output(reply.get("output"))
            healthy = not reply.get("retire")
            error = reply.get("error")
            if error is not None:
                raise _method_failed(error)
            self._apply(frame, reply.get("diff"))
            return frame.inward(reply.get("value"), for_slot=False)
        except CellTimeout:
            raise CellTimeout(
                f"{selector}() of {describe_briefly(frame.receiver)} ran longer than its time "
                f"limit ({self.timeout:g} s, method_timeout); its cell was killed"
            ) from None
        finally:
            if healthy:
                self.pool.release(cell)
            else:
                self.pool.discard(cell)

    async def _receive(self, cell: Any) -> dict[str, Any]:
        if time.monotonic() > self.wall_deadline:
            raise CellTimeout("wall time")
        return await cell.receive(self.time_left())

    # -- a cell's requests ---------------------------------------------------------------------
    async def _serve(self, frame: Frame, request: dict[str, Any], depth: int) -> dict[str, Any]:
        answer: dict[str, Any] = {"op": "reply", "id": request.get("id")}
        try:
            self._apply(frame, request.get("diff"))
            answer["value"] = await self._answer(frame, request, depth)
        except Refused as exc:
            answer["error"] = {"type": exc.kind, "message": str(exc)}
        except MethodFailed as exc:
            answer["error"] = {"type": exc.kind, "message": exc.message}
        except (CellTimeout, CellProtocolError):
            raise  # the whole call stops
        except CellFailure as exc:  # a nested cell died: the caller may handle it
            answer["error"] = {"type": "RuntimeError", "message": str(exc)}
        if self.version(frame.receiver) != frame.seen_version:
            answer["self"] = frame.snapshot()  # a nested call changed our receiver
            frame.seen_version = self.version(frame.receiver)
        answer["names"] = frame.names()
        return answer

    async def _answer(self, frame: Frame, request: dict[str, Any], depth: int) -> Any:
        kind = request.get("kind")
        if kind == "get":
            target = frame.resolve(request.get("target"))
            name = _public(request.get("name"), target)
            what, value = self.find(target, name)
            if what == "none":
                raise Refused("AttributeError", f"{describe_briefly(target)} has no slot or "
                              f"method {name!r}")
            return {"method": True} if what in ("source", "primitive") else {"value": value}
        if kind == "send":
            target = frame.resolve(request.get("target"))
            return await self.send(
                frame, target, request.get("selector"), request.get("args"),
                request.get("kwargs"), depth,
            )
        if kind == "clone":
            return self._clone(frame, frame.receiver, request.get("slots"))
        if kind == "lookup":
            name = _public(request.get("name"), frame.receiver)
            what, value = self.find(frame.receiver, name)
            if what == "source":
                return {"key": frame.keep_source(value)}
            if what == "primitive":
                return {"key": "primitive"}
            return {"key": None}
        if kind == "source":
            source = frame.sources.get(request.get("key"))
            if source is None:
                raise Refused("LookupError", "no such method source was offered to this method")
            return source
        if kind == "describe":
            return frame.resolve(request.get("target")).describe()
        if kind == "service":
            return await self._service(request.get("name"), request.get("args"))
        raise Refused("RuntimeError", f"unknown request {kind!r}")

    async def send(
        self, frame: Frame, target: UvmObject, selector: Any, args: Any, kwargs: Any, depth: int
    ) -> Any:
        """A message from generated code to an object: the kernel performs it."""
        selector = _public(selector, target)
        if type(args) is not list or type(kwargs) is not dict:
            raise Refused("TypeError", "a send needs a list of arguments and a dict of keywords")
        for name in kwargs:
            if type(name) is not str or name.startswith("_"):
                raise Refused("TypeError", f"keyword {name!r}: names starting with '_' are "
                              "reserved for the kernel")
        args = frame.inward(args, for_slot=False)
        kwargs = frame.inward(kwargs, for_slot=False)
        what, value = self.find(target, selector)
        if what == "none":
            raise Refused(
                "AttributeError",
                f"{describe_briefly(target)} does not understand {selector!r} (a method cannot "
                "start a cognitive cycle; send the brief from a client)",
            )
        if what == "slot":
            if args or kwargs:
                raise Refused("TypeError", f"slot {selector!r} is not callable")
            return value
        if what == "primitive":
            return await self._primitive(frame, target, value, args, kwargs)
        return await self.run(target, selector, value, args, kwargs, depth + 1)

    async def _primitive(
        self, frame: Frame, target: UvmObject, record: MethodRecord, args: list, kwargs: dict
    ) -> Any:
        name = record.primitive
        if record.author != "kernel" or name not in PRIMITIVES_FOR_METHODS:
            raise Refused("PermissionError", f"{record.selector!r} is kernel behaviour that "
                          "generated methods cannot call")
        if name == "clone":
            if args:
                raise Refused("TypeError", "clone takes slots as keywords only")
            return self._clone(frame, target, kwargs)
        if name == "describe":
            return target.describe()
        if name == "catalog.search":
            query, top_k = (list(args) + [None, 5])[:2] if args else (kwargs.get("query"), 5)
            return await self._service("search", [query, kwargs.get("top_k", top_k)])
        persona = target._slots.get("name") if "name" in target._slots else "ALFRED"
        prompt = args[0] if args else kwargs.get("prompt")
        return await self._service("ask", [persona, prompt])

    async def _service(self, name: Any, args: Any) -> Any:
        if type(args) is not list:
            raise Refused("TypeError", "service arguments must be a list")
        if name == "search" and len(args) == 2:  # kernel work for the method: its time
            return await self.services.search(str(args[0]), max(1, min(int(args[1]), 50)))
        if name == "ask" and len(args) == 2:
            paused = time.monotonic()
            try:
                return await self.services.ask(str(args[0]).upper(), str(args[1]))
            finally:
                self.in_services += time.monotonic() - paused  # a model thinking: not its time
        raise Refused("RuntimeError", f"unknown kernel service {name!r}")

    def _clone(self, frame: Frame, target: UvmObject, slots: Any) -> UvmObject:
        """A child of ``target``; every object a message creates stays in memory until commit."""
        if type(slots) is not dict:
            raise Refused("TypeError", "clone takes slots as keywords")
        self.clones += 1
        if self.clones > MAX_CLONES:
            raise Refused("MemoryError", f"a message may create at most {MAX_CLONES} objects")
        return target.clone(
            **{check_slot_name(k): frame.inward(v, for_slot=True) for k, v in slots.items()}
        )

    # -- a method's changes to its receiver --------------------------------------------------
    def _apply(self, frame: Frame, diff: Any) -> None:
        if not diff:
            return
        if type(diff) is not dict:
            raise CellProtocolError("a diff must be a map")
        changes, deletions = diff.get("set") or {}, diff.get("delete") or []
        if type(changes) is not dict or type(deletions) is not list:
            raise CellProtocolError("a malformed diff")
        if not changes and not deletions:
            return
        receiver = frame.receiver
        if kernel_owned(receiver):
            raise Refused("PermissionError", f"{describe_briefly(receiver)} belongs to the "
                          "kernel: generated methods cannot change it")
        values = {check_slot_name(n): frame.inward(v, for_slot=True) for n, v in changes.items()}
        state = receiver._slots
        for name in deletions:
            check_slot_name(name)
            if name not in state and name not in values:
                raise Refused("AttributeError", f"{describe_briefly(receiver)} has no slot "
                              f"{name!r} of its own to delete")
        for name in (*values, *deletions):
            if name in state and holds_kernel_object(state[name]):
                raise Refused("PermissionError", f"slot {name!r} of {describe_briefly(receiver)} "
                              "holds a kernel object: generated methods cannot replace it")
        for name, value in values.items():
            self.undo.append((receiver, name, name in state, state.get(name)))
            setattr(receiver, name, value)
        for name in deletions:
            if name in state:
                self.undo.append((receiver, name, True, state[name]))
                delattr(receiver, name)
        self._changed(receiver)
        frame.seen_version = self.version(receiver)


def _public(selector: Any, target: Any) -> str:
    if type(selector) is not str or not selector.isidentifier() or selector.startswith("_"):
        raise Refused("AttributeError", f"{describe_briefly(target)} does not understand "
                      f"{selector!r}")
    return selector


def _method_failed(error: Any) -> MethodFailed:
    if type(error) is not dict:
        return MethodFailed("RuntimeError", "the method failed")
    return MethodFailed(
        str(error.get("type", "Exception"))[:100],
        str(error.get("message", ""))[:2000],
        str(error.get("traceback", ""))[:4000],
    )


def is_generated(found: Any) -> bool:
    """Whether a lookup result is a generated method (it runs in a cell)."""
    return bool(found is not None and found.is_method and not found.value.primitive)


__all__ = ["Invocation", "MethodFailed", "NoServices", "Refused", "Services", "is_generated"]
