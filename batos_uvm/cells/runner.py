"""A cell's entry point: contain the process, then serve calls until the kernel hangs up.

Started by the kernel as ``python -I -S -c <bootstrap> FD CONFIG`` with an empty
environment, an empty private working directory, no inherited descriptors but
its end of a socket pair (FD), stdin and stdout on /dev/null and stderr on a
pipe the kernel drains. In order, before any generated code runs, it

1. imports everything generated code may use (nothing can load later),
2. applies the operating-system layers of sandbox.py,
3. replaces the builtins of methods with the restricted set (restricted.py),

then says "ready" with the status of every layer and serves calls.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Loaded now because nothing can be read from disk once the layers are on.
_PRELOAD = (
    "_strptime",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_16",
    "encodings.utf_32",
    "encodings.cp1252",
    "encodings.idna",
    "encodings.unicode_escape",
    "encodings.raw_unicode_escape",
    "encodings.hex_codec",
    "encodings.base64_codec",
    "linecache",
    "traceback",
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    fd, config = int(argv[0]), json.loads(argv[1])
    from batos_uvm import guardian, restricted
    from batos_uvm.cells import proxy, runtime, sandbox, wire

    for name in sorted(guardian.ALLOWED_MODULES) + list(_PRELOAD):
        __import__(name)
    sandbox.preload()
    restricted.prepare_views()
    import time

    time.localtime()  # reads the time zone now
    runtime.MEMORY_LIMIT = f"the memory limit of {int(config.get('memory_bytes', 0)) // 2**20} MiB"
    channel = runtime.Channel(fd)
    stdlib = os.path.dirname(os.__file__)
    sys.path[:] = [p for p in sys.path if p.startswith(sys.base_prefix)]  # the standard library
    layers = sandbox.apply(config, [stdlib])
    unrestricted = bool(config.get("unrestricted"))  # only tests of the layers ask for this
    compile_method = _compile_unrestricted if unrestricted else restricted.compile_method
    if not unrestricted:
        restricted.extra_builtins["batos"] = proxy.SERVICES
    cell = runtime.Cell(channel, compile_method)
    cell.max_frame = int(config.get("max_frame", cell.max_frame))
    channel.send({"op": "ready", "pid": os.getpid(), "layers": layers,
                  "restricted": not unrestricted})
    cpu_per_call = float(config.get("cpu_per_call", 0))
    serve(channel, cell, sandbox, wire, cpu_per_call, int(config.get("max_calls", 0)))


def serve(channel: Any, cell: Any, sandbox: Any, wire: Any, cpu: float, max_calls: int) -> None:
    while True:
        try:
            message = channel.receive()
        except wire.WireError as exc:
            raise SystemExit(f"cell: malformed message from the kernel: {exc}") from None
        if message is None:
            return  # the kernel closed our socket: it is done with this cell
        if message.get("op") != "call":
            raise SystemExit(f"cell: unexpected message {message.get('op')!r}")
        if cpu:
            sandbox.set_call_cpu_limit(cpu)
        outcome = cell.serve(message)
        outcome["id"] = message.get("id")
        try:
            cell.answer(outcome)
        except wire.WireError as exc:  # e.g. a repr that cannot be encoded
            channel.send({"op": "done", "id": message.get("id"), "output": "",
                          "error": {"type": "TypeError", "message": str(exc), "traceback": ""}})
        if outcome.get("retire") or (max_calls and cell.calls >= max_calls):
            return


def _compile_unrestricted(source: str, selector: str, filename: str) -> Any:
    """Full builtins: only for tests that show an operating-system layer on its own."""
    namespace: dict[str, Any] = {"__name__": "batos_method"}
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return namespace[selector]
