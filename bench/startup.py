"""Start-up: how soon a kernel answers, with the default settings.

    python bench/startup.py [--runs 10] [--root CHECKOUT] [--workdir DIR]

Measured, each as min / p50 / p95 / max over ``--runs`` samples, interleaved
round by round so a change in machine load hits every measurement alike:

* baseline: a process that imports pyzmq and ormsgpack, binds a ROUTER and
  answers one ping: the floor any kernel start pays (interpreter, the two
  libraries, the bind);
* fresh image: ``batos.py`` on a path where no image exists yet, from spawn to
  the first answered ``ping``; then to the first answered ``inspect
  genesis_obj`` (the image is usable) and to ``status.ready`` (everything
  loaded in the background: embedder, catalog, models; a kernel that does not
  report readiness counts as ready at its first ping);
* existing image: the same on the image the fresh start left behind;
* clean stop: SIGTERM to process exit (after the existing-image sample);
* watchdog: ``min_watchdog_service.py`` with its default options supervises the
  kernel; SIGKILL the kernel, time until a kernel with a new boot id answers.
  Each kill waits until the watchdog has reset its backoff (the kernel healthy
  for ``--backoff-reset``, 60 s), so every sample is the restart of a kernel that
  had been running, not the growing delay of a crash loop.

The kernel runs as a user starts it: ``batos.py --db PATH --endpoint URL``,
nothing else (default embedder, default ZEO serving, no model configured). The
only non-default is the bridge port, a free one, because the machine is shared.
``--root`` measures another checkout (e.g. an older commit extracted with
``git archive``) with this checkout's client, so before/after figures come from
the same harness. Ratios are p50 over the baseline's p50. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from batos_uvm.client import BridgeClient, BridgeClientError  # noqa: E402

BASELINE_SERVER = """
import sys, zmq, ormsgpack
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    ident, frame = sock.recv_multipart()
    msg = ormsgpack.unpackb(frame)
    if msg.get("command") == "heartbeat":
        out = {"v": 1, "type": "heartbeat", "boot_id": "baseline"}
    else:
        out = {"v": 1, "type": "reply", "id": msg["id"], "status": "COMPLETE",
               "result": {"boot_id": "baseline", "ready": True}, "boot_id": "baseline"}
    sock.send_multipart([ident, ormsgpack.packb(out)])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment() -> dict[str, str]:
    """The user's environment without BATOS_* settings; offline, as on this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATOS_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Poller:
    """Asks the kernel at ``endpoint`` something every 20 ms until it answers."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = self._client()

    def _client(self) -> BridgeClient:
        return BridgeClient(self.endpoint, timeout=0.5, heartbeat_interval=0.05,
                            dead_after=0.2, retries=1)

    def until(self, ask: Callable[[BridgeClient], bool], timeout: float = 180.0) -> float:
        """Poll; return the perf_counter time of the first True answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ask(self.client):
                    return time.perf_counter()
            except BridgeClientError:
                self.client.close()
                self.client = self._client()
            time.sleep(0.02)
        raise TimeoutError(f"no answer from {self.endpoint} within {timeout:g} s")

    def close(self) -> None:
        self.client.close()


def ping_from(not_boot: str | None) -> Callable[[BridgeClient], bool]:
    def ask(client: BridgeClient) -> bool:
        reply = client.ping(timeout=0.5)
        return reply.ok and reply.result.get("boot_id") != not_boot

    return ask


def inspect_answers(client: BridgeClient) -> bool:
    return client.inspect("genesis_obj", timeout=0.5).ok


def ready(client: BridgeClient) -> bool:
    reply = client.ping(timeout=0.5)
    return reply.ok and bool(reply.result.get("ready", True))


class Bench:
    def __init__(self, root: Path, python: str, workdir: Path) -> None:
        self.root, self.python, self.workdir = root, python, workdir
        self.env = environment()

    def kernel_argv(self, db: Path, endpoint: str) -> list[str]:
        return [self.python, str(self.root / "batos.py"), "--db", str(db), "--endpoint", endpoint]

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(argv, cwd=self.workdir, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def baseline(self) -> float:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        started = time.perf_counter()
        proc = self.spawn([self.python, "-c", BASELINE_SERVER, endpoint],
                          self.workdir / "baseline.log")
        poller = Poller(endpoint)
        try:
            return poller.until(ping_from(None)) - started
        finally:
            poller.close()
            proc.kill()
            proc.wait()

    def kernel_start(self, db: Path) -> tuple[dict[str, float], subprocess.Popen[bytes]]:
        """Start a kernel on ``db``: seconds to ping, to inspect, to ready; the process."""
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        started = time.perf_counter()
        proc = self.spawn(self.kernel_argv(db, endpoint), db.parent / "kernel.log")
        poller = Poller(endpoint)
        try:
            times = {"ping": poller.until(ping_from(None)) - started}
            times["inspect"] = poller.until(inspect_answers) - started
            times["ready"] = poller.until(ready) - started
        except BaseException:
            proc.kill()
            raise
        finally:
            poller.close()
        return times, proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> float:
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        return time.perf_counter() - started

    def fresh_and_existing(self, number: int) -> dict[str, float]:
        image_dir = self.workdir / f"image-{number}"
        image_dir.mkdir()
        db = image_dir / "live_image.fs"
        fresh, proc = self.kernel_start(db)
        self.stop(proc)
        existing, proc = self.kernel_start(db)
        stopped = self.stop(proc)
        shutil.rmtree(image_dir, ignore_errors=True)
        return {
            **{f"fresh image: {k}": v for k, v in fresh.items()},
            **{f"existing image: {k}": v for k, v in existing.items()},
            "clean stop: SIGTERM -> exit": stopped,
        }


class WatchedKernel:
    """A kernel under the watchdog with its default options."""

    def __init__(self, bench: Bench) -> None:
        self.dir = bench.workdir / "watchdog"
        self.dir.mkdir()
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.status_file = self.dir / "logs" / "watchdog.status.json"
        kernel = bench.kernel_argv(self.dir / "live_image.fs", self.endpoint)
        argv = [bench.python, str(bench.root / "min_watchdog_service.py"),
                "--python", bench.python, "--log-dir", str(self.dir / "logs"),
                "--upgrade-dir", str(self.dir), "--backup-dir", str(self.dir / "backups"),
                "--", *kernel[2:]]
        self.proc = bench.spawn(argv, self.dir / "watchdog.out")
        self.poller = Poller(self.endpoint)
        self.boot = self._boot(None)
        self.kills = 0

    def _boot(self, not_boot: str | None) -> str:
        box: dict[str, str] = {}

        def ask(client: BridgeClient) -> bool:
            reply = client.ping(timeout=0.5)
            if reply.ok and reply.result.get("boot_id") != not_boot:
                box["boot"] = reply.result["boot_id"]
                return True
            return False

        self.poller.until(ask)
        return box["boot"]

    def status(self) -> dict[str, object]:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def backoff_resets(self) -> int:
        try:
            lines = (self.dir / "logs" / "watchdog.jsonl").read_text().splitlines()
        except OSError:
            return 0
        return sum(json.loads(line)["event"] == "backoff_reset" for line in lines)

    def kill_and_wait(self) -> float:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (
            self.status().get("state") != "up" or self.backoff_resets() < self.kills
        ):
            time.sleep(0.2)
        self.poller.until(ready)  # a kernel busy loading in the background is not idle
        pid = int(self.status()["kernel_pid"])
        started = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        self.kills += 1
        self.boot = self._boot(self.boot)
        return time.perf_counter() - started

    def close(self) -> None:
        self.poller.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def report(results: dict[str, list[float]]) -> None:
    baseline = statistics.median(results["baseline: zmq ROUTER answers a ping"])
    print(f"\n{'':44}{'min':>8}{'p50':>8}{'p95':>8}{'max':>8}{'runs':>6}{'p50/base':>10}")
    for label, samples in results.items():
        p50 = percentile(samples, 50)
        print(f"{label:44}{min(samples):8.2f}{p50:8.2f}{percentile(samples, 95):8.2f}"
              f"{max(samples):8.2f}{len(samples):6d}{p50 / baseline:9.1f}x")
    print("(seconds)")


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="samples of each (default 10)")
    parser.add_argument("--root", type=Path, default=HERE,
                        help="the BAT OS checkout to measure (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the kernel")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary "
                        "directory, removed afterwards)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    root = args.root.resolve()
    if not (root / "batos.py").is_file():
        parser.error(f"{root} holds no batos.py; --root names a BAT OS checkout")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="batos-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(root, args.python, workdir)
    results: dict[str, list[float]] = {"baseline: zmq ROUTER answers a ping": []}
    print(f"measuring {root} ({args.runs} rounds) ...", flush=True)
    watched = None
    try:
        watched = WatchedKernel(bench)
        for number in range(args.runs):
            results["baseline: zmq ROUTER answers a ping"].append(bench.baseline())
            for label, seconds in bench.fresh_and_existing(number).items():
                results.setdefault(label, []).append(seconds)
            results.setdefault("watchdog: SIGKILL -> ping", []).append(watched.kill_and_wait())
            print(f"  round {number + 1}: " + ", ".join(
                f"{label.split(':')[0]} {samples[-1]:.2f}"
                for label, samples in results.items() if label.endswith(("ping", "a ping"))),
                flush=True)
    finally:
        if watched is not None:
            watched.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    return results


if __name__ == "__main__":
    main()
