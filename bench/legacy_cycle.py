"""The SYNTHESIZING prompt and reply reading as they were before the small-model work.

Kept only as the baseline of bench/briefs.py: the call shown as
``self.f(*[5], **{})``, the persona's voice, every retrieved chunk, a strict
reader (the reply must hold exactly the method; the model's examples must be
valid JSON and all pass), greedy retries, no forced start.
"""

from __future__ import annotations

import json
import re
from typing import Any

from batos_uvm.objects import UvmObject
from batos_uvm.prompts import visible_slots
from batos_uvm.replies import SynthesisReply
from batos_uvm.synthesis import CycleOptions

MAX_CODE_CHARS = 20_000
_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def legacy_prompt(
    brief: dict[str, Any],
    target: UvmObject,
    skills: Any = (),
    feedback: str | None = None,
    previous_code: str | None = None,
    *,
    notes: Any = (),
) -> str:
    selector = brief["selector"]
    slots = {name: repr(value)[:120] for name, value in visible_slots(target).items()}
    context = "\n".join(f"- {text}" for text in list(notes)[:6])
    parts = [
        f"Mission: write a Python method named '{selector}' for a BAT OS object.",
        f"It will be called as self.{selector}(*{json.dumps(brief.get('args', []), default=repr)}, "
        f"**{json.dumps(brief.get('kwargs', {}), default=repr)}).",
        f"The object's slots (read them as self.NAME): {json.dumps(slots)}.",
        "Rules: define exactly one function `def " + selector + "(self, ...)`; import only "
        "standard modules such as math, datetime, time, random, json, re, statistics, "
        "itertools, functools, collections, string; never touch names starting with '_' "
        "except `self._p_changed`; no open/exec/eval; a method that changes self must set "
        "`self._p_changed = True` after its last change on every path that returns.",
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


def legacy_parse(reply: str, selector: str) -> SynthesisReply:
    blocks = _FENCE.findall(reply)
    code_blocks = [body for lang, body in blocks if lang.lower() in {"python", "py", ""}]
    json_blocks = [body for lang, body in blocks if lang.lower() == "json"]
    code = code_blocks[0] if code_blocks else ("" if blocks else reply)
    code = code.strip("\n")
    if not code.strip():
        return SynthesisReply("", problem="the reply holds no code")
    examples = None
    if json_blocks:
        try:
            examples = json.loads(json_blocks[0])
        except json.JSONDecodeError as exc:
            return SynthesisReply(code, problem=f"the examples block is not JSON ({exc.msg})")
        if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
            return SynthesisReply(code, problem="the examples block must be a list of objects")
    return SynthesisReply(code, examples)


LEGACY = CycleOptions(
    prompt=legacy_prompt,
    parse=legacy_parse,
    code_system=False,
    force_prefix=False,
    advisory_examples=False,
    sampled_retries=False,
    repair_state=False,
    min_similarity=-1.0,
)
