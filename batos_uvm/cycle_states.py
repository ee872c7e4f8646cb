"""The states of the cognitive cycle, answered by primitives the image refers to by name.

IDLE -> DECOMPOSING (the planner lists catalog queries) -> DELEGATING (the
catalog is searched) -> SYNTHESIZING (the method is written) -> VALIDATING
(the Guardian, then the trial) -> COMPLETE | FAILED, going back from
VALIDATING to SYNTHESIZING with the reason while attempts remain. See
docs/CYCLE.md.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import primitives, trial_verdict
from .cycle_context import CycleContext
from .guardian import GuardianViolation, audit
from .objects import UvmObject
from .prompts import (
    CODE_STOPS,
    CODE_SYSTEM,
    MAX_CODE_CHARS,
    code_prefix,
    decomposition_prompt,
    show_call,
    visible_slots,
)
from .replies import parse_queries
from .state_repairs import repair_state
from .synthesis import (
    DEFAULT_OPTIONS,
    CycleOptions,
    catalog_notes,
    relevant_context,
    sampling_for,
    skills_from,
)

PLANNER = "BABS"  # deconstructs the brief into catalog queries
SYNTHESIZER = "BRICK"  # writes the method (ToolForge operator)
PLAN_TOKENS = 64
CODE_TOKENS = 384  # a method longer than this is a model repeating itself


async def process_idle(state: UvmObject, ctx: CycleContext) -> str:
    return "DECOMPOSING"


async def process_decomposing(state: UvmObject, ctx: CycleContext) -> str:
    brief = ctx.log.brief
    own_words = str(brief.get("intent") or "").strip() or brief["selector"].replace("_", " ")
    queries: list[str] | None = []
    if options_of(ctx).plan_with_model:
        reply = await ctx.think(
            PLANNER, "DECOMPOSING", decomposition_prompt(brief), max_tokens=PLAN_TOKENS
        )
        queries = parse_queries(reply)
    if queries is None:
        queries = []
        ctx.log.plan_fallback = True
    # The user's own words are always searched: the planner may miss them.
    ctx.log.research_plan = list(dict.fromkeys([own_words[:200], *queries]))
    return "DELEGATING"


async def process_delegating(state: UvmObject, ctx: CycleContext) -> str:
    store = ctx.root["knowledge_catalog_obj"].store
    seen: set[int] = set()
    if len(store):  # one batch for every query, off the event loop; the searches find them
        await ctx.services.prepare_queries(ctx.log.research_plan)
    for query in ctx.log.research_plan:
        hits = await ctx.services.search(store, query, 3)
        for hit in hits:
            if hit.chunk_id not in seen:
                seen.add(hit.chunk_id)
                ctx.log.retrieved_context.append(
                    {
                        "doc_id": hit.doc_id,
                        "text": hit.text,
                        "score": round(hit.score, 4),
                        "similarity": round(hit.vector_score, 4),
                        "metadata": {k: v for k, v in hit.metadata.items()
                                     if k in ("source", "selector", "target")},
                    }
                )  # fmt: skip
    return "SYNTHESIZING"


def announce(state: str, ctx: CycleContext) -> dict[str, Any]:
    """The progress event for entering ``state``: who works on what."""
    selector = ctx.log.selector
    if state == "DECOMPOSING" and options_of(ctx).plan_with_model:
        return ctx.event(state, f"{PLANNER} is planning the research", persona=PLANNER)
    if state == "SYNTHESIZING":
        attempt = ctx.attempt + 1
        return ctx.event(state, f"{SYNTHESIZER} is writing {selector} (attempt {attempt})",
                         persona=SYNTHESIZER)  # fmt: skip
    if state == "VALIDATING":
        return ctx.event(state, f"checking {selector} (Guardian, then a trial run)")
    return ctx.event(state, "")


def options_of(ctx: CycleContext) -> CycleOptions:
    return getattr(ctx.services, "cycle_options", None) or DEFAULT_OPTIONS


async def process_synthesizing(state: UvmObject, ctx: CycleContext) -> str:
    ctx.attempt += 1
    options = options_of(ctx)
    selector = ctx.log.selector
    previous = (ctx.candidate or {}).get("code") if ctx.feedback else None
    relevant = relevant_context(ctx.log.retrieved_context, options.min_similarity)
    skills = skills_from(relevant, ctx.connection, selector)
    prompt = options.prompt(
        ctx.log.brief, ctx.target(), skills, ctx.feedback, previous, notes=catalog_notes(relevant)
    )
    shape: dict[str, Any] = {}
    if options.force_prefix:
        brief = ctx.log.brief
        arity = len(brief.get("args", [])) + len(brief.get("kwargs", {}))
        shape = {"prefix": code_prefix(selector, arity), "prefix_stop": CODE_STOPS}
    if options.sampled_retries:
        shape.update(sampling_for(ctx.attempt))
    reply = await ctx.think(
        SYNTHESIZER,
        "SYNTHESIZING",
        prompt,
        max_tokens=CODE_TOKENS,
        system=CODE_SYSTEM if options.code_system else None,
        **shape,
    )
    parsed = options.parse(reply, selector)
    ctx.candidate = {
        "attempt": ctx.attempt,
        "persona": SYNTHESIZER,
        "reply": reply[:MAX_CODE_CHARS],
        "code": parsed.code,
        "examples": parsed.examples,
        "parse_problem": parsed.problem,
        "repairs": parsed.repairs,
        "skills": [skill.selector for skill in skills],
    }
    if parsed.dropped_examples:
        ctx.candidate["examples_dropped"] = parsed.dropped_examples
    ctx.log.attempts.append(ctx.candidate)
    return "VALIDATING"


async def process_validating(state: UvmObject, ctx: CycleContext) -> str:
    candidate = ctx.candidate or {}
    selector = ctx.log.selector
    reason = candidate.get("parse_problem")
    if reason is None:
        repair = options_of(ctx).repair_state
        if repair:
            existing = set(visible_slots(ctx.target()))
            candidate["code"], repaired = repair_state(candidate["code"], existing)
            candidate.setdefault("repairs", []).extend(repaired)
        reason = _audit(candidate, selector)
    if reason is None:
        reason = await _validate_by_trial(ctx, candidate)
    candidate["ok"] = reason is None
    candidate["reason"] = reason
    if reason is None:
        return "COMPLETE"
    ctx.feedback = reason
    if ctx.attempt < ctx.services.settings.max_attempts:
        return "SYNTHESIZING"
    ctx.log.reason = f"no valid method after {ctx.attempt} attempt(s); last: {reason}"
    return "FAILED"


def _audit(candidate: dict[str, Any], selector: str) -> str | None:
    """The Guardian's verdict, kept in the attempt; the reason goes back to the model."""
    try:
        audit(candidate["code"], selector)
        candidate["guardian"] = "passed"
        return None
    except GuardianViolation as violation:
        candidate["guardian"] = {"rule": violation.rule, "line": violation.line}
        return f"Persistence Guardian: {violation}"


