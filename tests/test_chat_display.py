"""How the chat client shows progress, streamed model output and answers."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pexpect
import pytest
from fake_kernel_bridge import spawn

from batos_uvm import chat_display
from batos_uvm.chat_display import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    ProgressPrinter,
    exit_code,
    explain_call_error,
    format_reply,
)
from batos_uvm.listing import cycles_table, describe_listing, when
from batos_uvm.protocol import ProgressEvent, Reply

CHAT = str(Path(__file__).resolve().parent.parent / "chat_client.py")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def event(state: str, **fields) -> ProgressEvent:
    return ProgressEvent(cycle_id=fields.pop("cycle_id", "c1"), state=state, **fields)


def test_a_line_per_state_with_time_persona_and_no_repeated_reason():
    out = io.StringIO()
    show = ProgressPrinter(out, live=False)
    show(event("DECOMPOSING", persona="BABS", elapsed_s=0.4))
    show(event("DECOMPOSING", persona="BABS", elapsed_s=2.4))  # a tick: not again so soon
    show(event("FAILED", detail="the reason the reply also gives", elapsed_s=3.0))
    show.finish()
    assert out.getvalue().splitlines() == [
        "    0.4s [cycle c1] DECOMPOSING  BABS",
        "    3.0s [cycle c1] FAILED",
    ]
    assert show.cycle_id == "c1"


def test_off_a_terminal_a_long_state_is_repeated_now_and_then(monkeypatch):
    monkeypatch.setattr(chat_display, "QUIET_EVERY", 0.05)
    out = io.StringIO()
    show = ProgressPrinter(out, live=False)
    show(event("SYNTHESIZING", persona="BRICK", elapsed_s=1.0))
    time.sleep(0.06)
    show(event("SYNTHESIZING", persona="BRICK", elapsed_s=12.0))
    assert out.getvalue().splitlines()[-1] == "   12.0s [cycle c1] SYNTHESIZING  BRICK"


def test_on_a_terminal_the_time_counts_in_place():
    out = Terminal()
    show = ProgressPrinter(out)
    show(event("SYNTHESIZING", persona="BRICK", elapsed_s=1.0))
    show(event("SYNTHESIZING", persona="BRICK", elapsed_s=3.0))
    show(event("VALIDATING", elapsed_s=4.0))
    show.finish()
    assert out.getvalue() == (
        "    1.0s [cycle c1] SYNTHESIZING  BRICK"
        "\r    3.0s [cycle c1] SYNTHESIZING  BRICK\x1b[K"
        "\n    4.0s [cycle c1] VALIDATING\n"
    )


def test_streamed_text_is_printed_as_it_arrives():
    out = io.StringIO()
    show = ProgressPrinter(out, live=False)
    show(event("SYNTHESIZING", persona="BRICK", elapsed_s=1.0))
    seen = []
    for chunk in ("def hello(self):", "\n    return 'hi'", "\n"):
        show(event("SYNTHESIZING", persona="BRICK", text=chunk))
        seen.append(out.getvalue())
    show(event("SYNTHESIZING", persona="BRICK", elapsed_s=9.0))  # a tick while text flows
    show(event("VALIDATING", elapsed_s=9.5))
    show.finish()
    assert seen[0].endswith("SYNTHESIZING  BRICK\ndef hello(self):")
    assert seen[1].endswith("def hello(self):\n    return 'hi'")
    assert out.getvalue().endswith("    return 'hi'\n    9.5s [cycle c1] VALIDATING\n")


def test_streamed_text_on_the_wire_reaches_the_terminal_before_the_answer():
    proc, endpoint = spawn()
    try:
        child = pexpect.spawn(sys.executable, [CHAT, "--endpoint", endpoint, "--call",
                                               "genesis_obj", "stream", "one ", "two ", "three",
                                               "pause=1.0"],
                              encoding="utf-8", timeout=30)
        child.expect_exact("SYNTHESIZING  BRICK")
        child.expect_exact("one ")
        first = time.monotonic()
        child.expect_exact("two ")
        child.expect_exact("three")
        assert time.monotonic() - first >= 1.0  # each chunk came when it was sent
        child.expect_exact("COMPLETE (cycle c-stream): streamed")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == EXIT_OK
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(("reason", "shown"), [
    ("TypeError: factorial() takes 2 positional arguments but 4 were given",
     "TypeError: factorial() takes 1 argument but 3 were given"),
    ("TypeError: greet() takes from 1 to 2 positional arguments but 3 were given",
     "TypeError: greet() takes from 0 to 1 arguments but 2 were given"),
    ("TypeError: ping() takes 1 positional argument but 2 were given",
     "TypeError: ping() takes 0 arguments but 1 was given"),
    ("TypeError: f() missing 1 required positional argument: 'n'",
     "TypeError: f() missing 1 required positional argument: 'n'"),
])
def test_argument_counts_leave_out_self(reason, shown):
    assert explain_call_error(reason) == shown
    reply = Reply.failed("method_raised", reason)
    assert format_reply(reply) == f"FAILED: method_raised: {shown}"


def test_cancelled_and_failed_replies_and_their_exit_codes():
    cancelled = Reply.failed("cancelled", "cancelled on request; nothing was installed",
                             cycle_id="c9")
    assert format_reply(cancelled) == (
        "CANCELLED (cycle c9): cancelled on request; nothing was installed")
    assert exit_code(cancelled) == EXIT_CANCELLED
    assert exit_code(Reply.failed("cycle_failed", "no")) == EXIT_FAILED
    assert exit_code(Reply.complete(1)) == EXIT_OK


def test_a_demo_miss_lists_the_briefs_once():
    reply = Reply.failed("cycle_failed", "cognition: replay cassette demo.jsonl has no answer "
                         "for BABS in DECOMPOSING; the prompt starts: ...", cycle_id="c2")
    text = format_reply(reply, "send", ["create a method to say hello"])
    assert text.count("create a method to say hello") == 1
    assert "replay cassette" not in text and "no live model runs in a demo" in text


def test_cycles_line_up_whatever_the_selector_length():
    rows = [
        {"cycle_id": "20261122-003635-895a15", "status": "COMPLETE", "selector": "f",
         "target": "0x4", "started": 1795305600.0, "duration_s": 0.2, "attempts": 1},
        {"cycle_id": "20261122-003636-111111", "status": "FAILED",
         "selector": "a_rather_long_selector_name_that_goes_on_and_on", "target": "0x4",
         "started": 1795305660.0, "duration_s": 12.25, "attempts": 3, "reason": "no\nway",
         "replayed": True},
    ]
    lines = cycles_table(rows).splitlines()
    header, first, second = lines
    for column in ("status", "selector", "target", "started", "took", "attempts"):
        at = header.index(column)
        assert first[at - 2:at] == "  " and second[at - 2:at] == "  ", column
    assert when(1795305600.0) in first and "1795305600" not in first
    assert second.endswith("replayed; no way")


def test_inspect_shows_times_not_epoch_floats():
    info = {"oid": "0x4", "label": "genesis_obj", "parents": ["UvmObject oid=0x3 'pLLM_obj'"],
            "slots": {"motto": "'hi'"},
            "methods": {"factorial": {"version": 2, "kind": "source", "author": "BRICK",
                                      "cycle_id": "c1", "created": 1795305600.5}}}
    text = describe_listing(info)
    assert "1795305600" not in text and when(1795305600.5) in text
    assert "factorial  v2  source  by BRICK" in text and "motto = 'hi'" in text
    assert format_reply(Reply.complete(info), "inspect").startswith("COMPLETE:\ngenesis_obj")


def test_what_a_method_printed_is_shown_and_control_characters_are_not_obeyed() -> None:
    from batos_uvm.chat_display import format_reply
    from batos_uvm.protocol import ErrorInfo, Reply

    shown = format_reply(Reply(status="COMPLETE", result=3, output="hello\n\x1b[2Jgone\n"))
    assert shown.splitlines() == ["COMPLETE: 3", "printed:", "  | hello", "  | \\x1b[2Jgone"]
    failed = format_reply(Reply(status="FAILED", error=ErrorInfo(
        kind="method_raised", reason="ValueError: \x1b]0;owned\x07")))
    assert "\x1b" not in failed and "\x07" not in failed and "\\x1b]0;owned\\x07" in failed
