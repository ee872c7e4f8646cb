"""The kernel: the living image, a pool of workers, cognitive cycles, the bridge.

Data flows one way: bridge -> ``handle`` -> job queue -> worker (own ZODB
connection and transaction manager) -> orchestrator -> reply. A message nobody
understands releases its worker, runs a cognitive cycle as a job of its own
(joining one already running for the same target and selector), then is sent
again to the new method.
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

import ormsgpack
import transaction
from ZODB.POSException import ConflictError

from . import primitives
from .audit import AuditTrail
from .awakening import awaken
from .cognition import Cognition
from .config import PERSONAS, Settings
from .cycle import (
    CycleOutcome,
    Orchestrator,
    register_state_primitives,
    run_candidate_trial,
)
from .deadline import MethodAbandoned, MethodTimeout, run_with_deadline
from .default_brain import backend_for_stored_model
from .image import OpenImage, open_image
from .objects import SelectorNotUnderstood, UvmObject, check_selector
from .protocol import (
    MAX_REPR_CHARS,
    CycleRequest,
    CyclesRequest,
    InspectRequest,
    PingRequest,
    ProgressEvent,
    Reply,
    SendRequest,
    parse_target,
)

log = logging.getLogger("batos.kernel")

Job = Callable[[Any], Awaitable[Any]]
SEND_RETRIES = 3


class TargetError(LookupError):
    pass


@dataclass
class _Joinable:
    future: asyncio.Future[CycleOutcome]
    listeners: list[Callable[[dict[str, Any]], Awaitable[None]]]


class Kernel:
    """One running BAT OS kernel. ``await run()`` until a signal or ``stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.boot_id = uuid.uuid4().hex
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

    # -- life cycle ---------------------------------------------------------------------
    async def start(self, *, serve_bridge: bool = True) -> None:
        from .text import default_embedder

        self.loop = asyncio.get_running_loop()
        self.image = await asyncio.to_thread(open_image, self.settings)
        self.embedder = default_embedder(self.settings.embedder)
        await asyncio.to_thread(self._awaken)
        self._register_primitives()
        specs = {p: self.settings.persona_backend(p) for p in PERSONAS}
        stored = functools.partial(
            backend_for_stored_model, self.image.db, threads=self.settings.model_threads
        )
        self.cognition = Cognition(specs, db=self.image.db, default=stored)
        await self.audit.start()
        self._background = [asyncio.create_task(self._save_index_now_and_then(), name="index")]
        for number in range(self.settings.workers):
            self._workers.append(asyncio.create_task(self._worker(number), name=f"worker-{number}"))
        if serve_bridge:
            from .bridge import Bridge, CurveServerConfig

            curve = (
                CurveServerConfig.from_dir(self.settings.curve_dir)
                if self.settings.curve_dir
                else None
            )
            self.bridge = Bridge(
                self,
                self.settings.endpoint,
                max_message_bytes=self.settings.max_message_bytes,
                curve=curve,
                allow_insecure_remote=self.settings.allow_insecure_remote,
                boot_id=self.boot_id,
            )
            await self.bridge.start()
        log.info("BAT OS kernel %s is live: image %s", self.boot_id[:8], self.image.description)

    def _awaken(self) -> None:
        assert self.image is not None
        awaken(self.image.db, self.settings, self.embedder, self._kernel_alive)
        # Load the embedding model now, off the event loop, not during the first cycle.
        self.embedder.encode(["BAT OS awakens"])

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

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        print(
            f"BAT OS kernel ready: bridge {self.bridge.endpoint}, image {self.image.description}",
            flush=True,
        )
        await self._stopping.wait()
        await self.stop()
        return 0

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        log.info("shutting down")
        if self.bridge is not None:
            await self.bridge.stop()
        for task in [*self._workers, *self._background]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._background, return_exceptions=True)
        self._workers.clear()
        self._background.clear()
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
                    if isinstance(exc, MethodAbandoned):
                        # A runaway thread still holds this connection: leave it to
                        # that thread, close it when the thread ends, work on a fresh one.
                        log.warning("worker %d: %s; continuing on a new connection", number, exc)
                        exc.finished.add_done_callback(
                            functools.partial(_close_abandoned, connection, tm)
                        )
                        tm = transaction.TransactionManager(explicit=True)
                        connection = self.image.db.open(transaction_manager=tm)
                    else:
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
        return Reply.error_reply("unknown_command", f"unsupported request {type(request).__name__}")

    def status(self) -> dict[str, Any]:
        return {
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            "image": self.image.description if self.image else None,
            "uptime_s": round(time.time() - self.started, 3),
            "cognition": self.cognition.describe(),
            "workers": len(self._workers),
        }

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
        brief = {"type": "unhandled_message", "selector": selector, "args": args, "kwargs": kwargs}
        if intent.strip():
            brief["intent"] = intent.strip()
        outcome: CycleOutcome | None = None
        try:
            if force_cycle:
                oid = await self.submit(
                    lambda conn: _read(conn, lambda: self._resolve(conn, target)._p_oid)
                )
                outcome = await self.cycle_for(oid, brief, progress)
                if outcome.status != "COMPLETE":
                    return _cycle_failed(outcome)
            for _ in range(SEND_RETRIES):
                answered, value = await self.submit(
                    lambda conn: self._try_send(conn, target, selector, args, kwargs)
                )
                if answered:
                    return _completed(value, outcome)
                if outcome is not None:
                    break
                outcome = await self.cycle_for(value, brief, progress)
                if outcome.status != "COMPLETE":
                    return _cycle_failed(outcome)
        except TargetError:
            raise
        except MethodTimeout as exc:
            return Reply.failed(
                "method_timeout",
                str(exc),
                cycle_id=outcome.cycle_id if outcome else None,
                replayed=outcome.replayed if outcome else False,
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
        """(True, result) when answered; (False, oid) when nobody understands the selector."""
        tm = connection.transaction_manager
        for attempt in range(1, SEND_RETRIES + 1):
            tm.begin()
            try:
                receiver = self._resolve(connection, target)
                found = receiver.lookup(selector)
                if found is None:
                    tm.abort()
                    return False, receiver._p_oid
                if not found.is_method and not callable(found.value):
                    result = receiver.send(selector, *args, **kwargs)  # a slot read
                else:
                    # Methods run off the event loop so the bridge keeps breathing,
                    # and are stopped when they overrun.
                    result = await run_with_deadline(
                        functools.partial(receiver.send, selector, *args, **kwargs),
                        self.settings.method_timeout,
                        name=f"{selector}()",
                    )
                if asyncio.iscoroutine(result):
                    result.close()  # never run kernel coroutines on behalf of a method
                    raise TypeError(f"{selector} returned a coroutine, not a value")
                # Made plain while the transaction is open: the reply is packed
                # later, when this connection may already serve the next job.
                wire = _to_wire(result)
                tm.commit()
                return True, wire
            except ConflictError:
                tm.abort()
                if attempt == SEND_RETRIES:
                    raise
            except MethodAbandoned:
                raise  # the runaway thread still uses this transaction: leave it be
            except BaseException:
                tm.abort()
                raise
        raise AssertionError("unreachable")

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
        """Run a cycle for (target, selector), or join the one already running."""
        key = (oid, brief["selector"])
        running = self._cycles.get(key)
        if running is not None:
            running.listeners.append(progress)
            return await asyncio.shield(running.future)
        joinable = _Joinable(asyncio.get_running_loop().create_future(), [progress])
        self._cycles[key] = joinable

        async def broadcast(event: dict[str, Any]) -> None:
            for listener in list(joinable.listeners):
                try:
                    await listener(event)
                except Exception:  # a vanished client must not break the cycle
                    log.debug("progress listener failed", exc_info=True)

        try:
            outcome = await self.submit(
                lambda conn: self.orchestrator.run(conn, brief, oid, broadcast)
            )
            joinable.future.set_result(outcome)
            return outcome
        except BaseException as exc:
            if not joinable.future.done():
                joinable.future.set_exception(exc)
                joinable.future.exception()  # joined or not, it was seen
            raise
        finally:
            self._cycles.pop(key, None)

    # -- services used by the cycle ------------------------------------------------------------
    async def search(self, store: Any, query: str, top_k: int) -> list[Any]:
        return store.search(query, self.embedder, top_k=top_k)

    async def trial(self, ctx: Any, candidate: dict[str, Any]) -> Any:
        return await run_candidate_trial(ctx, candidate)

    def index_skill(self, connection: Any, cycle_log: Any, code: str) -> None:
        store = connection.root()["knowledge_catalog_obj"].store
        words = cycle_log.selector.replace("_", " ")
        text = (
            f"Skill {cycle_log.selector} ({words}): a method of {cycle_log.target} grown "
            f"when it received {cycle_log.selector} with arguments "
            f"{cycle_log.brief.get('args', [])}. Source:\n{code}"
        )
        store.add_document(
            f"skill:{cycle_log.target}:{cycle_log.selector}",
            text,
            {
                "source": "cycle",
                "cycle_id": cycle_log.cycle_id,
                "selector": cycle_log.selector,
                "target": cycle_log.target,
            },
            self.embedder,
        )

    # -- primitives (called from installed methods and the shell) --------------------------------
    def _primitive_search(
        self, catalog: UvmObject, query: str, top_k: int = 5
    ) -> list[dict[str, Any]]:
        hits = catalog.store.search(str(query), self.embedder, top_k=int(top_k))
        return [{"doc_id": h.doc_id, "text": h.text, "score": round(h.score, 4)} for h in hits]

    def _primitive_index(
        self, catalog: UvmObject, doc_id: str, text: str, metadata: dict[str, Any] | None = None
    ) -> int:
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


def _close_abandoned(connection: Any, tm: transaction.TransactionManager, _: Any) -> None:
    _abort_quietly(tm)
    try:
        connection.close()
    except Exception:  # the database may already be closed at shutdown
        log.debug("closing an abandoned connection failed", exc_info=True)


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


def _cycle_failed(outcome: CycleOutcome) -> Reply:
    return Reply.failed(
        "cycle_failed",
        outcome.reason or "the cognitive cycle failed",
        cycle_id=outcome.cycle_id,
        replayed=outcome.replayed,
    )


def _to_wire(value: Any) -> tuple[Any, str | None]:
    """(value, None) when it travels as msgpack, else (None, a readable repr)."""
    try:
        ormsgpack.packb(value)
    except (TypeError, ValueError, OverflowError):
        try:
            text = repr(value)
        except Exception as exc:  # a broken __repr__ must not lose the reply
            text = f"<unrepresentable {type(value).__name__}: {exc}>"
        return None, text[:MAX_REPR_CHARS]
    return value, None


def _completed(wire: tuple[Any, str | None], outcome: CycleOutcome | None) -> Reply:
    value, text = wire
    return Reply(
        status="COMPLETE",
        result=value,
        result_repr=text,
        cycle_id=outcome.cycle_id if outcome else None,
        replayed=outcome.replayed if outcome else False,
    )


def recent_cycles(root: Any, limit: int) -> list[dict[str, Any]]:
    cycles = root["cycles"]
    keys = list(cycles.keys())[-limit:]
    return [cycles[key].summary() for key in reversed(keys)]


__all__ = ["Kernel", "SelectorNotUnderstood", "recent_cycles"]
