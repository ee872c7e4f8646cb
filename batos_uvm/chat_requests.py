"""Sending one command from the chat client: waiting, Ctrl-C and cancelling, what to say.

Shared by the REPL and the one-shot forms of ``chat_client.py``: ``await_reply``
sends and waits (Ctrl-C while a cycle runs offers to cancel it), ``run_command``
turns the outcome into an exit code and the text a user reads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .chat_display import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_UNREACHABLE,
    ProgressPrinter,
    exit_code,
    format_reply,
)
from .client import (
    BridgeClient,
    BridgeClientError,
    InvalidEndpoint,
    InvalidRequest,
    KernelUnreachable,
    RequestOutcomeUnknown,
    RequestTimeout,
)
from .protocol import Reply
from .translator import Command, parse_value

Ask = Callable[[str], bool]


def parse_call(tokens: list[str]) -> Command:
    """``TARGET SELECTOR [ARG ...]`` -> a send command (NAME=VALUE tokens are kwargs)."""
    if len(tokens) < 2:
        raise ValueError("usage: /call TARGET SELECTOR [ARG ...]")
    target, selector, rest = tokens[0], tokens[1], tokens[2:]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for token in rest:
        name, eq, value = token.partition("=")
        if eq and name.isidentifier():
            kwargs[name] = parse_value(value)
        else:
            args.append(parse_value(token))
    return Command("send", {"target": target, "selector": selector, "args": args, "kwargs": kwargs})


# --- running one command ---------------------------------------------------------------


def await_reply(
    client: BridgeClient,
    command: Command,
    printer: ProgressPrinter | None,
    *,
    ask: Ask | None = None,
    say: Callable[[str], None] | None = None,
) -> Reply | None:
    """Send one command and wait for its reply; None when Ctrl-C stopped the wait.

    Ctrl-C while a cycle runs asks (``ask``) whether to cancel it; the cycle then
    ends CANCELLED and its reply is awaited. Without ``ask``, or answered no,
    Ctrl-C only stops waiting. Raises BridgeClientError.
    """
    try:
        try:
            return client.request(command.command, command.fields, printer)
        except KeyboardInterrupt:
            return _after_interrupt(client, printer, ask, say or _say_stderr)
    finally:
        if printer is not None:
            printer.finish()


def run_command(
    client: BridgeClient,
    command: Command,
    printer: ProgressPrinter | None,
    *,
    ask: Ask | None = None,
    say: Callable[[str], None] | None = None,
    briefs: list[str] | None = None,
) -> tuple[int, str]:
    """Run one command (see ``await_reply``); returns (exit code, text for the user)."""
    try:
        reply = await_reply(client, command, printer, ask=ask, say=say)
    except BridgeClientError as exc:
        return run_command_error(exc)
    if reply is None:
        return EXIT_INTERRUPTED, stopped_waiting(printer)
    return exit_code(reply), format_reply(reply, command.command, briefs)


def stopped_waiting(printer: ProgressPrinter | None) -> str:
    cycle = printer.cycle_id if printer is not None else None
    if cycle:
        return (f"stopped waiting; cycle {cycle} carries on in the kernel "
                f"(/cancel {cycle} stops it, /cycles shows its outcome)")
    return "stopped waiting; the kernel may still complete the request (see /cycles)"


def _after_interrupt(
    client: BridgeClient, printer: ProgressPrinter | None, ask: Ask | None,
    say: Callable[[str], None],
) -> Reply | None:
    """After Ctrl-C: offer to cancel the running cycle; its reply, or None (stop waiting)."""
    if printer is not None:
        printer.finish()
    cycle = printer.cycle_id if printer is not None else None
    if cycle is None or ask is None or not client.outstanding:
        return None
    try:
        if not ask(f"Cancel cycle {cycle}? [y/N] "):
            return None
    except (KeyboardInterrupt, EOFError):
        return None
    with client.sibling(timeout=5.0) as side:
        answer = side.cancel(cycle)
    if not answer.ok:
        say(format_reply(answer))
        return None
    say(f"cancelling cycle {cycle} ...")
    try:
        return client.resume()
    except KeyboardInterrupt:
        return None


def cancel_cycle(client: BridgeClient, cycle_id: str) -> tuple[int, str]:
    """``--cancel`` and ``/cancel``: 0 when the kernel is cancelling it, 1 when it is not running."""
    try:
        reply = client.cancel(cycle_id)
    except BridgeClientError as exc:
        return run_command_error(exc)
    if reply.ok:
        return EXIT_OK, (f"cancelling cycle {reply.result['cycle_id']}: it ends CANCELLED "
                         "and installs nothing")
    return EXIT_FAILED, format_reply(reply)


def run_command_error(exc: BridgeClientError) -> tuple[int, str]:
    if isinstance(exc, InvalidRequest | InvalidEndpoint):
        return EXIT_FAILED, f"not sent: {exc}"
    if isinstance(exc, KernelUnreachable):
        return EXIT_UNREACHABLE, f"kernel unreachable: {exc}"
    if isinstance(exc, RequestTimeout):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, RequestOutcomeUnknown):
        return EXIT_UNKNOWN, str(exc)
    return EXIT_UNREACHABLE, str(exc)


def _say_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the REPL ---------------------------------------------------------------------------
