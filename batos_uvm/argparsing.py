"""Command lines that refuse bad options in one line, with the exit status their docs give."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and ``--help`` for the rest).

    ``error_status`` is the exit status of a usage error: 2 for ``batos.py`` (it
    cannot start), 1 for ``chat_client.py`` (whose 2 means "kernel unreachable").
    Sub-parsers are made of the same class, so they keep both.
    """

    error_status = 2

    def error(self, message: str) -> NoReturn:
        self.exit(self.error_status, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
