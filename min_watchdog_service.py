#!/usr/bin/env python3
"""BAT OS watchdog: keeps the kernel alive and applies allopoietic upgrades.

Standard library only, so it keeps working after an upgrade breaks the virtualenv.

    python min_watchdog_service.py [watchdog options] -- [batos.py options]

Everything after ``--`` goes to the kernel unchanged. This file supervises the
kernel; the upgrade half lives in watchdog_upgrade.py beside it. See
docs/WATCHDOG.md and docs/UPGRADES.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The upgrade half lives beside this file. Run as a script, its directory is sys.path[0];
# loaded by file path (tests, runpy) it may not be on sys.path at all.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from watchdog_upgrade import (  # noqa: E402
    INSTRUCTIONS,
    MAX_INSTRUCTION_BYTES,
    RESULT,
    SIGKILL,
    STEP_TIMEOUTS,
    InstructionError,
    UpgradeFailed,
    Upgrades,
    backup_image,
    exit_text,
    free_path,
    prune_backups,
    restore_image,
    run_command,
    signal_group,
    spawn,
    terminate,
    utc_now,
    validate_instructions,
    write_json,
)

__all__ = [  # the upgrade names are re-exported for callers of this module
    "DEFAULT_ENDPOINT",
    "EXIT_CRASH_LOOP",
    "EXIT_KERNEL_REFUSED",
    "INSTRUCTIONS",
    "MAX_INSTRUCTION_BYTES",
    "RESULT",
    "STEP_TIMEOUTS",
    "InstructionError",
    "UpgradeFailed",
    "Watchdog",
    "backup_image",
    "free_path",
    "kernel_option",
    "main",
    "parse_args",
    "prune_backups",
    "restore_image",
    "run_command",
    "validate_instructions",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
EXIT_CRASH_LOOP = 3
# batos.py exits 2 when it cannot start as configured (a bad option or setting, an image
# it refuses, an address in use), having said why in one line; restarting cannot help.
EXIT_KERNEL_REFUSED = 2


def kernel_option(args: list[str], name: str, default: str) -> str:
    """Value of ``--name X`` / ``--name=X`` among the kernel's arguments (last one wins)."""
    value = default
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def tail_lines(path: Path, n: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * n))
            return f.read().decode("utf-8", "replace").splitlines()[-n:]
    except OSError:
        return []


