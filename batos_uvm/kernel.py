"""The kernel: the living image, a pool of workers, cognitive cycles, the bridge.

Data flows one way: bridge -> ``handle`` -> job queue -> worker (own ZODB
connection and transaction manager) -> orchestrator -> reply. A message nobody
understands releases its worker, runs a cognitive cycle as a job of its own
(joining one already running for the same target and selector), then is sent
again to the new method. Generated methods run in cells (``batos_uvm.cells``),
never in this process: the worker serves the cell's requests and commits the
receiver's changes in the send's transaction.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import transaction
from ZODB.POSException import ConflictError

from . import primitives
from .audit import AuditTrail
from .awakening import awaken_catalog, awaken_models, awaken_objects
from .cells.invocation import Invocation, MethodFailed, Refused, is_generated
from .cells.pool import CellConfig, CellFailure, CellPool
from .cognition import Cognition
from .config import PERSONAS, Settings
from .cycle import (
    CycleOutcome,
    Orchestrator,
    register_state_primitives,
    run_candidate_trial,
)
from .cycle_progress import CycleProgress
from .cycle_states import PLANNER, SYNTHESIZER
from .default_brain import backend_for_stored_model
from .image import OpenImage, open_image, preflight
from .objects import (
    SelectorNotUnderstood,
    UvmObject,
    check_selector,
    describe_briefly,
    kernel_owned,
)
from .outcomes import SendFailed, completed, cycle_failed, to_wire
from .protocol import (
    CancelRequest,
    CycleRequest,
    CyclesRequest,
    InspectRequest,
    PingRequest,
    ProgressEvent,
    Reply,
    SendRequest,
    parse_target,
)
from .readiness import NotReady, Readiness, in_daemon_thread
from .recordings import recorded_briefs
from .services import KernelServices

log = logging.getLogger("batos.kernel")

Job = Callable[[Any], Awaitable[Any]]
SEND_RETRIES = 3


class TargetError(LookupError):
    pass


# The parts a kernel loads after it starts answering (see Kernel.start).
IMAGE, CATALOG, MODELS = "image", "catalog", "models"
CYCLE_NEEDS = (CATALOG, MODELS)  # a cognitive cycle searches the catalog and asks models
THINKING = {"DECOMPOSING": PLANNER, "SYNTHESIZING": SYNTHESIZER}  # who a state waits for


@dataclass
class _Joinable:
    future: asyncio.Future[CycleOutcome]
    progress: CycleProgress


class Kernel:
    """One running BAT OS kernel. ``await run()`` until a signal or ``stop()``."""

    def __init__(self, settings: Settings, *, boot_id: str | None = None) -> None:
        self.settings = settings
        self.boot_id = boot_id or uuid.uuid4().hex
        self.started = time.time()
        self.image: OpenImage | None = None
        self.audit = AuditTrail(settings.metacognition_log)
        self.cognition = Cognition({})
        self.embedder: Any = None
        self.bridge: Any = None
        self._jobs: asyncio.Queue[tuple[Job, asyncio.Future[Any]]] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[None]] = []
        self._cycles: dict[tuple[bytes, str], _Joinable] = {}
        self._stopping = asyncio.Event()
        self.orchestrator = Orchestrator(self)
        self.readiness = Readiness()
        self.readiness.add(IMAGE, "the image")
        self.readiness.add(CATALOG, "the knowledge catalog and its embedder")
        self.readiness.add(MODELS, "configured models and LoRA adapters")
        self.briefs = recorded_briefs(settings)
        self.cells = CellPool(
            CellConfig.from_settings(settings), size=settings.cells or settings.workers
        )

    # -- life cycle ---------------------------------------------------------------------
    async def start(
        self, *, serve_bridge: bool = True, wait_loaded: bool | None = None, bridge: Any = None
    ) -> None:
        """Answer first; load what is heavy in the background (docs/ARCHITECTURE.md).

        Refused before anything slow happens and before anything is created: a
        bad image path or a locked image (preflight), then a bridge address that
        cannot be bound (the bridge binds first, so ``ping`` answers from here
        on; ``bridge`` is one already bound, see boot.serve). The image opens and
        its objects awaken (fast): sends, inspect and cycles are served. The
        embedder, the golden dataset and the configured models load in the
        background; work that needs them waits for them. Without a bridge nobody
        can ask meanwhile, so by default ``start`` then returns once everything
        is loaded.
        """
        from .text import default_embedder

        self.loop = asyncio.get_running_loop()
        if bridge is not None:
            self.bridge, bridge.handler = bridge, self
        else:
            await asyncio.to_thread(preflight, self.settings)
            if serve_bridge:
                self.bridge = self._make_bridge()
                await self.bridge.start()
        self.cells.warm()  # cells start in the background while the image opens
        try:
            self.image = await asyncio.to_thread(open_image, self.settings)
            await asyncio.to_thread(
                awaken_objects, self.image.db, self._kernel_alive, self.settings
            )
            self.embedder = default_embedder(self.settings.embedder)
            self._register_primitives()
            specs = {p: self.settings.persona_backend(p) for p in PERSONAS}
            stored = functools.partial(
                backend_for_stored_model, self.image.db, threads=self.settings.model_threads
            )
            self.cognition = Cognition(specs, db=self.image.db, default=stored)
            await self.audit.start()
        except BaseException as exc:  # close what was opened: the image, its ZEO address file
            self.readiness.mark_failed(IMAGE, f"{type(exc).__name__}: {exc}")
            await self.stop()
            raise
        self._background = [asyncio.create_task(self._save_index_now_and_then(), name="index")]
        for number in range(self.settings.workers):
            self._workers.append(asyncio.create_task(self._worker(number), name=f"worker-{number}"))
        self.readiness.mark_ready(IMAGE)
        self.readiness.load_in_background(CATALOG, self._load_catalog)
        self.readiness.load_in_background(MODELS, self._load_models)
        log.info("BAT OS kernel %s is live: image %s", self.boot_id[:8], self.image.description)
        if wait_loaded if wait_loaded is not None else not serve_bridge:
            await self.readiness.wait_all((CATALOG, MODELS))

    def _make_bridge(self) -> Any:
        from .boot import make_bridge

        return make_bridge(self.settings, self, self.boot_id)

    async def _load_catalog(self) -> None:
        assert self.image is not None
        # The embedding model (torch, sentence-transformers: seconds) loads in a
        # daemon thread: a kernel stopped meanwhile does not wait for it.
        await in_daemon_thread(self.embedder.encode, ["BAT OS awakens"])
        await in_daemon_thread(awaken_catalog, self.image.db, self.settings, self.embedder)

    async def _load_models(self) -> None:
        assert self.image is not None
        await in_daemon_thread(awaken_models, self.image.db, self.settings)

    @property
    def identity(self) -> dict[str, Any]:
        """Who runs a cycle: recorded so other kernels on the image know it is alive."""
        return {"boot_id": self.boot_id, "pid": os.getpid(), "host": socket.gethostname()}

    def _kernel_alive(self, owner: dict[str, Any]) -> bool:
        if owner.get("boot_id") == self.boot_id:
            return True
        if owner.get("host") != socket.gethostname():
            return True  # another machine's kernel: it marks its own cycles
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _register_primitives(self) -> None:
        register_state_primitives()
        primitives.register("catalog.search", self._primitive_search)
        primitives.register("catalog.index", self._primitive_index)
        primitives.register("infer", self._primitive_infer)

    async def run(self, *, bridge: Any = None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start(bridge=bridge)
        loading = self.readiness.pending()
        print(
            f"BAT OS kernel answering: bridge {self.bridge.endpoint}, image "
            f"{self.image.description}"
            + (f"; loading in the background: {', '.join(loading)}" if loading else ""),
            flush=True,
        )
        announce = asyncio.create_task(self._announce_ready(), name="announce-ready")
        await self._stopping.wait()
        announce.cancel()
        await self.stop()
        return 0

    async def _announce_ready(self) -> None:
        try:
            await self.readiness.wait_all(tuple(self.readiness.describe()["parts"]))
        except NotReady as exc:
            print(f"BAT OS kernel answering, but not everything loaded: {exc}", flush=True)
            return
        print(f"BAT OS kernel ready: everything loaded {time.time() - self.started:.1f} s "
              "after start", flush=True)

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        log.info("shutting down")
        if self.bridge is not None:
            await self.bridge.stop()
        await self.readiness.cancel()
        for task in [*self._workers, *self._background]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._background, return_exceptions=True)
        self._workers.clear()
        self._background.clear()
        await self.cells.close()
        await self.cognition.close()
        await self.audit.close()
        if self.image is not None:
            await asyncio.to_thread(self.image.close)
        log.info("shutdown complete")

    # -- workers ----------------------------------------------------------------------------
    async def _worker(self, number: int) -> None:
        assert self.image is not None
        tm = transaction.TransactionManager(explicit=True)
        connection = self.image.db.open(transaction_manager=tm)
        try:
            while True:
                job, future = await self._jobs.get()
                if future.cancelled():
                    continue
                try:
                    result = await job(connection)
                except BaseException as exc:
                    _abort_quietly(tm)
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                        raise
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(result)
        finally:
            _abort_quietly(tm)
            connection.close()

    async def _save_index_now_and_then(self) -> None:
        assert self.image is not None
        while True:
            await asyncio.sleep(self.settings.index_interval)
            try:
                await asyncio.to_thread(self.image.save_index)
            except Exception:  # an index is an optimisation: never stop the kernel for it
                log.warning("saving the image index failed", exc_info=True)

    async def submit(self, job: Job) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._jobs.put((job, future))
        return await future

    # -- the request handler (see protocol.RequestHandler) -------------------------------------
    async def handle(
        self, request: Any, progress: Callable[[ProgressEvent], Awaitable[None]]
    ) -> Reply:
        async def emit(event: dict[str, Any]) -> None:
            await progress(ProgressEvent(**event))

        try:
            if isinstance(request, PingRequest):
                return Reply.complete(self.status())
            if isinstance(request, CancelRequest):
                return self.cancel_cycle(request.cycle_id)
            await self.readiness.wait(IMAGE)  # opened in a moment, even for a new image
            if isinstance(request, SendRequest):
                return await self.send(
                    request.target,
                    request.selector,
                    request.args,
                    request.kwargs,
                    emit,
                    intent=request.intent,
                )
            if isinstance(request, CycleRequest):
                brief = request.mission_brief
                return await self.send(
                    request.target_oid,
                    brief.selector,
                    brief.args,
                    brief.kwargs,
                    emit,
                    force_cycle=True,
                    intent=brief.intent,
                )
            if isinstance(request, InspectRequest):
                return Reply.complete(
                    await self.submit(
                        lambda conn: _read(
                            conn, lambda: self._resolve(conn, request.target).describe()
                        )
                    )
                )
            if isinstance(request, CyclesRequest):
                return Reply.complete(
                    await self.submit(
                        lambda conn: _read(conn, lambda: recent_cycles(conn.root(), request.limit))
                    )
                )
        except TargetError as exc:
            return Reply.error_reply("not_found", str(exc))
        except NotReady as exc:
            return Reply.failed("not_ready", str(exc))
        return Reply.error_reply("unknown_command", f"unsupported request {type(request).__name__}")

    def status(self) -> dict[str, Any]:
        """What ``ping`` answers: identity, image, cognition and readiness."""
        readiness = self.readiness.describe()
        status = {
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            "image": self.image.description if self.image else None,
            "uptime_s": round(time.time() - self.started, 3),
            "cognition": self.cognition.describe(),
            "workers": len(self._workers),
            "cells": self.cells.describe(),
            "ready": readiness["ready"],
            "loading": readiness["loading"],
            "parts": readiness["parts"],
        }
        if self.briefs:
            status["briefs"] = self.briefs
        return status

    def cancel_cycle(self, cycle_id: str) -> Reply:
        """Ask a running cycle to stop; it ends CANCELLED and installs nothing."""
        running = {j.progress.cycle_id: j for j in self._cycles.values() if j.progress.cycle_id}
        matches = [c for c in running if c == cycle_id] or [
            c for c in running if c.endswith(cycle_id) or c.startswith(cycle_id)
        ]
        if len(matches) != 1:
            why = "matches several running cycles" if matches else "is not running in this kernel"
            return Reply.failed(
                "not_found",
                f"cycle {cycle_id} {why}; running: {', '.join(sorted(running)) or 'none'} "
                "(a finished cycle's outcome is in /cycles)",
            )
        running[matches[0]].progress.cancel.set()
        log.info("cycle %s: cancellation requested", matches[0])
        return Reply.complete({"cycle_id": matches[0], "cancelling": True})

    # -- messages ------------------------------------------------------------------------------
    async def send(
        self,
        target: str,
        selector: str,
        args: list[Any],
        kwargs: dict[str, Any],
        progress: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        force_cycle: bool = False,
        intent: str = "",
    ) -> Reply:
        """Invoke ``selector``; when nobody understands it, grow it in a cycle and invoke it.

        ``intent`` is the user's description of what the message should do, for the cycle.
        """
        try:
            check_selector(selector)
        except ValueError as exc:
            return Reply.failed("invalid_selector", str(exc))
        for name in kwargs:
            if not isinstance(name, str) or name.startswith("_"):
                return Reply.failed(
                    "invalid_arguments",
                    f"keyword {name!r}: names starting with '_' are reserved for the kernel",
                )
        brief = {"type": "unhandled_message", "selector": selector, "args": args, "kwargs": kwargs}
        if intent.strip():
            brief["intent"] = intent.strip()
        outcome: CycleOutcome | None = None
        try:
            if force_cycle:
                oid = await self.submit(
                    lambda conn: _read(conn, lambda: self._growable(conn, target, selector))
                )
                outcome = await self.cycle_for(oid, brief, progress)
                if outcome.status != "COMPLETE":
                    return cycle_failed(outcome)
            for _ in range(SEND_RETRIES):
                answered, value = await self.submit(
                    lambda conn: self._try_send(conn, target, selector, args, kwargs)
                )
                if answered:
                    return completed(value, outcome)
                if outcome is not None:
                    break
                outcome = await self.cycle_for(value, brief, progress)
                if outcome.status != "COMPLETE":
                    return cycle_failed(outcome)
        except TargetError:
            raise
        except SendFailed as exc:
            return Reply.failed(
                exc.kind,
                str(exc),
                cycle_id=outcome.cycle_id if outcome else None,
                replayed=outcome.replayed if outcome else False,
                output=exc.output,
            )
        except Exception as exc:
            return Reply.failed(
                "method_raised",
                f"{type(exc).__name__}: {exc}",
                cycle_id=outcome.cycle_id if outcome else None,
                replayed=outcome.replayed if outcome else False,
            )
        return Reply.failed(
            "not_understood",
            f"{selector!r} is still not understood after a cycle",
            cycle_id=outcome.cycle_id if outcome else None,
        )

    async def _try_send(
        self, connection: Any, target: str, selector: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        """(True, answer) when answered; (False, oid) when nobody understands the selector."""
        tm = connection.transaction_manager
        for attempt in range(1, SEND_RETRIES + 1):
            tm.begin()
            try:
                receiver = self._resolve(connection, target)
                found = receiver.lookup(selector)
                if found is None:
                    self._growable(connection, target, selector)
                    tm.abort()
                    return False, receiver._p_oid
                output = None
                if is_generated(found):
                    invocation = Invocation(
                        self.cells,
                        timeout=self.settings.method_timeout,
                        services=self.services_for(connection),
                    )
                    try:
                        result = await invocation.call(receiver, selector, args, kwargs, found)
                    except (MethodFailed, Refused, CellFailure) as exc:
                        raise SendFailed.from_exception(exc, invocation.output) from None
                    output = invocation.output or None
                elif found.is_method:
                    # Kernel primitives are kernel code; off the event loop, since
                    # some wait on it (infer).
                    result = await asyncio.to_thread(receiver.send, selector, *args, **kwargs)
                else:
                    result = receiver.send(selector, *args, **kwargs)  # a slot read
                # Made plain while the transaction is open: the reply is packed
                # later, when this connection may already serve the next job.
                answer = to_wire(result, output)
                tm.commit()
                return True, answer
            except ConflictError:
                tm.abort()
                if attempt == SEND_RETRIES:
                    raise
            except BaseException:
                tm.abort()
                raise
        raise AssertionError("unreachable")

    def _growable(self, connection: Any, target: str, selector: str) -> bytes:
        """The target's oid, when a cycle may grow a method on it."""
        receiver = self._resolve(connection, target)
        if kernel_owned(receiver):
            raise SendFailed(
                "not_understood",
                f"{describe_briefly(receiver)} does not understand {selector!r}, and it belongs "
                "to the kernel: no method is grown on it (send the brief to genesis_obj, or "
                "to a clone of it)",
            )
        return receiver._p_oid

    def _resolve(self, connection: Any, target: str) -> UvmObject:
        try:
            parsed = parse_target(target) if isinstance(target, str) else target
        except ValueError as exc:
            raise TargetError(str(exc)) from None
        root = connection.root()
        if isinstance(parsed, str):
            obj = root.get(parsed)
            if obj is None:
                names = ", ".join(sorted(k for k in root.keys() if k.endswith("_obj")))
                raise TargetError(f"unknown target {parsed!r}; root objects: {names}")
        else:
            try:
                obj = connection.get(
                    parsed.to_bytes(8, "big") if isinstance(parsed, int) else parsed
                )
            except Exception:
                raise TargetError(f"no object with oid {target}") from None
        if not isinstance(obj, UvmObject):
            raise TargetError(f"target {target} is a {type(obj).__name__}, not a UvmObject")
        return obj

    async def cycle_for(
        self,
        oid: bytes,
        brief: dict[str, Any],
        progress: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> CycleOutcome:
        """Run a cycle for (target, selector), or join the one already running.

        The cycle waits for what it needs (the catalog, the models) if the
        kernel is still loading, saying so; it repeats its state every few
        seconds while a model thinks, and stops when its ``cancel`` is set.
        """
        key = (oid, brief["selector"])
        running = self._cycles.get(key)
        if running is not None:
            running.progress.add(progress)
            return await asyncio.shield(running.future)
        broadcast = CycleProgress(progress, personas=THINKING)
        joinable = _Joinable(asyncio.get_running_loop().create_future(), broadcast)
        self._cycles[key] = joinable
        talking = asyncio.create_task(broadcast.keep_talking(), name="cycle-progress")

        async def waiting(what: str, waited: float) -> None:
            await broadcast({"state": "WAITING", "detail": f"the kernel is still loading {what}"})

        try:
            await self.readiness.wait_all(CYCLE_NEEDS, waiting)
            outcome = await self.submit(
                lambda conn: self.orchestrator.run(
                    conn, brief, oid, broadcast, cancel=broadcast.cancel
                )
            )
            joinable.future.set_result(outcome)
            return outcome
        except BaseException as exc:
            if not joinable.future.done():
                joinable.future.set_exception(exc)
                joinable.future.exception()  # joined or not, it was seen
            raise
        finally:
            talking.cancel()
            self._cycles.pop(key, None)

    # -- services used by the cycle ------------------------------------------------------------
    async def search(self, store: Any, query: str, top_k: int) -> list[Any]:
        from .catalog import MAX_QUERY_CHARS

        query = query[:MAX_QUERY_CHARS]  # as the catalog cuts it, so the embedding is found
        if query.strip() and len(store):
            await self.prepare_queries([query])  # embedded off the loop; the search finds it
        return store.search(query, self.embedder, top_k=top_k)

    async def trial(self, ctx: Any, candidate: dict[str, Any]) -> Any:
        return await run_candidate_trial(ctx, candidate)

    async def prepare_queries(self, queries: list[str]) -> None:
        """Embed a cycle's catalog queries in one batch, off the loop (the embedder keeps them)."""
        await asyncio.to_thread(self.embedder.encode, list(queries))

    async def prepare_skill(self, cycle_log: Any, code: str) -> None:
        """Embed a candidate's skill text ahead of time (the embedder keeps it), off the loop."""
        await asyncio.to_thread(self.embedder.encode, [skill_text(cycle_log, code)])

    def index_skill(self, connection: Any, cycle_log: Any, code: str) -> None:
        store = connection.root()["knowledge_catalog_obj"].store
        store.add_document(
            f"skill:{cycle_log.target}:{cycle_log.selector}",
            skill_text(cycle_log, code),
            {
                "source": "cycle",
                "cycle_id": cycle_log.cycle_id,
                "selector": cycle_log.selector,
                "target": cycle_log.target,
            },
            self.embedder,
            whole=True,  # source code: one chunk, embedded once
        )

    def services_for(self, connection: Any) -> KernelServices:
        """What generated methods may ask of this kernel (batos.search, batos.ask)."""
        return KernelServices(self, connection)

    # -- primitives (called by clients and the shell) -------------------------------------------
    def _primitive_search(
        self, catalog: UvmObject, query: str, top_k: int = 5
    ) -> list[dict[str, Any]]:
        self.readiness.wait_blocking(CATALOG, timeout=self.settings.method_timeout)
        hits = catalog.store.search(str(query), self.embedder, top_k=int(top_k))
        return [{"doc_id": h.doc_id, "text": h.text, "score": round(h.score, 4)} for h in hits]

    def _primitive_index(
        self, catalog: UvmObject, doc_id: str, text: str, metadata: dict[str, Any] | None = None
    ) -> int:
        self.readiness.wait_blocking(CATALOG, timeout=self.settings.method_timeout)
        chunks = catalog.store.add_document(
            str(doc_id), str(text), dict(metadata or {}), self.embedder
        )
        return len(chunks)

    def _primitive_infer(self, receiver: UvmObject, prompt: str, persona: str | None = None) -> str:
        from .cognition import InferenceRequest

        name = (persona or getattr(receiver, "name", None) or "ALFRED").upper()
        codex = getattr(receiver, "codex", None) or {}
        request = InferenceRequest(
            persona=name, prompt=str(prompt), system=codex.get("system_prompt")
        )
        future = asyncio.run_coroutine_threadsafe(self.cognition.infer(request), self.loop)
        return future.result(timeout=600).text


def skill_text(cycle_log: Any, code: str) -> str:
    """What the catalog learns from a grown method."""
    words = cycle_log.selector.replace("_", " ")
    return (
        f"Skill {cycle_log.selector} ({words}): a method of {cycle_log.target} grown "
        f"when it received {cycle_log.selector} with arguments "
        f"{cycle_log.brief.get('args', [])}. Source:\n{code}"
    ).strip()  # as the catalog stores it: prepare_skill embeds exactly this text


def _abort_quietly(tm: transaction.TransactionManager) -> None:
    try:
        tm.abort()
    except Exception:  # no transaction was begun
        pass


async def _read(connection: Any, work: Callable[[], Any]) -> Any:
    tm = connection.transaction_manager
    tm.begin()
    try:
        return work()
    finally:
        tm.abort()


def recent_cycles(root: Any, limit: int) -> list[dict[str, Any]]:
    cycles = root["cycles"]
    keys = list(cycles.keys())[-limit:]
    return [cycles[key].summary() for key in reversed(keys)]


__all__ = ["Kernel", "SelectorNotUnderstood", "recent_cycles"]
