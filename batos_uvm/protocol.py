"""The synaptic bridge wire protocol, version 1 (see docs/PROTOCOL.md).

Kernel (ZeroMQ ROUTER) and clients (DEALER) exchange single-frame messages, each
one ormsgpack map carrying ``"v": 1``. This module holds the pydantic models both
sides validate against, the encode/decode helpers, and ``RequestHandler``: the
interface the kernel implements to answer requests arriving over the bridge.
"""

from __future__ import annotations

import ipaddress
import keyword
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import ormsgpack
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_ID_CHARS = 64
MAX_REASON_CHARS = 2000
MAX_REPR_CHARS = 64 * 1024
MAX_INTENT_CHARS = 2000

# Commands whose repetition has no side effect: a client may resend them freely.
IDEMPOTENT_COMMANDS = frozenset({"ping", "inspect", "cycles", "heartbeat", "cancel"})

# Error kinds the bridge itself produces (a handler may add its own, e.g. "not_found").
ERR_MALFORMED = "malformed"  # not msgpack, not a map, wrong number of frames
ERR_TOO_LARGE = "too_large"  # frame larger than the bridge's max_message_bytes
ERR_VERSION = "unsupported_version"  # "v" is not 1
ERR_UNKNOWN_COMMAND = "unknown_command"
ERR_INVALID = "invalid"  # a field is missing, has the wrong type or is out of range
ERR_DUPLICATE_ID = "duplicate_id"  # an id reused for a different request
ERR_BUSY = "busy"  # too many requests in flight
ERR_INTERNAL = "internal"  # the handler raised or returned something that is not a Reply
ERR_SHUTDOWN = "shutting_down"  # the kernel stopped before the request finished
ERR_CANCELLED = "cancelled"  # (kernel) the cognitive cycle was cancelled; nothing was installed

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX_OID_RE = re.compile(r"^0x[0-9a-fA-F]{1,16}$")
_DEC_OID_RE = re.compile(r"^[0-9]{1,20}$")


def is_identifier(name: str) -> bool:
    """A plain ASCII Python identifier that is not a keyword (selectors, root names)."""
    return bool(_IDENT_RE.match(name)) and not keyword.iskeyword(name)


def parse_target(target: str) -> int | str:
    """Turn a target string into an oid (int) or a root name (str).

    ``"0x2a"`` and ``"42"`` are oids (64-bit); anything else must be an identifier,
    looked up among the image's root objects. Raises ValueError otherwise.
    """
    if _HEX_OID_RE.match(target):
        return int(target, 16)
    if _DEC_OID_RE.match(target):
        oid = int(target)
        if oid < 2**64:
            return oid
        raise ValueError(f"oid {target} does not fit in 64 bits")
    if is_identifier(target):
        return target
    raise ValueError(
        f"target {target!r} is neither a root name (identifier) nor an oid ('0x..' or decimal)"
    )


def _check_target(value: str) -> str:
    parse_target(value)
    return value


def _check_selector(value: str) -> str:
    if not is_identifier(value):
        raise ValueError(f"selector {value!r} is not a valid identifier")
    return value


# -- requests (client -> kernel) --------------------------------------------------------------


class _Model(BaseModel):
    # strict: msgpack already yields the right types, so coercion would only hide bugs
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Target = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_check_target)]
Selector = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_check_selector)]
# The user's own words for what a message should do; they reach the personas who write it.
Intent = Annotated[str, Field(max_length=MAX_INTENT_CHARS)]


class _RequestBase(_Model):
    v: Literal[1] = 1
    id: RequestId


class PingRequest(_RequestBase):
    command: Literal["ping"] = "ping"


class HeartbeatRequest(_RequestBase):
    """Liveness only: the kernel answers with a Heartbeat, never with a Reply."""

    command: Literal["heartbeat"] = "heartbeat"


class SendRequest(_RequestBase):
    """Send ``selector(*args, **kwargs)`` to a live object; may start a cognitive cycle."""

    command: Literal["send"] = "send"
    target: Target
    selector: Selector
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    intent: Intent = ""


class MissionBrief(_Model):
    type: Literal["unhandled_message"] = "unhandled_message"
    selector: Selector
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    intent: Intent = ""


class CycleRequest(_RequestBase):
    """Start a cognitive cycle directly (the seed's payload, unchanged)."""

    command: Literal["initiate_cognitive_cycle"] = "initiate_cognitive_cycle"
    target_oid: Target
    mission_brief: MissionBrief


class InspectRequest(_RequestBase):
    command: Literal["inspect"] = "inspect"
    target: Target


