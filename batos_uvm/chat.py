"""The chat client's command line: ``chat_client.py`` (see docs/CHAT.md).

    python chat_client.py                      # interactive (history in ~/.batos_history)
    python chat_client.py --once "create a method to report the current system time"
    python chat_client.py --call genesis_obj add 1 2
    python chat_client.py --ping --timeout 2
    python chat_client.py --cancel 20261122-003635-895a15

Exit codes (chat_display): 0 COMPLETE; 1 FAILED/ERROR, a brief that was not
understood, a request refused before sending, bad options; 2 kernel unreachable
or no answer in time; 3 kernel restarted while the request was in flight; 4 the
cycle was cancelled; 130 Ctrl-C stopped waiting. The REPL is in repl.py, sending
one command in chat_requests.py, showing things in chat_display.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .argparsing import OneLineParser
from .chat_display import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ProgressPrinter,
    exit_code,
    format_reply,
    recording_has_no_answer,
)
from .chat_requests import (
    await_reply,
    cancel_cycle,
    parse_call,
    run_command_error,
    stopped_waiting,
)
from .client import BridgeClient, BridgeClientError, CurveClientConfig
from .model_translator import TranslatorUnavailable, default_model_path, load_translator
from .protocol import DEFAULT_ENDPOINT, Reply, check_endpoint
from .repl import Repl, history_path
from .translator import Command, RuleTranslator, Translator

__all__ = ["build_parser", "main"]

# Reconnection attempts after the kernel fell silent: with --dead-after 3 they span
# about 10 s, longer than a restart under the watchdog takes, so a request the
# kernel was working on ends with "restarted" (exit 3), not "unreachable" (exit 2).
RETRIES = 5


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
    if args.no_model:
        return RuleTranslator()
    if not args.model:  # the installed code model, loaded when a brief needs it; else the rules
        return load_translator(default_model_path(), lazy=True)
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
        print(stopped_waiting(printer), file=sys.stderr)
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
