"""The cognitive cycle: from a message nobody understands to an installed, verified method.

The Prototypal State Machine's states are persistent objects in the image
(``psm_prototypes_obj``); each answers ``process`` with a primitive registered
here. A cycle moves IDLE -> DECOMPOSING -> DELEGATING -> SYNTHESIZING ->
VALIDATING -> COMPLETE | FAILED, going back from VALIDATING to SYNTHESIZING
with the reason while attempts remain. A cycle asked to stop (its ``cancel``
event) ends CANCELLED at once, whatever state it was in.

Transactions: the cycle's record is committed as ACTIVE when the cycle starts
(so a killed kernel leaves evidence, marked INTERRUPTED on restart). The work
itself writes nothing. COMPLETE installs the method, adds the skill to the
catalog and writes the record in ONE transaction; FAILED and CANCELLED abort
everything and write only the record, in a transaction of its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import transaction
from persistent import Persistent
from ZODB.POSException import ConflictError

from . import primitives
from .awakening import STATES
from .cognition import CognitionError, CognitionUnavailable, InferenceRequest
from .guardian import GuardianViolation, audit
from .objects import UvmObject, check_selector, format_oid, parse_oid
from .prompts import (
    MAX_CODE_CHARS,
    decomposition_prompt,
    parse_queries,
    parse_synthesis,
    synthesis_prompt,
)
from .trial import jsonable, run_trial

Progress = Callable[[dict[str, Any]], Awaitable[None]]

PLANNER = "BABS"  # deconstructs the brief into catalog queries
SYNTHESIZER = "BRICK"  # writes the method (ToolForge operator)
COMMIT_RETRIES = 5


def new_cycle_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class CycleRecord(Persistent):
    """The persistent history of one cycle; ``data`` is plain JSON-able data."""

    def __init__(self, cycle_id: str, data: dict[str, Any]) -> None:
        self.cycle_id = cycle_id
        self.status = "ACTIVE"
        self.data = data

    def summary(self) -> dict[str, Any]:
        data = self.data
        return {
            "cycle_id": self.cycle_id,
            "status": self.status,
            "selector": data.get("selector"),
            "target": data.get("target"),
            "started": data.get("started"),
            "duration_s": data.get("duration_s"),
            "attempts": len(data.get("attempts", ())),
            "reason": data.get("reason"),
            "replayed": data.get("replayed", False),
        }

    def __repr__(self) -> str:
        return f"<CycleRecord {self.cycle_id} {self.status} {self.data.get('selector')!r}>"


@dataclass
class CycleLog:
    """What happened in a cycle, kept in memory until it is committed."""

    cycle_id: str
    brief: dict[str, Any]
    target: str
    selector: str
    started: float = field(default_factory=time.time)
    states: list[dict[str, Any]] = field(default_factory=list)
    research_plan: list[str] = field(default_factory=list)
    plan_fallback: bool = False
    retrieved_context: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    outcome: str | None = None
    reason: str | None = None
    installed_version: int | None = None
    duration_s: float | None = None
    replayed: bool = False
    owner: dict[str, Any] = field(default_factory=dict)  # the kernel running it

    def to_data(self) -> dict[str, Any]:
        return json.loads(json.dumps(jsonable(asdict(self))))

    def durations(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for entry in self.states:
            if entry.get("left") is not None:
                spent = entry["left"] - entry["entered"]
                totals[entry["state"]] = totals.get(entry["state"], 0.0) + spent
        return totals


@dataclass
class CycleContext:
    """Everything a state needs: the log, the connection, and the kernel's services."""

    log: CycleLog
    connection: Any
    services: Any  # kernel services: cognition, embedder, audit, settings
    progress: Progress
    attempt: int = 0
    feedback: str | None = None
    candidate: dict[str, Any] | None = None

    @property
    def root(self) -> Any:
        return self.connection.root()

    def target(self) -> UvmObject:
        return self.connection.get(parse_oid(self.log.target))

    async def think(self, persona: str, state: str, prompt: str, max_tokens: int = 1024) -> str:
        persona_obj = self.root[f"{persona.lower()}_prototype_obj"]
        codex = persona_obj.codex
        request = InferenceRequest(
            persona=persona,
            prompt=prompt,
            system=codex.get("system_prompt"),
            state=state,
            max_tokens=max_tokens,
        )
        started = time.perf_counter()
        completion = await self.services.cognition.infer(request)
        self.log.llm_calls.append(
            {
                "persona": persona,
                "state": state,
                "backend": completion.backend,
                "model": completion.model,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "replayed": completion.replayed,
                "seconds": round(time.perf_counter() - started, 4),
            }
        )
        self.log.replayed = self.log.replayed or completion.replayed
        return completion.text