# == watchdog ==================================================================================
class Watchdog(Upgrades):
    """Supervises one kernel process; see docs/WATCHDOG.md for the behaviour."""

    def __init__(self, cfg: argparse.Namespace) -> None:
        self.cfg = cfg
        self.kernel_cmd = [cfg.python, str(cfg.kernel), *cfg.kernel_args]
        self.endpoint = kernel_option(
            cfg.kernel_args, "--endpoint", os.environ.get("BATOS_ENDPOINT", DEFAULT_ENDPOINT)
        )
        # the kernel's own defaults and environment variables, so the same image is backed up
        db = kernel_option(cfg.kernel_args, "--db", os.environ.get("BATOS_DB", "live_image.fs"))
        blob = kernel_option(cfg.kernel_args, "--blob-dir", os.environ.get("BATOS_BLOB_DIR", ""))
        self.db = None if "://" in db else Path(db).absolute()  # zeo://: not a local file
        self.blob_dir = Path(blob).absolute() if blob else None
        probe = "--ping --endpoint {endpoint} --timeout 2".split()
        default_probe = [cfg.python, str(HERE / "chat_client.py"), *probe]
        self.health_cmd = [
            a.replace("{endpoint}", self.endpoint).replace("{python}", cfg.python)
            for a in (cfg.health_cmd or default_probe)
        ]
        self.kernel_log = cfg.log_dir / "kernel.log"
        self.proc: subprocess.Popen | None = None
        self.state, self.started_at, self.kernel_started_at = "starting", utc_now(), None
        self.starts, self.last_upgrade = 0, None
        self.delay = cfg.backoff_initial
        self.crashes: collections.deque[float] = collections.deque()
        self.up_since: float | None = None
        self.ever_up = False  # has any kernel of this watchdog answered yet?
        self.health_failures, self.next_health, self.next_upgrade_poll = 0, 0.0, 0.0
        self.seen_instructions: tuple[int, int] | None = None
        self.stop_signal, self.signal_count = 0, 0

    # -- bookkeeping
    def log(self, event: str, **details: Any) -> None:
        record = {"ts": utc_now(), "event": event, "details": details}
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.cfg.log_dir / "watchdog.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        brief = " ".join(f"{k}={v}" for k, v in details.items() if k != "log_tail")
        line = f"[watchdog {record['ts'][11:23]}] {event} {brief}".rstrip()
        print(line, file=sys.stderr, flush=True)

    def set_state(self, state: str) -> None:
        self.state = state
        running = self.proc is not None and self.proc.poll() is None
        write_json(
            self.cfg.status_file,
            {
                "watchdog_pid": os.getpid(),
                "kernel_pid": self.proc.pid if running else None,
                "state": state,
                "endpoint": self.endpoint,
                "db": str(self.db),
                "started_at": self.started_at,
                "kernel_started_at": self.kernel_started_at,
                "restarts": max(self.starts - 1, 0),
                "last_upgrade": self.last_upgrade,
                "updated_at": utc_now(),
            },
        )

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.signal_count += 1
        self.stop_signal = self.stop_signal or signum

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_signal and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    # -- the kernel process
    def start_kernel(self) -> None:
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        with self.kernel_log.open("ab") as log:
            log.write(f"--- watchdog: starting kernel at {utc_now()}\n".encode())
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # crash output reaches the log
            try:
                self.proc = spawn(self.kernel_cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            except OSError as exc:
                self.proc = None
                self.log("kernel_spawn_failed", error=str(exc), cmd=self.kernel_cmd)
                return
        self.starts += 1
        self.kernel_started_at, self.up_since = utc_now(), None
        self.log("kernel_started", pid=self.proc.pid, cmd=self.kernel_cmd)
        self.set_state("starting")

    def stop_kernel(self, why: str) -> None:
        """Graceful stop: the received signal (else SIGTERM), SIGKILL after --stop-timeout."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            sig = self.stop_signal or signal.SIGTERM
            self.log("kernel_stopping", pid=proc.pid, reason=why, signal=signal.Signals(sig).name)
            # a second signal to the watchdog means: do not wait any longer
            killed = terminate(proc, self.cfg.stop_timeout, lambda: self.signal_count >= 2, sig)
            if killed:
                self.log("kernel_killed", pid=proc.pid, after_s=self.cfg.stop_timeout)
        self.log("kernel_stopped", pid=proc.pid, exit_code=proc.wait())

    def probe(self) -> bool:
        """Run the health command; False if it fails, times out, or the kernel dies meanwhile.

        The kernel is watched while the probe runs: a kernel killed during a probe is
        restarted at once, not after the probe has waited out its own timeout.
        """
        quiet = {
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.DEVNULL,
            "stderr": subprocess.STDOUT,
        }
        try:
            check = subprocess.Popen(self.health_cmd, **quiet)
        except OSError:
            return False
        deadline = time.monotonic() + self.cfg.probe_timeout
        try:
            while (code := check.poll()) is None:
                kernel_gone = self.proc is None or self.proc.poll() is not None
                if kernel_gone or self.stop_signal or time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
            return code == 0
        finally:
            if check.poll() is None:
                check.kill()
                check.wait()

    def wait_healthy(self, timeout: float) -> tuple[bool, str]:
        """Probe until the kernel answers; gives up if it exits, a stop arrives or on timeout."""
        deadline = time.monotonic() + timeout
        while not self.stop_signal:
            if self.proc is None or self.proc.poll() is not None:
                return False, f"kernel {exit_text(self.proc and self.proc.returncode)} early"
            if self.probe():
                self.up_since, self.health_failures = time.monotonic(), 0
                self.ever_up = True
                self.next_health = self.up_since + self.cfg.health_interval
                self.log("kernel_up", pid=self.proc.pid)
                self.set_state("up")
                return True, "up"
            if time.monotonic() >= deadline:
                return False, f"kernel did not answer the health check within {timeout:g} s"
            self.sleep(self.cfg.start_poll)
        return False, "stop requested"

    def on_failure(self, reason: str) -> int | None:
        """Count a crash; back off and restart, or give up on a crash loop (exit code)."""
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.cfg.crash_loop_window:
            self.crashes.popleft()
        self.log("kernel_failed", reason=reason, recent_failures=len(self.crashes))
        if len(self.crashes) >= self.cfg.crash_loop_count:
            tail = tail_lines(self.kernel_log, self.cfg.tail_lines)
            why = (
                f"crash loop: {len(self.crashes)} failures within "
                f"{self.cfg.crash_loop_window:g} s; not restarting"
            )
            self.log("crash_loop", reason=why, kernel_log=str(self.kernel_log), log_tail=tail)
            print(
                f"watchdog: {why}. Last {len(tail)} lines of {self.kernel_log}:",
                *("  | " + line for line in tail),
                sep="\n",
                file=sys.stderr,
                flush=True,
            )
            self.set_state("crash_loop")
            return EXIT_CRASH_LOOP
        self.log("restart_scheduled", delay_s=self.delay)
        self.set_state("backoff")
        self.sleep(self.delay)
        self.delay = min(self.delay * self.cfg.backoff_factor, self.cfg.backoff_max)
        if not self.stop_signal:
            self.start_kernel()
        return None

    def on_refusal(self) -> int:
        """The first kernel refused its settings: say why and stop (restarts cannot help)."""
        tail = [line for line in tail_lines(self.kernel_log, self.cfg.tail_lines)
                if line.strip() and not line.startswith("--- watchdog:")][-5:]
        self.log("kernel_refused", exit_code=EXIT_KERNEL_REFUSED, kernel_log=str(self.kernel_log),
                 log_tail=tail)
        print("watchdog: the kernel refused to start, so it is not restarted:",
              *("  | " + line for line in tail), sep="\n", file=sys.stderr, flush=True)
        self.set_state("refused")
        return EXIT_KERNEL_REFUSED

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.log("watchdog_started", pid=os.getpid(), endpoint=self.endpoint, db=str(self.db))
        try:
            self.recover_interrupted_upgrade()
            self.start_kernel()
            while not self.stop_signal:
                code = self.step()
                if code is not None:
                    return code
        except Exception as exc:  # a bug here must not leave an unsupervised kernel behind
            self.log("watchdog_error", error=repr(exc))
            self.stop_kernel("watchdog error")
            self.set_state("stopped")
            raise
        self.set_state("stopping")
        self.stop_kernel(f"watchdog received {signal.Signals(self.stop_signal).name}")
        self.set_state("stopped")
        return 0

    def step(self) -> int | None:
        """One turn of the supervision loop; an int means exit with that code."""
        if self.proc is None:
            return self.on_failure("kernel could not be started")
        if (rc := self.proc.poll()) is not None:
            signal_group(self.proc, SIGKILL)  # orphans could hold the image lock or the port
            self.proc = None
            if rc == 0:
                self.log("kernel_exited", exit_code=0, action="watchdog stops")
                self.set_state("stopped")
                return 0
            if rc == EXIT_KERNEL_REFUSED and not self.ever_up:
                return self.on_refusal()
            return self.on_failure(f"kernel {exit_text(rc)}")
        if self.state != "up":
            ok, detail = self.wait_healthy(self.cfg.start_timeout)
            if not ok and self.proc and self.proc.poll() is None and not self.stop_signal:
                self.stop_kernel(detail)
                return self.on_failure(detail)
            return None
        now = time.monotonic()
        if self.delay != self.cfg.backoff_initial and now - self.up_since >= self.cfg.backoff_reset:
            self.delay = self.cfg.backoff_initial
            self.log("backoff_reset", delay_s=self.delay)
        if now >= self.next_health:
            self.next_health = now + self.cfg.health_interval
            if self.probe():
                self.health_failures = 0
            elif self.proc.poll() is not None:
                return None  # it died during the probe: the next step restarts it
            else:
                self.health_failures += 1
                self.log("health_check_failed", consecutive=self.health_failures)
                if self.health_failures >= self.cfg.health_failures:
                    why = f"{self.health_failures} consecutive failed health checks"
                    self.stop_kernel(why)
                    return self.on_failure(why)
        if now >= self.next_upgrade_poll:
            self.next_upgrade_poll = now + self.cfg.upgrade_poll
            self.poll_upgrade()
        self.sleep(0.1)
        return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    own, kernel_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    a("--python", default=sys.executable, help="interpreter that runs the kernel and pip")
    a("--kernel", type=Path, default=HERE / "batos.py", help="kernel script")
    a("--log-dir", type=Path, default=Path("logs"), help="kernel.log and watchdog.jsonl")
    a("--status-file", type=Path, help="JSON status; %(default)s: LOG_DIR/watchdog.status.json")
    # a kernel answers within about a second of starting: the first restart need not wait long
    a("--backoff-initial", type=float, default=0.1, help="first restart delay, s")
    a("--backoff-factor", type=float, default=2.0, help="delay multiplier per failure")
    a("--backoff-max", type=float, default=30.0, help="largest restart delay, s")
    a("--backoff-reset", type=float, default=60.0, help="healthy time that resets the delay, s")
    a("--crash-loop-count", type=int, default=5, help="failures that make a crash loop ...")
    a("--crash-loop-window", type=float, default=60.0, help="... within this many seconds")
    a("--tail-lines", type=int, default=50, help="kernel log lines reported on a crash loop")
    a("--stop-timeout", type=float, default=30.0, help="SIGKILL after this many s")
    a("--start-timeout", type=float, default=120.0, help="time to first healthy answer, s")
    a("--start-poll", type=float, default=1.0, help="probe interval while starting, s")
    a("--health-interval", type=float, default=10.0, help="probe interval once up, s")
    a("--health-failures", type=int, default=3, help="consecutive failed probes -> restart")
    a("--probe-timeout", type=float, default=10.0, help="time limit for one probe, s")
    a(
        "--health-cmd",
        type=json.loads,
        help="probe argv as a JSON list ({endpoint}, {python} filled in); %(default)s: "
        "chat_client.py --ping",
    )
    a("--upgrade-dir", type=Path, default=HERE, help=f"where {INSTRUCTIONS} is looked for")
    a("--upgrade-poll", type=float, default=1.0, help="seconds between looks")
    a("--repo", type=Path, default=HERE, help="git checkout that upgrades change")
    a("--backup-dir", type=Path, default=Path("backups"), help="image backups before upgrades")
    a("--keep-backups", type=int, default=5, help="backups kept after a successful upgrade")
    cfg = p.parse_args(own)
    if cfg.health_cmd is not None and (
        not isinstance(cfg.health_cmd, list)
        or not cfg.health_cmd
        or not all(isinstance(x, str) for x in cfg.health_cmd)
    ):
        p.error("--health-cmd must be a JSON list of strings")
    for name, value in vars(cfg).items():
        if isinstance(value, int | float) and not value > 0 and name != "keep_backups":
            p.error(f"--{name.replace('_', '-')} must be greater than 0")
    if cfg.backoff_factor < 1:
        p.error("--backoff-factor must be at least 1")
    for name in ("log_dir", "upgrade_dir", "repo", "backup_dir", "kernel"):
        setattr(cfg, name, getattr(cfg, name).absolute())
    cfg.status_file = (cfg.status_file or cfg.log_dir / "watchdog.status.json").absolute()
    cfg.kernel_args = kernel_args
    return cfg


def main(argv: list[str] | None = None) -> int:
    return Watchdog(parse_args(sys.argv[1:] if argv is None else argv)).run()


if __name__ == "__main__":
    sys.exit(main())
