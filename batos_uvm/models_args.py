"""The ``batos.py models`` sub-commands' arguments.

Apart from models_cli (which imports ZODB and the weight store) so that building
``batos.py``'s command line costs nothing: the kernel answers sooner.
"""

from __future__ import annotations

from typing import Any

from .config import PERSONAS


def add_models_parser(subparsers: Any) -> None:
    """Add ``list``, ``add``, ``add-adapter`` and ``verify`` to the ``models`` command.

    ``subparsers`` is the ``models`` parser's ``add_subparsers(dest="models_command")``.
    """
    sub = subparsers
    sub.add_parser("list", help="what each persona thinks with; stored models, adapters, sha256")
    add = sub.add_parser("add", help="store a model for a persona")
    add.add_argument("persona", help=", ".join(PERSONAS))
    add.add_argument("source", help="model folder, model id in the local HF cache, or a persona")
    add.add_argument("--replace", action="store_true", help="replace the persona's model")
    add.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights")
    adapter = sub.add_parser("add-adapter", help="store a PEFT LoRA adapter for a persona")
    adapter.add_argument("name")
    adapter.add_argument("persona")
    adapter.add_argument("directory", help="folder with adapter_config.json")
    adapter.add_argument("--force", action="store_true", help="accept another base model name")
    adapter.add_argument("--replace", action="store_true", help="replace an adapter of that name")
    adapter.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin")
    verify = sub.add_parser("verify", help="check stored files against their sha256")
    verify.add_argument("persona", nargs="?", help="only this persona (default: all)")
