"""A synchronous client for the synaptic bridge, with heartbeats and Lazy Pirate retries.

    with BridgeClient("tcp://127.0.0.1:5555") as client:
        reply = client.send("genesis_obj", "report_the_current_system_time")

One request at a time per client (not thread-safe: use one client per thread). A
silent kernel is detected within ``dead_after`` seconds; the socket is then closed,
reopened and the *same* request id resent, which the kernel deduplicates. A request
that changes state is never resent to a kernel that restarted meanwhile: that raises
``RequestOutcomeUnknown``. A ``KeyboardInterrupt`` while waiting leaves the request
outstanding: ``resume()`` waits for its reply again (e.g. after cancelling its cycle
through ``sibling().cancel(cycle_id)``). See docs/PROTOCOL.md.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from pydantic import ValidationError

from .protocol import (
    DEFAULT_ENDPOINT,
    IDEMPOTENT_COMMANDS,
    MAX_MESSAGE_BYTES,
    REQUEST_ADAPTER,
    Heartbeat,
    ProgressEvent,
    ProtocolError,
    Reply,
    check_endpoint,
    decode_kernel_message,
    describe_validation_error,
    pack,
)

ProgressHandler = Callable[[ProgressEvent], None]


class BridgeClientError(Exception):
    """Base class of everything the client raises about the conversation with the kernel."""


class InvalidRequest(BridgeClientError, ValueError):
    """The request would be rejected by the kernel; nothing was sent."""


class InvalidEndpoint(BridgeClientError, ValueError):
    """The endpoint is not an address ZeroMQ can connect to; the message says what to type."""


class KernelUnreachable(BridgeClientError):
    """No sign of life from the kernel: no heartbeat or reply for ``dead_after`` seconds,
    after ``retries`` reconnections. ``delivered`` tells whether the request may have
    reached a kernel (and so may have run)."""

    def __init__(self, message: str, *, delivered: bool = False) -> None:
        super().__init__(message)
        self.delivered = delivered


class AuthenticationFailed(KernelUnreachable):
    """The kernel refused the CURVE handshake (wrong or missing keys)."""


class RequestOutcomeUnknown(BridgeClientError):
    """The kernel restarted while a state-changing request was in flight: it may or may not
    have completed, and it is not resent automatically."""


class RequestTimeout(BridgeClientError):
    """The kernel is alive but gave no final reply within the timeout; it may still finish."""


@dataclass(frozen=True)
class CurveClientConfig:
    """Client side of CURVE: the client's key pair and the kernel's public key."""

    secret_key_file: Path
    server_public_key_file: Path

    @classmethod
    def from_dir(cls, keys_dir: str | os.PathLike[str], name: str = "client") -> CurveClientConfig:
        """The layout ``batos.py keys generate DIR`` writes."""
        base = Path(keys_dir)
        cfg = cls(base / f"{name}.key_secret", base / "server.key")
        for path in (cfg.secret_key_file, cfg.server_public_key_file):
            if not path.is_file():
                raise FileNotFoundError(
                    f"missing {path}; create keys with: python batos.py keys generate {base}"
                )
        return cfg

    def apply(self, sock: zmq.Socket[Any]) -> None:
        public, secret = zmq.auth.load_certificate(self.secret_key_file)
        server_public, _ = zmq.auth.load_certificate(self.server_public_key_file)
        if secret is None:
            raise ValueError(f"{self.secret_key_file} holds no secret key")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public


class _Silence(Exception):
    """Internal: nothing heard from the kernel for dead_after seconds."""


@dataclass
class _Outstanding:
    """The request a KeyboardInterrupt stopped waiting for (see ``resume``)."""

    rid: str
    payload: bytes
    idempotent: bool
    on_progress: ProgressHandler | None
    deadline: float | None


_UNSET: Any = object()
_AUTH_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class BridgeClient:
    """Talk to a kernel's bridge; see the module docstring."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float | None = None,
        heartbeat_interval: float = 1.0,
        dead_after: float = 3.0,
        retries: int = 3,
        curve: CurveClientConfig | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if dead_after <= heartbeat_interval:
            raise ValueError("dead_after must be longer than heartbeat_interval")
        try:
            endpoint = check_endpoint(endpoint)
        except ValueError as exc:
            raise InvalidEndpoint(str(exc)) from None
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.retries = retries
        self.curve = curve
        self.max_message_bytes = max_message_bytes
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self.boot_id: str | None = None  # the kernel incarnation last heard from
        self._last_heard = 0.0  # monotonic time of the last message from the kernel
        self._outstanding: _Outstanding | None = None
        self.reconnects = 0

    # -- socket management --------------------------------------------------------------------

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # queue only on completed connections: a request is never parked for a kernel
            # that is not there, to be delivered later after we gave up on it
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            try:
                if self.curve is not None:
                    self.curve.apply(sock)
                self._monitor = sock.get_monitor_socket(_AUTH_EVENTS)
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                self._sock = sock
                self._reset()  # closes both: a context with open sockets never terminates
                raise InvalidEndpoint(f"cannot connect to {self.endpoint}: {exc}") from None
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        """Lazy Pirate: drop the socket (and anything queued on it); a new one follows."""
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self.reconnects += 1

    def close(self) -> None:
        if self._sock is not None or self._monitor is not None:
            self._reset()
        if self._own_ctx:
            self._ctx.destroy(linger=0)  # never blocks, whatever is still open

    def sibling(self, **overrides: Any) -> BridgeClient:
        """Another client for the same kernel and keys, on its own socket (same context).

        For a second request while one is outstanding, e.g. a ``cancel``.
        """
        options: dict[str, Any] = {
            "timeout": self.timeout,
            "heartbeat_interval": self.heartbeat_interval,
            "dead_after": self.dead_after,
            "retries": self.retries,
            "curve": self.curve,
            "max_message_bytes": self.max_message_bytes,
            **overrides,
        }
        return BridgeClient(self.endpoint, context=self._ctx, **options)

    def __enter__(self) -> BridgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _auth_failure(self) -> str | None:
        """A handshake failure reported by the socket monitor, if any (non-blocking)."""
        if self._monitor is None:
            return None
        from zmq.utils.monitor import recv_monitor_message

        failure = None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                failure = "the kernel refused this client's CURVE key"
            elif failure is None:
                failure = (
                    "the security handshake with the kernel failed (CURVE keys on one side only,"
                    " or the wrong server key)"
                )
        return failure

    # -- requests -----------------------------------------------------------------------------

    def request(
        self,
        command: str,
        fields: dict[str, Any] | None = None,
        on_progress: ProgressHandler | None = None,
        *,
        timeout: float | None = _UNSET,
    ) -> Reply:
        """Send one request and wait for its final Reply, passing progress events on."""
        rid = uuid.uuid4().hex
        body = {"v": 1, "id": rid, "command": command, **(fields or {})}
        try:
            REQUEST_ADAPTER.validate_python(body)
        except ValidationError as exc:
            reason = describe_validation_error(exc)
            raise InvalidRequest(f"invalid {command} request: {reason}") from None
        payload = pack(body)
        if len(payload) > self.max_message_bytes:
            raise InvalidRequest(
                f"request of {len(payload)} bytes exceeds the limit of {self.max_message_bytes}"
            )
        timeout = self.timeout if timeout is _UNSET else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = _Outstanding(rid, payload, command in IDEMPOTENT_COMMANDS, on_progress, deadline)
        self._outstanding = None
        self._drain()  # what is left of an earlier request, if it was given up
        return self._exchange(pending, delivered=False)

    @property
    def outstanding(self) -> bool:
        """Whether a request is waiting for its reply (its wait was interrupted)."""
        return self._outstanding is not None and self._sock is not None

    def resume(self) -> Reply:
        """Wait again for the reply of the request whose wait a KeyboardInterrupt stopped."""
        if not self.outstanding:
            raise RuntimeError("no request is waiting for its reply")
        assert self._outstanding is not None
        return self._exchange(self._outstanding, delivered=True)

    def _exchange(self, pending: _Outstanding, *, delivered: bool) -> Reply:
        self._outstanding = pending
        try:
            reply = self._exchange_once(pending, delivered)
        except KeyboardInterrupt:
            raise  # still outstanding: resume() waits again
        except BaseException:
            self._outstanding = None
            raise
        self._outstanding = None
        return reply

    def _exchange_once(self, pending: _Outstanding, delivered: bool) -> Reply:
        rid, payload, idempotent = pending.rid, pending.payload, pending.idempotent
        on_progress, deadline = pending.on_progress, pending.deadline
        boot_at_send = self.boot_id
        attempt = restarts = 0
        resumed = delivered
        while True:
            try:
                if resumed:  # already sent: wait for its reply first
                    resumed = False
                    reply = self._await_reply(rid, on_progress, deadline, idempotent, boot_at_send)
                    if reply is not None:
                        return reply
                    raise _Silence
                wait = self._retry_wait(attempt)
                stale = time.monotonic() - self._last_heard > self.heartbeat_interval
                if not idempotent and (attempt or stale):
                    # learn which kernel incarnation gets the request: only the same one
                    # deduplicates a resend
                    boot = self._probe(deadline, wait, delivered)
                    if delivered and boot != boot_at_send:
                        raise self._outcome_unknown(boot_at_send, boot)
                    boot_at_send = boot
                if not self._send_when_connected(payload, deadline, wait, delivered):
                    raise _Silence
                delivered = True
                reply = self._await_reply(rid, on_progress, deadline, idempotent, boot_at_send)
                if reply is not None:
                    return reply
                restarts += 1  # the kernel restarted under an idempotent request: resend
                if restarts > self.retries:
                    raise KernelUnreachable(
                        f"the kernel at {self.endpoint} keeps restarting", delivered=True
                    )
                boot_at_send = self.boot_id
                continue
            except _Silence:
                pass
            attempt += 1
            if attempt > self.retries:
                raise self._unreachable(delivered)
            self._reset()

    def _retry_wait(self, attempt: int) -> float:
        # the first send may wait out a whole dead_after; reconnections back off quickly
        # (0.25 s, 0.5, 1, 2, then dead_after), so a dead kernel is reported a few seconds
        # after it went silent (about 5 s with the defaults; chat_client.py waits longer)
        return self.dead_after if attempt == 0 else min(self.dead_after, 0.25 * 2 ** (attempt - 1))

    def _send_when_connected(
        self, payload: bytes, deadline: float | None, wait: float, delivered: bool
    ) -> bool:
        sock = self._socket()
        until = _earliest(time.monotonic() + wait, deadline)
        while True:
            try:
                sock.send(payload, flags=zmq.NOBLOCK)
                return True
            except zmq.Again:
                pass
            remaining = until - time.monotonic()
            if remaining <= 0:
                self._check_deadline(deadline, delivered, heard_since_send=False)
                return False
            sock.poll(min(remaining, 0.05) * 1000, zmq.POLLOUT)

    def _await_reply(
        self,
        rid: str,
        on_progress: ProgressHandler | None,
        deadline: float | None,
        idempotent: bool,
        boot_at_send: str | None,
    ) -> Reply | None:
        """The final Reply; None when an idempotent request must be resent (kernel restart)."""
        sock = self._socket()
        heard = sent_at = time.monotonic()
        next_beat = heard + self.heartbeat_interval
        while True:
            now = time.monotonic()
            wake = _earliest(min(next_beat, heard + self.dead_after), deadline)
            if sock.poll(max(0.0, wake - now) * 1000, zmq.POLLIN):
                while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frame = sock.recv(flags=zmq.NOBLOCK)
                    heard = self._last_heard = time.monotonic()
                    message = self._decode(frame)
                    if isinstance(message, Heartbeat):
                        restarted = boot_at_send is not None and message.boot_id != boot_at_send
                        self.boot_id = message.boot_id
                        if restarted:
                            if not idempotent:
                                raise self._outcome_unknown(boot_at_send, message.boot_id)
                            return None
                        boot_at_send = message.boot_id
                    elif isinstance(message, ProgressEvent):
                        if message.id == rid and on_progress is not None:
                            on_progress(message)
                    elif isinstance(message, Reply):
                        # id "" answers a frame the kernel could not attribute; ours is the
                        # only request outstanding on this socket
                        if message.id == rid or (message.id == "" and message.status == "ERROR"):
                            if message.boot_id:
                                self.boot_id = message.boot_id
                            return message
            now = time.monotonic()
            if now - heard >= self.dead_after:
                raise _Silence
            self._check_deadline(deadline, True, heard_since_send=heard > sent_at)
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + self.heartbeat_interval

    def _probe(self, deadline: float | None, wait: float, delivered: bool) -> str:
        """Send a heartbeat and wait for the kernel's; returns its boot_id."""
        if not self._send_when_connected(self._heartbeat_payload(), deadline, wait, delivered):
            raise _Silence
        sock = self._socket()
        until = _earliest(time.monotonic() + self.dead_after, deadline)
        while (remaining := until - time.monotonic()) > 0:
            if not sock.poll(remaining * 1000, zmq.POLLIN):
                break
            message = self._decode(sock.recv())
            self._last_heard = time.monotonic()
            if isinstance(message, Heartbeat):
                self.boot_id = message.boot_id
                return message.boot_id
        self._check_deadline(deadline, delivered, heard_since_send=False)
        raise _Silence

    def _heartbeat_payload(self) -> bytes:
        return pack({"v": 1, "id": uuid.uuid4().hex, "command": "heartbeat"})

    def _heartbeat(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._socket().send(self._heartbeat_payload(), flags=zmq.NOBLOCK)

    def _drain(self) -> None:
        """Read what is left from earlier requests (late replies, heartbeats)."""
        if self._sock is None:
            return
        while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frame = self._sock.recv(flags=zmq.NOBLOCK)
            self._last_heard = time.monotonic()
            message = self._decode(frame)
            if isinstance(message, Heartbeat | Reply) and message.boot_id:
                self.boot_id = message.boot_id

    @staticmethod
    def _decode(frame: bytes) -> Any:
        try:
            return decode_kernel_message(frame)
        except ProtocolError:
            return None  # a kernel of another protocol version; ignore what we cannot read

    def _check_deadline(
        self, deadline: float | None, delivered: bool, *, heard_since_send: bool
    ) -> None:
        if deadline is None or time.monotonic() < deadline:
            return
        if not heard_since_send:
            raise self._unreachable(delivered, timed_out=True)
        raise RequestTimeout(
            f"no final reply from the kernel at {self.endpoint} within the timeout; "
            "the request may still complete there"
        )

    def _unreachable(self, delivered: bool, timed_out: bool = False) -> KernelUnreachable:
        auth = self._auth_failure()
        if auth is not None:
            return AuthenticationFailed(f"cannot talk to the kernel at {self.endpoint}: {auth}")
        what = (
            "the request may or may not have run" if delivered else "the request was not delivered"
        )
        why = (
            "within the timeout"
            if timed_out
            else f"for {self.dead_after:g}s, {self.retries} reconnection(s) tried"
        )
        return KernelUnreachable(
            f"the kernel at {self.endpoint} is not answering (no heartbeat or reply {why}); "
            f"{what}. Is it running? Start it with: python batos.py",
            delivered=delivered,
        )

    def _outcome_unknown(self, before: str | None, after: str | None) -> RequestOutcomeUnknown:
        return RequestOutcomeUnknown(
            f"the kernel at {self.endpoint} restarted (boot {before or 'unknown'} -> "
            f"{after or 'unknown'}) while the request was in flight; it may or may not have "
            "completed. It was not resent: check with /cycles or inspect before retrying."
        )

    # -- helpers ------------------------------------------------------------------------------

    def ping(self, timeout: float | None = _UNSET) -> Reply:
        return self.request("ping", {}, timeout=timeout)

    def send(
        self,
        target: str,
        selector: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        on_progress: ProgressHandler | None = None,
        *,
        timeout: float | None = _UNSET,
    ) -> Reply:
        fields = {
            "target": target,
            "selector": selector,
            "args": list(args or []),
            "kwargs": dict(kwargs or {}),
        }
        return self.request("send", fields, on_progress, timeout=timeout)

    def initiate_cognitive_cycle(
        self,
        target_oid: str,
        selector: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        on_progress: ProgressHandler | None = None,
        *,
        timeout: float | None = _UNSET,
    ) -> Reply:
        brief = {
            "type": "unhandled_message",
            "selector": selector,
            "args": list(args or []),
            "kwargs": dict(kwargs or {}),
        }
        fields = {"target_oid": target_oid, "mission_brief": brief}
        return self.request("initiate_cognitive_cycle", fields, on_progress, timeout=timeout)

    def inspect(self, target: str, *, timeout: float | None = _UNSET) -> Reply:
        return self.request("inspect", {"target": target}, timeout=timeout)

    def cycles(self, limit: int = 20, *, timeout: float | None = _UNSET) -> Reply:
        return self.request("cycles", {"limit": limit}, timeout=timeout)

    def cancel(self, cycle_id: str, *, timeout: float | None = _UNSET) -> Reply:
        """Ask the kernel to cancel a running cycle (COMPLETE: it is being cancelled)."""
        return self.request("cancel", {"cycle_id": cycle_id}, timeout=timeout)


def _earliest(a: float, b: float | None) -> float:
    return a if b is None else min(a, b)
