#!/usr/bin/env python3
"""A stand-in kernel for the watchdog tests (standard library only).

It records what happens to it as JSON lines in --marker, reports readiness by writing
its pid into --ready, and misbehaves on request (crash, ignore SIGTERM, never get
ready, refuse to start). ``fake_kernel.py --probe READY`` is the matching health
check: exit 0 if READY names a live process, else 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def record(marker: Path | None, event: str, **extra: object) -> None:
    if marker is not None:
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **extra})
        with marker.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def probe(ready: Path) -> int:
    try:
        pid = int(ready.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return 2
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--probe", type=Path, help="health-check mode")
    p.add_argument("--marker", type=Path)
    p.add_argument("--ready", type=Path)
    p.add_argument("--ready-delay", type=float, default=0.0)
    p.add_argument("--never-ready", action="store_true")
    p.add_argument("--unready-after", type=float, help="delete the ready file after S s")
    p.add_argument("--crash-after", type=float, help="exit with --crash-code after S s")
    p.add_argument("--crash-code", type=int, default=1)
    p.add_argument("--crash-lines", type=int, default=0, help="lines printed before crashing")
    p.add_argument("--exit-after", type=float, help="exit 0 on its own after S s")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--fail-if-exists", type=Path, help="refuse to start if this path exists")
    p.add_argument("--child-pidfile", type=Path, help="start a child process, write its pid")
    p.add_argument("--max-life", type=float, default=120.0, help="orphan protection")
    p.add_argument("--db")  # accepted like the real kernel's options
    p.add_argument("--endpoint")
    args = p.parse_args(argv)
    if args.probe is not None:
        return probe(args.probe)

    if args.fail_if_exists is not None and args.fail_if_exists.exists():
        print(f"fake kernel: {args.fail_if_exists} exists, refusing to start", file=sys.stderr)
        record(args.marker, "refused")
        return 1
    record(args.marker, "start", argv=argv)
    if args.child_pidfile is not None:  # a helper process, as a real kernel might have
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        args.child_pidfile.write_text(str(child.pid))
    print(f"fake kernel {os.getpid()} started", flush=True)
    stop: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and args.ignore_sigterm:
            record(args.marker, "ignored", signal=name)
            return
        record(args.marker, "signal", signal=name)
        stop.append(name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    ready_written = False
    code = 0
    try:
        while not stop:
            age = time.monotonic() - t0
            if (
                args.ready
                and not args.never_ready
                and not ready_written
                and age >= args.ready_delay
            ):
                args.ready.write_text(str(os.getpid()))
                ready_written = True
            if args.unready_after is not None and age >= args.unready_after and args.ready:
                args.ready.unlink(missing_ok=True)
            if args.crash_after is not None and age >= args.crash_after:
                for i in range(args.crash_lines):
                    print(f"fake crash line {i}", file=sys.stderr)
                code = args.crash_code
                break
            if args.exit_after is not None and age >= args.exit_after or age >= args.max_life:
                break
            time.sleep(0.02)
    finally:
        if args.ready and ready_written:
            args.ready.unlink(missing_ok=True)
    record(args.marker, "exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
