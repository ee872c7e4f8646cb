"""What the clients of one cognitive cycle hear while it runs, and how they stop it.

Every client whose message joined the cycle is a listener. Each event gets the
seconds since the cycle began (``elapsed_s``) and, where the state says who is
thinking, the persona. While a model thinks, no state changes for a long time:
so that a wait is never silent, the last state is sent again every ``tick``
seconds with the time updated. ``cancel`` is the cycle's cancellation switch
(see Orchestrator.run): a ``cancel`` request sets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("batos.kernel")

Listener = Callable[[dict[str, Any]], Awaitable[None]]

TICK_SECONDS = 2.0
FINAL_STATES = frozenset({"COMPLETE", "FAILED", "CANCELLED"})


class CycleProgress:
    """Fans one cycle's progress out to its listeners; see the module docstring."""

    def __init__(
        self,
        first: Listener,
        personas: dict[str, str] | None = None,
        tick: float = TICK_SECONDS,
    ) -> None:
        self.listeners: list[Listener] = [first]
        self.personas = personas or {}
        self.tick = tick
        self.started = time.monotonic()
        self.cycle_id: str | None = None
        self.cancel = asyncio.Event()
        self._last: dict[str, Any] | None = None
        self._last_sent = self.started

    def add(self, listener: Listener) -> None:
        self.listeners.append(listener)

    async def __call__(self, event: dict[str, Any]) -> None:
        event = dict(event)
        if event.get("cycle_id"):
            self.cycle_id = event["cycle_id"]
        event.setdefault("elapsed_s", round(time.monotonic() - self.started, 1))
        if not event.get("persona") and not event.get("text"):
            persona = self.personas.get(event.get("state", ""))
            if persona:
                event["persona"] = persona
        if not event.get("text"):  # a chunk of streamed output is not a state to repeat
            self._last = event
        await self._send(event)

    async def _send(self, event: dict[str, Any]) -> None:
        self._last_sent = time.monotonic()
        for listener in list(self.listeners):
            try:
                await listener(event)
            except Exception:  # a vanished client must not break the cycle
                log.debug("progress listener failed", exc_info=True)

    async def keep_talking(self) -> None:
        """Repeat the current state with the time after each ``tick`` s of silence (a task)."""
        while True:
            wait = self._last_sent + self.tick - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            last = self._last
            if last is None or last.get("state") in FINAL_STATES:
                await asyncio.sleep(self.tick)
                continue
            await self._send({**last, "elapsed_s": round(time.monotonic() - self.started, 1)})