# --- the states ------------------------------------------------------------------


async def process_idle(state: UvmObject, ctx: CycleContext) -> str:
    return "DECOMPOSING"


async def process_decomposing(state: UvmObject, ctx: CycleContext) -> str:
    brief = ctx.log.brief
    reply = await ctx.think(PLANNER, "DECOMPOSING", decomposition_prompt(brief), max_tokens=128)
    queries = parse_queries(reply)
    if queries is None:
        queries = [brief["selector"].replace("_", " ")]
        ctx.log.plan_fallback = True
    ctx.log.research_plan = queries
    return "DELEGATING"


async def process_delegating(state: UvmObject, ctx: CycleContext) -> str:
    store = ctx.root["knowledge_catalog_obj"].store
    seen: set[int] = set()
    for query in ctx.log.research_plan:
        hits = await ctx.services.search(store, query, 3)
        for hit in hits:
            if hit.chunk_id not in seen:
                seen.add(hit.chunk_id)
                ctx.log.retrieved_context.append(
                    {"doc_id": hit.doc_id, "text": hit.text, "score": round(hit.score, 4)}
                )
    return "SYNTHESIZING"


async def process_synthesizing(state: UvmObject, ctx: CycleContext) -> str:
    ctx.attempt += 1
    previous = (ctx.candidate or {}).get("code") if ctx.feedback else None
    prompt = synthesis_prompt(
        ctx.log.brief, ctx.target(), ctx.log.retrieved_context, ctx.feedback, previous
    )
    reply = await ctx.think(SYNTHESIZER, "SYNTHESIZING", prompt, max_tokens=1024)
    code, examples, problem = parse_synthesis(reply)
    ctx.candidate = {
        "attempt": ctx.attempt,
        "persona": SYNTHESIZER,
        "reply": reply[:MAX_CODE_CHARS],
        "code": code,
        "examples": examples,
        "parse_problem": problem,
    }
    ctx.log.attempts.append(ctx.candidate)
    return "VALIDATING"


async def process_validating(state: UvmObject, ctx: CycleContext) -> str:
    candidate = ctx.candidate or {}
    selector = ctx.log.selector
    reason = candidate.get("parse_problem")
    if reason is None:
        try:
            audit(candidate["code"], selector)
            candidate["guardian"] = "passed"
        except GuardianViolation as violation:
            candidate["guardian"] = {"rule": violation.rule, "line": violation.line}
            reason = f"Persistence Guardian: {violation}"
    if reason is None:
        # The skill's embedding is computed while the trial runs, on the other
        # core; installing the method then finds it ready.
        embedding = asyncio.ensure_future(ctx.services.prepare_skill(ctx.log, candidate["code"]))
        try:
            trial = await ctx.services.trial(ctx, candidate)
        finally:
            await asyncio.gather(embedding, return_exceptions=True)
        candidate["trial"] = trial.to_record()
        if not trial.ok:
            reason = f"trial run: {trial.reason}"
    candidate["ok"] = reason is None
    candidate["reason"] = reason
    if reason is None:
        return "COMPLETE"
    ctx.feedback = reason
    if ctx.attempt < ctx.services.settings.max_attempts:
        return "SYNTHESIZING"
    ctx.log.reason = f"no valid method after {ctx.attempt} attempt(s); last: {reason}"
    return "FAILED"


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


# --- running a cycle ------------------------------------------------------------------


CANCELLED_REASON = "cancelled on request; nothing was installed"


class CycleCancelled(Exception):
    """The cycle's cancel event was set while a state was working."""


async def _unless_cancelled(work: Awaitable[str], cancel: asyncio.Event | None) -> str:
    """The state's next state, or CycleCancelled as soon as ``cancel`` is set."""
    if cancel is None:
        return await work
    if cancel.is_set():
        if asyncio.iscoroutine(work):
            work.close()
        raise CycleCancelled
    step = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if step.done():
        return step.result()
    step.cancel()  # a model call in a thread finishes there; its answer is dropped
    await asyncio.gather(step, return_exceptions=True)
    raise CycleCancelled