class CyclesRequest(_RequestBase):
    command: Literal["cycles"] = "cycles"
    limit: int = Field(default=20, ge=1, le=1000)


class CancelRequest(_RequestBase):
    """Cancel a running cognitive cycle: it ends CANCELLED, recorded, nothing installed."""

    command: Literal["cancel"] = "cancel"
    cycle_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


Request = Annotated[
    PingRequest
    | HeartbeatRequest
    | SendRequest
    | CycleRequest
    | InspectRequest
    | CyclesRequest
    | CancelRequest,
    Field(discriminator="command"),
]
REQUEST_ADAPTER: TypeAdapter[Any] = TypeAdapter(Request)
COMMANDS = (
    "ping", "send", "initiate_cognitive_cycle", "inspect", "cycles", "cancel", "heartbeat"
)


# -- kernel -> client -------------------------------------------------------------------------


class ErrorInfo(_Model):
    kind: str
    reason: str


class ProgressEvent(_Model):
    """A state transition of the work behind a request; zero or more precede the Reply.

    A handler builds it with ``cycle_id``/``state``/``detail``; the bridge fills ``id``.
    ``persona`` names who is thinking, ``elapsed_s`` the seconds since the work
    began, and ``text`` carries a chunk of model output as it streams ("" when
    the event is not a chunk).
    """

    model_config = ConfigDict(strict=False, extra="ignore", frozen=True)
    v: Literal[1] = 1
    type: Literal["progress"] = "progress"
    id: str = ""
    cycle_id: str | None = None
    state: str
    detail: str = ""
    persona: str | None = None
    elapsed_s: float | None = None
    text: str = ""
    ts: float = Field(default_factory=time.time)


class Heartbeat(_Model):
    model_config = ConfigDict(strict=False, extra="ignore", frozen=True)
    v: Literal[1] = 1
    type: Literal["heartbeat"] = "heartbeat"
    boot_id: str
    ts: float = Field(default_factory=time.time)


Status = Literal["COMPLETE", "FAILED", "ERROR"]


class Reply(_Model):
    """The one final answer to a request.

    COMPLETE: the request was carried out, ``result`` holds the value. FAILED: it was
    understood but the work failed (e.g. a cognitive cycle could not produce a valid
    method); ``error`` says why. ERROR: the request itself was rejected (bad frame,
    invalid fields, unknown command) or the handler crashed.
    """

    model_config = ConfigDict(strict=False, extra="ignore", frozen=True)
    v: Literal[1] = 1
    type: Literal["reply"] = "reply"
    id: str = ""
    status: Status
    result: Any = None
    result_repr: str | None = None
    error: ErrorInfo | None = None
    cycle_id: str | None = None
    replayed: bool = False
    boot_id: str = ""
    output: str | None = None  # what the method printed in its cell (bounded)

    @property
    def ok(self) -> bool:
        return self.status == "COMPLETE"

    @classmethod
    def complete(
        cls, result: Any = None, *, cycle_id: str | None = None, replayed: bool = False
    ) -> Reply:
        return cls(status="COMPLETE", result=result, cycle_id=cycle_id, replayed=replayed)

    @classmethod
    def failed(
        cls,
        kind: str,
        reason: str,
        *,
        cycle_id: str | None = None,
        replayed: bool = False,
        output: str | None = None,
    ) -> Reply:
        return cls(
            status="FAILED",
            error=ErrorInfo(kind=kind, reason=reason),
            cycle_id=cycle_id,
            replayed=replayed,
            output=output,
        )

    @classmethod
    def error_reply(cls, kind: str, reason: str, request_id: str = "") -> Reply:
        return cls(
            status="ERROR",
            id=request_id,
            error=ErrorInfo(kind=kind, reason=truncate(reason, MAX_REASON_CHARS)),
        )


KernelMessage = Annotated[Reply | ProgressEvent | Heartbeat, Field(discriminator="type")]
KERNEL_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(KernelMessage)

ProgressCallback = Callable[[ProgressEvent], Awaitable[None]]


@runtime_checkable
class RequestHandler(Protocol):
    """What the kernel implements to serve the bridge.

    ``handle`` receives every validated request except ``heartbeat`` (ping, send,
    initiate_cognitive_cycle, inspect, cycles), may await ``progress(ProgressEvent(...))``
    any number of times, and returns the final ``Reply`` (``Reply.complete(...)``,
    ``Reply.failed(...)``). The bridge fills ``id``, ``boot_id`` and ``v``, calls
    ``handle`` concurrently (one task per request), and turns an exception into an
    ERROR reply of kind "internal". It never calls ``handle`` twice for one request id.
    """

    async def handle(self, request: Request, progress: ProgressCallback) -> Reply: ...


