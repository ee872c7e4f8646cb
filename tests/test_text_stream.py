"""Model text streamed to a cycle's progress: batched, and never held back at the end."""

from __future__ import annotations

import asyncio
import time

from batos_uvm import cycle_context


class Listener:
    """Stands in for a cycle: records the progress events a stream sends."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def event(self, state: str, **fields):
        return {"state": state, **fields}

    async def progress(self, event) -> None:
        self.texts.append(event["text"])


def test_text_is_batched_and_the_end_is_not_waited_for(monkeypatch) -> None:
    monkeypatch.setattr(cycle_context, "STREAM_INTERVAL", 30.0)  # a batch would wait long

    async def scenario():
        listener = Listener()
        stream = cycle_context._TextStream(listener, "BRICK", "SYNTHESIZING")
        pump = asyncio.create_task(stream.pump())
        for piece in ("def f", "(self):", "\n    return 1"):
            stream.feed(piece)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await stream.close(pump)  # the model is done: what is left goes now
        return listener.texts, time.monotonic() - started

    texts, waited = asyncio.run(scenario())
    assert texts == ["def f(self):\n    return 1"]
    assert waited < 5.0