@dataclass
class CycleOutcome:
    cycle_id: str
    status: str  # COMPLETE | FAILED | CANCELLED
    reason: str | None
    replayed: bool
    version: int | None = None


class Orchestrator:
    """Drives one cycle on one worker connection (see the module docstring)."""

    def __init__(self, services: Any) -> None:
        self.services = services

    async def run(
        self,
        connection: Any,
        brief: dict[str, Any],
        target_oid: bytes,
        progress: Progress,
        *,
        cancel: asyncio.Event | None = None,
    ) -> CycleOutcome:
        selector = check_selector(brief.get("selector"))
        tm = connection.transaction_manager
        log = CycleLog(new_cycle_id(), dict(brief), format_oid(target_oid), selector)
        log.owner = dict(self.services.identity)
        ctx = CycleContext(log, connection, self.services, progress)
        await _in_transaction(tm, lambda: self._begin(connection, log))
        audit_trail = self.services.audit
        audit_trail.record(log.cycle_id, log.brief, "CYCLE_STARTED", "IDLE", target=log.target)
        tm.begin()
        machine = connection.root()["psm_prototypes_obj"]
        state_name = "IDLE"
        try:
            while True:
                entry = {"state": state_name, "entered": time.time(), "left": None}
                log.states.append(entry)
                audit_trail.record(log.cycle_id, log.brief, "STATE_TRANSITION", state_name)
                await progress({"cycle_id": log.cycle_id, "state": state_name, "detail": ""})
                if state_name in ("COMPLETE", "FAILED"):
                    entry["left"] = entry["entered"]
                    break
                prototype = getattr(machine, state_name)
                next_state = await _unless_cancelled(prototype.process(ctx), cancel)
                entry["left"] = time.time()
                self._audit_artifacts(ctx, state_name)
                if next_state not in STATES:
                    raise RuntimeError(f"state {state_name} answered unknown state {next_state!r}")
                state_name = next_state
        except CycleCancelled:
            state_name, log.reason = "CANCELLED", CANCELLED_REASON
        except (CognitionUnavailable, CognitionError) as exc:
            state_name, log.reason = "FAILED", f"cognition: {exc}"
        except Exception as exc:  # a broken cycle fails; the kernel keeps running
            state_name, log.reason = "FAILED", f"internal error: {type(exc).__name__}: {exc}"
        if state_name == "COMPLETE" and cancel is not None and cancel.is_set():
            state_name, log.reason = "CANCELLED", CANCELLED_REASON  # before anything installs
        if state_name in ("FAILED", "CANCELLED") and log.states[-1]["state"] != state_name:
            log.states.append({"state": state_name, "entered": time.time(), "left": time.time()})
            await progress({"cycle_id": log.cycle_id, "state": state_name, "detail": log.reason})
        tm.abort()
        if state_name == "COMPLETE":
            try:
                await _in_transaction(tm, lambda: self._install(connection, ctx))
            except Exception as exc:
                state_name = "FAILED"
                log.installed_version = None  # rolled back with the transaction
                log.reason = f"install failed: {type(exc).__name__}: {exc}"
        log.outcome = state_name
        log.duration_s = round(time.time() - log.started, 4)
        if state_name in ("FAILED", "CANCELLED"):
            await _in_transaction(tm, lambda: self._record_failure(connection, log, state_name))
        audit_trail.record(
            log.cycle_id,
            log.brief,
            "FINAL_OUTCOME",
            state_name,
            outcome=state_name,
            reason=log.reason,
            durations=log.durations(),
            replayed=log.replayed,
        )
        return CycleOutcome(
            log.cycle_id, state_name, log.reason, log.replayed, log.installed_version
        )

    def _audit_artifacts(self, ctx: CycleContext, state_name: str) -> None:
        log, trail = ctx.log, ctx.services.audit
        if state_name == "DECOMPOSING":
            trail.record(
                log.cycle_id,
                log.brief,
                "ARTIFACT_GENERATED",
                state_name,
                artifact_type="research_plan",
                queries=log.research_plan,
                fallback=log.plan_fallback,
            )
        elif state_name == "DELEGATING":
            trail.record(
                log.cycle_id,
                log.brief,
                "RESEARCH_COMPLETE",
                state_name,
                context_snippets=len(log.retrieved_context),
            )
        elif state_name == "SYNTHESIZING" and ctx.candidate:
            trail.record(
                log.cycle_id,
                log.brief,
                "ARTIFACT_GENERATED",
                state_name,
                artifact_type="code",
                attempt=ctx.attempt,
                code=ctx.candidate["code"],
            )
        elif state_name == "VALIDATING" and ctx.candidate:
            event = "VALIDATION_SUCCESS" if ctx.candidate.get("ok") else "VALIDATION_FAILURE"
            trail.record(
                log.cycle_id,
                log.brief,
                event,
                state_name,
                attempt=ctx.attempt,
                reason=ctx.candidate.get("reason"),
            )

    @staticmethod
    def _begin(connection: Any, log: CycleLog) -> None:
        root = connection.root()
        root["cycles"][log.cycle_id] = CycleRecord(log.cycle_id, log.to_data())
        root["active_cycles"][log.cycle_id] = dict(log.owner)

    @staticmethod
    def _install(connection: Any, ctx: CycleContext) -> None:
        log, candidate = ctx.log, ctx.candidate or {}
        target = ctx.target()
        record = target.install_method(
            log.selector,
            candidate["code"],
            author=candidate.get("persona", SYNTHESIZER),
            cycle_id=log.cycle_id,
            note=f"grown for mission brief {log.brief.get('type', 'unhandled_message')}",
        )
        log.installed_version = record.version
        ctx.services.index_skill(connection, log, candidate["code"])
        log.outcome = "COMPLETE"
        log.duration_s = round(time.time() - log.started, 4)
        cycle = connection.root()["cycles"][log.cycle_id]
        cycle.status = "COMPLETE"
        cycle.data = log.to_data()
        connection.root()["active_cycles"].pop(log.cycle_id, None)

    @staticmethod
    def _record_failure(connection: Any, log: CycleLog, status: str = "FAILED") -> None:
        cycles = connection.root()["cycles"]
        cycle = cycles.get(log.cycle_id)
        if cycle is None:
            cycle = cycles[log.cycle_id] = CycleRecord(log.cycle_id, {})
        cycle.status = status
        cycle.data = log.to_data()
        connection.root()["active_cycles"].pop(log.cycle_id, None)


