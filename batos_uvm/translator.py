"""The mission brief translator: a sentence typed in the chat becomes one bridge command.

Translators share one interface (``translate(text) -> Translation``):

* ``RuleTranslator`` (no model needed) understands a few fixed forms
  ("create a method to ...", "I need a method that ...", "make genesis able
  to ...", "... and call it with 3 and 4", "call X on Y with ...",
  "what is ...") and says plainly when it does not understand, rather than
  inventing a selector.
* ``LlamaTranslator`` and ``HybridTranslator`` (batos_uvm/model_translator.py)
  ask a local GGUF model for what the rules do not know.

A brief that asks for new behaviour keeps the user's words: the ``send``
command carries them as ``intent``, and the kernel hands them to the
personas who write the method.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import unicodedata
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
    """Arguments after "with": JSON or Python literals separated by commas or "and", or words.

    ``3 and 4`` -> ``[3, 4]``; ``[3, 9, 2]`` -> ``[[3, 9, 2]]``; ``'a', "b"`` -> ``["a", "b"]``;
    ``'two words' 3`` -> ``["two words", 3]``; unquoted words stay strings.
    """
    text = text.strip().rstrip(".!")
    try:
        return list(json.loads(f"[{text}]"))
    except ValueError:
        pass
    values: list[Any] = []
    for piece in _split_top_level(text):
        literal = _literal(piece)
        if literal is not _NO_LITERAL:
            values.append(literal)
            continue
        try:
            tokens = shlex.split(piece)
        except ValueError:
            tokens = piece.split()
        values.extend(parse_value(tok) for tok in tokens)
    return values


_NO_LITERAL = object()


def _literal(piece: str) -> Any:
    """A JSON or Python literal (``'x'``, ``[1, 2]``, ``True``), else ``_NO_LITERAL``."""
    try:
        return json.loads(piece)
    except ValueError:
        pass
    try:
        return ast.literal_eval(piece)  # literals only: never runs code
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NO_LITERAL


def _split_top_level(text: str) -> list[str]:
    """Split at commas and at the word "and" outside quotes and brackets."""
    pieces, current, depth, quote, i = [], [], 0, "", 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and char == ",":
            pieces.append("".join(current))
            current, i = [], i + 1
            continue
        elif depth == 0 and re.match(r"\sand\s", text[i : i + 5], re.IGNORECASE):
            pieces.append("".join(current))
            current, i = [], i + 5
            continue
        current.append(char)
        i += 1
    pieces.append("".join(current))
    return [piece.strip() for piece in pieces if piece.strip()]


# Letters whose plain-ASCII spelling is not their base letter without the accent.
_SPELLED = str.maketrans({
    "ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "ß": "ss", "ẞ": "SS",
    "æ": "ae", "Æ": "Ae", "œ": "oe", "Œ": "Oe", "ø": "oe", "Ø": "Oe",
    "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th",
    "ı": "i",
})  # fmt: skip


def transliterate(text: str) -> str:
    """Plain ASCII letters for the words of a selector: ``grüße`` -> ``gruesse``, ``café`` -> ``cafe``."""
    spelled = unicodedata.normalize("NFC", text).translate(_SPELLED)
    decomposed = unicodedata.normalize("NFKD", spelled)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def selector_from_words(text: str) -> str | None:
    """snake_case of the words: transliterated, lowercased, punctuation stripped, capped at whole words."""
    words = re.findall(r"[a-z0-9]+", transliterate(text).lower().replace("'", ""))
    selector = ""
    for word in words:
        candidate = f"{selector}_{word}" if selector else word
        if len(candidate) > MAX_SELECTOR_CHARS:
            break
        selector = candidate
    if not selector and words:
        selector = words[0][:MAX_SELECTOR_CHARS]
    return selector if selector and is_identifier(selector) else None


_POLITE = r"^(?:please\s+)?(?:(?:can|could|would)\s+you\s+(?:please\s+)?)?"
_CREATE = re.compile(
    _POLITE + r"(?:create|write|make|build|add|define|generate|give\s+me)\s+(?:me\s+)?"
    r"(?:(?:a|an|the)\s+)?(?:new\s+)?(?:method|function)\b\s*(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_NEED = re.compile(
    r"^(?:please\s+)?(?:(?:i\s+(?:need|want|would\s+like)|i'd\s+like|we\s+need)\s+)?"
    r"(?:(?:a|an)\s+)?(?:new\s+)?(?:method|function)\b\s*(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_ABLE = re.compile(
    _POLITE + r"(?:make|teach|let|help)\s+(?P<target>[A-Za-z_]\w*)\s+"
    r"(?:be\s+able\s+to|able\s+to|learn\s+(?:how\s+)?to|how\s+to|to)\s+(?P<rest>.+)$",
    re.IGNORECASE | re.DOTALL,
)
_LEAD = re.compile(
    r"^(?:(?:that|which)\s+(?:can|will|should|would)|to|that|which|for|called|named)\s+"
    r"(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_NAMED = re.compile(r"^(?:called|named)\s+(?P<name>[A-Za-z_]\w*)\b[\s,;:.]*(?P<rest>.*)$", re.I | re.S)
_CALL_IT = re.compile(
    r"(?:\s*[,;.(]\s*|\s+)(?:and\s+|then\s+)*(?:call|run|try|test)\s+it\s+(?:with|on)\s+"
    r"(?P<args>.+?)\)?$",
    re.IGNORECASE | re.DOTALL,
)
_CALL = re.compile(
    r"^(?:please\s+)?call\s+(?P<sel>\S+)\s+on\s+(?P<target>[^\s,.!?]+)[.!?]?"
    r"(?:\s+with\s+(?P<args>.+))?$",
    re.IGNORECASE | re.DOTALL,
)
_QUESTION = re.compile(r"^what\s+(?:is|are)\b", re.IGNORECASE)
SAY_WHAT = "say what the method should do, e.g. 'create a method to greet a user'"


def object_name(word: str) -> str | None:
    """``genesis`` -> ``genesis_obj``; root names ending in ``_obj`` stay; anything else: None."""
    word = word.strip().lower()
    if word in ("genesis", "it", "yourself", "bat_os", "batos"):
        return GENESIS
    return word if word.endswith("_obj") and is_identifier(word) else None


class RuleTranslator:
    """Deterministic translation of the common forms; used when no model is configured."""

    name = "rules"

    def translate(self, text: str) -> Translation:
        text = " ".join(text.split())
        if not text:
            return Translation(None, NOT_UNDERSTOOD, self.name)
        if m := _CREATE.match(text) or _NEED.match(text):
            return self._new_method(GENESIS, m.group("rest"), text)
        if m := _ABLE.match(text):
            target = object_name(m.group("target"))
            if target is None:
                return Translation(None, f"{m.group('target')!r} names no object; try genesis", self.name)
            return self._new_method(target, m.group("rest"), text)
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

    def _new_method(self, target: str, rest: str, text: str) -> Translation:
        """A send that grows a method: the selector from the words, args from "call it with"."""
        rest = rest.strip()
        args: list[Any] = []
        if call := _CALL_IT.search(rest):
            args = parse_args(call.group("args"))
            rest = rest[: call.start()].strip()
        selector = None
        if named := _NAMED.match(rest):
            selector = named.group("name") if is_identifier(named.group("name")) else None
        if selector is None:
            if lead := _LEAD.match(rest):
                rest = lead.group("rest")
            selector = selector_from_words(rest)
        if selector is None:
            return Translation(None, SAY_WHAT, self.name)
        return self._command(
            {
                "command": "send",
                "target": target,
                "selector": selector,
                "args": args,
                "kwargs": {},
                "intent": text[:MAX_BRIEF_CHARS],
            }
        )

    def _command(self, obj: dict[str, Any]) -> Translation:
        try:
            return Translation(validate_command(obj), "", self.name)
        except ValueError as exc:
            return Translation(None, f"cannot send that: {exc}", self.name)
