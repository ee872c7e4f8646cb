"""Generated methods called from code without the kernel's event loop: the shell, tests.

``obj.factorial(5)`` in the shell runs ``factorial`` in a cell of a small pool
owned by this process, exactly as the kernel would (same sandbox, same proxy,
same diff), on the caller's connection and in the caller's transaction:
``commit()`` in the shell keeps what the method changed. Kernel services
(catalog search, personas) are not available here. The pool's event loop runs
only during a call, so a call also waits for the cells the pool is starting
or closing (a new cell takes about a tenth of a second): left half-started,
they would find their time limits expired at the next call.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Any

from .invocation import Invocation, NoServices
from .pool import CellConfig, CellPool

DEFAULT_TIMEOUT = 30.0


class LocalCells:
    """A private event loop and cell pool for synchronous callers in one thread."""

    def __init__(self, config: CellConfig | None = None, size: int = 1) -> None:
        self.config = config or CellConfig()
        self.size = size
        self.timeout = DEFAULT_TIMEOUT
        self._loop = asyncio.new_event_loop()
        self._pool: CellPool | None = None
        self._owner = threading.get_ident()

    def run(self, receiver: Any, selector: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._owner:
            raise RuntimeError("local cells serve the thread that created them")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "a generated method was called synchronously inside an event loop; "
                "send the message through the kernel instead"
            )
        return self._loop.run_until_complete(self._run(receiver, selector, args, kwargs))

    async def _run(self, receiver: Any, selector: str, args: list, kwargs: dict) -> Any:
        if self._pool is None:
            self._pool = CellPool(self.config, size=self.size, announce=False)
        invocation = Invocation(self._pool, timeout=self.timeout, services=NoServices())
        try:
            value = await invocation.call(receiver, selector, args, kwargs)
        finally:
            # This loop runs only during calls: cells left starting or closing would
            # find their time limits expired at the next call, however fast they were.
            await self._pool.settle()
        if invocation.output:
            print(invocation.output, end="" if invocation.output.endswith("\n") else "\n")
        return value

    def close(self) -> None:
        if self._pool is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self._pool.close())
        self._pool = None
        if not self._loop.is_closed():
            self._loop.close()


_local: dict[int, LocalCells] = {}


def run_method(receiver: Any, selector: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Run ``receiver``'s generated method ``selector`` in a local cell (one pool per thread)."""
    thread = threading.get_ident()
    cells = _local.get(thread)
    if cells is None:
        cells = _local[thread] = LocalCells()
    return cells.run(receiver, selector, args, kwargs)


def close_all() -> None:
    for cells in list(_local.values()):
        try:
            cells.close()
        except Exception:  # noqa: BLE001 - at exit, a pool of another thread may be busy
            pass
    _local.clear()


atexit.register(close_all)
