"""Checks every cognition backend must pass, whatever model answers.

Use it by subclassing in a test module and providing fixtures::

    from backend_conformance import BackendConformance

    class TestMyBackendConformance(BackendConformance):
        @pytest.fixture
        def backend_factory(self):
            return lambda: MyBackend(...)          # a fresh, working backend per call

        @pytest.fixture
        def broken_backend_factory(self):
            return lambda: MyBackend(bad_config)   # raises CognitionError on construction
                                                   # or on its first infer()

Optional fixtures (defaults below): ``normal_request`` (a request the backend
answers with non-empty text) and ``slow_request`` (one that keeps the backend
busy for a noticeable time, so a blocked event loop would show).

The class name does not start with ``Test``, so pytest collects the checks only
through subclasses. No async plugin is needed: each check runs its own loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from batos_uvm.cognition.base import (
    CognitionBackend,
    CognitionError,
    Completion,
    InferenceRequest,
)

T = TypeVar("T")
BackendFactory = Callable[[], CognitionBackend]

# Longest pause of the event loop tolerated while a backend works; generous for a
# loaded 2-core CI machine, far below what a blocking model call takes.
MAX_LOOP_STALL = 0.25
TICK = 0.005


def run(coro: Awaitable[T], timeout: float = 120.0) -> T:
    """Run one coroutine to completion on a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def _with_backend(factory: BackendFactory, body: Callable[[Any], Awaitable[T]]) -> T:
    backend = factory()
    try:
        return await body(backend)
    finally:
        await backend.close()


class BackendConformance:
    """Backend-agnostic checks; see the module docstring for the fixtures to provide."""

    @pytest.fixture
    def normal_request(self) -> InferenceRequest:
        return InferenceRequest(
            persona="BRICK",
            prompt="The living image keeps every object",
            system="You are BRICK. Answer briefly.",
            state="DECOMPOSING",
            max_tokens=16,
        )

    @pytest.fixture
    def slow_request(self, normal_request: InferenceRequest) -> InferenceRequest:
        return normal_request

    def test_satisfies_protocol(self, backend_factory: BackendFactory) -> None:
        async def body(backend: Any) -> None:
            assert isinstance(backend, CognitionBackend)
            assert isinstance(backend.name, str) and backend.name
            line = backend.describe()
            assert isinstance(line, str) and line.strip() and "\n" not in line

        run(_with_backend(backend_factory, body))

    def test_returns_completion(
        self, backend_factory: BackendFactory, normal_request: InferenceRequest
    ) -> None:
        async def body(backend: Any) -> tuple[str, Completion]:
            return backend.name, await backend.infer(normal_request)

        name, completion = run(_with_backend(backend_factory, body))
        assert isinstance(completion, Completion)
        assert completion.backend == name
        assert isinstance(completion.text, str) and completion.text.strip()
        assert isinstance(completion.prompt_tokens, int) and completion.prompt_tokens >= 0
        assert isinstance(completion.completion_tokens, int) and completion.completion_tokens >= 0
        record = completion.to_record()
        assert record["backend"] == completion.backend and record["text"] == completion.text

    def test_honours_max_tokens(
        self, backend_factory: BackendFactory, normal_request: InferenceRequest
    ) -> None:
        small = InferenceRequest(
            persona=normal_request.persona,
            prompt=normal_request.prompt,
            system=normal_request.system,
            state=normal_request.state,
            max_tokens=3,
        )

        async def body(backend: Any) -> tuple[Completion, Completion]:
            return await backend.infer(small), await backend.infer(normal_request)

        short, longer = run(_with_backend(backend_factory, body))
        assert short.completion_tokens <= 3
        if longer.completion_tokens > 3:  # the backend counts tokens: a cap must show
            assert len(short.text) <= len(longer.text)

    def test_does_not_block_event_loop(
        self, backend_factory: BackendFactory, slow_request: InferenceRequest
    ) -> None:
        async def body(backend: Any) -> tuple[float, float, int]:
            stamps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                while not stop.is_set():
                    stamps.append(time.perf_counter())
                    await asyncio.sleep(TICK)

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0.02)  # the ticker is running before the call starts
            start = time.perf_counter()
            await backend.infer(slow_request)
            end = time.perf_counter()
            stop.set()
            await task
            during = [start] + [s for s in stamps if start <= s <= end] + [end]
            stall = max(b - a for a, b in zip(during, during[1:], strict=False))
            return stall, end - start, len(during) - 2

        stall, elapsed, ticks = run(_with_backend(backend_factory, body))
        assert stall < MAX_LOOP_STALL, (
            f"event loop stalled {stall:.3f} s during a {elapsed:.3f} s infer"
        )
        if elapsed > 0.05:  # long enough for a free loop to tick several times
            assert ticks >= 2, f"ticker ran {ticks} times during a {elapsed:.3f} s infer"

    def test_concurrent_calls_both_answer(
        self, backend_factory: BackendFactory, normal_request: InferenceRequest
    ) -> None:
        async def body(backend: Any) -> list[Completion]:
            return await asyncio.gather(
                backend.infer(normal_request), backend.infer(normal_request)
            )

        first, second = run(_with_backend(backend_factory, body))
        assert first.text.strip() and second.text.strip()

    def test_failure_raises_cognition_error(
        self, broken_backend_factory: BackendFactory, normal_request: InferenceRequest
    ) -> None:
        async def attempt() -> None:
            backend = broken_backend_factory()
            try:
                await backend.infer(normal_request)
            finally:
                await backend.close()

        with pytest.raises(CognitionError) as info:
            run(attempt())
        assert str(info.value).strip(), "the error must say what went wrong"

    def test_close_is_idempotent_and_final(
        self, backend_factory: BackendFactory, normal_request: InferenceRequest
    ) -> None:
        async def body() -> None:
            backend = backend_factory()
            await backend.infer(normal_request)
            await backend.close()
            await backend.close()
            with pytest.raises(CognitionError):
                await backend.infer(normal_request)
            await backend.close()

        run(body())

    def test_close_without_use(self, backend_factory: BackendFactory) -> None:
        async def body() -> None:
            backend = backend_factory()
            await backend.close()
            await backend.close()

        run(body())
