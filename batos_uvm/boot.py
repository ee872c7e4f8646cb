"""Starting a kernel process: refuse what is wrong, answer within a second, then load.

``python batos.py`` runs ``serve``. Before anything slow, and before anything is
created, it refuses a backend spec with a typo or a missing file
(config.check_cognition) and a bad image path or a locked image (image_path.preflight);
then it binds the bridge with the *lobby* as its handler, having imported only
pyzmq and the protocol. The lobby answers ``ping`` at once (the kernel is
starting) and holds every other request until the kernel takes over. The
kernel's modules (ZODB, the cycle, the catalog ...) are imported in a thread
meanwhile, so pings keep being answered; then the kernel starts on the bound
bridge and loads what is heavy in the background (Kernel.start).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import time
import uuid
from typing import Any

from .bridge import Bridge, CurveServerConfig
from .config import Settings, check_cognition
from .image_path import preflight
from .protocol import Reply


class Lobby:
    """The bridge's handler until the kernel is ready to take requests (see the docstring)."""

    def __init__(self, boot_id: str) -> None:
        self.boot_id = boot_id
        self.started = time.time()
        self._kernel: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def admit(self, kernel: Any) -> None:
        """From now on ``kernel`` answers (requests held meanwhile go to it)."""
        if not self._kernel.done():
            self._kernel.set_result(kernel)

    def close(self, why: str) -> None:
        """The kernel will not come: held requests get an ERROR saying why."""
        if not self._kernel.done():
            self._kernel.set_exception(RuntimeError(why))
            self._kernel.exception()  # retrieved: nobody may be waiting

    def status(self) -> dict[str, Any]:
        return {
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            "image": None,
            "uptime_s": round(time.time() - self.started, 3),
            "cognition": {},
            "workers": 0,
            "ready": False,
            "loading": ["the kernel"],
            "parts": {},
        }

    async def handle(self, request: Any, progress: Any) -> Reply:
        if request.command == "ping" and not self._kernel.done():
            return Reply.complete(self.status())
        try:
            kernel = await asyncio.shield(self._kernel)
        except RuntimeError as exc:
            return Reply.error_reply("shutting_down", str(exc))
        return await kernel.handle(request, progress)


def make_bridge(settings: Settings, handler: Any, boot_id: str) -> Bridge:
    """The kernel's bridge as configured (endpoint, CURVE keys, message size)."""
    curve = CurveServerConfig.from_dir(settings.curve_dir) if settings.curve_dir else None
    return Bridge(
        handler,
        settings.endpoint,
        max_message_bytes=settings.max_message_bytes,
        curve=curve,
        allow_insecure_remote=settings.allow_insecure_remote,
        boot_id=boot_id,
    )


async def serve(settings: Settings) -> int:
    """Run a kernel process until SIGINT/SIGTERM (see the module docstring); 0 when stopped."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the kernel installs its own when it runs
        loop.add_signal_handler(sig, stop.set)
    check_cognition(settings)
    preflight(settings)
    boot_id = uuid.uuid4().hex
    lobby = Lobby(boot_id)
    bridge = make_bridge(settings, lobby, boot_id)
    await bridge.start()
    importing = asyncio.ensure_future(
        asyncio.to_thread(importlib.import_module, "batos_uvm.kernel"))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({importing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            lobby.close("the kernel is stopping")
            await bridge.stop()
            return 0
        kernel = importing.result().Kernel(settings, boot_id=boot_id)
    except BaseException as exc:
        lobby.close(f"the kernel failed to start: {type(exc).__name__}: {exc}")
        await bridge.stop()
        raise
    finally:
        stopping.cancel()
    lobby.admit(kernel)
    return await kernel.run(bridge=bridge)
