"""Recovery: from SIGKILL to a kernel answering ping again, and opening a large image.

Measured in one run, each as p50/p95 over ``--runs`` samples (with few samples
p95 is close to the worst run):

* baseline: a bare ``python -c "import ZODB"`` process, start to exit;
* plain restart: SIGKILL the kernel, start a new one at once, poll ping with an
  in-process bridge client every 20 ms until it answers (demo image; and the
  100,000-object image);
* watchdog restart: the same with ``min_watchdog_service.py`` doing the restart,
  with its default backoff (0.5 s) and with ``--backoff-initial 0.05``; between
  samples the kernel stays up longer than ``--backoff-reset`` so every sample
  starts from the initial delay;
* opening an image of 100,000 UvmObjects (built once with plain FileStorage),
  up to its root and the top node of the tree holding the objects:
  in-process with its ``.index`` file and without it (a full scan), the
  kernel's ``open_image`` without and with its ZEO server (open and close), a
  fresh process that imports ZODB and opens the image; and, for scale, opening
  it and loading every one of the 100,000 objects.

Ratios are against the baseline's p50. Usage:
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
sys.path.insert(0, str(ROOT))

import transaction  # noqa: E402
import ZODB  # noqa: E402
import ZODB.FileStorage  # noqa: E402
from BTrees.IOBTree import IOBTree  # noqa: E402

from batos_uvm.client import BridgeClient, BridgeClientError  # noqa: E402
from batos_uvm.config import load_settings  # noqa: E402
from batos_uvm.image import open_image  # noqa: E402
from batos_uvm.objects import UvmObject  # noqa: E402
from tests.kernel_process import PYTHON, KernelProcess, run_env  # noqa: E402

WATCHDOG = ROOT / "min_watchdog_service.py"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


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


def plain_restarts(workdir: Path, runs: int, db: str | None = None) -> list[float]:
    kernel = KernelProcess(workdir, db=db)
    proc = spawn_kernel(kernel)
    boot = wait_for_ping(kernel.endpoint)
    samples = []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc = spawn_kernel(kernel)
            boot = wait_for_ping(kernel.endpoint, not_boot=boot)
            samples.append(time.perf_counter() - started)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return samples


def watchdog_restarts(workdir: Path, runs: int, extra: list[str]) -> list[float]:
    kernel = KernelProcess(workdir)
    logs = workdir / "logs"
    status_file = logs / "watchdog.status.json"
    argv = [PYTHON, str(WATCHDOG), "--log-dir", str(logs), "--backoff-reset", "1",
            "--crash-loop-count", "100000", "--upgrade-dir", str(workdir),
            "--backup-dir", str(workdir / "backups"), *extra, "--", *kernel.argv()[2:]]
    watchdog = subprocess.Popen(argv, cwd=workdir, env=run_env(), stdout=subprocess.DEVNULL,
                                stderr=open(workdir / "watchdog.err", "ab"))  # noqa: SIM115
    samples = []

    def status() -> dict:
        try:
            return json.loads(status_file.read_text())
        except (OSError, ValueError):
            return {}

    try:
        boot = wait_for_ping(kernel.endpoint)
        for _ in range(runs):
            deadline = time.monotonic() + 60
            while status().get("state") != "up" and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.3)  # longer than --backoff-reset: the next restart uses the first delay
            pid = status()["kernel_pid"]
            started = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            boot = wait_for_ping(kernel.endpoint, not_boot=boot)
            samples.append(time.perf_counter() - started)
    finally:
        watchdog.send_signal(signal.SIGTERM)
        watchdog.wait(timeout=60)
    return samples


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
    results: dict[str, list[float]] = {}
    size = f"{args.objects // 1000}k" if args.objects >= 1000 else str(args.objects)
    try:
        results["baseline: python -c 'import ZODB'"] = timed(
            run_process([PYTHON, "-c", "import ZODB"]), args.runs)

        big = workdir / "big" / "image.fs"
        big.parent.mkdir(exist_ok=True)
        if not big.exists():
            print(f"building an image of {args.objects:,} UvmObjects ...", flush=True)
            print(f"  built in {build_image(big, args.objects):.1f} s, "
                  f"{big.stat().st_size / 2**20:.1f} MiB", flush=True)
        open_script = ("import sys, ZODB, ZODB.FileStorage; db = ZODB.DB(ZODB.FileStorage."
                       "FileStorage(sys.argv[1], read_only=True)); db.open().root()['objects']"
                       "._p_activate(); db.close()")
        results[f"open {size} image: fresh process"] = timed(
            run_process([PYTHON, "-c", open_script, str(big)]), args.runs)
        results[f"open {size} image: in-process, .index"] = timed(open_plain(big, index=True),
                                                                args.runs)
        results[f"open {size} image: kernel open_image"] = timed(
            open_kernel_way(big, workdir, zeo=False), args.runs)
        results[f"open {size} image: open_image + ZEO"] = timed(
            open_kernel_way(big, workdir, zeo=True), args.runs)
        results[f"open {size} image: no .index (scan)"] = timed(open_plain(big, index=False),
                                                              args.runs)
        open_plain(big, index=True)()  # leave a fresh index for the kernel below
        results[f"open {size} image + load every object"] = timed(load_everything(big),
                                                                  max(3, args.runs // 2))

        print("measuring plain restarts ...", flush=True)
        results["SIGKILL -> ping: plain restart"] = plain_restarts(workdir / "plain", args.runs)
        results[f"SIGKILL -> ping: plain, {size} image"] = plain_restarts(
            workdir / "plain-big", args.runs, db=str(big))
        print("measuring restarts under the watchdog ...", flush=True)
        results["SIGKILL -> ping: watchdog default"] = watchdog_restarts(
            workdir / "wd-default", args.runs, [])
        results["SIGKILL -> ping: watchdog 0.05s"] = watchdog_restarts(
            workdir / "wd-fast", args.runs, ["--backoff-initial", "0.05", "--start-poll", "0.1"])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    baseline = statistics.median(results["baseline: python -c 'import ZODB'"])
    print(f"\n{'':38}{'p50 s':>9}{'p95 s':>9}{'runs':>6}{'p50 / baseline':>17}")
    summary: dict[str, float] = {}
    for label, samples in results.items():
        p50, p95 = percentile(samples, 50), percentile(samples, 95)
        summary[f"{label} p50"], summary[f"{label} p95"] = p50, p95
        print(f"{label:38}{p50:9.3f}{p95:9.3f}{len(samples):6d}{p50 / baseline:16.2f}x")
    return summary


if __name__ == "__main__":
    main()
