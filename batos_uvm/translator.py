"""The mission brief translator: a sentence typed in the chat becomes one bridge command.

Two translators share one interface (``translate(text) -> Translation``):

* ``RuleTranslator`` (no model needed) understands a few fixed forms
  ("create a method to ...", "call X on Y with ...", "what is ...") and says
  plainly when it does not understand, rather than inventing a selector.
* ``LlamaTranslator`` asks a local GGUF model (llama-cpp-python, loaded once)
  for JSON constrained by a grammar, then validates that JSON against the
  protocol's request models; anything invalid is rejected with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from .protocol import REQUEST_ADAPTER, describe_validation_error, is_identifier, parse_target

GENESIS = "genesis_obj"
CATALOG = "knowledge_catalog_obj"
MAX_SELECTOR_CHARS = 64
MAX_BRIEF_CHARS = 2000
NOT_UNDERSTOOD = "I did not understand that; try /help"
TRANSLATABLE_COMMANDS = ("send", "initiate_cognitive_cycle", "inspect", "cycles", "ping")


@dataclass(frozen=True)
class Command:
    """A bridge command without its envelope (``v`` and ``id`` are added when sent)."""

    command: str
    fields: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        f = self.fields
        if self.command == "send":
            return f"send {f['target']}.{f['selector']}({_call_args(f['args'], f['kwargs'])})"
        if self.command == "initiate_cognitive_cycle":
            brief = f["mission_brief"]
            call = _call_args(brief.get("args", []), brief.get("kwargs", {}))
            return f"cognitive cycle on {f['target_oid']} for {brief['selector']}({call})"
        if self.command == "inspect":
            return f"inspect {f['target']}"
        if self.command == "cycles":
            return f"cycles (last {f.get('limit', 20)})"
        return self.command


@dataclass(frozen=True)
class Translation:
    """``command`` is None when the text was not understood; ``message`` then says why."""

    command: Command | None
    message: str = ""
    translator: str = "rules"

    @property
    def ok(self) -> bool:
        return self.command is not None


class Translator(Protocol):
    name: str

    def translate(self, text: str) -> Translation: ...


def _call_args(args: list[Any], kwargs: dict[str, Any]) -> str:
    parts = [json.dumps(a, ensure_ascii=False, default=repr) for a in args]
    parts += [f"{k}={json.dumps(v, ensure_ascii=False, default=repr)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def validate_command(obj: Any) -> Command:
    """Check a command map (e.g. a model's JSON) against the protocol; ValueError if invalid."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    command = obj.get("command")
    if command not in TRANSLATABLE_COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    fields = {k: v for k, v in obj.items() if k != "command"}
    try:
        REQUEST_ADAPTER.validate_python({"v": 1, "id": "translator", "command": command, **fields})
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None
    return Command(command, fields)


def parse_value(token: str) -> Any:
    """A JSON value if the token is one (``1``, ``true``, ``"x"``, ``[1]``), else the string."""
    try:
        return json.loads(token)
    except ValueError:
        return token


def parse_args(text: str) -> list[Any]:
    """Arguments after "with": a JSON list, comma separated values, or shell-like words."""
    text = text.strip().rstrip(".!")
    try:
        value = json.loads(f"[{text}]")
        return value
    except ValueError:
        pass
    if "," in text:
        return [parse_value(part.strip()) for part in text.split(",") if part.strip()]
    try:
        return [parse_value(tok) for tok in shlex.split(text)]
    except ValueError:
        return [parse_value(tok) for tok in text.split()]


def selector_from_words(text: str) -> str | None:
    """snake_case of the words: lowercased, punctuation stripped, capped at whole words."""
    words = re.findall(r"[a-z0-9]+", text.lower().replace("'", ""))
    selector = ""
    for word in words:
        candidate = f"{selector}_{word}" if selector else word
        if len(candidate) > MAX_SELECTOR_CHARS:
            break
        selector = candidate
    if not selector and words:
        selector = words[0][:MAX_SELECTOR_CHARS]
    return selector if selector and is_identifier(selector) else None


_CREATE = re.compile(
    r"^(?:please\s+)?(?:(?:can|could|would)\s+you\s+)?"
    r"(?:create|write|make|build|add|define|generate)\s+(?:me\s+)?(?:(?:a|an|the)\s+)?"
    r"(?:new\s+)?(?:method|function)\b\s*(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_LEAD = re.compile(r"^(?:to|that|which|called|named)\s+(?P<rest>.*)$", re.IGNORECASE | re.DOTALL)
_CALL = re.compile(
    r"^(?:please\s+)?call\s+(?P<sel>\S+)\s+on\s+(?P<target>[^\s,.!?]+)[.!?]?"
    r"(?:\s+with\s+(?P<args>.+))?$",
    re.IGNORECASE | re.DOTALL,
)
_QUESTION = re.compile(r"^what\s+(?:is|are)\b", re.IGNORECASE)


class RuleTranslator:
    """Deterministic translation of the common forms; used when no model is configured."""

    name = "rules"

    def translate(self, text: str) -> Translation:
        text = " ".join(text.split())
        if not text:
            return Translation(None, NOT_UNDERSTOOD, self.name)
        if m := _CREATE.match(text):
            rest = m.group("rest").strip()
            if lead := _LEAD.match(rest):
                rest = lead.group("rest")
            selector = selector_from_words(rest)
            if selector is None:
                return Translation(
                    None,
                    "say what the method should do, e.g. 'create a method to greet a user'",
                    self.name,
                )
            return self._command(
                {
                    "command": "send",
                    "target": GENESIS,
                    "selector": selector,
                    "args": [],
                    "kwargs": {},
                }
            )
        if m := _CALL.match(text):
            selector, target = m.group("sel"), m.group("target")
            if not is_identifier(selector):
                return Translation(None, f"{selector!r} is not a valid method name", self.name)
            try:
                parse_target(target)
            except ValueError as exc:
                return Translation(None, str(exc), self.name)
            args = parse_args(m.group("args")) if m.group("args") else []
            return self._command(
                {
                    "command": "send",
                    "target": target,
                    "selector": selector,
                    "args": args,
                    "kwargs": {},
                }
            )
        if _QUESTION.match(text):
            return self._command(
                {
                    "command": "send",
                    "target": CATALOG,
                    "selector": "search",
                    "args": [text],
                    "kwargs": {},
                }
            )
        return Translation(None, NOT_UNDERSTOOD, self.name)

    def _command(self, obj: dict[str, Any]) -> Translation:
        try:
            return Translation(validate_command(obj), "", self.name)
        except ValueError as exc:
            return Translation(None, f"cannot send that: {exc}", self.name)


# -- the model-backed translator --------------------------------------------------------------

_NAME = {"type": "string", "pattern": "^[a-z_][a-z0-9_]{0,63}$"}
OUTPUT_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["command", "target", "selector", "args", "kwargs"],
            "properties": {
                "command": {"const": "send"},
                "target": _NAME,
                "selector": _NAME,
                "args": {"type": "array"},
                "kwargs": {"type": "object"},
            },
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["command", "target"],
            "properties": {"command": {"const": "inspect"}, "target": _NAME},
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["command", "limit"],
            "properties": {"command": {"const": "cycles"}, "limit": {"type": "integer"}},
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["command"],
            "properties": {"command": {"const": "unclear"}},
        },
    ]
}

