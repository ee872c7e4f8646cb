"""Logging for ``batos.py``: one format, and quiet about what is expected or not actionable.

* A shell or second kernel that goes away closes its ZEO connection; the ZEO
  server logs that as an ERROR ("Disconnected ConnectionResetError"). It is
  expected: such records are demoted to DEBUG.
* Third-party warnings a user cannot act on (bitsandbytes asking for the
  ``kernels`` package, which downloads code from a model hub) are demoted too.
* Storage housekeeping (ZODB, ZEO, txn) and model-loading INFO lines show only at DEBUG.

At ``--log-level DEBUG`` everything shows again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# storage housekeeping and model-loading chatter: not news at INFO
CHATTY = ("ZODB", "ZEO", "txn", "sentence_transformers")
EXPECTED_DISCONNECTS = frozenset({"ConnectionResetError", "BrokenPipeError",
                                  "ConnectionAbortedError"})


class Demote(logging.Filter):
    """Turn matching records into DEBUG records (dropped unless DEBUG is enabled)."""

    def __init__(self, matches: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.matches(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def _expected_disconnect(record: logging.LogRecord) -> bool:
    return (str(record.msg).startswith("Disconnected")
            and bool(record.args) and record.args[0] in EXPECTED_DISCONNECTS)


def _asks_for_kernels(record: logging.LogRecord) -> bool:
    return "pip install kernels" in str(record.msg)


DEMOTED = {
    "ZEO.asyncio.server": _expected_disconnect,
    "bitsandbytes.backends.cpu.ops": _asks_for_kernels,
}
_installed: set[str] = set()


def quiet_third_party() -> None:
    """Install the demotions (once per process); see the module docstring."""
    for name, matches in DEMOTED.items():
        if name not in _installed:
            logging.getLogger(name).addFilter(Demote(matches))
            _installed.add(name)


def configure(level_name: str = "INFO") -> None:
    """Log to stderr at ``level_name`` with the demotions above."""
    level = getattr(logging, str(level_name).upper(), None)
    if not isinstance(level, int):
        raise ValueError(f"--log-level {level_name!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format=FORMAT)
    if level > logging.DEBUG:
        for chatty in CHATTY:
            logging.getLogger(chatty).setLevel(logging.WARNING)
    quiet_third_party()
