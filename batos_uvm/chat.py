"""The chat client: an interactive REPL and one-shot commands over the synaptic bridge.

    python chat_client.py                      # interactive (history in ~/.batos_history)
    python chat_client.py --once "create a method to report the current system time"
    python chat_client.py --call genesis_obj add 1 2
    python chat_client.py --ping --timeout 2
    python chat_client.py --cancel 20261122-003635-895a15

Exit codes (see chat_display and docs/CHAT.md): 0 COMPLETE; 1 FAILED/ERROR, a brief
that was not understood, a request refused before sending, bad options; 2 kernel
unreachable or no answer in time; 3 kernel restarted while the request was in flight;
4 the cycle was cancelled; 130 Ctrl-C stopped waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .argparsing import OneLineParser
from .chat_display import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_UNREACHABLE,
    REPLAY_NOTE,
    ProgressPrinter,
    briefs_text,
    exit_code,
    format_reply,
    format_value,
    recording_has_no_answer,
)
from .client import (
    BridgeClient,
    BridgeClientError,
    CurveClientConfig,
    InvalidEndpoint,
    InvalidRequest,
    KernelUnreachable,
    RequestOutcomeUnknown,
    RequestTimeout,
)
from .protocol import DEFAULT_ENDPOINT, Reply, check_endpoint
from .translator import (
    Command,
    RuleTranslator,
    Translator,
    TranslatorUnavailable,
    load_translator,
    parse_value,
)

__all__ = [
    "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNKNOWN",
    "EXIT_UNREACHABLE", "HELP", "PROMPT", "REPLAY_NOTE", "ProgressPrinter", "Repl",
    "build_parser", "exit_code", "format_reply", "format_value", "main", "parse_call",
    "run_command",
]

PROMPT = "batos> "
# Reconnection attempts after the kernel fell silent: with --dead-after 3 they span
# about 10 s, longer than a restart under the watchdog takes, so a request the
# kernel was working on ends with "restarted" (exit 3), not "unreachable" (exit 2).
RETRIES = 5
MAX_HISTORY_CHARS = 2000  # longer lines (pasted data) are not kept in the history file

HELP = """\
Type a mission brief in plain words, or a command:
  create a method to ...          a new method on genesis_obj (the kernel writes it)
  call METHOD on OBJECT [with A, B]  send a message (arguments as JSON or words)
  what is ... / what are ...      search the knowledge catalog
  /call TARGET SELECTOR [ARG ...]  send SELECTOR(ARG, ...) to TARGET; each ARG is parsed
                                  as JSON (1, true, "x", [1,2]) else taken as a string;
                                  NAME=VALUE passes a keyword argument
  /inspect TARGET                 show an object (a root name or an oid like 0x2a)
  /cycles [N]                     the last N cognitive cycles (default 20)
  /cancel [CYCLE_ID]              cancel a running cycle (default: the last one seen)
  /ping                           check that the kernel answers, and what it has loaded
  /help                           this text
  /quit                           leave (Ctrl-D too)