async def _validate_by_trial(ctx: CycleContext, candidate: dict[str, Any]) -> str | None:
    """Run the trial; the model's own examples only advise (see trial_verdict)."""
    # The skill's embedding is computed while the trial runs, on the other core;
    # installing the method then finds it ready.
    embedding = asyncio.ensure_future(ctx.services.prepare_skill(ctx.log, candidate["code"]))
    try:
        trial = await ctx.services.trial(ctx, candidate)
    finally:
        await asyncio.gather(embedding, return_exceptions=True)
    candidate["trial"] = trial.to_record()
    if not options_of(ctx).advisory_examples:
        return None if trial.ok else f"trial run: {trial.reason}"
    verdict = trial_verdict.judge(trial)
    if not verdict.ok and trial_verdict.needs_rerun(trial, bool(candidate.get("examples"))):
        first = verdict.reason
        trial = await ctx.services.trial(ctx, {**candidate, "examples": None})
        candidate["trial_without_model_examples"] = trial.to_record()
        verdict = trial_verdict.judge(trial)
        verdict.warnings.insert(0, f"with the model's examples the trial failed: {first}")
    if verdict.warnings:
        candidate["warnings"] = verdict.warnings
    if verdict.ok:
        return None
    asked = next((e for e in trial.examples if e.requested and not e.ok), None)
    if asked is not None:  # say it as the call the user made, not as "example 1"
        brief = ctx.log.brief
        call = show_call(ctx.log.selector, brief.get("args", []), brief.get("kwargs", {}))
        return f"trial run: {call} {asked.error}{_where(trial.traceback)}"
    return f"trial run: {verdict.reason}"


def _where(traceback: str | None) -> str:
    """The line of the method that raised, from the trial's traceback."""
    lines = [line.strip() for line in (traceback or "").splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith('File "<')]
    if not frames or frames[-1] + 1 >= len(lines):
        return ""
    return f" (at: {lines[frames[-1] + 1][:160]})"


async def process_final(state: UvmObject, ctx: CycleContext) -> str:
    return state.name


STATE_PRIMITIVES = {
    "IDLE": process_idle,
    "DECOMPOSING": process_decomposing,
    "DELEGATING": process_delegating,
    "SYNTHESIZING": process_synthesizing,
    "VALIDATING": process_validating,
    "COMPLETE": process_final,
    "FAILED": process_final,
}


def register_state_primitives() -> None:
    for name, function in STATE_PRIMITIVES.items():
        primitives.register(f"psm.{name}", function)
