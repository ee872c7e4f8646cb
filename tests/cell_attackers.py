"""Attackers of the cell boundary, for tests: hostile methods and subverted cells.

A *hostile method* is source a model might write: it passes the Guardian and
runs with the restricted builtins inside every operating-system layer. A
*subverted cell* is code that escaped the restricted builtins (its cell is
started ``unrestricted`` to stand for that) and speaks the cell protocol
directly: it writes any bytes to the kernel's end of the socket and may patch
the cell's own runtime. ``subverted(body)`` makes such a method; the body sees
``wire``, ``ormsgpack``, ``call`` (the call being served), ``fd`` (the socket),
``send_raw(payload)`` and ``done(value, diff)``.
"""

from __future__ import annotations

import asyncio
import textwrap
from typing import Any

import transaction
import ZODB
import ZODB.FileStorage

from batos_uvm.cells.invocation import Invocation, MethodFailed, Refused
from batos_uvm.cells.pool import CellConfig, CellFailure, CellPool
from batos_uvm.objects import UvmObject

__all__ = ["Image", "call_in_cell", "outcome", "run", "subverted"]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def call_in_cell(
    pool: CellPool, receiver: UvmObject, source: str, *args: Any, timeout: float = 10.0
) -> Any:
    """Run ``source`` (a function named ``probe``) as a method of ``receiver``."""
    source = textwrap.dedent(source)
    invocation = Invocation(pool, timeout=timeout, overlay={(id(receiver), "probe"): source})
    return await invocation.call(receiver, "probe", list(args), {})


def outcome(source: str, *args: Any, receiver: UvmObject | None = None,
            unrestricted: bool = False, timeout: float = 10.0) -> Any:
    """The value, or the failure as (kind, message): one call in a fresh pool."""

    async def scenario() -> Any:
        pool = CellPool(CellConfig(unrestricted=unrestricted), size=1)
        target = receiver if receiver is not None else UvmObject(label="probe target")
        try:
            return await call_in_cell(pool, target, source, *args, timeout=timeout)
        finally:
            await pool.close()

    try:
        return run(scenario())
    except MethodFailed as exc:
        return (exc.kind, exc.message)
    except (CellFailure, Refused) as exc:
        return (type(exc).__name__, str(exc))


class Image:
    """A real FileStorage image; ``reopen()`` closes it and loads it again from disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.open()

    def open(self) -> None:
        self.db = ZODB.DB(ZODB.FileStorage.FileStorage(self.path))
        self.conn = self.db.open()
        self.root = self.conn.root()

    def reopen(self) -> None:
        self.close()
        self.open()

    def close(self) -> None:
        transaction.abort()
        self.conn.close()
        self.db.close()


SUBVERTED_PRELUDE = """
import os, sys
wire = sys.modules["batos_uvm.cells.wire"]
proxy = sys.modules["batos_uvm.cells.proxy"]
ormsgpack = wire.ormsgpack
call = proxy.active()
fd = call.cell.channel.fd

def send_raw(payload):
    os.write(fd, wire.frame(payload))

def done(value=None, diff=None):
    return {"op": "done", "id": call.call_id, "value": value, "output": "",
            "diff": diff or {"set": {}, "delete": []}}
"""


def subverted(body: str) -> str:
    """A method whose body runs with the cell's full powers (see the module docstring)."""
    lines = textwrap.indent(textwrap.dedent(SUBVERTED_PRELUDE) + textwrap.dedent(body), "    ")
    return "def probe(self, *args):\n" + lines
