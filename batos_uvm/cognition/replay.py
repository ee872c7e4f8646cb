"""The replay backend: recorded answers from a JSONL cassette, always labelled as replayed.

Each line: ``{"persona": "BRICK" | null, "prompt_contains": "text", "response": "text"}``
with an optional ``"state"`` (the state-machine state making the call). The
first line whose persona matches (null matches any), whose state matches
(absent matches any) and whose ``prompt_contains`` occurs in the prompt answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .base import CognitionError, Completion, InferenceRequest

MAX_CASSETTE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class CassetteLine:
    number: int
    persona: str | None
    state: str | None
    prompt_contains: str
    response: str

    def matches(self, request: InferenceRequest) -> bool:
        if self.persona is not None and self.persona != request.persona.upper():
            return False
        if self.state is not None and self.state != (request.state or "").upper():
            return False
        return self.prompt_contains in request.prompt


def load_cassette(path: str | Path) -> list[CassetteLine]:
    """Parse a cassette; a bad line is an error naming the file and line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CASSETTE_BYTES:
            raise CognitionError(f"cassette {path} is larger than {MAX_CASSETTE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CognitionError(f"cannot read replay cassette {path}: {exc.strerror}") from None
    lines: list[CassetteLine] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("//"):
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CognitionError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise CognitionError(f"{path}:{number}: a line must be a JSON object")
        if set(data) == {"comment"}:
            continue  # a line that only documents the cassette
        unknown = set(data) - {"persona", "state", "prompt_contains", "response", "comment"}
        if unknown:
            raise CognitionError(f"{path}:{number}: unknown key(s) {sorted(unknown)}")
        persona, state = data.get("persona"), data.get("state")
        contains, response = data.get("prompt_contains", ""), data.get("response")
        if persona is not None and not isinstance(persona, str):
            raise CognitionError(f"{path}:{number}: 'persona' must be a string or null")
        if state is not None and not isinstance(state, str):
            raise CognitionError(f"{path}:{number}: 'state' must be a string")
        if not isinstance(contains, str) or not isinstance(response, str):
            raise CognitionError(f"{path}:{number}: 'prompt_contains' and 'response' must be text")
        lines.append(
            CassetteLine(
                number,
                persona.upper() if persona else None,
                state.upper() if state else None,
                contains,
                response,
            )
        )
    return lines


class ReplayBackend:
    """Answers from a cassette. Every Completion says ``replayed=True``."""

    name = "replay"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lines = load_cassette(self.path)
        self._closed = False

    async def infer(self, request: InferenceRequest) -> Completion:
        if self._closed:
            raise CognitionError(f"replay backend for {self.path} is closed")
        for line in self.lines:
            if line.matches(request):
                text, words = _within_budget(line.response, request.max_tokens)
                return Completion(
                    text=text,
                    backend=self.name,
                    model=f"cassette {self.path.name}",
                    prompt_tokens=len(request.prompt.split()),
                    completion_tokens=words,
                    replayed=True,
                    details={"cassette": str(self.path), "line": line.number},
                )
        start = " ".join(request.prompt.split())[:160]
        raise CognitionError(
            f"replay cassette {self.path} has no answer for {request.persona}"
            f"{' in ' + request.state if request.state else ''}; the prompt starts: \"{start}\""
        )

    def describe(self) -> str:
        return f"replay of {self.path} ({len(self.lines)} recorded answers)"

    async def close(self) -> None:
        self._closed = True


def _within_budget(text: str, max_tokens: int) -> tuple[str, int]:
    """A replay keeps the token budget too, counted in words, keeping the layout."""
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_tokens:
        return text, len(words)
    return text[: words[max_tokens - 1].end()] if max_tokens > 0 else "", max(max_tokens, 0)
