"""Kernel settings: defaults, then ``batos.toml``, then environment, then command line.

Every setting has one name used everywhere: the TOML key under ``[kernel]``,
the environment variable ``BATOS_<NAME>`` and the option ``--<name>``.
Per-persona cognition lives under ``[personas.NAME]`` in the TOML file.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("batos.config")

REPO_DIR = Path(__file__).resolve().parent.parent
PERSONAS = ("ALFRED", "BRICK", "ROBIN", "BABS")


class ConfigError(ValueError):
    """A setting has a value the kernel cannot use; the message says which and why."""


@dataclass
class Settings:
    db: str = "live_image.fs"  # FileStorage path, zeo://HOST:PORT or zconfig://FILE
    blob_dir: str = ""  # default: the image path + ".blob"
    endpoint: str = "tcp://127.0.0.1:5555"
    zeo: str = "unix"  # serve the image over ZEO: "unix" (a private socket), HOST:PORT, "off"
    backend: str = ""  # default cognition for every persona, e.g. "replay:demo.jsonl"
    model: str = "auto"  # the installed code model personas without a backend use, or "none"
    model_threads: int = 0  # CPU threads of the default model; 0: one per core, at most 2
    workers: int = 2
    max_attempts: int = 3
    trial_wall_seconds: float = 5.0  # seconds a trial call may run
    method_timeout: float = 30.0  # seconds of cell time a generated method may use per message
    cells: int = 0  # warm cells for generated methods (0: as many as workers)
    cell_memory_mb: int = 512  # address space of one cell
    cell_max_calls: int = 1000  # a cell is replaced after this many calls
    index_interval: float = 300.0  # seconds between saves of the FileStorage index
    metacognition_log: str = "metacognition.jsonl"
    codex: str = str(REPO_DIR / "persona_codex.jsonl")
    lora_dir: str = str(REPO_DIR / "lora_adapters")
    embedder: str = "auto"  # "minilm", "hashing" or "auto"
    max_message_bytes: int = 1024 * 1024
    curve_dir: str = ""  # directory with server.key_secret and authorized clients/
    allow_insecure_remote: bool = False
    create: bool = False  # make the image's missing directories (--create)
    personas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_file_storage(self) -> bool:
        return "://" not in self.db or self.db.startswith("file://")

    @property
    def db_path(self) -> Path:
        return Path(self.db.removeprefix("file://")).expanduser().resolve()

    @property
    def blob_path(self) -> Path:
        if self.blob_dir:
            return Path(self.blob_dir).expanduser().resolve()
        return self.db_path.with_name(self.db_path.name + ".blob")

    def persona_backend(self, persona: str) -> dict[str, Any] | str:
        """The cognition configuration for a persona (its own, else the default)."""
        own = self.personas.get(persona.upper())
        if own:
            return own
        return self.backend


_SIMPLE = {f.name: f for f in fields(Settings) if f.name != "personas"}

# Settings of earlier versions that no longer do anything: accepted with a warning,
# so an upgrade does not stop a kernel at start over a leftover line.
OBSOLETE = {
    "trial_cpu_seconds": "trials run in cells with the cells' limits (trial_wall_seconds)",
    "trial_memory_mb": "trials run in cells with cell_memory_mb",
}


def _coerce(name: str, value: Any) -> Any:
    kind = type(getattr(Settings(), name))
    try:
        if kind is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(value)
            return lowered in {"1", "true", "yes", "on"}
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: {value!r} is not a valid {kind.__name__}") from None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build settings from a TOML file, ``BATOS_*`` variables and explicit overrides."""
    environ = dict(os.environ if environ is None else environ)
    settings = Settings()
    path = config_file or environ.get("BATOS_CONFIG")
    if path is None and Path("batos.toml").exists():
        path = "batos.toml"
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        for key, value in data.get("kernel", {}).items():
            if key in OBSOLETE:
                log.warning("%s: setting [kernel] %s no longer has an effect (%s); remove it",
                            path, key, OBSOLETE[key])
                continue
            if key not in _SIMPLE:
                raise ConfigError(f"{path}: unknown setting [kernel] {key}")
            setattr(settings, key, _coerce(key, value))
        for persona, table in data.get("personas", {}).items():
            if persona.upper() not in PERSONAS:
                raise ConfigError(f"{path}: unknown persona [personas.{persona}]")
            if not isinstance(table, dict) or "backend" not in table:
                raise ConfigError(f"{path}: [personas.{persona}] needs a 'backend' key")
            settings.personas[persona.upper()] = dict(table)
    for name in _SIMPLE:
        env_name = "BATOS_" + name.upper()
        if environ.get(env_name):
            setattr(settings, name, _coerce(name, environ[env_name]))
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in _SIMPLE:
            raise ConfigError(f"unknown setting {name!r}")
        setattr(settings, name, _coerce(name, value))
    if settings.workers < 1:
        raise ConfigError("workers must be at least 1")
    if settings.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    if settings.cells < 0:
        raise ConfigError("cells must be 0 (as many as workers) or more")
    if settings.cell_memory_mb < 64:
        raise ConfigError("cell_memory_mb must be at least 64 (a cell needs ~30 MiB to start)")
    if settings.cell_max_calls < 1:
        raise ConfigError("cell_max_calls must be at least 1")
    if settings.method_timeout <= 0 or settings.trial_wall_seconds <= 0:
        raise ConfigError("method_timeout and trial_wall_seconds must be positive")
    check_addresses(settings)
    return settings


def check_cognition(settings: Settings) -> None:
    """Refuse a backend spec nobody can use, and files it names that do not exist.

    Checked by a starting kernel (boot.serve) before anything else happens. A
    kernel with no backend at all still starts (briefs then fail saying how to
    configure one); a spec with a typo does not.
    """
    from .cognition import CognitionError, parse_spec

    for persona in PERSONAS:
        spec = settings.persona_backend(persona)
        where = f"[personas.{persona}]" if persona in settings.personas else "backend"
        try:
            config = parse_spec(spec)
        except CognitionError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        kind = config["backend"]
        path = config.get("path") if kind == "replay" else (
            config.get("model_path") if kind == "llama-cpp" else None)
        if kind in ("replay", "llama-cpp") and not path:
            raise ConfigError(f"{where}: {kind} needs a file: {kind}:PATH")
        if path and not Path(path).expanduser().is_file():
            what = "replay cassette" if kind == "replay" else "model file"
            raise ConfigError(f"{where}: {what} {path} does not exist")
        url = str(config.get("base_url", ""))
        if kind == "openai" and not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{where}: the openai backend needs an http(s) URL, e.g. "
                f"openai:http://127.0.0.1:8000/v1#MODEL (got {url!r})")


ZEO_OFF = frozenset({"", "off", "no", "false"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def check_addresses(settings: Settings) -> None:
    """Refuse a malformed bridge endpoint or ZEO address before any slow work."""
    from .protocol import check_endpoint

    try:
        settings.endpoint = check_endpoint(settings.endpoint)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    zeo = settings.zeo.strip()
    if zeo.lower() in ZEO_OFF | {"unix"}:
        return
    host, _, port = zeo.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"--zeo {zeo!r} must be 'unix' (the default), HOST:PORT on loopback "
            "(e.g. 127.0.0.1:8100, port 0 for any free port) or 'off'"
        )
    if host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"--zeo {zeo!r}: the ZEO server binds loopback only (ZEO authenticates nobody); "
            f"use 127.0.0.1:{port}"
        )