PROMPT = """Translate a request to the BAT OS kernel into exactly one JSON command.
{"command": "send", "target": OBJECT, "selector": METHOD, "args": [...], "kwargs": {...}} sends a message to a live object; a METHOD the object lacks is written by the kernel.
{"command": "inspect", "target": OBJECT} shows an object.
{"command": "cycles", "limit": N} lists recent cognitive cycles.
{"command": "unclear"} when the request is none of these.
New methods go to genesis_obj. Questions go to knowledge_catalog_obj with selector "search".

Request: create a method to report the current system time
JSON: {"command": "send", "target": "genesis_obj", "selector": "report_the_current_system_time", "args": [], "kwargs": {}}
Request: call add on genesis_obj with 2, 3
JSON: {"command": "send", "target": "genesis_obj", "selector": "add", "args": [2, 3], "kwargs": {}}
Request: what is the living image?
JSON: {"command": "send", "target": "knowledge_catalog_obj", "selector": "search", "args": ["what is the living image?"], "kwargs": {}}
Request: show the last 5 cycles
JSON: {"command": "cycles", "limit": 5}
Request: %s
JSON: """


class TranslatorUnavailable(RuntimeError):
    """The configured model cannot be used; the message says how to fix it."""


class LlamaTranslator:
    """Translate with a local GGUF model, loaded once when the translator is created."""

    name = "llama"

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int = 2048,
        max_tokens: int = 256,
        n_threads: int | None = None,
        llama_factory: Any = None,
    ) -> None:
        if not os.path.isfile(model_path):
            raise TranslatorUnavailable(
                f"model file {model_path} does not exist (set LLAMA_MODEL_PATH or --model to a "
                "GGUF file, or use --no-model for the built-in rules)"
            )
        try:
            from llama_cpp import LlamaGrammar
        except ImportError as exc:
            raise TranslatorUnavailable(
                "llama-cpp-python is not installed: pip install 'batos[llama]' "
                "(or use --no-model for the built-in rules)"
            ) from exc
        if llama_factory is None:
            from llama_cpp import Llama as llama_factory
        self.model_path = model_path
        self.max_tokens = max_tokens
        try:
            self._llm = llama_factory(
                model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, seed=0, verbose=False
            )
        except Exception as exc:  # llama.cpp reports a bad file as a ValueError or RuntimeError
            raise TranslatorUnavailable(f"cannot load {model_path}: {exc}") from exc
        self._grammar = LlamaGrammar.from_json_schema(json.dumps(OUTPUT_SCHEMA), verbose=False)

    def translate(self, text: str) -> Translation:
        text = " ".join(text.split())[:MAX_BRIEF_CHARS]
        if not text:
            return Translation(None, NOT_UNDERSTOOD, self.name)
        try:
            response = self._llm.create_completion(
                PROMPT % text, max_tokens=self.max_tokens, temperature=0.0, grammar=self._grammar
            )
            output = str(response["choices"][0]["text"]).strip()
        except Exception as exc:  # e.g. the brief does not fit the model's context
            return Translation(None, f"the model could not translate that: {exc}", self.name)
        return self.check_output(output)

    def check_output(self, output: str) -> Translation:
        """Validate the model's JSON; a clear rejection when it is not a valid command."""
        shown = output if len(output) <= 200 else output[:200] + "..."
        try:
            obj = json.loads(output)
        except ValueError as exc:
            return Translation(
                None, f"the model's answer is not valid JSON ({exc}): {shown}", self.name
            )
        if isinstance(obj, dict) and obj.get("command") == "unclear":
            return Translation(None, NOT_UNDERSTOOD, self.name)
        try:
            return Translation(validate_command(obj), "", self.name)
        except ValueError as exc:
            return Translation(
                None, f"the model proposed an invalid command ({exc}): {shown}", self.name
            )


def load_translator(model_path: str | None) -> Translator:
    """The llama translator for a model path, else the rules."""
    return LlamaTranslator(model_path) if model_path else RuleTranslator()