While a cycle runs, Ctrl-C asks whether to cancel it (else the kernel carries on)."""

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
        return EXIT_INTERRUPTED, _stopped_waiting(printer)
    return exit_code(reply), format_reply(reply, command.command, briefs)


def _stopped_waiting(printer: ProgressPrinter | None) -> str:
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


class Repl:
    """The interactive loop; ``handle_line`` is usable on its own (returns False to quit)."""

    def __init__(
        self, client: BridgeClient, translator: Translator, out: TextIO = sys.stdout
    ) -> None:
        self.client = client
        self.translator = translator
        self.out = out
        self.briefs: list[str] = []  # what a replaying (demo) kernel knows
        self.last_cycle: str | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, history: Path | None = None) -> int:
        remember = _setup_history(history) if history else _no_history
        self.say(
            f"BAT OS chat: kernel {self.client.endpoint}, translator: "
            f"{self.translator.name}. /help for commands, /quit to leave."
        )
        self._greet()
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.say("")
                return EXIT_OK
            except KeyboardInterrupt:
                self.say("^C")
                continue
            if line.strip():
                remember(line)
            if not self.handle_line(line):
                return EXIT_OK

    def _greet(self) -> None:
        try:
            reply = self.client.ping(timeout=min(2.0, self.client.dead_after))
        except BridgeClientError as exc:
            self.say(f"warning: {exc}")
            return
        status = reply.result if isinstance(reply.result, dict) else {}
        self.say(f"kernel is up (boot {reply.boot_id[:12]})")
        if status.get("loading"):
            self.say("still loading in the background (briefs wait for it): "
                     + ", ".join(status["loading"]))
        self.briefs = list(status.get("briefs") or ())
        if self.briefs:
            self.say("This kernel answers from a recording (a demo, not a live model). "
                     + briefs_text(self.briefs))

    def handle_line(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self._slash(line)
        translation = self.translator.translate(line)
        if translation.command is None:
            self.say(translation.message)
            return True
        self.execute(translation.command)
        return True

    def _slash(self, line: str) -> bool:
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            self.say(f"cannot parse that line: {exc}")
            return True
        name, rest = tokens[0].lower(), tokens[1:]
        if name in ("/quit", "/exit", "/q"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP + ("\n" + briefs_text(self.briefs) if self.briefs else ""))
        elif name == "/ping":
            self.execute(Command("ping"))
        elif name == "/call":
            try:
                self.execute(parse_call(rest))
            except ValueError as exc:
                self.say(str(exc))
        elif name == "/inspect":
            if len(rest) != 1:
                self.say("usage: /inspect TARGET")
            else:
                self.execute(Command("inspect", {"target": rest[0]}))
        elif name == "/cycles":
            if len(rest) > 1 or (rest and not rest[0].isdigit()):
                self.say("usage: /cycles [N]")
            else:
                self.execute(Command("cycles", {"limit": int(rest[0]) if rest else 20}))
        elif name == "/cancel":
            self._cancel(rest)
        else:
            self.say(f"unknown command {name}; try /help")
        return True

    def _cancel(self, rest: list[str]) -> None:
        if len(rest) > 1 or not (rest or self.last_cycle):
            self.say("usage: /cancel CYCLE_ID (no cycle was seen in this session; /cycles "
                     "lists them)")
            return
        self.say(cancel_cycle(self.client, rest[0] if rest else str(self.last_cycle))[1])

    def execute(self, command: Command) -> int:
        """Send a command, show its progress and the final answer; returns the exit code."""
        self.say(f"-> {command.describe()}")
        printer = ProgressPrinter(self.out)
        code, text = run_command(self.client, command, printer, ask=self._ask, say=self.say,
                                 briefs=self.briefs)
        self.last_cycle = printer.cycle_id or self.last_cycle
        self.say(text)
        return code

    def _ask(self, question: str) -> bool:
        answer = input(question)
        readline = sys.modules.get("readline")
        if readline is not None and readline.get_current_history_length():  # not a brief
            readline.remove_history_item(readline.get_current_history_length() - 1)
        return answer.strip().lower() in ("y", "yes")


def _no_history(line: str) -> None:
    return None


def _setup_history(path: Path) -> Callable[[str], None]:
    """Line editing and a history file kept between sessions (GNU readline/libedit)."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return _no_history
    if str(path) == os.devnull:  # history switched off: line editing only
        return _no_history
    readline.set_history_length(1000)
    try:
        if path.exists():
            readline.read_history_file(path)
        else:
            path.touch(mode=0o600)
    except OSError as exc:
        print(f"warning: history file {path} unusable: {exc}", file=sys.stderr)
        return _no_history

    def remember(line: str) -> None:
        if len(line) > MAX_HISTORY_CHARS:  # pasted data, not something to recall
            readline.remove_history_item(readline.get_current_history_length() - 1)
            return
        try:
            readline.append_history_file(1, path)
        except OSError:
            pass

    return remember


def history_path() -> Path:
    return Path(os.environ.get("BATOS_HISTORY") or Path.home() / ".batos_history")


# --- the command line -------------------------------------------------------------------


