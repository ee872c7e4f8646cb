"""The metacognition audit trail: one JSON line per event of every cognitive cycle.

Events go through an in-memory queue to a single writer task using aiologger,
so a cycle never waits for the disk and lines keep their order.
Each line: timestamp, cycle_id, mission_brief_hash, event_type, state, plus data.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiologger import Logger
from aiologger.formatters.base import Formatter
from aiologger.handlers.files import AsyncFileHandler
from aiologger.levels import LogLevel


def brief_hash(brief: dict[str, Any]) -> str:
    canonical = json.dumps(brief, sort_keys=True, default=repr).encode()
    return hashlib.sha256(canonical).hexdigest()


class _MessageAsIs(Formatter):
    def format(self, record: Any) -> str:
        return str(record.msg)


class AuditTrail:
    """Append-only JSON lines at ``path``; ``record`` never blocks the caller."""

    def __init__(self, path: str | Path, *, queue_limit: int = 10_000) -> None:
        self.path = Path(path)
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=queue_limit)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._logger = Logger(name=f"batos.audit.{id(self)}", level=LogLevel.INFO)
        handler = AsyncFileHandler(filename=str(self.path), encoding="utf-8")
        handler.formatter = _MessageAsIs()
        self._logger.add_handler(handler)
        self._task = asyncio.create_task(self._write_forever(), name="audit-writer")

    def record(
        self,
        cycle_id: str,
        brief: dict[str, Any],
        event_type: str,
        state: str,
        **data: Any,
    ) -> None:
        entry = {
            "timestamp": datetime.now(UTC).isoformat(),
            "cycle_id": cycle_id,
            "mission_brief_hash": brief_hash(brief),
            "event_type": event_type,
            "state": state,
            **data,
        }
        line = json.dumps(entry, default=repr, ensure_ascii=False)
        try:
            self._queue.put_nowait(line)
        except asyncio.QueueFull:
            self.dropped += 1  # never stall a cycle on the audit trail

    async def _write_forever(self) -> None:
        while True:
            line = await self._queue.get()
            if line is None:
                return
            await self._logger.info(line)

    async def close(self, timeout: float = 5.0) -> None:
        if self._task is None:
            return
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            pass  # the writer drains the queue, then is cancelled below
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            self._task.cancel()
        await self._logger.shutdown()
        self._task = None
