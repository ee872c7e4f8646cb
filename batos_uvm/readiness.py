"""What a starting kernel has loaded, what it is still loading, and waiting for it.

The kernel answers first and loads heavy things (the embedding model, the
golden dataset, stored models, the cells) in the background. Each of those is
a named *part*; work that needs a part waits for it (``await wait(name)`` on
the event loop, ``wait_blocking(name)`` from a method's thread) instead of
failing, and ``describe()`` is what ``ping`` reports as readiness.

A part that fails stays failed: waiting for it raises :class:`NotReady` with
the reason, so a request gets a clear answer instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("batos.readiness")


class NotReady(RuntimeError):
    """A part the work needs failed to load (or the kernel is stopping)."""


@dataclass
class _Part:
    name: str
    description: str
    state: str = "pending"  # pending -> loading -> ready | failed
    error: str | None = None
    started: float | None = None
    seconds: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Readiness:
    """The parts of one kernel; see the module docstring."""

    def __init__(self) -> None:
        self._parts: dict[str, _Part] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._changed: asyncio.Event | None = None

    def add(self, name: str, description: str) -> None:
        """Declare a part (pending until it is loaded or marked ready)."""
        self._parts[name] = _Part(name, description)

    def mark_ready(self, name: str) -> None:
        part = self._parts[name]
        if part.started is not None:
            part.seconds = round(time.monotonic() - part.started, 3)
        part.state = "ready"
        part.done.set()
        self._notify()

    def mark_failed(self, name: str, error: str) -> None:
        part = self._parts[name]
        part.state, part.error = "failed", error
        part.done.set()
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def load_in_background(
        self, name: str, work: Callable[[], Awaitable[Any]], *, needs: tuple[str, ...] = ()
    ) -> asyncio.Task[None]:
        """Run ``work`` as a task once the parts it ``needs`` are ready; record the outcome."""

        async def load() -> None:
            part = self._parts[name]
            try:
                for other in needs:
                    await self.wait(other)
                part.state, part.started = "loading", time.monotonic()
                self._notify()
                await work()
            except asyncio.CancelledError:
                self.mark_failed(name, "the kernel stopped before it was loaded")
                raise
            except Exception as exc:  # the kernel keeps serving what does not need this part
                log.error("loading %s failed: %s: %s", part.description, type(exc).__name__,
                          exc, exc_info=log.isEnabledFor(logging.DEBUG))
                self.mark_failed(name, f"{type(exc).__name__}: {exc}")
            else:
                self.mark_ready(name)
                log.info("%s loaded in %.1f s", part.description, part.seconds or 0.0)

        task = asyncio.create_task(load(), name=f"load-{name}")
        self._tasks.append(task)
        return task

    def is_ready(self, name: str) -> bool:
        part = self._parts.get(name)
        return part is None or part.state == "ready"

    def pending(self, names: tuple[str, ...] | None = None) -> list[str]:
        """Descriptions of the parts (of ``names``) not loaded yet."""
        chosen = self._parts.values() if names is None else (
            self._parts[n] for n in names if n in self._parts)
        return [p.description for p in chosen if p.state in ("pending", "loading")]

    def _raise_if_failed(self, part: _Part) -> None:
        if part.state == "failed":
            raise NotReady(f"{part.description} could not be loaded: {part.error}")

    async def wait(self, name: str) -> None:
        """Until the part is ready (at once if it is, or is not a part at all)."""
        part = self._parts.get(name)
        if part is None:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        while not part.done.is_set():
            self._changed.clear()
            await self._changed.wait()
        self._raise_if_failed(part)

    async def wait_all(
        self,
        names: tuple[str, ...],
        on_wait: Callable[[str, float], Awaitable[None]] | None = None,
        every: float = 2.0,
    ) -> None:
        """Wait for several parts, calling ``on_wait(what, waited_s)`` now and every ``every`` s."""
        started = time.monotonic()
        waiting = asyncio.ensure_future(asyncio.gather(*(self.wait(n) for n in names)))
        waiting.add_done_callback(_retrieve)  # also when abandoned at shutdown
        try:
            while True:
                pending = self.pending(names)
                if on_wait is not None and pending:
                    await on_wait(", ".join(pending), time.monotonic() - started)
                done, _ = await asyncio.wait({waiting}, timeout=every)
                if done:
                    waiting.result()
                    return
        finally:
            waiting.cancel()

    def wait_blocking(self, name: str, timeout: float | None = None) -> None:
        """From a thread (e.g. a primitive a method calls): block until the part is ready."""
        part = self._parts.get(name)
        if part is None:
            return
        if not part.done.wait(timeout):
            raise NotReady(f"{part.description} is still loading; try again in a moment")
        self._raise_if_failed(part)

    @property
    def ready(self) -> bool:
        return all(p.state == "ready" for p in self._parts.values())

    def describe(self) -> dict[str, Any]:
        """For ``status``: ready overall, and each part's state (and time or error)."""
        parts = {}
        for part in self._parts.values():
            entry: dict[str, Any] = {"state": part.state, "what": part.description}
            if part.seconds is not None:
                entry["seconds"] = part.seconds
            if part.error:
                entry["error"] = part.error
            parts[part.name] = entry
        return {"ready": self.ready, "loading": self.pending(), "parts": parts}

    async def cancel(self) -> None:
        """Stop loading (kernel shutdown); threads already working finish on their own."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def in_daemon_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``await`` ``function(*args)`` run in a daemon thread.

    Unlike ``asyncio.to_thread``, a process that is stopping does not wait for
    it: loading a model can take many seconds and has nothing to save.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting task
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name=f"load-{getattr(function, '__name__', 'work')}",
                     daemon=True).start()
    return await future