class _Parser(OneLineParser):
    error_status = EXIT_FAILED  # 2 means the kernel could not be reached


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="chat_client.py",
        description="Talk to a running BAT OS kernel.",
        epilog="Exit codes (one-shot forms): 0 COMPLETE; 1 FAILED/ERROR, not understood, "
        "refused before sending, or bad options; 2 kernel unreachable or no answer in time; "
        "3 kernel restarted mid-request; 4 the cycle was cancelled; 130 Ctrl-C stopped waiting.",
    )
    p.add_argument(
        "--endpoint",
        help=f"kernel bridge endpoint (default: $BATOS_ENDPOINT or {DEFAULT_ENDPOINT})",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", metavar="BRIEF", help="translate and send one brief, then exit")
    mode.add_argument(
        "--call",
        nargs="+",
        metavar="ARG",
        help="TARGET SELECTOR [JSON_ARG ...]: send one message, then exit",
    )
    mode.add_argument("--ping", action="store_true", help="exit 0 if the kernel answers, else 2")
    mode.add_argument("--cancel", metavar="CYCLE_ID",
                      help="cancel a running cognitive cycle (an id, or its unique end)")
    p.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=None,
        help="seconds to wait for the final reply (default: as long as the kernel "
        "is alive; --ping and --cancel: 5)",
    )
    p.add_argument(
        "--dead-after",
        type=_positive,
        default=3.0,
        help="seconds of silence after which the kernel counts as gone (default 3)",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("LLAMA_MODEL_PATH"),
        help="GGUF model for the brief translator (default: $LLAMA_MODEL_PATH)",
    )
    p.add_argument("--no-model", action="store_true", help="use the built-in rules translator")
    p.add_argument("--curve-dir", help="CURVE key directory (from `batos.py keys generate`)")
    p.add_argument("--curve-client", default="client", help="client key name in --curve-dir")
    p.add_argument(
        "--history",
        type=Path,
        default=None,
        help="history file (default: $BATOS_HISTORY or ~/.batos_history)",
    )
    return p


def _endpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """--endpoint, else $BATOS_ENDPOINT, else the default; a malformed one is a usage error."""
    if args.endpoint is not None:
        source, value = "--endpoint", args.endpoint
    else:
        source, value = "BATOS_ENDPOINT", os.environ.get("BATOS_ENDPOINT") or DEFAULT_ENDPOINT
    try:
        return check_endpoint(value)
    except ValueError as exc:
        parser.error(f"{source}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    endpoint = _endpoint(parser, args)
    try:
        curve = (
            CurveClientConfig.from_dir(args.curve_dir, args.curve_client)
            if args.curve_dir
            else None
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    one_shot = args.ping or args.call or args.once is not None or args.cancel is not None
    short = args.ping or args.cancel is not None
    timeout = args.timeout if args.timeout is not None else (5.0 if short else None)
    client = BridgeClient(
        endpoint,
        timeout=timeout,
        dead_after=args.dead_after,
        heartbeat_interval=min(1.0, args.dead_after / 3),
        retries=RETRIES,
        curve=curve,
    )
    try:
        if one_shot:
            return _one_shot(args, client)
        translator = _make_translator(args)
        if translator is None:
            return EXIT_FAILED
        return Repl(client, translator).run(args.history or history_path())
    except KeyboardInterrupt:  # between requests: nothing is running for this client
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


def _make_translator(args: argparse.Namespace) -> Translator | None:
    if args.no_model or not args.model:
        return RuleTranslator()
    try:
        return load_translator(args.model)
    except TranslatorUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _ask_on_terminal(question: str) -> bool:
    """Ask on stderr/stdin (stdout carries only the answer of a one-shot command)."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    sys.stderr.write(question)
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _one_shot(args: argparse.Namespace, client: BridgeClient) -> int:
    if args.cancel is not None:
        code, text = cancel_cycle(client, args.cancel)
        print(text, file=sys.stdout if code == EXIT_OK else sys.stderr)
        return code
    if args.ping:
        command = Command("ping")
    elif args.call:
        try:
            command = parse_call(args.call)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    else:
        translator = _make_translator(args)
        if translator is None:
            return EXIT_FAILED
        translation = translator.translate(args.once)
        if translation.command is None:
            print(translation.message, file=sys.stderr)
            return EXIT_FAILED
        command = translation.command
    printer = None if args.json else ProgressPrinter(sys.stderr)
    try:
        reply = await_reply(client, command, printer, ask=_ask_on_terminal)
    except BridgeClientError as exc:
        code, text = run_command_error(exc)
        print(text, file=sys.stderr)
        return code
    if reply is None:
        print(_stopped_waiting(printer), file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(reply.model_dump(), indent=2, ensure_ascii=False, default=repr))
    elif args.ping and reply.ok:
        print(f"kernel at {client.endpoint} is up (boot {reply.boot_id})")
    else:
        print(format_reply(reply, command.command, _briefs_if_needed(client, reply)))
    return exit_code(reply)


def _briefs_if_needed(client: BridgeClient, reply: Reply) -> list[str] | None:
    """The demo briefs, asked for only when a brief failed for want of a recorded answer."""
    if reply.error is None or not recording_has_no_answer(reply.error.reason):
        return None
    try:
        status = client.ping(timeout=2.0).result
    except BridgeClientError:
        return None
    return list(status.get("briefs") or ()) if isinstance(status, dict) else None
