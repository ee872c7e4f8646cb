"""What one cognitive cycle carries while it runs: its log, its connection, its voice.

:class:`CycleLog` is the record kept in memory until the cycle commits;
:class:`CycleContext` is what every state receives: the log, the worker's
connection, the kernel's services and the progress callback through which
state changes and the models' streamed text reach the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .cognition import InferenceRequest
from .objects import UvmObject, parse_oid
from .trial import jsonable

Progress = Callable[[dict[str, Any]], Awaitable[None]]

STREAM_INTERVAL = 0.2  # seconds between progress events carrying streamed text


@dataclass
class CycleLog:
    """What happened in a cycle, kept in memory until it is committed."""

    cycle_id: str
    brief: dict[str, Any]
    target: str
    selector: str
    started: float = field(default_factory=time.time)
    states: list[dict[str, Any]] = field(default_factory=list)
    research_plan: list[str] = field(default_factory=list)
    plan_fallback: bool = False
    retrieved_context: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    outcome: str | None = None
    reason: str | None = None
    installed_version: int | None = None
    duration_s: float | None = None
    replayed: bool = False
    owner: dict[str, Any] = field(default_factory=dict)  # the kernel running it

    def to_data(self) -> dict[str, Any]:
        return json.loads(json.dumps(jsonable(asdict(self))))

    def durations(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for entry in self.states:
            if entry.get("left") is not None:
                spent = entry["left"] - entry["entered"]
                totals[entry["state"]] = totals.get(entry["state"], 0.0) + spent
        return totals


@dataclass
class CycleContext:
    """Everything a state needs: the log, the connection, and the kernel's services."""

    log: CycleLog
    connection: Any
    services: Any  # kernel services: cognition, embedder, audit, settings
    progress: Progress
    attempt: int = 0
    feedback: str | None = None
    candidate: dict[str, Any] | None = None
    details: dict[str, str] = field(default_factory=dict)  # state -> its last announcement

    @property
    def root(self) -> Any:
        return self.connection.root()

    def target(self) -> UvmObject:
        return self.connection.get(parse_oid(self.log.target))

    async def think(
        self,
        persona: str,
        state: str,
        prompt: str,
        max_tokens: int = 1024,
        *,
        system: str | None = None,
        **options: Any,
    ) -> str:
        """Ask ``persona``'s model; its text streams to ``progress`` as it is written.

        ``system`` replaces the persona's own system prompt (its voice) for work
        that needs none, such as writing code; ``options`` are further
        :class:`InferenceRequest` fields (prefix, stop, temperature, seed).
        """
        persona_obj = self.root[f"{persona.lower()}_prototype_obj"]
        codex = persona_obj.codex
        stream = _TextStream(self, persona, state)
        request = InferenceRequest(
            persona=persona,
            prompt=prompt,
            system=system if system is not None else codex.get("system_prompt"),
            state=state,
            max_tokens=max_tokens,
            on_text=stream.feed,
            **options,
        )
        started = time.perf_counter()
        pump = asyncio.create_task(stream.pump())
        try:
            completion = await self.services.cognition.infer(request)
        finally:
            await stream.close(pump)
        self.log.llm_calls.append(
            {
                "persona": persona,
                "state": state,
                "backend": completion.backend,
                "model": completion.model,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "replayed": completion.replayed,
                "seconds": round(time.perf_counter() - started, 4),
                "temperature": request.temperature,
                "seed": request.seed,
                "prefixed": completion.details.get("prefixed", False),
            }
        )
        self.log.replayed = self.log.replayed or completion.replayed
        return completion.text

    def event(self, state: str, detail: str | None = None, **fields: Any) -> dict[str, Any]:
        """A progress event of this cycle (see docs/PROTOCOL.md).

        Without a ``detail`` the state's last one is repeated: streamed text belongs to
        the announcement it follows.
        """
        if detail is None:
            detail = self.details.get(state, "")
        else:
            self.details[state] = detail
        elapsed = round(time.time() - self.log.started, 2)
        return {"cycle_id": self.log.cycle_id, "state": state, "detail": detail,
                "elapsed_s": elapsed, **fields}  # fmt: skip


class _TextStream:
    """Carries model output from the backend's thread to the cycle's progress, in batches."""

    def __init__(self, ctx: CycleContext, persona: str, state: str) -> None:
        self.ctx, self.persona, self.state = ctx, persona, state
        self.loop = asyncio.get_running_loop()
        self.chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self.closed = asyncio.Event()  # the model is done: send what is left at once

    def feed(self, text: str) -> None:  # any thread
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, text)

    async def pump(self) -> None:
        done = False
        while not done:
            batch = [await self.chunks.get()]
            if batch[0] is not None and not self.closed.is_set():
                try:  # gather what follows for a moment, unless the model is done
                    await asyncio.wait_for(self.closed.wait(), STREAM_INTERVAL)
                except TimeoutError:
                    pass
            while not self.chunks.empty():
                batch.append(self.chunks.get_nowait())
            done = None in batch
            text = "".join(chunk for chunk in batch if chunk)
            if text:
                try:
                    await self.ctx.progress(
                        self.ctx.event(self.state, persona=self.persona, text=text)
                    )
                except Exception:  # a vanished listener must not stop the cycle
                    pass

    async def close(self, pump: asyncio.Task[None]) -> None:
        self.closed.set()
        self.chunks.put_nowait(None)
        try:
            await asyncio.wait_for(pump, 5.0)
        except (TimeoutError, asyncio.CancelledError):
            pump.cancel()
