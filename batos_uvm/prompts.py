"""What the cycle asks the personas: short prompts that small code models get right.

DECOMPOSING asks for catalog queries as a JSON list. SYNTHESIZING asks for one
method, shown as the call the user made (``self.factorial(5)``), with the
user's own words when the brief carries them, the object's data and methods,
a few rules, relevant earlier skills as examples and, on a retry, what went
wrong. The reply's start is forced to ``def NAME(self`` inside a python fence
and generation stops where the method ends (:data:`CODE_STOPS`); how replies
are read is :mod:`batos_uvm.replies`. Measured on ``bench/briefs.py``.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

from .objects import UvmObject
from .reprs import safe_repr

MAX_CODE_CHARS = 20_000
SHOWN_MODULES = ("math", "re", "datetime", "random", "collections", "itertools", "statistics")
MAX_ARG_CHARS = 160  # longer arguments are shown abbreviated: a prompt is not a data channel
MAX_SLOT_CHARS = 120
MAX_SKILLS = 2
MAX_NOTES = 2
MAX_NOTE_CHARS = 300
MAX_FEEDBACK_CHARS = 700

# The system prompt for writing code; the personas' own voices are for conversation.
CODE_SYSTEM = (
    "You are an expert Python programmer. You write one complete, correct method. "
    "Reply with code only."
)

# What the model needs to know about keeping data (the kernel records changes of self).
PERSISTENCE_RULE = "Assigning or changing attributes of self keeps the data for later calls."

# Where a forced ``def NAME(self`` reply ends: the closing fence, or any line that starts
# at column 0 again (a second def or class, example usage, a comment, a print ...).
CODE_STOPS: tuple[str, ...] = (
    "\n```",
    *(f"\n{c}" for c in string.ascii_letters + string.digits + "_#@(["),
)


# A line of advice for failures small models otherwise repeat attempt after attempt.
_ADVICE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"has no slot or method '(\w+)'.*\bself\.\1\(", re.S),
     "self.{0} does not exist: write def {0}(...) inside the method, before the line that "
     "calls it, and call it as {0}(...)."),
    # A reply stops at its first line at column 0: a helper written after the method is lost.
    (re.compile(r"NameError: name '(\w+)' is not defined.*\b\1\(", re.S),
     "{0} is not defined: write def {0}(...) inside the method, indented, before the line "
     "that calls it."),
    (re.compile(r"has no slot or method '(\w+)'"),
     "self.{0} is not set yet: read it with getattr(self, '{0}', default)."),
    (re.compile(r"names starting with '_' are private|private-attribute"),
     "Keep data in a plain attribute of self (for example self.items = {{}}), never in "
     "self.__dict__ or a name starting with _."),
)


def advice_for(reason: str) -> str:
    """What to change, for a failure of a kind small models repeat; '' for others."""
    for pattern, advice in _ADVICE:
        found = pattern.search(reason)
        if found:
            return advice.format(*found.groups())
    return ""


@dataclass(frozen=True)
class Skill:
    """An earlier method shown to the model as an example."""

    selector: str
    source: str


def code_prefix(selector: str, arity: int = 0) -> str:
    """The forced start of a SYNTHESIZING reply: the signature up to its first parameter.

    With arguments the model goes on to name them; without, the method takes only self.
    """
    # ends before a space or newline: the model's own tokens carry them (" n", "\n   ")
    return f"```python\ndef {selector}(self{',' if arity else '):'}"


def decomposition_prompt(brief: dict[str, Any]) -> str:
    intent = str(brief.get("intent") or "").strip()
    task = f' The user asked: "{intent}".' if intent else ""
    return (
        f'Mission brief: an object received the message "{brief["selector"]}" with arguments '
        f"{json.dumps(brief.get('args', []), default=repr)} and no object understands it.{task} "
        "List 1 to 3 short search queries for the knowledge catalog that would help write "
        'this method. Output ONLY a JSON list of strings, like ["query 1", "query 2"].'
    )


def show_value(value: Any) -> str:
    """A Python literal as the user would type it, abbreviated when long."""
    text = repr(value)
    if len(text) <= MAX_ARG_CHARS:
        return text
    kind = type(value).__name__
    size = f" of {len(value)} items" if hasattr(value, "__len__") else ""
    return f"{text[: MAX_ARG_CHARS - 40]}... (a {kind}{size}, abbreviated)"


def show_call(selector: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """``self.factorial(5)``: the call as the user would write it."""
    parts = [show_value(a) for a in args] + [f"{k}={show_value(v)}" for k, v in kwargs.items()]
    return f"self.{selector}({', '.join(parts)})"


def synthesis_prompt(
    brief: dict[str, Any],
    target: UvmObject,
    skills: list[Skill] | tuple[Skill, ...] = (),
    feedback: str | None = None,
    previous_code: str | None = None,
    *,
    notes: list[str] | tuple[str, ...] = (),
    advice: bool = True,
) -> str:
    """The request to the synthesizing persona; the reply starts with :func:`code_prefix`.

    ``skills`` are earlier methods shown as examples, ``notes`` relevant catalog text;
    ``advice`` adds what to change to the feedback, for failures models tend to repeat.
    """
    selector = brief["selector"]
    args, kwargs = list(brief.get("args", [])), dict(brief.get("kwargs", {}))
    intent = str(brief.get("intent") or "").strip()
    words = selector.replace("_", " ")
    parts = [f"Write the Python method '{selector}' of an object."]
    parts.append(f"The user asked: {intent}" if intent else f"What it should do: {words}.")
    call = show_call(selector, args, kwargs)
    arity = len(args) + len(kwargs)
    if arity:
        count = f"{arity} argument{'s' * (arity > 1)}"
        parts.append(f"Example call: {call}. It takes {count} besides self and must work for "
                     "any values, not only these. Return the result.")  # fmt: skip
    else:
        parts.append(f"It is called as {call}, with no arguments besides self. Return the result.")
    data = object_data(target)
    if data:
        parts.append("The object's data (read as self.NAME): " + ", ".join(data))
    methods = [m for m in method_signatures(target) if not m.startswith(f"{selector}(")]
    if methods:
        parts.append("Its other methods (call as self.NAME(...)): " + ", ".join(methods))
    parts.append(
        "Rules: import inside the method, and only what it uses from the standard modules "
        f"{', '.join(SHOWN_MODULES)}. No open, exec, eval or names starting "
        "with _. Data kept between calls lives in attributes of self; read them with "
        f"getattr(self, 'NAME', default). {PERSISTENCE_RULE}"
    )
    if notes:
        shown = "\n".join(
            f"- {' '.join(note.split())[:MAX_NOTE_CHARS]}" for note in notes[:MAX_NOTES]
        )
        parts.append(f"Notes from the knowledge catalog:\n{shown}")
    for skill in list(skills)[:MAX_SKILLS]:
        parts.append(f"An earlier method, for reference:\n```python\n{skill.source.strip()}\n```")
    if feedback:
        advice_line = advice_for(feedback) if advice else ""
        parts.append(
            f"Your previous attempt failed: {feedback[:MAX_FEEDBACK_CHARS]}\n"
            f"```python\n{(previous_code or '').strip()[:3000]}\n```\n"
            + (f"{advice_line}\n" if advice_line else "") + "Write a corrected method."
        )
    parts.append(f"Reply with the method only, in a ```python block: def {selector}(self...")
    return "\n".join(parts)


def object_data(obj: UvmObject) -> list[str]:
    """``NAME=value`` for the plain data self.NAME finds (kernel internals left out)."""
    shown = []
    for name, value in visible_slots(obj).items():
        if name == "label" or not _is_plain(value):
            continue
        shown.append(f"{name}={safe_repr(value, MAX_SLOT_CHARS)}")  # no code of the image runs
    return shown


def _is_plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if depth > 3:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain(v, depth + 1) for v in list(value)[:50])
    if isinstance(value, dict) or type(value).__name__ in ("PersistentMapping", "PersistentList"):
        items = list(dict(value).items())[:50] if not isinstance(value, list) else []
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in items)
    return False


def method_signatures(obj: UvmObject) -> list[str]:
    """``factorial(n)`` for each generated method the object answers (nearest first)."""
    import ast

    shown = []
    for selector, source in chain_methods(obj).items():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == selector:
                params = [a.arg for a in node.args.posonlyargs + node.args.args][1:]
                shown.append(f"{selector}({', '.join(params)})")
    return shown


def visible_slots(obj: UvmObject) -> dict[str, Any]:
    """Slots ``self.NAME`` would find, nearest owner first (used for prompts and trials)."""
    merged: dict[str, Any] = {}
    for owner in reversed(list(obj.ancestors())):
        for name in owner.slot_names():
            if name != "parents":
                merged[name] = owner._slots[name]
    return merged


def chain_methods(obj: UvmObject) -> dict[str, str]:
    """Source of every method the object answers (nearest first), for the trial's self."""
    found: dict[str, str] = {}
    for owner in obj.ancestors():
        for selector, record in owner.methods().items():
            if record.source and selector not in found:
                found[selector] = record.source
    return found
