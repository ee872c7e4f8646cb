"""Running an installed method in a thread, with a time limit the kernel enforces.

Installed methods run in the kernel (the trial run is where they are
sandboxed), off the event loop. A method that overruns its time gets a
``MethodTimeout`` raised inside its thread; pure-Python loops stop at the
next bytecode. A method stuck in C code cannot be interrupted: it is
abandoned, and the caller must not reuse what the thread still holds.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from typing import Any


class MethodTimeout(Exception):
    """The method ran past its time limit and was stopped."""


class MethodAbandoned(MethodTimeout):
    """The method ignored the stop request; its thread still runs."""


def _raise_in_thread(thread_id: int, exception: type[BaseException]) -> bool:
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception)
    )
    return hit == 1


async def run_with_deadline(
    function: Callable[[], Any], timeout: float, *, grace: float = 2.0, name: str = "method"
) -> Any:
    """Run ``function`` in its own thread; stop it after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle, setter, value)
        except RuntimeError:
            pass  # an abandoned method outlived the kernel's event loop

    def body() -> None:
        try:
            value = function()
        except BaseException as exc:  # delivered to the awaiting coroutine
            deliver(future.set_exception, exc)
        else:
            deliver(future.set_result, value)

    thread = threading.Thread(target=body, name=f"batos-{name}", daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        pass
    if thread.ident is not None:
        _raise_in_thread(thread.ident, MethodTimeout)
    try:
        await asyncio.wait_for(asyncio.shield(future), grace)
    except MethodTimeout:
        raise MethodTimeout(f"{name} ran longer than {timeout:g} s and was stopped") from None
    except TimeoutError:
        raise MethodAbandoned(
            f"{name} ran longer than {timeout:g} s and did not stop; its thread was abandoned"
        ) from None
    except BaseException:
        raise MethodTimeout(f"{name} ran longer than {timeout:g} s and was stopped") from None
    raise MethodTimeout(f"{name} ran longer than {timeout:g} s")
