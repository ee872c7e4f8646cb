"""BAT OS chat client: talk to a running kernel (interactive, or one-shot with --once/--call/--ping).

See docs/CHAT.md, or run ``python chat_client.py --help``.
"""

import sys

from batos_uvm.chat import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
