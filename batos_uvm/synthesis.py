"""Choices the SYNTHESIZING state makes beside the prompt: what to show, how to sample.

* Retrieved knowledge reaches the model only above a relevance threshold, and
  earlier skills (methods grown by cycles) are shown as their source, the kind
  of example a small code model can use.
* The first attempt decodes greedily; a retry samples with a seed that
  depends on the attempt, since greedy retries repeat the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .objects import UvmObject, parse_oid
from .prompts import Skill, synthesis_prompt
from .replies import SynthesisReply, parse_synthesis

log = logging.getLogger("batos.cycle")

# Cosine similarity (all-MiniLM-L6-v2) of the query and a catalog chunk at which the
# chunk is worth a small model's attention; measured on bench/briefs.py.
MIN_SIMILARITY = 0.45
RETRY_TEMPERATURE = 0.8


@dataclass(frozen=True)
class CycleOptions:
    """How SYNTHESIZING asks and how VALIDATING judges; the defaults measured best.

    A kernel's ``cycle_options`` attribute, when set, replaces the defaults:
    ``bench/briefs.py`` does, to compare variants on the same briefs.
    """

    prompt: Callable[..., str] = synthesis_prompt
    parse: Callable[[str, str], SynthesisReply] = parse_synthesis
    code_system: bool = True  # a short coding system prompt instead of the persona's voice
    force_prefix: bool = True  # the reply starts as ``def NAME(self`` and stops after it
    advisory_examples: bool = True  # the model's own examples cannot fail the method
    sampled_retries: bool = True  # retries sample (seeded) instead of decoding greedily
    repair_state: bool = True  # initialise unset data of self; add a forgotten change mark
    plan_with_model: bool = True  # the planner persona adds catalog queries to the brief's words
    min_similarity: float = MIN_SIMILARITY  # catalog chunks below it are not shown


DEFAULT_OPTIONS = CycleOptions()


def relevant_context(
    context: list[dict[str, Any]], min_similarity: float = MIN_SIMILARITY
) -> list[dict[str, Any]]:
    """The retrieved chunks similar enough to the brief, best first."""
    kept = [item for item in context if item.get("similarity", 0.0) >= min_similarity]
    return sorted(kept, key=lambda item: -item.get("similarity", 0.0))


def catalog_notes(context: list[dict[str, Any]]) -> list[str]:
    """The texts of relevant chunks that are not skills (those are shown as code)."""
    return [
        item["text"] for item in context if (item.get("metadata") or {}).get("source") != "cycle"
    ]


def skills_from(context: list[dict[str, Any]], connection: Any, selector: str) -> list[Skill]:
    """Earlier methods among ``context`` (skills the catalog holds), with their current source."""
    skills: list[Skill] = []
    seen: set[tuple[str, str]] = set()
    for item in context:
        meta = item.get("metadata") or {}
        if meta.get("source") != "cycle":
            continue
        key = (str(meta.get("target", "")), str(meta.get("selector", "")))
        if key in seen or key[1] == selector:
            continue
        seen.add(key)
        source = _method_source(connection, *key)
        if source:
            skills.append(Skill(key[1], source))
    return skills


def _method_source(connection: Any, target: str, selector: str) -> str | None:
    try:
        owner = connection.get(parse_oid(target))
    except Exception:  # the object is gone, or the oid is not one: no example then
        log.debug("skill %s of %s not found", selector, target, exc_info=True)
        return None
    if not isinstance(owner, UvmObject):
        return None
    record = owner.methods().get(selector)
    return record.source if record is not None else None


def sampling_for(attempt: int) -> dict[str, Any]:
    """Greedy first, then seeded sampling: a retry must be able to write something else."""
    if attempt <= 1:
        return {}
    return {"temperature": RETRY_TEMPERATURE, "seed": attempt}
