"""CURVE keys for the bridge: ``python batos.py keys generate DIR``.

The kernel uses ``DIR/server.key_secret`` and the public keys in
``DIR/authorized_clients/``; a client needs ``server.key`` and its own
``NAME.key_secret`` (see docs/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import zmq.auth


def add_keys_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``generate`` to the subcommands of a ``keys`` command (dest ``keys_command``).

    Wiring: ``keys = sub.add_parser("keys"); add_keys_parser(keys.add_subparsers(
    dest="keys_command", required=True))``; then ``run_keys_command(args)``.
    """
    gen = subparsers.add_parser(
        "generate",
        help="create the kernel's key pair and client key pairs in DIR",
        description="Creates DIR/server.key(_secret), DIR/NAME.key(_secret) for each client "
        "and copies client public keys to DIR/authorized_clients/. Existing keys are kept.",
    )
    gen.add_argument("dir", help="directory to hold the keys (created with mode 0700)")
    gen.add_argument(
        "--client",
        action="append",
        dest="clients",
        metavar="NAME",
        help="client name (repeatable; default: client)",
    )
    gen.add_argument("--force", action="store_true", help="replace existing keys")
    return gen


def run_keys_command(args: argparse.Namespace) -> int:
    if getattr(args, "keys_command", None) != "generate":
        print("usage: batos.py keys generate DIR [--client NAME ...]")
        return 2
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    authorized = base / "authorized_clients"
    authorized.mkdir(exist_ok=True, mode=0o700)
    for name in ["server", *(args.clients or ["client"])]:
        if name != "server" and not name.replace("-", "_").isidentifier():
            print(f"error: client name {name!r} must be letters, digits, '_' or '-'")
            return 2
        secret = base / f"{name}.key_secret"
        if secret.exists() and not args.force:
            print(f"kept     {secret} (exists; --force replaces it)")
        else:
            public_file, secret_file = zmq.auth.create_certificates(base, name)
            os.chmod(secret_file, 0o600)
            print(f"created  {public_file}\ncreated  {secret_file}")
        if name != "server":
            shutil.copy2(base / f"{name}.key", authorized / f"{name}.key")
    clients = args.clients or ["client"]
    print(
        f"\nkernel:  python batos.py --curve-dir {base}   (uses server.key_secret and "
        f"authorized_clients/)\nclient:  python chat_client.py --curve-dir {base} "
        f"--curve-client {clients[0]}   (uses server.key and {clients[0]}.key_secret)\n"
        "On another machine a client needs only server.key and its own NAME.key_secret."
    )
    return 0