async def _in_transaction(tm: transaction.TransactionManager, work: Callable[[], None]) -> None:
    """Run ``work`` in a fresh transaction and commit, retrying on write conflicts."""
    for attempt in range(1, COMMIT_RETRIES + 1):
        tm.begin()
        try:
            work()
            tm.commit()
            return
        except ConflictError:
            tm.abort()
            if attempt == COMMIT_RETRIES:
                raise
            await asyncio.sleep(0.01 * attempt)
        except BaseException:
            tm.abort()
            raise


def mark_interrupted(root: Any, owner_alive: Callable[[dict[str, Any]], bool]) -> list[str]:
    """Mark INTERRUPTED the active cycles whose kernel is gone (caller commits).

    Another kernel sharing the image over ZEO may be running its own cycles
    right now: ``owner_alive`` decides from the owner recorded at the start.
    """
    interrupted = []
    active = root["active_cycles"]
    for cycle_id, owner in list(active.items()):
        if owner_alive(owner):
            continue
        record = root["cycles"].get(cycle_id)
        if record is not None and record.status == "ACTIVE":
            record.status = "INTERRUPTED"
            data = dict(record.data)
            data["outcome"] = "INTERRUPTED"
            data["reason"] = "the kernel stopped before the cycle finished; nothing was installed"
            record.data = data
            interrupted.append(cycle_id)
        del active[cycle_id]
    return interrupted


async def run_candidate_trial(ctx: CycleContext, candidate: dict[str, Any]) -> Any:
    """Run the candidate in a cell, as the installed method would run (see trial.py)."""
    kernel = ctx.services
    brief = ctx.log.brief
    return await run_trial(
        kernel.cells,
        ctx.connection,
        ctx.target(),
        ctx.log.selector,
        candidate["code"],
        candidate.get("examples"),
        {"args": list(brief.get("args", [])), "kwargs": dict(brief.get("kwargs", {}))},
        timeout=kernel.settings.trial_wall_seconds,
        services=kernel.services_for(ctx.connection),
    )
