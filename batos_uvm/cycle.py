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
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import transaction
from persistent import Persistent
from ZODB.POSException import ConflictError

from .awakening import STATES
from .cognition import CognitionError, CognitionUnavailable
from .cycle_context import CycleContext, CycleLog, Progress
from .cycle_states import SYNTHESIZER, announce, register_state_primitives
from .objects import check_selector, format_oid
from .trial import run_trial

__all__ = [
    "CycleContext",
    "CycleLog",
    "CycleOutcome",
    "CycleRecord",
    "Orchestrator",
    "mark_interrupted",
    "register_state_primitives",
    "run_candidate_trial",
]

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
                await progress(announce(state_name, ctx))
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
            await progress(ctx.event(state_name, log.reason or ""))
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
        intent = str(log.brief.get("intent") or "").strip()
        record = target.install_method(
            log.selector,
            candidate["code"],
            author=candidate.get("persona", SYNTHESIZER),
            cycle_id=log.cycle_id,
            note=f"brief: {intent}" if intent else
            f"grown for mission brief {log.brief.get('type', 'unhandled_message')}",
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
