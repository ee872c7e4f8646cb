"""Cognition: which backend answers which persona, built from configuration.

A backend is named by a short spec or a table (``[personas.BRICK]`` in batos.toml):

    replay:PATH                 recorded answers (tests, demos; always labelled)
    transformers                the persona's model stored in the image
    llama-cpp:PATH.gguf         a GGUF file through llama-cpp-python
    openai:BASE_URL#MODEL       any OpenAI-compatible server (vLLM, llama.cpp server, Ollama)

Backends are built on first use, so a kernel with no usable model still starts;
a cycle then fails fast with :class:`CognitionUnavailable` saying what to set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .base import (
    CognitionBackend,
    CognitionError,
    CognitionUnavailable,
    Completion,
    InferenceRequest,
)

__all__ = [
    "Cognition",
    "CognitionBackend",
    "CognitionError",
    "CognitionUnavailable",
    "Completion",
    "InferenceRequest",
    "parse_spec",
]

HOW_TO_CONFIGURE = (
    "no language model is configured for {persona}. Install the default code model with "
    "`python batos.py models fetch` (or ./puter.sh setup) and start the kernel again, or "
    "start it with --backend replay:CASSETTE (recorded answers), --backend llama-cpp:MODEL.gguf, "
    "--backend openai:http://HOST:PORT/v1#MODEL, or store a model in the image with "
    "`python batos.py models add {persona} SOURCE` and use --backend transformers; "
    "per-persona settings go in batos.toml under [personas.{persona}] (see docs/MODELS.md)"
)


def parse_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """Turn ``kind:argument`` or a table into a configuration dict with a 'backend' key."""
    if isinstance(spec, dict):
        config = dict(spec)
        config["backend"] = str(config.get("backend", "")).lower()
        return config
    kind, _, argument = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "replay":
        return {"backend": "replay", "path": argument}
    if kind in {"llama-cpp", "llama_cpp", "llamacpp"}:
        return {"backend": "llama-cpp", "model_path": argument}
    if kind == "openai":
        url, _, model = argument.partition("#")
        return {"backend": "openai", "base_url": url, "model": model or "default"}
    if kind == "transformers":
        return {"backend": "transformers"}
    if kind in {"", "none"}:
        return {"backend": ""}
    raise CognitionError(
        f"unknown cognition backend {spec!r} (use replay:, transformers, llama-cpp: or openai:)"
    )


def build_backend(config: dict[str, Any], *, db: Any = None) -> CognitionBackend:
    kind = config["backend"]
    if kind == "replay":
        from .replay import ReplayBackend

        if not config.get("path"):
            raise CognitionError("replay backend needs a cassette path: replay:PATH")
        return ReplayBackend(config["path"])
    if kind == "llama-cpp":
        from .llama_cpp_backend import LlamaCppBackend

        return LlamaCppBackend.from_config(config)
    if kind == "openai":
        from .openai_backend import OpenAICompatibleBackend

        return OpenAICompatibleBackend.from_config(config)
    if kind == "transformers":
        from .transformers_backend import TransformersBackend

        if db is None:
            raise CognitionError("the transformers backend needs the kernel's database")
        # 'model' names what the kernel stores on awakening; the backend reads the image.
        options = {k: v for k, v in config.items() if k not in {"model", "source"}}
        return TransformersBackend.from_config(options, db=db)
    raise CognitionError(f"unknown cognition backend {kind!r}")


DefaultResolver = Callable[[str], "dict[str, Any] | None"]


class Cognition:
    """Routes ``infer(persona, prompt)`` to the backend configured for that persona.

    A persona with no backend configured asks ``default(persona)`` (in a
    thread) for the configuration of the model stored for it, on every
    request, so a model stored while the kernel runs is used by the next call;
    a backend no persona resolves to any more is closed.
    """

    def __init__(
        self,
        specs: dict[str, str | dict[str, Any]],
        *,
        db: Any = None,
        default: DefaultResolver | None = None,
    ) -> None:
        self._configs = {persona.upper(): parse_spec(spec) for persona, spec in specs.items()}
        self._db = db
        self._default = default
        self._defaults: dict[str, str] = {}  # persona -> key of its resolved default backend
        self._backends: dict[str, CognitionBackend] = {}
        self._lock = asyncio.Lock()

    def configured(self, persona: str) -> bool:
        return bool(self._configs.get(persona.upper(), {}).get("backend"))

    async def backend_for(self, persona: str) -> CognitionBackend:
        persona = persona.upper()
        config = self._configs.get(persona) or {"backend": ""}
        if not config["backend"] and self._default is not None:
            config = await asyncio.to_thread(self._default, persona) or {"backend": ""}
        if not config["backend"]:
            raise CognitionUnavailable(HOW_TO_CONFIGURE.format(persona=persona))
        key = repr(sorted(config.items()))
        async with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = await asyncio.to_thread(build_backend, config, db=self._db)
                self._backends[key] = backend
            if not self.configured(persona):
                await self._forget_default(persona, key)
        return backend

    async def _forget_default(self, persona: str, key: str) -> None:
        """Remember ``persona``'s default backend; close one nobody resolves to any more."""
        old = self._defaults.get(persona)
        self._defaults[persona] = key
        if old is None or old == key or old in self._defaults.values():
            return
        if any(repr(sorted(c.items())) == old for c in self._configs.values()):
            return
        backend = self._backends.pop(old, None)
        if backend is not None:
            await backend.close()

    async def infer(self, request: InferenceRequest) -> Completion:
        backend = await self.backend_for(request.persona)
        try:
            return await backend.infer(request)
        except CognitionError:
            raise
        except Exception as exc:  # a backend bug must fail the cycle, not the kernel
            raise CognitionError(
                f"{backend.name} backend failed: {type(exc).__name__}: {exc}"
            ) from exc

    def describe(self) -> dict[str, str]:
        described = {}
        for persona, config in self._configs.items():
            key = self._defaults.get(persona) or repr(sorted(config.items()))
            backend = self._backends.get(key)
            if backend is not None:
                described[persona] = backend.describe()
            elif config["backend"]:
                described[persona] = config["backend"]
            elif self._default is not None:
                described[persona] = "its model in the image, if any (loaded on first use)"
            else:
                described[persona] = "none"
        return described

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
        self._backends.clear()
