"""What a recording (a replay cassette) can answer, so a user can be told.

A cassette answers only the briefs it was recorded for. ``NAME.briefs.txt``
beside ``NAME.jsonl`` lists them, one per line (``#`` starts a comment); the
kernel reports them in its status and the chat client shows them.
"""

from __future__ import annotations

from pathlib import Path

from .config import PERSONAS, Settings


def recorded_briefs(settings: Settings) -> list[str]:
    """The briefs a replay cassette answers, from ``CASSETTE.briefs.txt`` beside it (if any).

    A recording knows only the briefs it was recorded for: clients list them
    (``/help``, a failed brief) so a demo user knows what to type.
    """
    specs = [settings.persona_backend(p) for p in PERSONAS]
    cassettes = {s.partition(":")[2] for s in specs if isinstance(s, str)
                 and s.startswith("replay:")}
    briefs: list[str] = []
    for cassette in sorted(cassettes):
        path = Path(cassette).with_suffix(".briefs.txt")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        briefs += [line.strip() for line in lines
                   if line.strip() and not line.lstrip().startswith("#")]
    return briefs
