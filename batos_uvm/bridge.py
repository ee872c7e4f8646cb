"""The synaptic bridge: the kernel's ZeroMQ ROUTER endpoint (protocol: docs/PROTOCOL.md).

It turns frames from any number of clients into validated requests, runs each one
as its own asyncio task through the kernel's ``RequestHandler``, relays progress,
deduplicates retried request ids, answers heartbeats, and never lets bad input
stop it: every malformed frame gets an ERROR reply with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import reprlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ormsgpack
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from .protocol import (
    DEFAULT_ENDPOINT,
    ERR_BUSY,
    ERR_DUPLICATE_ID,
    ERR_INTERNAL,
    ERR_MALFORMED,
    ERR_SHUTDOWN,
    MAX_MESSAGE_BYTES,
    MAX_REPR_CHARS,
    Heartbeat,
    ProgressEvent,
    ProtocolError,
    Reply,
    RequestHandler,
    check_endpoint,
    decode_request,
    endpoint_is_local,
    pack,
    truncate,
)

log = logging.getLogger("batos.bridge")

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 6, 200, 200, 200
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 20_000, 20_000, 1000


class BridgeError(RuntimeError):
    """The bridge cannot start as configured; the message says what to change."""


class InsecureBindError(BridgeError, ValueError):
    """A non-loopback endpoint without CURVE authentication."""


@dataclass(frozen=True)
class CurveServerConfig:
    """Kernel side of CURVE: its secret key and the directory of authorised client keys."""

    secret_key_file: Path
    authorized_keys_dir: Path

    @classmethod
    def from_dir(cls, keys_dir: str | os.PathLike[str]) -> CurveServerConfig:
        """The layout ``batos.py keys generate DIR`` writes."""
        base = Path(keys_dir)
        cfg = cls(base / "server.key_secret", base / "authorized_clients")
        if not cfg.secret_key_file.is_file():
            raise BridgeError(
                f"no server secret key at {cfg.secret_key_file}; "
                f"create keys with: python batos.py keys generate {base}"
            )
        if not cfg.authorized_keys_dir.is_dir():
            raise BridgeError(f"no authorised client keys directory at {cfg.authorized_keys_dir}")
        return cfg


def check_bind_allowed(
    endpoint: str, curve: CurveServerConfig | None, allow_insecure_remote: bool
) -> None:
    """Refuse to expose the kernel beyond this machine without authentication."""
    if curve is None and not allow_insecure_remote and not endpoint_is_local(endpoint):
        raise InsecureBindError(
            f"refusing to bind {endpoint} without CURVE authentication: anyone who can reach "
            "it could send messages that make the kernel write and run code. Bind a loopback "
            "address (tcp://127.0.0.1:PORT), or create keys with `python batos.py keys "
            "generate DIR` and start the kernel with --curve-dir DIR, or (on a trusted "
            "network only) pass --allow-insecure-remote."
        )


_SCALARS = (str, int, float, bool, type(None), bytes)


def _safe_repr(value: Any) -> str:
    """A readable, bounded repr; never raises."""
    try:
        # small flat values: the builtin repr is exact and fast; anything else is abbreviated
        if type(value) in _SCALARS and not (isinstance(value, str | bytes) and len(value) > 1000):
            return repr(value)
        if (
            type(value) in (list, tuple, dict)
            and len(value) <= 20
            and all(
                type(v) in _SCALARS for v in (value.values() if isinstance(value, dict) else value)
            )
            and len(text := repr(value)) <= 2000
        ):
            return text
        return truncate(_REPR.repr(value), MAX_REPR_CHARS)
    except Exception as exc:  # a broken __repr__ must not lose the reply
        return f"<{type(value).__name__} object; repr failed: {exc!r}>"


def _fingerprint(request: Any) -> bytes:
    """Identifies a request's content, so a reused id with other content is caught."""
    # decoded msgpack maps only have str keys, so sorting them is always possible
    packed = ormsgpack.packb(request.model_dump(), option=ormsgpack.OPT_SORT_KEYS)
    return hashlib.blake2b(packed, digest_size=16).digest()


