"""Recovery: from SIGKILL to a kernel answering ping again, and opening a large image.

Measured in one run, each as min / median / max over ``--runs`` samples:

* restarts, in rounds that alternate between two setups running side by side:
  the baseline, a *plain restart* (SIGKILL the kernel, start a new one at once,
  poll ping with a bridge client every 20 ms until it answers), and a restart by
  ``min_watchdog_service.py`` with its default backoff, each crash isolated (the
  kernel stays up longer than ``--backoff-reset`` before it is killed);
* a crash loop under the watchdog: the kernel is killed again as soon as it
  answers, ``--runs`` times, so the backoff grows as it would in a real crash
  loop: the time of each restart in order;
* the same plain restart on an image of 100,000 UvmObjects;
* opening that image (built once with plain FileStorage) up to its root and the
  top node of the tree holding the objects: in-process with its ``.index`` file
  (the baseline of this part) and without it (a full scan), the kernel's
  ``open_image`` without and with its ZEO server, a fresh process that imports
  ZODB and opens the image; and, for scale, loading every one of the objects.

Usage:
    python bench/recovery.py [--runs 7] [--objects 100000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import transaction  # noqa: E402
import ZODB  # noqa: E402
import ZODB.FileStorage  # noqa: E402
from benchutil import machine_load  # noqa: E402
from BTrees.IOBTree import IOBTree  # noqa: E402

from batos_uvm.client import BridgeClient, BridgeClientError  # noqa: E402
from batos_uvm.config import load_settings  # noqa: E402
from batos_uvm.image import open_image  # noqa: E402
from batos_uvm.objects import UvmObject  # noqa: E402
from tests.kernel_process import PYTHON, KernelProcess, run_env  # noqa: E402

WATCHDOG = ROOT / "min_watchdog_service.py"


def wait_for_ping(endpoint: str, *, not_boot: str | None = None, timeout: float = 120.0) -> str:
    """Poll ping every 20 ms; return the boot id of the first kernel (other than not_boot)."""
    deadline = time.monotonic() + timeout
    client = BridgeClient(endpoint, timeout=0.25, heartbeat_interval=0.05, dead_after=0.2,
                          retries=1)
    try:
        while time.monotonic() < deadline:
            try:
                reply = client.ping(timeout=0.25)
            except BridgeClientError:
                client.close()
                client = BridgeClient(endpoint, timeout=0.25, heartbeat_interval=0.05,
                                      dead_after=0.2, retries=1)
                time.sleep(0.02)
                continue
            if reply.ok and reply.result["boot_id"] != not_boot:
                return reply.result["boot_id"]
            time.sleep(0.02)
    finally:
        client.close()
    raise TimeoutError(f"no kernel answered at {endpoint} within {timeout} s")


def spawn_kernel(kernel: KernelProcess) -> subprocess.Popen[bytes]:
    log = open(kernel.log_path, "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(kernel.argv(), cwd=kernel.workdir, env=run_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


class PlainSetup:
    """A kernel restarted by hand: SIGKILL, then a new process at once."""

    def __init__(self, workdir: Path, db: str | None = None) -> None:
        self.kernel = KernelProcess(workdir, db=db)
        self.proc = spawn_kernel(self.kernel)
        self.boot = wait_for_ping(self.kernel.endpoint)

    def crash(self) -> float:
        started = time.perf_counter()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = spawn_kernel(self.kernel)
        self.boot = wait_for_ping(self.kernel.endpoint, not_boot=self.boot)
        return time.perf_counter() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


class WatchdogSetup:
    """A kernel under min_watchdog_service.py, with its default backoff."""

    def __init__(self, workdir: Path, extra: list[str] | None = None) -> None:
        self.kernel = KernelProcess(workdir)
        logs = workdir / "logs"
        self.status_file = logs / "watchdog.status.json"
        argv = [PYTHON, str(WATCHDOG), "--log-dir", str(logs), "--backoff-reset", "1",
                "--crash-loop-count", "100000", "--upgrade-dir", str(workdir),
                "--backup-dir", str(workdir / "backups"), *(extra or []), "--",
                *self.kernel.argv()[2:]]  # fmt: skip
        self.watchdog = subprocess.Popen(
            argv, cwd=workdir, env=run_env(), stdout=subprocess.DEVNULL,
            stderr=open(workdir / "watchdog.err", "ab"),  # noqa: SIM115
        )  # fmt: skip
        self.boot = wait_for_ping(self.kernel.endpoint)

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def wait_up(self) -> None:
        deadline = time.monotonic() + 60
        while self.status().get("state") != "up" and time.monotonic() < deadline:
            time.sleep(0.05)

    def crash(self, *, isolated: bool = True) -> float:
        self.wait_up()
        if isolated:
            time.sleep(1.3)  # longer than --backoff-reset: the restart uses the first delay
        pid = self.status()["kernel_pid"]
        started = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        self.boot = wait_for_ping(self.kernel.endpoint, not_boot=self.boot)
        return time.perf_counter() - started

    def close(self) -> None:
        self.watchdog.send_signal(signal.SIGTERM)
        self.watchdog.wait(timeout=60)


def paired_restarts(workdir: Path, runs: int) -> dict[str, list[float]]:
    """Plain and watchdog restarts in alternating order, both setups up at once."""
    plain = PlainSetup(workdir / "plain")
    watched = WatchdogSetup(workdir / "watchdog")
    out: dict[str, list[float]] = {"plain": [], "watchdog": []}
    try:
        for round_ in range(runs):
            order = [("plain", plain.crash), ("watchdog", watched.crash)]
            for name, crash in order if round_ % 2 == 0 else order[::-1]:
                out[name].append(crash())
        loop = [watched.crash(isolated=False) for _ in range(runs)]
    finally:
        plain.close()
        watched.close()
    out["loop"] = loop
    return out


def build_image(path: Path, objects: int) -> float:
    started = time.perf_counter()
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    conn = db.open()
    root = conn.root()
    proto = UvmObject(label="prototype", kind="bench")
    tree = root["objects"] = IOBTree()
    for number in range(objects):
        tree[number] = UvmObject(parents=[proto], n=number, name=f"object {number}")
        if number % 10_000 == 9_999:
            transaction.commit()
            conn.cacheMinimize()
    transaction.commit()
    db.close()
    return time.perf_counter() - started


def timed(action: Callable[[], None], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def open_plain(path: Path, *, index: bool) -> Callable[[], None]:
    def action() -> None:
        if not index:
            Path(str(path) + ".index").unlink(missing_ok=True)
        db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=not index))
        conn = db.open()
        conn.root()["objects"]._p_activate()  # the tree's top node, not all its buckets
        conn.close()
        db.close()

    return action


def open_kernel_way(path: Path, workdir: Path, *, zeo: bool) -> Callable[[], None]:
    settings = load_settings(None, {"db": str(path), "zeo": "127.0.0.1:0" if zeo else "off"},
                             environ={})

    def action() -> None:
        image = open_image(settings)
        conn = image.db.open()
        conn.root()["objects"]._p_activate()
        conn.close()
        image.close()

    return action


def load_everything(path: Path) -> Callable[[], None]:
    def action() -> None:
        db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True), cache_size=200_000)
        conn = db.open()
        total = sum(obj.n for obj in conn.root()["objects"].values())
        assert total >= 0
        db.close()

    return action


def run_process(argv: list[str]) -> Callable[[], None]:
    def action() -> None:
        subprocess.run(argv, check=True, env=run_env(), stdout=subprocess.DEVNULL)

    return action


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="batos-recovery-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_load(), flush=True)
    opening: dict[str, list[float]] = {}
    size = f"{args.objects // 1000}k" if args.objects >= 1000 else str(args.objects)
    try:
        big = workdir / "big" / "image.fs"
        big.parent.mkdir(exist_ok=True)
        if not big.exists():
            print(f"building an image of {args.objects:,} UvmObjects ...", flush=True)
            print(f"  built in {build_image(big, args.objects):.1f} s, "
                  f"{big.stat().st_size / 2**20:.1f} MiB", flush=True)
        open_script = ("import sys, ZODB, ZODB.FileStorage; db = ZODB.DB(ZODB.FileStorage."
                       "FileStorage(sys.argv[1], read_only=True)); db.open().root()['objects']"
                       "._p_activate(); db.close()")
        open_plain(big, index=True)()  # an up-to-date .index for the first sample
        actions = {
            "in-process, .index (baseline)": open_plain(big, index=True),
            "fresh process": run_process([PYTHON, "-c", open_script, str(big)]),
            "kernel open_image": open_kernel_way(big, workdir, zeo=False),
            "open_image + ZEO": open_kernel_way(big, workdir, zeo=True),
        }
        for round_ in range(args.runs):
            for name, action in list(actions.items())[:: 1 if round_ % 2 == 0 else -1]:
                opening.setdefault(name, []).extend(timed(action, 1))
        opening["no .index (scan)"] = timed(open_plain(big, index=False), args.runs)
        open_plain(big, index=True)()  # leave a fresh index for the kernel below
        opening["load every object"] = timed(load_everything(big), max(3, args.runs // 2))

        print("measuring restarts (plain and watchdog, alternating) ...", flush=True)
        restarts = paired_restarts(workdir, args.runs)
        print(f"measuring plain restarts on the {size} image ...", flush=True)
        big_kernel = PlainSetup(workdir / "plain-big", db=str(big))
        try:
            restarts[f"plain, {size} image"] = [big_kernel.crash() for _ in range(args.runs)]
        finally:
            big_kernel.close()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    summary: dict[str, float] = {}

    def table(title: str, rows: dict[str, list[float]], base: list[float]) -> None:
        print(f"\n{title}")
        print(f"  {'':34}{'min / median / max s':>28}{'runs':>6}{'median / baseline':>19}")
        for label, samples in rows.items():
            low, mid, high = min(samples), statistics.median(samples), max(samples)
            summary[f"{title}: {label}"] = mid
            print(f"  {label:34}{f'{low:.3f} / {mid:.3f} / {high:.3f}':>28}{len(samples):6d}"
                  f"{mid / statistics.median(base):18.2f}x")  # fmt: skip

    table("SIGKILL -> ping", {
        "plain restart (baseline)": restarts["plain"],
        "watchdog, isolated crash": restarts["watchdog"],
        f"plain restart, {size} image": restarts[f"plain, {size} image"],
    }, restarts["plain"])  # fmt: skip
    print("  watchdog crash loop (killed again once it answers), restart by restart:")
    print("   " + "  ".join(f"{s:.2f}" for s in restarts["loop"]) + " s")
    table(f"opening the {size}-object image", opening, opening["in-process, .index (baseline)"])
    print(machine_load())
    return summary


if __name__ == "__main__":
    main()
