"""The chat client: an interactive REPL and one-shot commands over the synaptic bridge.

    python chat_client.py                      # interactive (history in ~/.batos_history)
    python chat_client.py --once "create a method to report the current system time"
    python chat_client.py --call genesis_obj add 1 2
    python chat_client.py --ping --timeout 2

Exit codes of the one-shot forms: 0 COMPLETE, 1 FAILED/ERROR (or a brief that was not
understood), 2 kernel unreachable or no answer in time, 3 kernel restarted while the
request was in flight (it may or may not have run). See docs/CHAT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .client import (
    BridgeClient,
    BridgeClientError,
    CurveClientConfig,
    InvalidRequest,
    KernelUnreachable,
    RequestOutcomeUnknown,
    RequestTimeout,
)
from .model_translator import TranslatorUnavailable, default_model_path, load_translator
from .protocol import DEFAULT_ENDPOINT, ProgressEvent, Reply
from .translator import Command, RuleTranslator, Translator, parse_value

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_UNKNOWN = 0, 1, 2, 3
PROMPT = "batos> "
REPLAY_NOTE = "Note: this answer was replayed from a recording; no live model produced it."

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
  /ping                           check that the kernel answers
  /help                           this text
  /quit                           leave (Ctrl-D too)
While a request runs, Ctrl-C stops waiting (the kernel carries on)."""


def exit_code(reply: Reply) -> int:
    return EXIT_OK if reply.status == "COMPLETE" else EXIT_FAILED


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


def format_reply(reply: Reply) -> str:
    """The final answer as the user reads it."""
    lines = []
    head = reply.status + (f" (cycle {reply.cycle_id})" if reply.cycle_id else "")
    if reply.status == "COMPLETE":
        if reply.result is not None:
            body = format_value(reply.result)
        elif reply.result_repr is not None:
            body = reply.result_repr
        else:
            body = "(no value)"
        lines.append(f"{head}: {body}" if "\n" not in body else f"{head}:\n{body}")
    else:
        err = reply.error
        lines.append(f"{head}: {err.kind}: {err.reason}" if err else head)
    if reply.replayed:
        lines.append(REPLAY_NOTE)
    return "\n".join(lines)


class ProgressPrinter:
    """Print state transitions as they arrive, once per state change."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.last: tuple[str | None, str, str] | None = None

    def __call__(self, event: ProgressEvent) -> None:
        key = (event.cycle_id, event.state, event.detail)
        if key == self.last:
            return
        self.last = key
        where = f"[cycle {event.cycle_id}] " if event.cycle_id else ""
        detail = f"  {event.detail}" if event.detail else ""
        elapsed = time.monotonic() - self.started
        print(f"  {elapsed:5.1f}s {where}{event.state}{detail}", file=self.out, flush=True)


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


class Repl:
    """The interactive loop; ``handle_line`` is usable on its own (returns False to quit)."""

    def __init__(
        self, client: BridgeClient, translator: Translator, out: TextIO = sys.stdout
    ) -> None:
        self.client = client
        self.translator = translator
        self.out = out

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
            self.say(f"kernel is up (boot {reply.boot_id[:12]})")
        except BridgeClientError as exc:
            self.say(f"warning: {exc}")

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
            self.say(HELP)
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
        else:
            self.say(f"unknown command {name}; try /help")
        return True

    def execute(self, command: Command) -> int:
        """Send a command, show its progress and the final answer; returns the exit code."""
        self.say(f"-> {command.describe()}")
        code, text = run_command(self.client, command, ProgressPrinter(self.out))
        self.say(text)
        return code


def run_command(
    client: BridgeClient, command: Command, on_progress: Callable[[ProgressEvent], None] | None
) -> tuple[int, str]:
    """Run one command; returns (exit code, text for the user)."""
    try:
        reply = client.request(command.command, command.fields, on_progress)
    except BridgeClientError as exc:
        return run_command_error(exc)
    except KeyboardInterrupt:
        return EXIT_UNREACHABLE, (
            "stopped waiting; the kernel may still complete the request (see /cycles)"
        )
    return exit_code(reply), format_reply(reply)


def _no_history(line: str) -> None:
    return None


def _setup_history(path: Path) -> Callable[[str], None]:
    """Line editing and a history file kept between sessions (GNU readline/libedit)."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
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
        try:
            readline.append_history_file(1, path)
        except OSError:
            pass

    return remember


def history_path() -> Path:
    return Path(os.environ.get("BATOS_HISTORY") or Path.home() / ".batos_history")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat_client.py",
        description="Talk to a running BAT OS kernel.",
        epilog="Exit codes (one-shot forms): 0 COMPLETE, 1 FAILED/ERROR or not understood, "
        "2 kernel unreachable or no answer in time, 3 kernel restarted mid-request.",
    )
    p.add_argument(
        "--endpoint",
        default=os.environ.get("BATOS_ENDPOINT", DEFAULT_ENDPOINT),
        help="kernel bridge endpoint (default: $BATOS_ENDPOINT or %(default)s)",
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
    p.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for the final reply (default: as long as the kernel "
        "is alive; --ping: 5)",
    )
    p.add_argument(
        "--dead-after",
        type=float,
        default=3.0,
        help="seconds of silence after which the kernel counts as gone",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("LLAMA_MODEL_PATH"),
        help="GGUF model for the brief translator (default: $LLAMA_MODEL_PATH, else the "
        "installed code model, else the built-in rules)",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        curve = (
            CurveClientConfig.from_dir(args.curve_dir, args.curve_client)
            if args.curve_dir
            else None
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    timeout = args.timeout if args.timeout is not None else (5.0 if args.ping else None)
    dead_after = max(args.dead_after, 0.2)
    client = BridgeClient(
        args.endpoint,
        timeout=timeout,
        dead_after=dead_after,
        heartbeat_interval=min(1.0, dead_after / 3),
        curve=curve,
    )
    try:
        if args.ping or args.call or args.once is not None:
            return _one_shot(args, client)
        translator = _make_translator(args)
        if translator is None:
            return EXIT_FAILED
        return Repl(client, translator).run(args.history or history_path())
    finally:
        client.close()


def _make_translator(args: argparse.Namespace) -> Translator | None:
    if args.no_model:
        return RuleTranslator()
    if not args.model:  # the installed code model, loaded when a brief needs it; else the rules
        return load_translator(default_model_path(), lazy=True)
    try:
        return load_translator(args.model)
    except TranslatorUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _one_shot(args: argparse.Namespace, client: BridgeClient) -> int:
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
    progress = None if args.json else ProgressPrinter(sys.stderr)
    try:
        reply = client.request(command.command, command.fields, progress)
    except BridgeClientError as exc:
        code, text = run_command_error(exc)
        print(text, file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(reply.model_dump(), indent=2, ensure_ascii=False, default=repr))
    elif args.ping and reply.ok:
        print(f"kernel at {client.endpoint} is up (boot {reply.boot_id})")
    else:
        print(format_reply(reply))
    return exit_code(reply)


def run_command_error(exc: BridgeClientError) -> tuple[int, str]:
    if isinstance(exc, InvalidRequest):
        return EXIT_FAILED, f"not sent: {exc}"
    if isinstance(exc, KernelUnreachable):
        return EXIT_UNREACHABLE, f"kernel unreachable: {exc}"
    if isinstance(exc, RequestTimeout):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, RequestOutcomeUnknown):
        return EXIT_UNKNOWN, str(exc)
    return EXIT_UNREACHABLE, str(exc)