@dataclass
class _InFlight:
    fingerprint: bytes
    identities: list[bytes]
    task: asyncio.Task[None] | None = None


@dataclass
class _ReplyCache:
    """Bounded LRU of sent replies by request id (entries, age and total bytes)."""

    max_entries: int = 10_000
    ttl: float = 600.0
    max_bytes: int = 64 * 1024 * 1024
    _items: OrderedDict[str, tuple[bytes, bytes, float]] = field(default_factory=OrderedDict)
    _bytes: int = 0

    def get(self, rid: str) -> tuple[bytes, bytes] | None:
        item = self._items.get(rid)
        if item is None:
            return None
        if item[2] < time.monotonic():
            self._drop(rid)
            return None
        self._items.move_to_end(rid)
        return item[0], item[1]

    def put(self, rid: str, fingerprint: bytes, payload: bytes) -> None:
        if rid in self._items:
            self._drop(rid)
        self._items[rid] = (fingerprint, payload, time.monotonic() + self.ttl)
        self._bytes += len(payload)
        while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))

    def _drop(self, rid: str) -> None:
        _, payload, _ = self._items.pop(rid)
        self._bytes -= len(payload)

    def __len__(self) -> int:
        return len(self._items)


class Bridge:
    """Serve the protocol on ``endpoint`` with ``handler`` answering the requests."""

    def __init__(
        self,
        handler: RequestHandler,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        curve: CurveServerConfig | None = None,
        allow_insecure_remote: bool = False,
        heartbeat_interval: float = 1.0,
        boot_id: str | None = None,
        max_in_flight: int = 1024,
        cache_entries: int = 10_000,
        cache_ttl: float = 600.0,
        cache_bytes: int = 64 * 1024 * 1024,
        drain_timeout: float = 5.0,
    ) -> None:
        try:
            endpoint = check_endpoint(endpoint)
        except ValueError as exc:
            raise BridgeError(str(exc)) from None
        check_bind_allowed(endpoint, curve, allow_insecure_remote)
        self.handler = handler
        self.requested_endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.curve = curve
        self.heartbeat_interval = heartbeat_interval
        self.boot_id = boot_id or uuid.uuid4().hex
        self.max_in_flight = max_in_flight
        self.drain_timeout = drain_timeout
        self.stats: dict[str, int] = dict.fromkeys(
            ("received", "requests", "errors", "replies", "deduplicated", "heartbeats"), 0
        )
        self._cache = _ReplyCache(cache_entries, cache_ttl, cache_bytes)
        self._inflight: dict[str, _InFlight] = {}
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._read_scheduled = False
        self._closed: asyncio.Event | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self._endpoint: str | None = None
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint actually bound (a wildcard port ``tcp://127.0.0.1:*`` resolved)."""
        return self._endpoint or self.requested_endpoint

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        if self._sock is not None:
            return
        self._loop = asyncio.get_running_loop()
        # a plain socket driven by the loop's reader callback: no per-message futures
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 500)
        # frames a little over the limit still get a readable ERROR reply; far larger
        # ones make ZeroMQ drop the connection before buffering them
        sock.setsockopt(
            zmq.MAXMSGSIZE, max(4 * self.max_message_bytes, self.max_message_bytes + 65536)
        )
        try:
            if self.curve is not None:
                public, secret = zmq.auth.load_certificate(self.curve.secret_key_file)
                if secret is None:
                    raise BridgeError(f"{self.curve.secret_key_file} holds no secret key")
                # the ZAP handler must live in the socket's context; it runs on this loop
                self._auth = AsyncioAuthenticator(zmq.asyncio.Context.shadow(ctx.underlying))
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(self.curve.authorized_keys_dir))
                sock.curve_secretkey = secret
                sock.curve_publickey = public
                sock.curve_server = True
            sock.bind(self.requested_endpoint)
        except zmq.ZMQError as exc:
            self._close_zmq(sock, ctx)
            raise BridgeError(
                f"cannot bind {self.requested_endpoint}: {exc} (is another kernel running there?)"
            ) from exc
        except BaseException:
            self._close_zmq(sock, ctx)
            raise
        self._ctx, self._sock = ctx, sock
        self._endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stopping = False
        self._closed = asyncio.Event()
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._on_readable)
        self._schedule_read()  # frames may already be queued: the FD is edge-triggered
        self._hb_task = asyncio.create_task(self._heartbeat_loop(), name="bridge-heartbeat")
        log.info(
            "bridge listening on %s (boot %s, curve %s)",
            self.endpoint,
            self.boot_id,
            "on" if self.curve else "off",
        )

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until ``stop()`` is called."""
        await self.start()
        assert self._closed is not None
        await self._closed.wait()

    async def stop(self) -> None:
        """Stop receiving, let in-flight requests finish (up to drain_timeout), then close."""
        if self._sock is None:
            return
        self._stopping = True
        self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
        tasks = [e.task for e in self._inflight.values() if e.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        self._close_zmq(self._sock, self._ctx)
        self._sock = self._ctx = None
        self._closed.set()

    def _close_zmq(self, sock: zmq.Socket[Any], ctx: zmq.Context[Any] | None) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        sock.close()
        if ctx is not None:
            ctx.term()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reload_keys(self) -> None:
        """Re-read the authorised client keys (after adding or removing a client)."""
        if self._auth is not None and self.curve is not None:
            self._auth.configure_curve(domain="*", location=str(self.curve.authorized_keys_dir))

    # -- receiving ----------------------------------------------------------------------------

    def _schedule_read(self) -> None:
        # ZeroMQ's FD only signals changes: when frames may be waiting unannounced (a batch
        # was cut short, a send consumed the wake-up), look again on the next iteration
        if not self._read_scheduled and self._sock is not None:
            self._read_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._read_scheduled = False
        sock = self._sock
        if sock is None or self._stopping:
            return
        for _ in range(64):  # a bounded batch, so request tasks get their turn under floods
            try:
                # asking EVENTS first avoids raising zmq.Again at the end of every batch
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("bridge: receive failed: %s", exc)
                return
            try:
                self._on_frames(frames)
            except Exception as exc:  # the bridge outlives any single message
                log.exception("bridge: unexpected error while handling a message")
                with contextlib.suppress(Exception):
                    reason = f"the bridge failed on this message: {type(exc).__name__}: {exc}"
                    self._send_error(frames[0], ProtocolError(ERR_INTERNAL, reason))
        self._schedule_read()

    def _on_frames(self, frames: list[bytes]) -> None:
        self.stats["received"] += 1
        identity, body = frames[0], frames[1:]
        if len(body) != 1:
            self._send_error(
                identity,
                ProtocolError(ERR_MALFORMED, f"expected one frame per message, got {len(body)}"),
            )
            return
        try:
            request = decode_request(body[0], self.max_message_bytes)
        except ProtocolError as exc:
            self._send_error(identity, exc)
            return
        if request.command == "heartbeat":
            self.stats["heartbeats"] += 1
            self._send(identity, pack(Heartbeat(boot_id=self.boot_id).model_dump()))
            return
        rid = request.id
        fingerprint = _fingerprint(request)
        running = self._inflight.get(rid)
        if running is not None:
            if running.fingerprint != fingerprint:
                self._send_error(identity, _reused(rid))
            elif identity not in running.identities:
                running.identities.append(identity)  # a retry from a reopened socket
                self.stats["deduplicated"] += 1
            return
        cached = self._cache.get(rid)
        if cached is not None:
            if cached[0] != fingerprint:
                self._send_error(identity, _reused(rid))
            else:
                self.stats["deduplicated"] += 1
                self._send(identity, cached[1])
            return
        if self._stopping:
            self._send_error(identity, ProtocolError(ERR_SHUTDOWN, "kernel is stopping", rid))
            return
        if len(self._inflight) >= self.max_in_flight:
            reason = f"{len(self._inflight)} requests in flight; retry later"
            self._send_error(identity, ProtocolError(ERR_BUSY, reason, rid))
            return
        self.stats["requests"] += 1
        entry = _InFlight(fingerprint, [identity])
        self._inflight[rid] = entry
        entry.task = asyncio.create_task(self._run(request, entry), name=f"bridge-req-{rid}")

    # -- running a request --------------------------------------------------------------------

    async def _run(self, request: Any, entry: _InFlight) -> None:
        rid = request.id

        async def progress(event: ProgressEvent) -> None:
            try:
                if not isinstance(event, ProgressEvent):
                    raise TypeError(f"progress() takes a ProgressEvent, not {type(event).__name__}")
                payload = pack(event.model_copy(update={"id": rid}).model_dump())
                for identity in list(entry.identities):
                    self._send(identity, payload)
            except Exception:  # progress is best effort; the handler must not fail on it
                log.exception("bridge: could not send progress for %s", rid)

        try:
            reply = await self.handler.handle(request, progress)
            if not isinstance(reply, Reply):
                reply = Reply.error_reply(
                    ERR_INTERNAL, f"handler returned {type(reply).__name__} instead of a Reply"
                )
        except asyncio.CancelledError:
            reply = Reply.error_reply(
                ERR_SHUTDOWN, "the kernel stopped before this request finished"
            )
        except Exception as exc:
            log.exception("bridge: handler failed on request %s (%s)", rid, request.command)
            reply = Reply.error_reply(ERR_INTERNAL, f"{type(exc).__name__}: {exc}")
        payload = self._finalize(reply, rid)
        if reply.error is None or reply.error.kind != ERR_SHUTDOWN:
            self._cache.put(rid, entry.fingerprint, payload)
        self._inflight.pop(rid, None)
        self.stats["replies"] += 1
        for identity in entry.identities:
            self._send(identity, payload)

    def _finalize(self, reply: Reply, rid: str) -> bytes:
        """Fill id/boot_id, guarantee result_repr, and make the reply fit on the wire."""
        data = reply.model_dump()
        data["id"], data["boot_id"] = rid, self.boot_id
        if reply.result is not None and reply.result_repr is None:
            data["result_repr"] = _safe_repr(reply.result)
        try:
            payload = pack(data)
        except (TypeError, ValueError, OverflowError):
            data["result"] = None  # not msgpack-able: the repr carries it
            payload = pack(data)
        if len(payload) > self.max_message_bytes:
            data["result"] = None
            data["result_repr"] = truncate(data["result_repr"] or "", MAX_REPR_CHARS)
            payload = pack(data)
        return payload

    # -- sending ------------------------------------------------------------------------------

    def _send(self, identity: bytes, payload: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            # ROUTER never blocks: it drops messages for peers that are gone or over their
            # high-water mark
            sock.send_multipart([identity, payload], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("bridge: could not send to %r: %s", identity, exc)
        # a send may consume the FD's wake-up for frames that arrived meanwhile
        if not self._read_scheduled and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._schedule_read()

    def _send_error(self, identity: bytes, exc: ProtocolError) -> None:
        self.stats["errors"] += 1
        log.debug("bridge: rejected a message: %s: %s", exc.kind, exc.reason)
        reply = Reply.error_reply(exc.kind, exc.reason, exc.request_id)
        self._send(identity, self._finalize(reply, exc.request_id))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            identities = {i for e in self._inflight.values() for i in e.identities}
            if identities:
                payload = pack(Heartbeat(boot_id=self.boot_id).model_dump())
                for identity in identities:
                    self._send(identity, payload)


def _reused(rid: str) -> ProtocolError:
    return ProtocolError(
        ERR_DUPLICATE_ID, f"request id {rid!r} was already used for a different request", rid
    )
