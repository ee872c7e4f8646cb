"""The OpenAI-compatible backend against a real HTTP server on loopback.

The server speaks the ``/v1/chat/completions`` protocol from a thread of the test
process; each test scripts its answers (errors, delays, broken bodies) in order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from backend_conformance import BackendConformance, run

from batos_uvm.cognition.base import CognitionError, CognitionUnavailable, InferenceRequest
from batos_uvm.cognition.openai_backend import OpenAICompatibleBackend, _parse_retry_after

SLOW_MARK = "[take your time]"


@dataclass
class Scripted:
    status: int = 200
    body: bytes | None = None  # None: a normal generated answer
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


class FakeOpenAIServer:
    """A loopback HTTP server answering like an OpenAI-compatible endpoint."""

    def __init__(self) -> None:
        self.script: deque[Scripted] = deque()
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.disconnected = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                fake.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(raw)}
                )
                step = fake.script.popleft() if fake.script else Scripted()
                if step.hang:
                    fake.release.wait(10)
                    # A client that gave up has closed its end: reading sees EOF.
                    self.connection.settimeout(1)
                    try:
                        if self.rfile.read(1) == b"":
                            fake.disconnected.set()
                    except OSError:
                        fake.disconnected.set()
                    return
                body = step.body if step.body is not None else fake.answer(fake.requests[-1])
                self.send_response(step.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in step.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @staticmethod
    def answer(request: dict[str, Any]) -> bytes:
        """Echo the user's words back, one 'token' per word, honouring max_tokens and stop."""
        body = request["json"]
        user = body["messages"][-1]["content"]
        if SLOW_MARK in user:
            time.sleep(0.4)
        words = (user.split() * 10)[:12]
        n = min(body.get("max_tokens") or 12, len(words))
        text = " ".join(words[:n])
        for stop in body.get("stop") or []:
            text = text.split(stop)[0]
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        return json.dumps(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length" if n == body.get("max_tokens") else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n,
                    "total_tokens": prompt_tokens + n,
                },
            }
        ).encode()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer()
    yield fake
    fake.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(server: FakeOpenAIServer, **kwargs: Any) -> OpenAICompatibleBackend:
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("timeout", 5.0)
    return OpenAICompatibleBackend(server.base_url, "tiny-test-model", **kwargs)


REQUEST = InferenceRequest(
    persona="ALFRED",
    prompt="What will this change cost?",
    system="You are ALFRED, keeper of the books.",
    max_tokens=64,
    stop=("\n\n", "END"),
)


async def _infer_once(backend: OpenAICompatibleBackend, request: InferenceRequest = REQUEST):
    try:
        return await backend.infer(request)
    finally:
        await backend.close()


def test_success_sends_standard_request(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATOS_TEST_API_KEY", "sk-secret-123")
    backend = backend_for(server, api_key_env="BATOS_TEST_API_KEY")
    assert "sk-secret-123" not in backend.describe() + repr(backend)

    completion = run(_infer_once(backend))

    assert completion.text == "What will this change cost? What will this change cost? What will"
    assert completion.backend == "openai" and completion.model == "tiny-test-model"
    assert completion.completion_tokens == 12 and completion.prompt_tokens == 12
    assert completion.details["attempts"] == 1 and completion.details["finish_reason"] == "stop"
    (sent,) = server.requests
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-secret-123"
    assert sent["json"]["messages"] == [
        {"role": "system", "content": REQUEST.system},
        {"role": "user", "content": REQUEST.prompt},
    ]
    assert sent["json"]["max_tokens"] == 64 and sent["json"]["temperature"] == 0.0
    assert sent["json"]["stop"] == ["\n\n", "END"] and sent["json"]["model"] == "tiny-test-model"


def test_no_system_message_and_no_key(server: FakeOpenAIServer) -> None:
    request = InferenceRequest(persona="BABS", prompt="find facts")
    run(_infer_once(backend_for(server), request))
    (sent,) = server.requests
    assert sent["json"]["messages"] == [{"role": "user", "content": "find facts"}]
    assert "Authorization" not in sent["headers"] and "stop" not in sent["json"]


def test_retries_after_server_error(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(500, b'{"error": {"message": "engine restarting"}}'))
    completion = run(_infer_once(backend_for(server)))
    assert completion.text and completion.details["attempts"] == 2
    assert len(server.requests) == 2


def test_gives_up_after_max_retries(server: FakeOpenAIServer) -> None:
    server.script.extend(Scripted(503, b"overloaded") for _ in range(5))
    with pytest.raises(CognitionError) as info:
        run(_infer_once(backend_for(server, max_retries=2)))
    message = str(info.value)
    assert "HTTP 503" in message and "overloaded" in message and "3 attempt" in message
    assert server.base_url in message
    assert len(server.requests) == 3


def test_honours_retry_after_on_429(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(429, b'{"error": "slow down"}', {"Retry-After": "1"}))
    start = time.monotonic()
    completion = run(_infer_once(backend_for(server)))
    assert time.monotonic() - start >= 0.95  # waited as told, not the 10 ms backoff
    assert completion.details["attempts"] == 2 and len(server.requests) == 2


def test_long_retry_after_fails_at_once(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(429, b'{"error": "quota"}', {"Retry-After": "3600"}))
    start = time.monotonic()
    with pytest.raises(CognitionError, match="retry after 3600 s") as info:
        run(_infer_once(backend_for(server, max_retry_after=5)))
    assert time.monotonic() - start < 2 and len(server.requests) == 1
    assert "HTTP 429" in str(info.value) and "quota" in str(info.value)


def test_client_error_is_not_retried_and_names_url(server: FakeOpenAIServer) -> None:
    body = json.dumps({"error": {"message": "model 'x' does not exist", "type": "invalid"}})
    server.script.append(Scripted(400, body.encode()))
    with pytest.raises(CognitionError) as info:
        run(_infer_once(backend_for(server)))
    message = str(info.value)
    assert f"{server.base_url}/chat/completions" in message
    assert "HTTP 400" in message and "model 'x' does not exist" in message
    assert len(server.requests) == 1


def test_fastapi_style_error_detail(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(404, b'{"detail": "Not Found"}'))
    with pytest.raises(CognitionError, match="HTTP 404: Not Found"):
        run(_infer_once(backend_for(server)))


def test_hanging_server_times_out_without_retry(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(hang=True))
    start = time.monotonic()
    with pytest.raises(CognitionError, match="timeout") as info:
        run(_infer_once(backend_for(server, timeout=0.3)))
    assert time.monotonic() - start < 2.0
    assert server.base_url in str(info.value) and len(server.requests) == 1


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe\x00garbage", "malformed JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"id": "x", "choices": []}', "no 'choices'"),
        (b'{"choices": [{"index": 0}]}', "message"),
        (b'{"choices": [{"message": {"content": 42}}]}', "not text"),
    ],
)
def test_malformed_answers(server: FakeOpenAIServer, body: bytes, complaint: str) -> None:
    server.script.append(Scripted(200, body))
    with pytest.raises(CognitionError, match=complaint):
        run(_infer_once(backend_for(server)))
    assert len(server.requests) == 1


