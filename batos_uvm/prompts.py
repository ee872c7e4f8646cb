"""What the cycle asks the personas, and how their replies are read.

The reply formats are documented in docs/CYCLE.md: DECOMPOSING answers a
JSON list of catalog queries; SYNTHESIZING answers the method in a fenced
``python`` block and optionally examples in a fenced ``json`` block.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .objects import UvmObject
from .reprs import safe_repr

MAX_CODE_CHARS = 20_000


def decomposition_prompt(brief: dict[str, Any]) -> str:
    return (
        f'Mission brief: an object received the message "{brief["selector"]}" with arguments '
        f"{json.dumps(brief.get('args', []), default=repr)} and no object understands it. "
        "List 1 to 3 short search queries for the knowledge catalog that would help write "
        'this method. Output ONLY a JSON list of strings, like ["query 1", "query 2"].'
    )


def parse_queries(reply: str) -> list[str] | None:
    text = reply.strip()
    match = re.search(r"\[.*\]", text, re.S)
    try:
        value = json.loads(match.group(0) if match else text)
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(value, list) or not value or not all(isinstance(q, str) for q in value):
        return None
    queries = [q.strip()[:200] for q in value if q.strip()][:5]
    return queries or None


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def parse_synthesis(reply: str) -> tuple[str, list[dict[str, Any]] | None, str | None]:
    """Extract (code, examples, problem) from a SYNTHESIZING reply (see docs/CYCLE.md)."""
    blocks = _FENCE.findall(reply)
    code_blocks = [body for lang, body in blocks if lang.lower() in {"python", "py", ""}]
    json_blocks = [body for lang, body in blocks if lang.lower() == "json"]
    if code_blocks:
        code = code_blocks[0]
    elif blocks:
        code = ""
    else:
        code = reply
    code = code.strip("\n")
    if not code.strip():
        return "", None, "the reply holds no code"
    if len(code) > MAX_CODE_CHARS:
        return code[:MAX_CODE_CHARS], None, f"the code is longer than {MAX_CODE_CHARS} characters"
    examples = None
    if json_blocks:
        try:
            examples = json.loads(json_blocks[0])
        except json.JSONDecodeError as exc:
            return code, None, f"the examples block is not JSON ({exc.msg})"
        problem = _check_examples(examples)
        if problem:
            return code, None, problem
    return code, examples, None


def _check_examples(examples: Any) -> str | None:
    if not isinstance(examples, list):
        return "the examples block must be a JSON list"
    if len(examples) > 20:
        return "at most 20 examples are run"
    for number, example in enumerate(examples, start=1):
        if not isinstance(example, dict):
            return f"example {number} is not an object"
        unknown = set(example) - {"args", "kwargs", "expect"}
        if unknown:
            return f"example {number} has unknown keys {sorted(unknown)}"
        if not isinstance(example.get("args", []), list):
            return f"example {number}: args must be a list"
        if not isinstance(example.get("kwargs", {}), dict):
            return f"example {number}: kwargs must be an object"
    return None


def synthesis_prompt(
    brief: dict[str, Any],
    target: UvmObject,
    retrieved_context: list[dict[str, Any]],
    feedback: str | None = None,
    previous_code: str | None = None,
) -> str:
    """The request to the synthesizing persona (reply format: docs/CYCLE.md)."""
    selector = brief["selector"]
    slots = {name: safe_repr(value, 120) for name, value in visible_slots(target).items()}
    context = "\n".join(f"- {item['text']}" for item in retrieved_context[:6])
    parts = [
        f"Mission: write a Python method named '{selector}' for a BAT OS object.",
        f"It will be called as self.{selector}(*{json.dumps(brief.get('args', []), default=repr)}, "
        f"**{json.dumps(brief.get('kwargs', {}), default=repr)}).",
        f"The object's slots (read them as self.NAME): {json.dumps(slots)}.",
        "Rules: define exactly one function `def " + selector + "(self, ...)`; import only "
        "standard modules such as math, datetime, time, random, json, re, statistics, "
        "itertools, functools, collections, string; never touch names starting with '_'; "
        "no open/exec/eval; a method may change only self (self.NAME = value, or "
        "changing a list or dict it holds): the kernel keeps the change.",
        "Reply with the method in a ```python fenced block, then optionally a ```json block "
        'holding a list of examples like [{"args": [5], "kwargs": {}, "expect": 120}].',
    ]
    if context:
        parts.append(f"Knowledge from the catalog:\n{context}")
    if feedback:
        parts.append(
            f"Your previous attempt failed validation: {feedback}\n"
            f"Previous code:\n```python\n{(previous_code or '')[:4000]}\n```\nFix it."
        )
    return "\n\n".join(parts)


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
