"""A real BAT OS kernel as a subprocess, for tests and benchmarks.

    from tests.kernel_process import KernelProcess

    with KernelProcess(tmp_path) as kernel:        # starts, waits for --ping, stops at exit
        kernel.call("genesis_obj", "factorial", 5)  # chat_client.py --call ...
        kernel.shell("print(ls(genesis))")          # batos.py shell -c ...
        kernel.kill()                               # SIGKILL, like a power cut
        kernel.start()                              # same image, same bridge port

Every kernel gets a free loopback port for its bridge (kept across restarts, so
clients find it again), its image in ``workdir`` (``live_image.fs`` unless ``db=``
names one, e.g. ``zeo://127.0.0.1:PORT``), replayed answers from a cassette (the
demo cassette unless ``cassette=``) and the hashing embedder (fast start, no
model files). It runs in its own process group with its output in
``workdir/<name>.log``. Nothing here mocks anything: the commands are the ones a
user types.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATOS = ROOT / "batos.py"
CHAT_CLIENT = ROOT / "chat_client.py"
DEMO_CASSETTE = ROOT / "demo" / "demo_cassette.jsonl"
PYTHON = sys.executable

__all__ = ["KernelProcess", "KernelFailed", "free_port", "run_env", "DEMO_CASSETTE"]


class KernelFailed(RuntimeError):
    """The kernel exited or did not answer in time; the message holds its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_env(**extra: str) -> dict[str, str]:
    """Environment for kernel, client and shell subprocesses: offline, unbuffered."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1", BATOS_HISTORY=os.devnull,
               BATOS_SHELL_HISTORY=os.devnull)
    for name in [n for n in env if n.startswith("BATOS_") and "HISTORY" not in n
                 and n != "BATOS_MODEL_DIR"]:  # fmt: skip
        env.pop(name, None)  # the arguments below decide, not the caller's shell
    env.update(extra)
    return env


class KernelProcess:
    """One kernel subprocess; see the module docstring."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        db: str | None = None,
        cassette: str | os.PathLike[str] | None = None,
        embedder: str = "hashing",
        port: int | None = None,
        extra_args: tuple[str, ...] | list[str] = (),
        name: str = "kernel",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = db or str(self.workdir / "live_image.fs")
        self.cassette = Path(cassette) if cassette else DEMO_CASSETTE
        self.embedder = embedder
        self.port = port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.name = name
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- paths ------------------------------------------------------------------------------
    @property
    def db_path(self) -> Path | None:
        """The FileStorage file, or None for a ``zeo://`` kernel."""
        return None if "://" in self.db else Path(self.db).resolve()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def argv(self) -> list[str]:
        return [PYTHON, str(BATOS), "--db", self.db, "--endpoint", self.endpoint,
                "--backend", f"replay:{self.cassette}", "--embedder", self.embedder,
                "--log-level", "WARNING", *self.extra_args]

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> KernelProcess:
        """Start the kernel and return once it reports everything loaded."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> KernelProcess:
        """Start the kernel process and return at once."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (PID {self.pid})")
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(), cwd=self.workdir, env=run_env(), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the kernel reports everything loaded (it answers ping sooner, while loading)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise KernelFailed(f"{self.name} exited with code {code} before it was "
                                   f"ready:\n{self.log_tail()}")
            status = self.status(timeout=1.0)
            if status is not None and status.get("ready", True):
                return
            time.sleep(0.05)
        raise KernelFailed(f"{self.name} was not ready within {timeout} s:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the kernel (its whole process group) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean shutdown); SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def restart(self, timeout: float = 60.0) -> KernelProcess:
        """Kill -9 and start again on the same image and port."""
        self.kill()
        return self.start(timeout)

    def __enter__(self) -> KernelProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=15.0)

    # -- talking to it ----------------------------------------------------------------------
    def chat(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``chat_client.py --endpoint ENDPOINT ARGS...`` (stdout/stderr captured as text)."""
        return subprocess.run(
            [PYTHON, str(CHAT_CLIENT), "--endpoint", self.endpoint, *args],
            capture_output=True, text=True, timeout=timeout, env=run_env(), cwd=self.workdir)

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            done = self.chat("--ping", "--timeout", str(timeout), timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """What ``ping`` answers (readiness among it), or None when nothing answers."""
        try:
            done = self.chat("--json", "--ping", "--timeout", str(timeout), timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        return json.loads(done.stdout).get("result") or {}

    def call(self, target: str, selector: str, *args: Any,
             timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``chat_client.py --call TARGET SELECTOR ARGS...``; each arg is passed as JSON."""
        words = [a if isinstance(a, str) else json.dumps(a) for a in args]
        return self.chat("--call", target, selector, *words, timeout=timeout)

    def call_json(self, target: str, selector: str, *args: Any,
                  timeout: float = 120.0) -> dict[str, Any]:
        """Like :meth:`call` with ``--json``: the reply as a dict."""
        words = [a if isinstance(a, str) else json.dumps(a) for a in args]
        done = self.chat("--json", "--call", target, selector, *words, timeout=timeout)
        if not done.stdout.strip():
            raise KernelFailed(f"no reply (exit {done.returncode}): {done.stderr}")
        return json.loads(done.stdout)

    def shell(self, code: str, *, write: bool = False, db: str | None = None,
              timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``batos.py shell --db DB [--write] -c CODE`` on this kernel's image."""
        return run_shell(db or self.db, code, write=write, cwd=self.workdir, timeout=timeout)

    def zeo_address(self) -> tuple[str, int] | str | None:
        """The ZEO server this kernel announced in ``<image>.zeo.json`` (None if none)."""
        if self.db_path is None:
            return None
        try:
            data = json.loads(self.db_path.with_name(self.db_path.name + ".zeo.json").read_text())
        except (OSError, ValueError):
            return None
        if data.get("pid") != self.pid:
            return None
        if "socket" in data:
            return data["socket"]
        return data["host"], int(data["port"])

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def run_shell(db: str, code: str, *, write: bool = False, cwd: str | os.PathLike[str] | None = None,
              timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``batos.py shell --db DB [--write] -c CODE``, kernel or not."""
    argv = [PYTHON, str(BATOS), "shell", "--db", db, *(["--write"] if write else []), "-c", code]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=run_env(),
                          cwd=cwd)