# -- encoding ---------------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A frame that is not a valid request; carries what the ERROR reply needs."""

    def __init__(self, kind: str, reason: str, request_id: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.request_id = request_id


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... (truncated)"


def pack(message: dict[str, Any]) -> bytes:
    """Encode one wire map (ormsgpack; non-str keys allowed inside results)."""
    return ormsgpack.packb(message, option=ormsgpack.OPT_NON_STR_KEYS)


def encode(model: BaseModel) -> bytes:
    return pack(model.model_dump())


def _recover_id(obj: Any) -> str:
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else ""


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in COMMANDS) or "request"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more problem(s)")
    return "; ".join(parts)


def validate_request(obj: Any) -> Any:
    """Validate a decoded map as a request; raises ProtocolError with a readable reason."""
    if not isinstance(obj, dict):
        raise ProtocolError(ERR_MALFORMED, f"a request must be a map, not {type(obj).__name__}")
    rid = _recover_id(obj)
    version = obj.get("v")
    if version is None:
        raise ProtocolError(ERR_INVALID, "missing field 'v' (protocol version, must be 1)", rid)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ERR_VERSION,
            f"protocol version {version!r} is not supported; this kernel speaks version 1",
            rid,
        )
    command = obj.get("command")
    if command is None:
        raise ProtocolError(ERR_INVALID, "missing field 'command'", rid)
    if not isinstance(command, str) or command not in COMMANDS:
        shown = truncate(repr(command), 80)
        raise ProtocolError(
            ERR_UNKNOWN_COMMAND,
            f"unknown command {shown}; known commands: {', '.join(COMMANDS)}",
            rid,
        )
    try:
        return REQUEST_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise ProtocolError(ERR_INVALID, describe_validation_error(exc), rid) from None


def decode_request(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode and validate one request frame; raises ProtocolError."""
    if len(frame) > max_bytes:
        raise ProtocolError(
            ERR_TOO_LARGE, f"message of {len(frame)} bytes exceeds the limit of {max_bytes} bytes"
        )
    try:
        obj = ormsgpack.unpackb(frame)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(ERR_MALFORMED, f"not a msgpack message: {exc}") from None
    return validate_request(obj)


def decode_kernel_message(frame: bytes) -> Any:
    """Decode a kernel -> client frame into a Reply, ProgressEvent or Heartbeat."""
    try:
        obj = ormsgpack.unpackb(frame)
    except (ValueError, TypeError) as exc:
        reason = f"kernel sent a frame that is not msgpack: {exc}"
        raise ProtocolError(ERR_MALFORMED, reason) from None
    try:
        return KERNEL_MESSAGE_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise ProtocolError(ERR_INVALID, describe_validation_error(exc)) from None


_TCP_ENDPOINT_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):(\d{1,5}|\*)$")
_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]*):(\d{1,5}|\*)$")
ENDPOINT_HINT = "write tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555 (or ipc://PATH)"


def check_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if ZeroMQ can use it; else raise ValueError saying what to type.

    Accepted: ``tcp://HOST:PORT`` (PORT 1-65535; ``*`` or 0 binds any free port),
    ``ipc://PATH`` and ``inproc://NAME``. The usual mistake, a missing scheme
    (``127.0.0.1:5555``), is named as such with the corrected address.
    """
    text = endpoint.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        match = _HOST_PORT_RE.match(text)
        if match:
            host = match.group(1) or "127.0.0.1"
            raise ValueError(
                f"endpoint {endpoint!r} has no scheme: write tcp://{host}:{match.group(2)}"
            )
        raise ValueError(f"endpoint {endpoint!r} is not a ZeroMQ address; {ENDPOINT_HINT}")
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"endpoint {endpoint!r} names no {scheme} path; {ENDPOINT_HINT}")
        return text
    if scheme != "tcp":
        raise ValueError(
            f"endpoint {endpoint!r}: unsupported scheme {scheme!r}; {ENDPOINT_HINT}"
        )
    match = _TCP_ENDPOINT_RE.match(text)
    if not match:
        raise ValueError(
            f"endpoint {endpoint!r} is not of the form tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)"
        )
    port = match.group(2)
    if port != "*" and not 0 <= int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r}: port {port} is not between 0 and 65535")
    return text


def endpoint_is_local(endpoint: str) -> bool:
    """True when binding ``endpoint`` exposes it to this machine only (loopback, ipc, inproc)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", interface names, host names
