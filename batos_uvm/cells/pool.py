"""Cell processes and the warm pool the kernel takes them from.

A cell is started from a minimal entry point (``python -I -S``, never a fork
of the kernel): no inherited descriptors but its end of a socket pair, an
empty environment, a private working directory removed once it is ready. The pool keeps
``size`` cells warm; a cell that crashed, was killed, broke the protocol or
served ``max_calls`` calls is replaced in the background.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire
from .sandbox import LAYERS

log = logging.getLogger("batos.cells")

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
_ORMSGPACK_DIR = str(Path(wire.ormsgpack.__file__).resolve().parent.parent)


def _bootstrap() -> str:
    extra = [_ORMSGPACK_DIR]
    try:
        import pyseccomp

        extra.append(str(Path(pyseccomp.__file__).resolve().parent))
    except (ImportError, RuntimeError, OSError):
        pass
    return (
        "import sys, types, ctypes.util\n"
        "package = types.ModuleType('batos_uvm')\n"
        f"package.__path__ = [{_PACKAGE_DIR!r}]\n"
        "sys.modules['batos_uvm'] = package  # not the package's __init__: only what cells need\n"
        f"sys.path[:0] = {sorted(set(extra))!r}\n"
        f"known = {{'seccomp': {ctypes.util.find_library('seccomp')!r}}}\n"
        "find = ctypes.util.find_library\n"
        "ctypes.util.find_library = lambda name: known.get(name) or find(name)\n"
        "from batos_uvm.cells import runner\n"
        "runner.main()\n"
    )


_BOOTSTRAP = _bootstrap()
_STDERR_TAIL = 4096


class CellFailure(Exception):
    """A cell stopped serving a call: it died, overran its time or broke the protocol."""

    kind = "cell_failed"


class CellTimeout(CellFailure):
    kind = "method_timeout"


class CellCrashed(CellFailure):
    kind = "cell_crashed"


class CellProtocolError(CellFailure):
    kind = "cell_protocol"


@dataclass
class CellConfig:
    """How cells are started and contained (see docs/CELLS.md)."""

    memory_bytes: int = 512 * 2**20
    cpu_per_call: float = 30.0
    cpu_lifetime: int = 3600
    layers: tuple[str, ...] = LAYERS
    max_calls: int = 1000
    startup_timeout: float = 20.0
    limits: wire.Limits = field(default_factory=wire.Limits)
    unrestricted: bool = False  # full builtins: only for tests of the OS layers alone

    @classmethod
    def from_settings(cls, settings: Any) -> CellConfig:
        """How a kernel with these settings contains its cells (docs/CELLS.md)."""
        # What a cell may hand the kernel in one frame: room for a caller's whole
        # argument and then some (a method returning or storing it never fails on a
        # limit the argument set); little enough that decoding it on the event
        # loop stays short (a byte can decode to an object: an empty list).
        frame = max(2**20, settings.max_message_bytes) + 64 * 1024
        return cls(
            memory_bytes=settings.cell_memory_mb * 2**20,
            cpu_per_call=max(settings.method_timeout, settings.trial_wall_seconds) + 1,
            max_calls=settings.cell_max_calls,
            limits=wire.Limits(max_bytes=frame),
        )

    def child_config(self) -> dict[str, Any]:
        return {
            "memory_bytes": self.memory_bytes,
            "cpu_seconds": self.cpu_lifetime,
            "cpu_per_call": self.cpu_per_call,
            "layers": list(self.layers),
            "max_calls": self.max_calls,
            "max_frame": self.limits.max_bytes,
            "unrestricted": self.unrestricted,
        }


class Cell:
    """One running cell process and the kernel's end of its socket."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: CellConfig,
    ) -> None:
        self.proc, self.reader, self.writer, self.config = proc, reader, writer, config
        self.pid = proc.pid
        self.layers: dict[str, str] = {}
        self.calls = 0
        self.known: set[str] = set()  # method sources this cell was sent (it may forget some)
        self.tag: Any = None  # the receiver it serves, once it ran a method
        self.started = time.monotonic()
        self._stderr = b""
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        while chunk := await stream.read(65536):
            self._stderr = (self._stderr + chunk)[-_STDERR_TAIL:]

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_bytes(wire.encode(message))

    async def send_bytes(self, payload: bytes) -> None:
        try:
            self.writer.write(wire.frame(payload))
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise await self._died(f"its socket closed ({exc})") from None

    async def receive(self, timeout: float) -> dict[str, Any]:
        """The next message, or CellTimeout/CellCrashed/CellProtocolError."""
        try:
            async with asyncio.timeout(max(timeout, 0)):
                header = await self.reader.readexactly(wire.HEADER.size)
                (length,) = wire.HEADER.unpack(header)
                if length > self.config.limits.max_bytes:
                    raise CellProtocolError(
                        f"the cell sent {length} bytes; the limit is "
                        f"{self.config.limits.max_bytes}"
                    )
                payload = await self.reader.readexactly(length)
        except TimeoutError:
            raise CellTimeout("timeout") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            raise await self._died("it stopped") from None
        try:
            message = wire.decode(payload, self.config.limits)
        except wire.WireError as exc:
            raise CellProtocolError(f"the cell sent data that is not plain: {exc}") from None
        if type(message) is not dict or type(message.get("op")) is not str:
            raise CellProtocolError("the cell sent a message without an op")
        return message

    async def _died(self, what: str) -> CellCrashed:
        try:
            await asyncio.wait_for(self.proc.wait(), 2.0)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
        return CellCrashed(self.exit_reason(what))

    def exit_reason(self, what: str = "it stopped") -> str:
        code = self.proc.returncode
        if code is None:
            return what
        if code < 0:
            number = -code
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            if number == signal.SIGKILL:
                detail = "SIGKILL (killed, e.g. out of memory)"
            elif number == signal.SIGXCPU:
                detail = "SIGXCPU (CPU time limit)"
            else:
                detail = name
            return f"the cell died with {detail}"
        tail = self._stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        return f"the cell exited with status {code}" + (f": {' / '.join(tail)}" if tail else "")

    @property
    def alive(self) -> bool:
        """As far as the event loop has heard: not exited, socket open."""
        return (
            self.proc.returncode is None
            and not self.reader.at_eof()
            and not self.writer.transport.is_closing()
        )

    def still_running(self) -> bool:
        """Alive, asking the operating system too (without reaping: the child watcher does).

        For an idle cell about to get a call: one killed while idle is noticed
        before the call is sent, not after.
        """
        if not self.alive:
            return False
        try:
            exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already reaped: the watcher sets returncode soon
            return False
        return exited is None

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    async def close(self) -> None:
        """Kill the process and release everything it held."""
        self.kill()
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already closed
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), 5.0)
            await asyncio.wait_for(self._stderr_task, 2.0)  # its pipe ends with the process
        except TimeoutError:
            log.warning("cell %d did not exit after SIGKILL", self.pid)
            self._stderr_task.cancel()


