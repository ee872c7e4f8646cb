"""Cognition through any OpenAI-compatible HTTP server (vLLM, llama.cpp server, Ollama ...).

Only the standard library speaks HTTP here (``http.client`` in a worker thread), so
the backend adds no dependency. Each request is one ``POST {base_url}/chat/completions``
with ``[system, user]`` messages.

Configuration (``OpenAICompatibleBackend.from_config``):

``base_url``            required, e.g. ``http://127.0.0.1:8000/v1`` (http or https)
``model``               required, the model name the server knows
``api_key_env``         name of an environment variable holding the API key (optional);
                        the key itself never appears in config, logs, errors or ``repr``
``timeout``             seconds from sending a request to having the whole answer (60)
``connect_timeout``     seconds to open the connection (defaults to ``timeout``)
``max_retries``         retries after the first attempt (2, so 3 attempts in all) on
                        connection errors, HTTP 429 and 5xx; other 4xx fail at once
``backoff``             first retry delay in seconds, doubled per retry (0.5, capped at 8)
``max_retry_after``     longest ``Retry-After`` the backend will wait; beyond it, fail (30)
``max_response_bytes``  answers larger than this are refused (4 MiB)
``temperature``         sampling temperature sent with every request (0.0)

Keys ``backend`` and ``name`` are ignored (they select the backend); any other
unknown key is an error, so a typo does not pass silently.

A read timeout is not retried: the server is alive but slow, and asking it again
would repeat the expensive generation. Proxy environment variables are not used,
and a ``user:password@`` part of ``base_url`` is neither sent nor shown: use
``api_key_env`` for credentials.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import json
import os
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .base import CognitionError, CognitionUnavailable, Completion, InferenceRequest

_CHUNK = 64 * 1024
_MAX_BACKOFF = 8.0


@dataclass
class _Reply:
    """One HTTP exchange, as the worker thread saw it."""

    status: int
    body: bytes
    retry_after: str | None


class _RetryableError(Exception):
    """A failure worth another attempt (connection trouble, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAICompatibleBackend:
    """Answers through ``POST /chat/completions`` of an OpenAI-compatible server."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float | None = None,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_retry_after: float = 30.0,
        max_response_bytes: int = 4 * 1024 * 1024,
        temperature: float = 0.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CognitionUnavailable(
                f"openai backend: base_url must be an http(s) URL such as "
                f"http://127.0.0.1:8000/v1, got {base_url!r}"
            )
        if not model:
            raise CognitionUnavailable("openai backend: 'model' is required")
        if timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise CognitionUnavailable("openai backend: timeouts must be positive")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise CognitionUnavailable(
                    f"openai backend: environment variable {api_key_env} (api_key_env) "
                    f"is not set or empty"
                )
        self.model = model
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + "/chat/completions"
        # The displayed URL drops any user:password@ part and the query.
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + ("" if parts.port is None else f":{parts.port}")
        self.url = urlunsplit((parts.scheme, netloc, self._path, "", ""))
        self._api_key = api_key
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout if connect_timeout is not None else timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = max(0.0, float(backoff))
        self.max_retry_after = float(max_retry_after)
        self.max_response_bytes = int(max_response_bytes)
        self.temperature = float(temperature)
        self._closed = False
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> OpenAICompatibleBackend:
        """Build from a config mapping (keys in the module docstring)."""
        known = {
            "base_url", "model", "api_key_env", "timeout", "connect_timeout", "max_retries",
            "backoff", "max_retry_after", "max_response_bytes", "temperature",
        }  # fmt: skip
        unknown = set(cfg) - known - {"backend", "name"}
        if unknown:
            raise CognitionUnavailable(
                f"openai backend: unknown config keys {sorted(unknown)}; known: {sorted(known)}"
            )
        for key in ("base_url", "model"):
            if not cfg.get(key):
                raise CognitionUnavailable(f"openai backend: config key {key!r} is required")
        kwargs = {k: cfg[k] for k in known if k in cfg and cfg[k] is not None}
        return cls(kwargs.pop("base_url"), kwargs.pop("model"), **kwargs)

    def __repr__(self) -> str:  # never includes the API key
        return f"OpenAICompatibleBackend(url={self.url!r}, model={self.model!r})"

    def describe(self) -> str:
        auth = ", api key set" if self._api_key else ""
        return f"openai: model {self.model} at {self.url}{auth}"

    # -- inference --------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> Completion:
        payload = self._payload(request)
        attempts = self.max_retries + 1
        last: _RetryableError | None = None
        for attempt in range(1, attempts + 1):
            if self._closed:
                raise CognitionError(f"openai backend for {self.url} is closed")
            try:
                reply = await self._exchange(payload)
                return self._parse(reply, attempt)
            except _RetryableError as exc:
                last = exc
                if attempt == attempts:
                    break
                delay = self._delay(attempt, exc.retry_after)
                await asyncio.sleep(delay)
        raise CognitionError(f"{last} (gave up after {attempt} attempt(s))")

    def _payload(self, request: InferenceRequest) -> bytes:
        messages = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": int(request.max_tokens),
            "temperature": self.temperature,
            "stream": False,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        return json.dumps(body).encode("utf-8")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        base = min(_MAX_BACKOFF, self.backoff * 2 ** (attempt - 1))
        return base * (0.75 + random.random() / 2)  # jitter spreads out herds of clients

    async def _exchange(self, payload: bytes) -> _Reply:
        holder: list[socket.socket] = []
        try:
            reply = await asyncio.to_thread(self._post, payload, holder)
        except asyncio.CancelledError:
            # Wake the worker thread blocked in recv(), so cancelling frees it at once.
            for sock in holder:
                _shutdown(sock)
            raise
        if 200 <= reply.status < 300:
            return reply
        detail = _error_detail(reply.body)
        message = f"openai backend: POST {self.url} -> HTTP {reply.status}" + (
            f": {detail}" if detail else ""
        )
        if reply.status == 429 or reply.status >= 500:
            wait = _parse_retry_after(reply.retry_after)
            if wait is not None and wait > self.max_retry_after:
                raise CognitionError(
                    f"{message} (server asks to retry after {wait:.0f} s, more than "
                    f"max_retry_after={self.max_retry_after:.0f} s)"
                )
            raise _RetryableError(message, wait)
        raise CognitionError(message)

    def _post(self, payload: bytes, holder: list[socket.socket]) -> _Reply:
        """Blocking HTTP exchange; runs in a worker thread."""
        if self._scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.connect_timeout,
                context=ssl.create_default_context(),
            )  # fmt: skip
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        sock: socket.socket | None = None
        try:
            try:
                conn.connect()
            except OSError as exc:  # refused, unreachable, DNS, connect timeout
                raise _RetryableError(
                    f"openai backend: cannot connect to {self.url}: {_os_reason(exc)}"
                ) from None
            sock = conn.sock
            holder.append(sock)
            with self._lock:
                if self._closed:
                    raise CognitionError(f"openai backend for {self.url} is closed")
                self._live.add(sock)
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            deadline = time.monotonic() + self.timeout
            try:
                sock.settimeout(self.timeout)
                conn.request("POST", self._path, body=payload, headers=headers)
                resp = conn.getresponse()
                body = self._read_body(resp, sock, deadline)
            except TimeoutError:
                raise CognitionError(
                    f"openai backend: no complete answer from {self.url} within "
                    f"{self.timeout:g} s (timeout)"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                if self._closed:
                    raise CognitionError(f"openai backend for {self.url} was closed") from None
                raise _RetryableError(
                    f"openai backend: connection to {self.url} failed: {_os_reason(exc)}"
                ) from None
            return _Reply(resp.status, body, resp.getheader("Retry-After"))
        finally:
            if sock is not None:
                with self._lock:
                    self._live.discard(sock)
            conn.close()

    def _read_body(
        self, resp: http.client.HTTPResponse, sock: socket.socket, deadline: float
    ) -> bytes:
        limit = self.max_response_bytes
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise CognitionError(
                f"openai backend: answer from {self.url} is {int(length)} bytes, "
                f"more than max_response_bytes={limit}"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)  # the whole answer must arrive before the deadline
            chunk = resp.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise CognitionError(
                    f"openai backend: answer from {self.url} exceeds max_response_bytes={limit}"
                )
            chunks.append(chunk)

    def _parse(self, reply: _Reply, attempts: int) -> Completion:
        try:
            data = json.loads(reply.body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise CognitionError(f"openai backend: malformed JSON from {self.url}: {exc}") from None
        if not isinstance(data, dict):
            raise CognitionError(f"openai backend: answer from {self.url} is not a JSON object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise CognitionError(f"openai backend: answer from {self.url} has no 'choices'")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise CognitionError(
                f"openai backend: answer from {self.url} has no 'choices[0].message'"
            )
        content = message.get("content")
        if content is None:
            content = ""  # e.g. a reply that only holds tool calls
        if not isinstance(content, str):
            raise CognitionError(
                f"openai backend: 'choices[0].message.content' from {self.url} is not text"
            )
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Completion(
            text=content,
            backend=self.name,
            model=str(data.get("model") or self.model),
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            details={
                "url": self.url,
                "finish_reason": choice.get("finish_reason"),
                "attempts": attempts,
                "usage_reported": bool(usage),
            },
        )

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            live = list(self._live)
        for conn in live:
            _shutdown(conn)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(body: bytes, limit: int = 300) -> str:
    """The server's own error message: OpenAI, vLLM/FastAPI and Ollama shapes, else text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            message = err.get("message")
        elif isinstance(err, str):
            message = err
        message = message or data.get("message") or data.get("detail")
    if message is None:
        message = text
    message = message if isinstance(message, str) else json.dumps(message)
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."
