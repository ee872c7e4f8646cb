"""``batos.py doctor``: which layers protect generated code on this machine.

It starts one real cell with the kernel's settings and prints the status each
layer reported from inside it, so what it says is what the kernel gets.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import sys
import time
from typing import Any

from .pool import CellPool
from .sandbox import LAYERS, landlock_abi

EXPLAIN = {
    "network": "a new network namespace without interfaces",
    "user": "an unprivileged user (when the kernel runs as root)",
    "rlimits": "limits on memory, CPU, files and processes",
    "no_new_privs": "no privilege gain through exec",
    "landlock": "no writes, reads only of the standard library, no TCP",
    "seccomp": "no processes, sockets, tracing, mounts, clock changes or writes",
}


async def _probe(config: Any) -> tuple[dict[str, str], float]:
    logging.getLogger("batos.cells").setLevel(logging.WARNING)  # the report says it all
    pool = CellPool(config, size=1)
    started = time.perf_counter()
    try:
        layers = await pool.ready()
        return layers, time.perf_counter() - started
    finally:
        await pool.close()


def run_doctor(settings: Any) -> int:
    """Print the layers' status; 1 when a layer this system could have is missing."""
    from .pool import CellConfig

    print(f"BAT OS doctor: Python {platform.python_version()} on {platform.system()} "
          f"{platform.release()} ({platform.machine()})")
    try:
        layers, seconds = asyncio.run(_probe(CellConfig.from_settings(settings)))
    except Exception as exc:  # noqa: BLE001 - the report is the point
        print(f"  a cell could not be started: {exc}")
        return 1
    print(f"  a cell started in {seconds * 1000:.0f} ms; landlock ABI {landlock_abi() or 'none'}")
    missing = []
    for name in LAYERS:
        status = layers.get(name, "unknown")
        mark = "ok " if status.startswith("active") else "-- "
        print(f"  {mark}{name:<13} {status}")
        if not status.startswith("active"):
            missing.append(name)
    print("  ok restricted builtins and guarded imports (always)")
    if sys.platform.startswith("linux"):
        expected = [n for n in missing if n not in ("network", "user")]  # need root
        if expected:
            print(f"missing on this Linux system: {', '.join(expected)} "
                  f"({'; '.join(EXPLAIN[n] for n in expected)})")
            return 1
    return 0
