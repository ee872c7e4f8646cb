"""Tables and times for people: cycle lists and object descriptions, as the chat client
and the shell show them (the wire and ``--json`` keep the raw values)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

REASON_CHARS = 100


def when(stamp: float | None) -> str:
    """An epoch time as local ``YYYY-MM-DD HH:MM:SS`` ("-" when unknown)."""
    if not isinstance(stamp, int | float) or isinstance(stamp, bool) or stamp <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def table(rows: Sequence[Sequence[str]], gap: str = "  ") -> list[str]:
    """Rows of cells as lines with every column as wide as its widest cell."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append(gap.join(cells).rstrip())
    return lines


def cycles_table(rows: Sequence[dict[str, Any]]) -> str:
    """Cycle summaries (``kernel.recent_cycles``) as an aligned table, newest first."""
    if not rows:
        return "(no cycles yet)"
    cells = [["cycle", "status", "selector", "target", "started", "took", "attempts", "note"]]
    for row in rows:
        took = row.get("duration_s")
        note = " ".join(str(row.get("reason") or "").split())
        if len(note) > REASON_CHARS:
            note = note[: REASON_CHARS - 3] + "..."
        if row.get("replayed"):
            note = "replayed" + (f"; {note}" if note else "")
        cells.append([
            str(row.get("cycle_id")),
            str(row.get("status")),
            str(row.get("selector")),
            str(row.get("target")),
            when(row.get("started")),
            f"{took:.2f}s" if isinstance(took, int | float) else "-",
            str(row.get("attempts", "-")),
            note,
        ])
    return "\n".join(table(cells))


def describe_listing(info: dict[str, Any]) -> str:
    """An object's description (``UvmObject.describe``) as the shell's ``ls`` shows it."""
    lines = [f"{info.get('label') or '(unlabelled)'}  oid={info.get('oid')}",
             "  parents: " + (", ".join(info.get("parents") or ()) or "(none)")]
    slots = {k: v for k, v in (info.get("slots") or {}).items() if k != "parents"}
    lines.append("  slots:" + ("" if slots else " (none)"))
    lines += ["    " + line for line in table([[name, "=", str(value)]
                                                 for name, value in sorted(slots.items())], " ")]
    methods = info.get("methods") or {}
    lines.append("  methods:" + ("" if methods else " (none)"))
    rows = []
    for name, meta in sorted(methods.items()):
        cycle = f"cycle {meta['cycle_id']}" if meta.get("cycle_id") else ""
        rows.append([name, f"v{meta.get('version')}", str(meta.get("kind")),
                     f"by {meta.get('author')}", when(meta.get("created")), cycle])
    lines += ["    " + line for line in table(rows)]
    return "\n".join(lines)
