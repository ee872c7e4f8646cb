"""Running an installed method in a thread, with a time limit the kernel enforces.

Installed methods run in the kernel (the trial run is where they are
sandboxed), off the event loop. A method that overruns its time gets a
``MethodTimeout`` raised inside its thread; pure-Python loops stop at the
next bytecode. A method stuck in C code cannot be interrupted: it is
abandoned, and the caller must not reuse what the thread still holds.

Threads are reused while they behave: starting one per call would cost more
than most methods take. A thread that was ever asked to stop is never reused,
so a late stop request cannot hit another method.
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import threading
from collections.abc import Callable
from typing import Any


class MethodTimeout(BaseException):
    """The method ran past its time limit and was stopped.

    A BaseException, so that a method's own ``except Exception`` cannot swallow it.
    """


class MethodAbandoned(MethodTimeout):
    """The method ignored the stop request; its thread still runs.

    ``finished`` completes when the thread finally ends, so that what it holds
    can be released then.
    """

    def __init__(self, message: str, finished: asyncio.Future[Any]) -> None:
        super().__init__(message)
        self.finished = finished


class _Runner:
    """One reusable daemon thread running one job at a time."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="batos-method", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job()
            except MethodTimeout:
                pass  # a stop request that arrived after the job ended

    def interrupt(self) -> None:
        if self.thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread.ident), ctypes.py_object(MethodTimeout)
            )


_idle: list[_Runner] = []
_idle_lock = threading.Lock()
_MAX_IDLE = 16
# Abandoned methods still running; past this many, no new method is started,
# since each holds a thread, a database connection and maybe a core.
MAX_RUNAWAYS = 8
_runaways = 0


def _take_runner() -> _Runner:
    with _idle_lock:
        if _idle:
            return _idle.pop()
    return _Runner()


def _give_back(runner: _Runner) -> None:
    with _idle_lock:
        if len(_idle) < _MAX_IDLE:
            _idle.append(runner)
            return
    runner.jobs.put(None)


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _count_runaway(fate: dict[str, bool], *, ended: bool) -> None:
    """Keep ``_runaways`` right whichever comes first: the end or the abandonment."""
    global _runaways
    with _idle_lock:
        if ended:
            fate["finished"] = True
            if fate["abandoned"]:
                _runaways -= 1
        elif not fate["finished"]:
            fate["abandoned"] = True
            _runaways += 1


async def run_with_deadline(
    function: Callable[[], Any], timeout: float, *, grace: float = 2.0, name: str = "method"
) -> Any:
    """Run ``function`` in a worker thread; stop it after ``timeout`` seconds."""
    if _runaways >= MAX_RUNAWAYS:
        raise MethodTimeout(
            f"{_runaways} earlier methods overran their time and still run; "
            "no new method starts until they end or the kernel restarts"
        )
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    # A late outcome nobody awaits any more must not be logged from a finalizer:
    # on CPython 3.11 that logging parses source lines and can break an ast.parse
    # running at the time ("AST constructor recursion depth mismatch").
    future.add_done_callback(_mark_retrieved)
    fate = {"finished": False, "abandoned": False}  # guarded by _idle_lock

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
            outcome = (future.set_result, function())
        except BaseException as exc:  # delivered to the awaiting coroutine
            outcome = (future.set_exception, exc)
        _count_runaway(fate, ended=True)
        while True:
            try:
                deliver(*outcome)
                return
            except MethodTimeout:
                continue  # a stop request that arrived just after the method ended

    runner = _take_runner()
    runner.jobs.put(body)
    try:
        result = await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        pass
    except asyncio.CancelledError:
        runner.jobs.put(None)  # the method may still run: retire its thread after it
        raise
    except BaseException:
        _give_back(runner)  # the method itself raised: the thread is fine
        raise
    else:
        _give_back(runner)
        return result
    runner.interrupt()  # never reused after this: the request may land late
    runner.jobs.put(None)
    try:
        await asyncio.wait_for(asyncio.shield(future), grace)
    except TimeoutError:
        _count_runaway(fate, ended=False)
        raise MethodAbandoned(
            f"{name} ran longer than {timeout:g} s and did not stop; its thread was abandoned",
            future,
        ) from None
    except BaseException:
        raise MethodTimeout(f"{name} ran longer than {timeout:g} s and was stopped") from None
    raise MethodTimeout(f"{name} ran longer than {timeout:g} s")