def test_missing_usage_gives_zero_counts(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(200, b'{"choices": [{"message": {"content": "hi"}}]}'))
    completion = run(_infer_once(backend_for(server)))
    assert (completion.text, completion.prompt_tokens, completion.completion_tokens) == (
        "hi",
        0,
        0,
    )
    assert completion.model == "tiny-test-model" and not completion.details["usage_reported"]


def test_response_size_limit(server: FakeOpenAIServer) -> None:
    big = json.dumps({"choices": [{"message": {"content": "x" * 50_000}}]}).encode()
    server.script.append(Scripted(200, big))
    with pytest.raises(CognitionError, match="max_response_bytes"):
        run(_infer_once(backend_for(server, max_response_bytes=10_000)))


def test_connection_refused_is_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAICompatibleBackend(url, "m", max_retries=2, backoff=0.01)
    with pytest.raises(CognitionError, match="cannot connect") as info:
        run(_infer_once(backend))
    assert url in str(info.value) and "3 attempt" in str(info.value)


def test_cancel_frees_the_connection(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(hang=True))
    backend = backend_for(server, timeout=30)

    async def body() -> float:
        task = asyncio.create_task(backend.infer(REQUEST))
        while not server.requests:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await backend.close()
        return time.monotonic() - start

    assert run(body()) < 1.0
    server.release.set()
    assert server.disconnected.wait(3), "the server should see the client hang up"


def test_close_interrupts_a_call_in_flight(server: FakeOpenAIServer) -> None:
    server.script.append(Scripted(hang=True))
    backend = backend_for(server, timeout=30)

    async def body() -> float:
        task = asyncio.create_task(backend.infer(REQUEST))
        while not server.requests:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        await backend.close()
        with pytest.raises(CognitionError, match="closed"):
            await task
        return time.monotonic() - start

    assert run(body()) < 1.0


def test_from_config(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATOS_TEST_KEY", "k-1")
    backend = OpenAICompatibleBackend.from_config(
        {
            "base_url": server.base_url + "/",
            "model": "m",
            "api_key_env": "BATOS_TEST_KEY",
            "timeout": 7,
            "max_retries": 4,
        }
    )
    assert backend.timeout == 7 and backend.max_retries == 4
    assert backend.url == f"{server.base_url}/chat/completions"
    assert backend.describe() == f"openai: model m at {backend.url}, api key set"
    run(_infer_once(backend))
    assert server.requests[0]["headers"]["Authorization"] == "Bearer k-1"


@pytest.mark.parametrize(
    ("cfg", "complaint"),
    [
        ({"model": "m"}, "base_url"),
        ({"base_url": "http://h/v1"}, "model"),
        ({"base_url": "ftp://h/v1", "model": "m"}, "http"),
        ({"base_url": "http://h/v1", "model": "m", "api_kye_env": "X"}, "unknown config"),
        ({"base_url": "http://h/v1", "model": "m", "api_key_env": "BATOS_UNSET_VAR"}, "not set"),
    ],
)
def test_bad_config_fails_fast(
    cfg: dict[str, Any], complaint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATOS_UNSET_VAR", raising=False)
    with pytest.raises(CognitionUnavailable, match=complaint):
        OpenAICompatibleBackend.from_config(cfg)


def test_credentials_in_url_are_not_displayed() -> None:
    backend = OpenAICompatibleBackend("https://user:pw@example.invalid:8443/v1", "m")
    assert backend.url == "https://example.invalid:8443/v1/chat/completions"
    assert "pw" not in backend.describe() + repr(backend)


def test_parse_retry_after() -> None:
    assert _parse_retry_after("2") == 2.0
    assert _parse_retry_after(None) is None and _parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 20))
    assert 15 < _parse_retry_after(future) <= 21


class TestOpenAIConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, server: FakeOpenAIServer):
        return lambda: backend_for(server)

    @pytest.fixture
    def broken_backend_factory(self):
        url = f"http://127.0.0.1:{free_port()}/v1"
        return lambda: OpenAICompatibleBackend(url, "m", max_retries=1, backoff=0.01)

    @pytest.fixture
    def slow_request(self) -> InferenceRequest:
        return InferenceRequest(persona="BRICK", prompt=f"build it {SLOW_MARK}", max_tokens=8)
