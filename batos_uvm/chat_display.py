"""How the chat client shows things: replies, progress while the kernel works, exit codes.

Answers go to stdout, progress to stderr (in the REPL both go to the terminal).
Progress is a line per state with the time since the request was sent, the
persona thinking and the state; while a state lasts the time keeps counting
(in place on a terminal, a line every ``QUIET_EVERY`` seconds otherwise), and
model output that streams arrives as it is written.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, TextIO

from .listing import cycles_table, describe_listing
from .protocol import ERR_CANCELLED, ProgressEvent, Reply

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_UNKNOWN, EXIT_CANCELLED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C: stopped waiting (the kernel carries on)

REPLAY_NOTE = "Note: this answer was replayed from a recording; no live model produced it."
FINAL_STATES = frozenset({"COMPLETE", "FAILED", "CANCELLED"})
QUIET_EVERY = 10.0  # seconds between repeated progress lines when not on a terminal

# Python counts `self` in a method's arguments; the person who sent the message did not.
_ARG_COUNT = re.compile(
    r"(?P<name>\w+)\(\) takes (?:from (?P<low>\d+) to )?(?P<high>\d+) positional "
    r"arguments? but (?P<given>\d+) (?:was|were) given"
)


def exit_code(reply: Reply) -> int:
    if reply.status == "COMPLETE":
        return EXIT_OK
    if reply.error is not None and reply.error.kind == ERR_CANCELLED:
        return EXIT_CANCELLED
    return EXIT_FAILED


def explain_call_error(reason: str) -> str:
    """Argument counts as the sender counts them: without the method's ``self``."""

    def fix(match: re.Match[str]) -> str:
        low, high, given = match["low"], int(match["high"]), int(match["given"])
        if high < 1 or given < 1:
            return match[0]
        took = f"from {int(low) - 1} to {high - 1}" if low else str(high - 1)
        plural = "s" if (low or high - 1 != 1) else ""
        verb = "was" if given - 1 == 1 else "were"
        return f"{match['name']}() takes {took} argument{plural} but {given - 1} {verb} given"

    return _ARG_COUNT.sub(fix, reason)


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "\n".join(f"{i}. {_compact(v)}" for i, v in enumerate(value, 1))
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        return repr(value)


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_compact(v)}" for k, v in value.items())
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=repr)


def format_status(status: dict[str, Any]) -> str:
    """A ping's answer: who answered, what it holds, whether everything is loaded."""
    lines = [f"kernel {str(status.get('boot_id', '?'))[:12]} (PID {status.get('pid')}), "
             f"up {status.get('uptime_s', 0):.0f} s, image: {status.get('image') or 'opening'}"]
    if status.get("ready", True):
        lines.append("ready: everything is loaded")
    else:
        lines.append("loading in the background: " + ", ".join(status.get("loading") or ()))
    for persona, backend in sorted((status.get("cognition") or {}).items()):
        lines.append(f"  {persona:<7} thinks with {backend}")
    return "\n".join(lines)


def _body(reply: Reply, command: str | None) -> str:
    value = reply.result
    if value is None:
        return reply.result_repr if reply.result_repr is not None else "(no value)"
    if command == "cycles" and isinstance(value, list):
        return cycles_table(value)
    if command == "inspect" and isinstance(value, dict) and "oid" in value:
        return describe_listing(value)
    if command == "ping" and isinstance(value, dict) and "boot_id" in value:
        return format_status(value)
    return format_value(value)


