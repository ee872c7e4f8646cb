"""The one interface every cognition backend implements.

Personas think through ``infer(persona, prompt)``; which model answers is a
matter of configuration. Backends live beside this module: ``replay`` (recorded
answers, always labelled as such), ``transformers``, ``llama_cpp`` and
``openai`` (any OpenAI-compatible HTTP server).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


class CognitionError(RuntimeError):
    """A backend could not produce an answer; the message says what to fix."""


class CognitionUnavailable(CognitionError):
    """No usable backend is configured for a persona (fail fast, say how to configure)."""


@dataclass(frozen=True)
class Completion:
    """One answer from a backend, with what the cycle record needs to know about it."""

    text: str
    backend: str
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replayed: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InferenceRequest:
    """What a persona asks of its model.

    ``state`` is the state-machine state making the call (``DECOMPOSING``,
    ``SYNTHESIZING`` ...); ``system`` the persona's system prompt from its codex.

    ``prefix`` is how the reply must begin (e.g. ``def factorial(self``): a
    backend that can force it generates after it, also applies ``prefix_stop``,
    and returns the prefix as the start of its text (``details["prefixed"]``);
    one that cannot ignores both. ``temperature`` and ``seed`` override the
    backend's own for this request (None: the backend's); a temperature given
    here asks for variety, so backends sample without cutting the
    distribution down to its likeliest token. ``on_text`` receives
    the reply in chunks as it is generated, from any thread, by backends that
    stream; it must not block.
    """

    persona: str
    prompt: str
    system: str | None = None
    state: str | None = None
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()
    prefix: str = ""
    prefix_stop: tuple[str, ...] = ()
    temperature: float | None = None
    seed: int | None = None
    on_text: Callable[[str], None] | None = field(default=None, compare=False, repr=False)


@runtime_checkable
class CognitionBackend(Protocol):
    """A source of completions. Implementations must not block the event loop."""

    name: str

    async def infer(self, request: InferenceRequest) -> Completion:
        """Answer one request or raise CognitionError with a readable reason."""
        ...

    def describe(self) -> str:
        """One line for logs and ``models list``: backend, model, where it runs."""
        ...

    async def close(self) -> None:
        """Release models, sockets and threads."""
        ...