WORKDIR_PREFIX = "batos-cell-"
_swept = False
STALE_WORKDIR_SECONDS = 300  # far beyond a cell's start-up, when its directory goes


def sweep_stale_workdirs() -> int:
    """Remove working directories left by cells whose kernel was killed while they started.

    Only empty directories older than any start-up can take are removed.
    """
    removed = 0
    root = Path(tempfile.gettempdir())
    cutoff = time.time() - STALE_WORKDIR_SECONDS
    for path in root.glob(WORKDIR_PREFIX + "*"):
        try:
            if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.rmdir()  # fails unless empty
                removed += 1
        except OSError:
            pass
    return removed


async def start_cell(config: CellConfig, python: str = sys.executable) -> Cell:
    """Start one cell and wait until it is contained and ready."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    try:
        proc = await asyncio.create_subprocess_exec(
            python, "-I", "-S", "-c", _BOOTSTRAP, str(child.fileno()),
            json.dumps(config.child_config()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(child.fileno(),),
            env={},
            cwd=workdir,
            start_new_session=True,  # its own process group: one kill reaches all of it
        )
    except BaseException:
        parent.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        child.close()
    try:
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=2**16)
        cell = Cell(proc, reader, writer, config)
    except BaseException:
        parent.close()
        await _reap(proc)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        ready = await cell.receive(config.startup_timeout)
        if ready.get("op") != "ready":
            raise CellProtocolError(f"the cell said {ready.get('op')!r} instead of ready")
    except BaseException:
        await asyncio.shield(cell.close())  # also when cancelled: never leave a process behind
        raise
    finally:
        # The cell keeps a working directory that no longer exists: empty, private,
        # nothing can be created in it, and nothing is left behind however the
        # cell or the kernel ends.
        shutil.rmtree(workdir, ignore_errors=True)
    cell.layers = {str(k): str(v) for k, v in dict(ready.get("layers", {})).items()}
    return cell


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    await asyncio.shield(proc.wait())


class CellPool:
    """Warm cells for calls; more are started for nested calls, up to ``max_cells``."""

    def __init__(
        self,
        config: CellConfig | None = None,
        size: int = 2,
        max_cells: int = 0,
        *,
        announce: bool = True,
    ) -> None:
        self.config = config or CellConfig()
        self.size = max(1, size)
        self.max_cells = max(max_cells, self.size * 4 + 8)
        self._idle: list[Cell] = []
        self._busy: set[Cell] = set()
        self._starting = 0
        self._waiters: list[asyncio.Future[None]] = []  # acquires waiting for a cell
        self._tasks: set[asyncio.Future[Any]] = set()  # starting and closing cells
        self._closed = False
        self.layers: dict[str, str] = {}
        self.announce = announce  # say at the first start which layers protect cells
        self.started = 0  # cells started over the pool's life
        self.replaced = 0  # cells that died, were killed or retired
        global _swept
        if not _swept:  # once per process: what killed kernels left behind
            _swept = True
            sweep_stale_workdirs()

    # -- life cycle ---------------------------------------------------------------------
    def warm(self) -> None:
        """Start cells in the background: ``size`` in all, and one fresh for a new receiver."""
        while not self._closed and (
            self._total() < self.size
            or (self._fresh() == 0 and self._total() < self.size + 1)
        ):
            self._starting += 1
            self._background(self._start_idle())

    async def _start_idle(self) -> None:
        try:
            cell = await self._start()
        except Exception as exc:  # noqa: BLE001 - reported; the next acquire tries again
            log.error("a cell could not be started: %s", exc)
            self._wake()  # a waiting acquire starts one itself and sees the error
            return
        finally:
            self._starting -= 1
        if self._closed:
            await cell.close()
            return
        self._idle.append(cell)
        self._wake()

    async def _start(self) -> Cell:
        cell = await start_cell(self.config)
        self.started += 1
        if not self.layers:
            self.layers = cell.layers
            if self.announce:
                report_layers(cell.layers)
        return cell

    async def ready(self) -> dict[str, str]:
        """Wait for one cell to be ready; return the layers protecting cells here."""
        cell = await self.acquire()
        self.release(cell)
        return self.layers

    def _background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait until the cells starting and closing in the background have done so."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Kill every cell, also those starting or closing, and wait until they are gone.

        Cells still starting finish starting and are killed then: cancelling a
        start half-way could leave a process nobody waits for.
        """
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # they see the pool is closed
        cells = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for cell in cells:
            self._background(cell.close())
        await self.settle()

    # -- taking and giving back ---------------------------------------------------------
    async def acquire(self, *, nested: bool = False, tag: Any = None) -> Cell:
        """A cell for a call whose receiver is ``tag``.

        A cell that served one receiver serves no other (see invocation): the
        pool hands out an idle cell of the same receiver, else a fresh one, else
        starts one (up to ``size`` plus one spare, or ``max_cells`` for nested
        calls), making room by retiring the receiver's cell least recently used.
        """
        while True:
            if self._closed:
                raise CellFailure("the kernel is shutting down")
            cell = self._take_idle(tag) or self._take_idle(None)
            if cell is not None:
                cell.tag = tag
                self._busy.add(cell)
                self.warm()  # a fresh spare for the next receiver
                return cell
            limit = self.max_cells if nested else self.size + 1
            if self._total() >= limit and self._idle:
                self.discard(self._idle.pop(0))  # the least recently used receiver's cell
            if self._total() < limit:
                self._starting += 1
                try:
                    cell = await self._start()
                finally:
                    self._starting -= 1
                cell.tag = tag
                self._busy.add(cell)
                return cell
            if nested:
                raise CellFailure(
                    f"{self.max_cells} cells are busy with nested calls; the call chain is too deep"
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _take_idle(self, tag: Any) -> Cell | None:
        for index in range(len(self._idle) - 1, -1, -1):
            cell = self._idle[index]
            if cell.tag == tag:
                del self._idle[index]
                if cell.still_running():
                    return cell
                self.discard(cell)
        return None

    def release(self, cell: Cell) -> None:
        """Give back a cell that finished its call normally (it keeps its receiver)."""
        self._busy.discard(cell)
        cell.calls += 1
        if self._closed or not cell.alive or cell.calls >= self.config.max_calls:
            self.discard(cell)
            return
        self._idle.append(cell)
        while self._total() > self.size + 1 and len(self._idle) > 1:
            self.discard(self._idle.pop(0))  # nested-call extras are not all kept warm
        self._wake()

    def discard(self, cell: Cell) -> None:
        """Kill a cell that failed (or is done) and start its replacement."""
        self._busy.discard(cell)
        if cell in self._idle:
            self._idle.remove(cell)
        self.replaced += 1
        self._background(cell.close())
        self.warm()
        self._wake()

    @property
    def idle(self) -> int:
        """Cells waiting for a call."""
        return len(self._idle)

    def _total(self) -> int:
        return len(self._idle) + len(self._busy) + self._starting

    def _fresh(self) -> int:
        """Cells that never ran a method, idle or starting."""
        return self._starting + sum(1 for cell in self._idle if cell.tag is None)

    def _wake(self) -> None:
        """Let one waiting acquire look again (a cell was given back or started)."""
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def describe(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "idle": len(self._idle),
            "busy": len(self._busy),
            "receivers": len({cell.tag for cell in [*self._idle, *self._busy]} - {None}),
            "starting": self._starting,
            "started": self.started,
            "replaced": self.replaced,
            "layers": dict(self.layers),
        }


def report_layers(layers: dict[str, str]) -> None:
    """Say once, plainly, which layers protect generated code on this machine."""
    active = [name for name in LAYERS if layers.get(name, "").startswith("active")]
    missing = [f"{name} ({layers.get(name, 'unknown')})" for name in LAYERS if name not in active]
    log.info(
        "generated methods run in cells protected by: %s, restricted builtins",
        ", ".join(active) or "no operating-system layer",
    )
    if missing:
        log.warning("cell layers not active here: %s", "; ".join(missing))
