"""The model-backed brief translators: a local GGUF model where the rules do not know.

``LlamaTranslator`` asks a local GGUF model (llama-cpp-python, loaded once)
for JSON constrained by a grammar, then validates that JSON against the
protocol's request models; anything invalid is rejected with the reason.
``HybridTranslator`` lets the rules (batos_uvm/translator.py) read what they
know and asks the model for the rest. See docs/CHAT.md.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .protocol import is_identifier
from .translator import (
    CATALOG,
    MAX_BRIEF_CHARS,
    NOT_UNDERSTOOD,
    Command,
    RuleTranslator,
    Translation,
    Translator,
    validate_command,
)

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

PROMPT = """Turn a request to the BAT OS kernel into exactly one JSON command.
{"command": "send", "target": OBJECT, "selector": NAME, "args": [...], "kwargs": {...}} sends the message NAME to a live object; when the object lacks that method, the kernel writes it from the request. NAME is a short snake_case name (1 to 3 words) for what the method does; args are the values the request says to call it with, none if it names none.
{"command": "inspect", "target": OBJECT} shows an object.
{"command": "cycles", "limit": N} lists recent cognitive cycles.
{"command": "unclear"} when the request is none of these.
New methods go to genesis_obj. Questions go to knowledge_catalog_obj with selector "search".

Request: create a method to report the current system time
JSON: {"command": "send", "target": "genesis_obj", "selector": "report_time", "args": [], "kwargs": {}}
Request: I need a method that adds two numbers; call it with 3 and 4
JSON: {"command": "send", "target": "genesis_obj", "selector": "add", "args": [3, 4], "kwargs": {}}
Request: make genesis able to greet someone by name, try it with "Bruce"
JSON: {"command": "send", "target": "genesis_obj", "selector": "greet", "args": ["Bruce"], "kwargs": {}}
Request: call factorial on genesis_obj with 5
JSON: {"command": "send", "target": "genesis_obj", "selector": "factorial", "args": [5], "kwargs": {}}
Request: what is the living image?
JSON: {"command": "send", "target": "knowledge_catalog_obj", "selector": "search", "args": ["what is the living image?"], "kwargs": {}}
Request: show the last 5 cycles
JSON: {"command": "cycles", "limit": 5}
Request: %s
JSON: """


NAME_PROMPT = """Give the Python method a request asks for a short snake_case name (1 to 3 words).
Request: create a method that returns the square root of a number
Name: square_root
Request: I need a method that counts the words in a text and call it with 'a b'
Name: count_words
Request: %s
Name:"""


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

    def name_for(self, text: str) -> str | None:
        """A short method name for a brief (a prompt a tenth of a translation's), or None."""
        text = " ".join(text.split())[:MAX_BRIEF_CHARS]
        try:
            response = self._llm.create_completion(
                NAME_PROMPT % text, max_tokens=16, temperature=0.0, stop=["\n"]
            )
        except Exception:  # e.g. the brief does not fit the model's context
            return None
        name = str(response["choices"][0]["text"]).strip().strip("_")
        return name if is_identifier(name) and 0 < len(name.split("_")) <= 4 else None

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
        return self.check_output(output, text)

    def check_output(self, output: str, text: str = "") -> Translation:
        """Validate the model's JSON; a clear rejection when it is not a valid command.

        A send that may grow a method carries ``text``, the user's words, as its intent.
        """
        shown = output if len(output) <= 200 else output[:200] + "..."
        try:
            obj = json.loads(output)
        except ValueError as exc:
            return Translation(
                None, f"the model's answer is not valid JSON ({exc}): {shown}", self.name
            )
        if isinstance(obj, dict) and obj.get("command") == "unclear":
            return Translation(None, NOT_UNDERSTOOD, self.name)
        if text and isinstance(obj, dict) and obj.get("command") == "send" and obj.get("target") != CATALOG:
            obj = {**obj, "intent": text}  # the user's words travel with the message
        try:
            return Translation(validate_command(obj), "", self.name)
        except ValueError as exc:
            return Translation(
                None, f"the model proposed an invalid command ({exc}): {shown}", self.name
            )


SHORT_NAME_WORDS = 3  # a rules' selector this short is a good name already


class HybridTranslator:
    """The model for what the rules do not know; the rules' reading where they do.

    When the rules recognise a brief for a new method, they know its target and
    its arguments for certain ("call it with 3 and 4"); the model then only
    contributes a shorter name (if the rules' has more than three words and the
    model agrees on the target). Anything the rules do not understand is the
    model's to translate; when the model cannot either (or says it is unclear),
    the rules' message stands. ``model`` may be a function that makes the model
    translator: it is then loaded on first need, and a model that cannot load
    leaves the rules alone (``problem`` says why).
    """

    def __init__(
        self, model: Translator | Callable[[], Translator], rules: Translator | None = None
    ) -> None:
        self._model, self.rules = model, rules or RuleTranslator()
        self.name = "llama+rules"
        self.problem: str | None = None

    @property
    def model(self) -> Translator | None:
        if callable(self._model) and not hasattr(self._model, "translate"):
            try:
                self._model = self._model()
            except TranslatorUnavailable as exc:
                self._model, self.problem = None, str(exc)
                print(f"warning: {exc}; the built-in rules translate alone", file=sys.stderr)
        return self._model

    def translate(self, text: str) -> Translation:
        ruled = self.rules.translate(text)
        if ruled.ok and "intent" not in ruled.command.fields:
            return ruled  # an explicit call or a question: nothing to guess
        if ruled.ok and len(ruled.command.fields["selector"].split("_")) <= SHORT_NAME_WORDS:
            return ruled
        model = self.model
        if model is None:
            return ruled
        if ruled.ok and hasattr(model, "name_for"):  # only a name is missing: a short question
            name = model.name_for(text)
            if not name:
                return ruled
            return Translation(Command("send", {**ruled.command.fields, "selector": name}), "",
                               model.name)  # fmt: skip
        guessed = model.translate(text)
        if not ruled.ok:
            if guessed.ok or guessed.message == NOT_UNDERSTOOD:
                return guessed if guessed.ok else ruled
            return guessed
        mine, theirs = ruled.command.fields, guessed.command.fields if guessed.ok else {}
        same_target = guessed.ok and guessed.command.command == "send" and (
            theirs.get("target") == mine["target"] and theirs.get("selector") != "search"
        )
        if not same_target:
            return ruled
        fields = {**mine, "selector": theirs["selector"]}
        return Translation(Command("send", fields), "", guessed.translator)


def default_model_path() -> str | None:
    """The installed default code model (``batos.py models fetch``), if there is one."""
    from .model_catalog import MODELS, for_this_machine
    from .model_fetch import installed

    preferred = for_this_machine()
    for model in (preferred, *[m for m in MODELS if m is not preferred]):
        path = installed(model)
        if path is not None:
            return str(path)
    return None


def load_translator(model_path: str | None, *, lazy: bool = False) -> Translator:
    """The model translator (falling back to the rules) for a model path, else the rules.

    ``lazy`` loads the model only when a brief needs it (the installed default model);
    otherwise it is loaded now and an unusable file is an error at once.
    """
    if not model_path:
        return RuleTranslator()
    if lazy:
        return HybridTranslator(lambda: LlamaTranslator(model_path))
    return HybridTranslator(LlamaTranslator(model_path))
