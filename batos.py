#!/usr/bin/env python3
"""BAT OS kernel entry point: ``python batos.py --help``."""

import sys

from batos_uvm.cli import main

if __name__ == "__main__":
    sys.exit(main())