def format_reply(reply: Reply, command: str | None = None, briefs: list[str] | None = None) -> str:
    """The final answer as the user reads it (``command`` picks a table where one helps)."""
    lines = []
    cycle = f" (cycle {reply.cycle_id})" if reply.cycle_id else ""
    err = reply.error
    if reply.status == "COMPLETE":
        body = _body(reply, command)
        head = f"COMPLETE{cycle}"
        lines.append(f"{head}: {body}" if "\n" not in body else f"{head}:\n{body}")
    elif err is not None and err.kind == ERR_CANCELLED:
        lines.append(f"CANCELLED{cycle}: {err.reason}")
    elif err is not None and briefs and recording_has_no_answer(err.reason):
        lines.append(f"FAILED{cycle}: the recording this kernel answers from has no answer "
                     "for that brief (no live model runs in a demo).")
        lines.append(briefs_text(briefs))
    elif err is not None:
        reason = explain_call_error(err.reason) if err.kind == "method_raised" else err.reason
        lines.append(f"{reply.status}{cycle}: {err.kind}: {reason}")
    else:
        lines.append(reply.status + cycle)
    if reply.output:
        printed = reply.output if reply.output.endswith("\n") else reply.output + "\n"
        lines.append("printed:\n" + "".join(f"  | {line}\n" for line in printed.splitlines()))
        lines[-1] = lines[-1].rstrip("\n")
    if reply.replayed:
        lines.append(REPLAY_NOTE)
    return printable("\n".join(lines))


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F) if code not in (9, 10)}


def printable(text: str) -> str:
    """Text from the kernel with terminal control characters shown, never obeyed.

    A method's output and error messages are written by generated code: an
    escape sequence in them must not move the cursor or retitle the terminal.
    """
    return text.translate(_CONTROL)


def recording_has_no_answer(reason: str) -> bool:
    """Whether a cycle failed because a replay cassette holds no answer for the brief."""
    return "replay cassette" in reason and "has no answer" in reason


def briefs_text(briefs: list[str]) -> str:
    return "The recording knows these briefs:\n" + "\n".join(f"  {brief}" for brief in briefs)


class ProgressPrinter:
    """Show a request's progress events as they arrive; see the module docstring.

    ``cycle_id`` is the cycle the request runs (or joined), once an event named it.
    Call ``finish()`` before printing anything else, so an open line is ended.
    """

    def __init__(self, out: TextIO, *, live: bool | None = None) -> None:
        self.out = out
        self.live = _is_terminal(out) if live is None else live
        self.started = time.monotonic()
        self.cycle_id: str | None = None
        self._key: tuple[str | None, str, str] | None = None
        self._open = False  # the cursor is not at the start of a line
        self._streaming = False
        self._printed_at = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if event.cycle_id:
            self.cycle_id = event.cycle_id
        key = (event.cycle_id, event.state, event.detail)
        if event.text:
            if self._key is None or self._key[:2] != key[:2]:  # say whose text this is
                self._key, self._streaming = key, False
                self.finish()
                self._write(self._line(event), keep_open=False)
            self._stream(event.text)
            return
        line = self._line(event)
        if key != self._key:
            self._key, self._streaming = key, False
            self.finish()
            self._write(line, keep_open=self.live and event.state not in FINAL_STATES)
        elif self._streaming:
            return  # the text arriving says it is busy
        elif self.live and self._open:
            self._write("\r" + line + "\x1b[K", keep_open=True)
        elif time.monotonic() - self._printed_at >= QUIET_EVERY:
            self.finish()
            self._write(line, keep_open=False)

    def _line(self, event: ProgressEvent) -> str:
        elapsed = event.elapsed_s if event.elapsed_s is not None else (
            time.monotonic() - self.started)
        where = f"[cycle {event.cycle_id}] " if event.cycle_id else ""
        persona = f"  {event.persona}" if event.persona else ""
        # a final state's reason is the reply's: shown once, with the reply
        detail = f"  {event.detail}" if event.detail and event.state not in FINAL_STATES else ""
        return f"  {elapsed:5.1f}s {where}{event.state}{persona}{detail}"

    def _stream(self, text: str) -> None:
        if not self._streaming:
            self._streaming = True
            self.finish()
        self.out.write(text)
        self.out.flush()
        self._open = not text.endswith("\n")

    def _write(self, text: str, *, keep_open: bool) -> None:
        self.out.write(text if keep_open else text + "\n")
        self.out.flush()
        self._open = keep_open
        self._printed_at = time.monotonic()

    def finish(self) -> None:
        """End the current line if one is open (before other output)."""
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = [
    "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNKNOWN",
    "EXIT_UNREACHABLE", "REPLAY_NOTE", "ProgressPrinter", "briefs_text", "exit_code",
    "explain_call_error", "format_reply", "format_status", "format_value",
]
