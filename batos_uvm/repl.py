"""The chat client's interactive loop: briefs and slash commands, history, a demo's briefs."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .chat_display import EXIT_OK, ProgressPrinter, briefs_text
from .chat_requests import cancel_cycle, parse_call, run_command
from .client import BridgeClient, BridgeClientError
from .translator import Command, Translator

PROMPT = "batos> "
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
