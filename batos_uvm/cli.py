"""Command line of ``batos.py``: run the kernel, open the shell, manage models and keys.

Exit status of the kernel: 0 after a clean stop (SIGINT/SIGTERM, also while it
starts); 2 when it cannot start (a bad option or setting, an image it refuses,
an address in use), with one line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import sys
from typing import Any, NoReturn

from .argparsing import OneLineParser
from .config import REPO_DIR, ConfigError, load_settings

DEMO_CASSETTE = REPO_DIR / "demo" / "demo_cassette.jsonl"

EPILOG = """\
commands:
  (none)          run the kernel (the default)
  shell           an interactive Python console on the living image
  models          store and list persona models and LoRA adapters in the image
  keys            generate CURVE keys for the bridge
  doctor          which layers protect generated code on this machine

examples:
  python batos.py                                  # live_image.fs in the current directory
  python batos.py --demo                           # replayed answers from the demo cassette
  python batos.py --db ~/batos/new/live_image.fs --create   # a new image in a new directory
  python batos.py --backend openai:http://127.0.0.1:8000/v1#qwen2.5
  python batos.py shell -c "print(ls(genesis))"
"""


def _kernel_options(parser: argparse.ArgumentParser, *, sub: bool = False) -> None:
    # On sub-commands the options may also come before the command
    # (`batos.py --db X shell`): a sub-parser must not reset them to None.
    default = argparse.SUPPRESS if sub else None
    parser.add_argument("--db", default=default,
                        help="image: a FileStorage path (default live_image.fs), "
                        "zeo://HOST:PORT or zconfig://FILE [BATOS_DB]")
    parser.add_argument("--blob-dir", dest="blob_dir", default=default,
                        help="blob directory (default: the image path + .blob) [BATOS_BLOB_DIR]")
    parser.add_argument("--config", default=default,
                        help="a batos.toml settings file [BATOS_CONFIG]")
    parser.add_argument("--create", action="store_true", default=default,
                        help="create the image's directory if it does not exist (a new image "
                        "is otherwise made only in an existing directory)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="batos.py",
        description="BAT OS kernel: a persistent, self-extending prototype object system.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _kernel_options(parser)
    parser.add_argument(
        "--endpoint", help="bridge endpoint (default tcp://127.0.0.1:5555) [BATOS_ENDPOINT]"
    )
    parser.add_argument(
        "--backend",
        help="cognition for every persona: replay:CASSETTE, "
        "transformers, llama-cpp:MODEL.gguf or openai:URL#MODEL [BATOS_BACKEND]",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="answer briefs from the demo cassette (replayed, and labelled so)",
    )
    parser.add_argument(
        "--zeo",
        help="serve the image over ZEO for the shell and other kernels: 'unix' (the default: "
        "a socket in a directory only you can enter), HOST:PORT on loopback, or 'off' "
        "[BATOS_ZEO]",
    )
    parser.add_argument("--workers", type=int, help="worker connections (default 2)")
    parser.add_argument(
        "--max-attempts",
        dest="max_attempts",
        type=int,
        help="synthesis attempts per cycle (default 3)",
    )
    parser.add_argument(
        "--embedder",
        choices=["auto", "minilm", "hashing"],
        help="sentence embeddings for the catalog (default auto)",
    )
    parser.add_argument(
        "--curve-dir", dest="curve_dir", help="CURVE keys made by `batos.py keys generate DIR`"
    )
    parser.add_argument(
        "--allow-insecure-remote",
        dest="allow_insecure_remote",
        action="store_true",
        default=None,
        help="allow a non-loopback endpoint without CURVE (not recommended)",
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command")
    shell = sub.add_parser("shell", help="interactive console on the living image")
    _kernel_options(shell, sub=True)
    shell.add_argument("--write", action="store_true", help="allow commit() (default read-only)")
    shell.add_argument("-c", dest="code", help="run CODE and exit")
    models = sub.add_parser("models", help="persona models and LoRA adapters in the image")
    _kernel_options(models, sub=True)
    from .models_args import add_models_parser

    model_commands = models.add_subparsers(dest="models_command", required=True)
    add_models_parser(model_commands)
    for command in model_commands.choices.values():  # `models list --db X` works too
        _kernel_options(command, sub=True)
    doctor = sub.add_parser(
        "doctor", help="which layers protect generated code (cells) on this machine"
    )
    _kernel_options(doctor, sub=True)
    keys = sub.add_parser("keys", help="CURVE keys for the bridge")
    from .keys import add_keys_parser

    add_keys_parser(keys.add_subparsers(dest="keys_command", required=True))
    return parser


def settings_from(args: argparse.Namespace) -> Any:
    overrides = {
        name: getattr(args, name, None)
        for name in (
            "db",
            "blob_dir",
            "endpoint",
            "backend",
            "zeo",
            "workers",
            "max_attempts",
            "embedder",
            "curve_dir",
            "allow_insecure_remote",
            "create",
        )
    }
    if getattr(args, "demo", False):
        overrides["backend"] = f"replay:{DEMO_CASSETTE}"
    return load_settings(getattr(args, "config", None), overrides)


def _models(args: argparse.Namespace, settings: Any) -> int:
    """Run a models command on the image, through the running kernel when there is one."""
    from .image import ImageError, open_image, open_zeo_client, running_kernel_address
    from .models_cli import run_models_command

    address = running_kernel_address(settings.db_path) if settings.is_file_storage else None
    if address is not None:  # the kernel holds the file: go through its storage server
        db = open_zeo_client(address, settings)
        try:
            status = run_models_command(args, db, settings=settings)
        finally:
            db.close()
        if args.models_command == "list":
            _print_loaded(settings.endpoint)
        return status
    reading = args.models_command in ("list", "verify")
    if reading and settings.is_file_storage and not settings.db_path.exists():
        print(f"error: no image at {settings.db_path}. Start BAT OS once to create it "
              f"(python batos.py --db {settings.db_path}), or name another with --db.",
              file=sys.stderr)
        return 1
    try:
        image = open_image(settings, serve_zeo=False)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return run_models_command(args, image.db, settings=settings)
    finally:
        image.close()


def _print_loaded(endpoint: str) -> None:
    """What the running kernel has in memory, as its ping reports it."""
    from .client import BridgeClient, KernelUnreachable

    try:
        reply = BridgeClient(endpoint, timeout=3.0, dead_after=3.0, retries=1).ping()
    except (KernelUnreachable, OSError) as exc:
        print(f"loaded: unknown (no kernel answers at {endpoint}: {exc})")
        return
    cognition = (reply.result or {}).get("cognition", {}) if reply.ok else {}
    print(f"in the running kernel at {endpoint}:")
    for persona, description in sorted(cognition.items()):
        print(f"  {persona:<8} {description}")


def main(argv: list[str] | None = None) -> int:
    # Idle torch/OpenMP threads must not spin on the few cores the kernel shares
    # with numpy, the trial processes and the bridge.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from . import logs

    logs.configure(getattr(args, "log_level", "INFO"))
    from .bridge import BridgeError
    from .image_path import ImageError

    try:
        settings = settings_from(args)
        if args.command == "shell":
            from .shell import run_shell

            return run_shell(settings, write=args.write, code=args.code)
        if args.command == "models":
            return _models(args, settings)
        if args.command == "keys":
            from .keys import run_keys_command

            return run_keys_command(args)
        if args.command == "doctor":
            from .cells.doctor import run_doctor

            return run_doctor(settings)
        from .boot import serve

        code = asyncio.run(serve(settings))
    except (ConfigError, ImageError, BridgeError) as exc:
        print(f"batos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    exit_at_once(code)


def exit_at_once(code: int) -> NoReturn:
    """Exit now that everything is committed and closed.

    Tearing down an interpreter that imported torch and friends takes seconds
    after "shutdown complete" (freeing modules and their objects one by one);
    nothing in that is worth waiting for. Exit handlers still run.
    """
    atexit._run_exitfuncs()  # logging.shutdown among them: log files are flushed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
