"""Model weights and LoRA adapters kept in the living image: storing and validating them.

Every file of a model (config, tokenizer, safetensors shards) is its own ZODB blob
with its size and sha256. Loading them without copies (verification, views of
links) is :mod:`batos_uvm.weight_views`; its names are re-exported here.

This module needs only ZODB; torch and transformers stay in the backend.
Storing functions take a :class:`WeightLibrary` (the kernel keeps one at
``root['pLLM_obj'].weights``) and never commit: the caller commits or aborts.
Everything is validated before the library is touched, so an error leaves it as
it was, and blobs are registered with the connection only when the record is
about to be attached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import persistent
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob

# The loading side (verification, views of links) is re-exported: callers may import it from here.
from .weight_views import (  # noqa: F401
    CHUNK,
    FileRef,
    WeightError,
    WeightIntegrityError,
    close_view,
    committed_files,
    file_view,
    forget_verified,
    hash_file,
    materialise,
    open_view,
    verify_files,
    verify_record,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)

MAX_HEADER = 100 << 20  # a safetensors header larger than this is not a real one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FOREIGN_SUFFIXES = (".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".mlmodel")
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
ADD_MODEL = "python batos.py models add {persona} SOURCE"


class WeightFile(persistent.Persistent):
    """One file of a model or adapter: a blob plus what it must hash to."""

    def __init__(self, name: str, size: int, sha256: str, blob: Blob) -> None:
        self.name, self.size, self.sha256, self.blob = name, size, sha256, blob


class _Stored(persistent.Persistent):
    files: PersistentMapping
    fingerprint: str

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


class ModelRecord(_Stored):
    """A stored model; several personas may point at the same record."""

    def __init__(self, name: str, source: str, files: PersistentMapping, **info: Any) -> None:
        self.name, self.source, self.files = name, source, files
        self.created = time.time()
        self.model_id: str | None = info.get("model_id")
        self.config: dict[str, Any] = info.get("config", {})  # architecture, dtype, sizes
        self.tensor_shapes: dict[str, tuple[int, ...]] = info.get("tensor_shapes", {})
        self.parameters: int = info.get("parameters", 0)
        self.linear_parameters: int = info.get("linear_parameters", 0)
        self.fingerprint: str = fingerprint(files)
        self.skipped: list[str] = info.get("skipped", [])


class AdapterRecord(_Stored):
    """A stored PEFT LoRA adapter for one persona's base model."""

    def __init__(self, name: str, persona: str, files: PersistentMapping, **info: Any) -> None:
        self.name, self.persona, self.files = name, persona, files
        self.created = time.time()
        self.base_model: str | None = info.get("base_model")  # from adapter_config.json
        self.base_fingerprint: str = info.get("base_fingerprint", "")
        self.config: dict[str, Any] = info.get("config", {})
        self.fingerprint: str = fingerprint(files)


class WeightLibrary(persistent.Persistent):
    """persona -> ModelRecord, adapter name -> AdapterRecord, persona -> active adapter."""

    def __init__(self) -> None:
        self.models: PersistentMapping = PersistentMapping()
        self.adapters: PersistentMapping = PersistentMapping()
        self.active: PersistentMapping = PersistentMapping()

    def adapters_for(self, persona: str) -> list[AdapterRecord]:
        key = persona_key(persona)
        return [a for a in self.adapters.values() if a.persona == key]


def persona_key(persona: str) -> str:
    """Personas are stored upper-case: ``brick`` and ``BRICK`` are the same persona."""
    key = persona.strip().upper()
    if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", key):
        raise WeightError(f"{persona!r} is not a persona name (letters, digits, underscore)")
    return key


def library_from_root(root: Any, *, create: bool = False) -> WeightLibrary:
    """The library at ``root['pLLM_obj'].weights`` (created on request)."""
    holder = root.get("pLLM_obj") if hasattr(root, "get") else None
    if holder is None:
        raise WeightError("the image has no pLLM_obj yet: start BAT OS once (python batos.py)")
    library = getattr(holder, "weights", None)
    if library is None:
        if not create:
            raise WeightError(f"no models stored yet: {ADD_MODEL.format(persona='PERSONA')}")
        library = holder.weights = WeightLibrary()
    return library


def fingerprint(files: Any) -> str:
    lines = sorted(f"{name}\0{f.sha256}\n" for name, f in files.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# -- validation ------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header; the data must exactly fill the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise WeightError(f"{path}: truncated or not safetensors (header says {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: safetensors header is not a JSON object")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            shape = [int(x) for x in t["shape"]]
        except (KeyError, TypeError, ValueError):
            raise WeightError(f"{path}: bad entry for tensor {name!r} in header") from None
        width = DTYPE_BYTES.get(t.get("dtype"))
        count = 1
        for d in shape:
            count *= d
        if stop < begin or (width is not None and (stop - begin) != count * width):
            raise WeightError(f"{path}: tensor {name!r} has inconsistent offsets")
        end = max(end, stop)
    if 8 + n + end != size:
        raise WeightError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}"
        )
    return header


@dataclass
class _Plan:
    """What a source directory holds, checked before anything is written."""

    directory: Path
    files: list[tuple[str, Path, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            name: tuple(t["shape"])
            for h in self.headers.values()
            for name, t in h.items()
            if name != "__metadata__"
        }


def _scan(directory: Path, weight_names: str, allow_pickle: bool) -> _Plan:
    """Check a folder; ``weight_names`` matches pickled files that hold weights."""
    plan = _Plan(directory)
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    has_safetensors = any(p.suffix == ".safetensors" for p in entries)
    for p in entries:
        if not p.is_file():  # follows symlinks (the Hugging Face cache is made of them)
            plan.skipped.append(p.name + "/" if p.is_dir() else p.name)
            continue
        if p.suffix in FOREIGN_SUFFIXES or (p.suffix in PICKLE_SUFFIXES and has_safetensors):
            plan.skipped.append(p.name)
            continue
        if p.suffix in PICKLE_SUFFIXES and not re.fullmatch(weight_names, p.name):
            plan.skipped.append(p.name)  # e.g. training_args.bin: not weights
            continue
        if p.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise WeightError(
                f"{p}: pickled weights can run code when loaded; convert them to "
                "safetensors or pass --allow-pickle if you trust the file"
            )
        if p.suffix == ".safetensors":
            plan.headers[p.name] = read_safetensors_header(p)
        plan.files.append((p.name, p, p.stat().st_size))
    names = {name for name, _, _ in plan.files}
    if not any(re.fullmatch(weight_names, n) for n in names) and not plan.headers:
        raise WeightError(f"{directory}: no weights found (expected *.safetensors)")
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        try:
            shards = set(json.loads((directory / index).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            raise WeightError(f"{directory / index}: not a valid shard index") from None
        for shard in sorted(shards - names):
            raise WeightError(f"{directory / shard}: shard listed in {index} is missing")
    return plan


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightError(f"{path.parent}: not a model directory (no {path.name})") from None
    except ValueError as e:
        raise WeightError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightError(f"{path}: expected a JSON object")
    return data


def resolve_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """A local directory, or a model id already in the local Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        raise WeightError(f"{path}: not a directory")
    text = str(source)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        raise WeightError(f"{text}: no such directory")
    from huggingface_hub import snapshot_download

    try:  # local_files_only: the cache is read, the network is never used
        return Path(snapshot_download(text, local_files_only=True)), text
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError ...
        raise WeightError(
            f"{text}: no such directory, and not in the local Hugging Face cache ({type(e).__name__})"
        ) from None


# -- writing -----------------------------------------------------------------------------------


def _write_files(library: Any, plan: _Plan, progress: Progress | None) -> PersistentMapping:
    jar = getattr(library, "_p_jar", None)
    total, done = sum(s for _, _, s in plan.files), 0
    files = PersistentMapping()
    for name, path, size in plan.files:
        blob = Blob()
        if jar is not None:  # the upload file then lives beside the blob dir: commit renames it
            jar.add(blob)

        def report(count: int, name: str = name, before: int = done) -> None:
            if progress:
                progress(name, before + count, total)

        digest, count = stream_into_blob(blob, path, report)
        done += count
        if count != size:
            raise WeightError(f"{path}: changed while being stored ({size} -> {count} bytes)")
        files[name] = WeightFile(name, size, digest, blob)
    return files


def stream_into_blob(blob: Blob, path: Path, report: Callable[[int], None]) -> tuple[str, int]:
    """Copy ``path`` into ``blob`` in chunks, hashing it; returns (sha256, bytes)."""
    digest, count = hashlib.sha256(), 0
    with open(path, "rb") as src, blob.open("w") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            count += len(chunk)
            report(count)
    return digest.hexdigest(), count


def _same_content(record: _Stored, plan: _Plan) -> bool:
    """True if ``plan`` holds exactly ``record``'s files (sizes first, then hashes)."""
    if {(n, s) for n, _, s in plan.files} != {(n, f.size) for n, f in record.files.items()}:
        return False
    return all(hash_file(p) == record.files[n].sha256 for n, p, _ in plan.files)


def _linear_parameters(shapes: dict[str, tuple[int, ...]]) -> int:
    skip = ("embed", "lm_head", "wte", "wpe", "norm")
    return sum(
        s[0] * s[1]
        for n, s in shapes.items()
        if len(s) == 2 and n.endswith(".weight") and not any(k in n for k in skip)
    )


def store_model(
    library: WeightLibrary,
    persona: str,
    source: str | os.PathLike,
    *,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    replace: bool = False,
) -> ModelRecord:
    """Store the model at ``source`` for ``persona`` (the caller commits).

    ``source`` is a model directory, a model id in the local Hugging Face cache, or
    the name of a persona whose model this persona should share. Identical
    content already in the library is shared rather than stored twice.
    """
    key = persona_key(persona)
    current = library.models.get(key)
    shared = _persona_source(library, source)
    if shared is not None:
        record = shared
    else:
        directory, model_id = resolve_source(source)
        config = _read_json(directory / "config.json")
        plan = _scan(directory, r"(pytorch_model|model|consolidated)\b.*", allow_pickle)
        record = next((r for r in set(library.models.values()) if _same_content(r, plan)), None)
        if record is None:
            if current is not None and not replace:
                raise _replace_error(key, current)
            shapes = plan.shapes()
            record = ModelRecord(
                model_id or directory.name,
                model_id or str(directory),
                _write_files(library, plan, progress),
                model_id=model_id or config.get("_name_or_path") or None,
                config=_summarise(config, plan),
                tensor_shapes=shapes,
                parameters=sum(_count(s) for s in shapes.values()),
                linear_parameters=_linear_parameters(shapes),
                skipped=plan.skipped,
            )
    if current is not None and current is not record:
        if not replace:
            raise _replace_error(key, current)
        for adapter in library.adapters_for(key):
            if adapter.base_fingerprint != record.fingerprint:
                del library.adapters[adapter.name]
                library.active.pop(key, None)
    library.models[key] = record
    return record


def _replace_error(key: str, current: ModelRecord) -> WeightError:
    return WeightError(f"persona {key} already has model {current.name}; pass --replace")


def _persona_source(library: WeightLibrary, source: str | os.PathLike) -> ModelRecord | None:
    text = str(source)
    if Path(text).exists() or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", text):
        return None
    return library.models.get(text.upper())


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _summarise(config: dict[str, Any], plan: _Plan) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for h in plan.headers.values():
        for name, t in h.items():
            if name != "__metadata__":
                dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + _count(t["shape"])
    quant = config.get("quantization_config") or {}
    return {
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "model_type": config.get("model_type"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "stored_dtype": max(dtypes, key=dtypes.get) if dtypes else None,
        "hidden_size": config.get("hidden_size"),
        "layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "quantization": quant.get("quant_method") if isinstance(quant, dict) else None,
        "weight_bytes": sum(s for n, _, s in plan.files if n in plan.headers),
    }


# -- adapters ----------------------------------------------------------------------------------


def store_adapter(
    library: WeightLibrary,
    name: str,
    persona: str,
    source_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    replace: bool = False,
    activate: bool = True,
) -> AdapterRecord:
    """Store the PEFT LoRA adapter in ``source_dir`` as ``name`` for ``persona``.

    The adapter must fit the persona's stored model: every LoRA matrix must match
    the shape of the base layer it adapts, and ``base_model_name_or_path`` must
    name that model (its source, model id or folder name) unless ``force``.
    The newest adapter of a persona becomes its active one unless ``activate=False``.
    """
    key = persona_key(persona)
    if not re.fullmatch(r"[\w.-]{1,128}", name):
        raise WeightError(f"{name!r} is not an adapter name (letters, digits, _ . -)")
    base = library.models.get(key)
    if base is None:
        raise WeightError(f"persona {key} has no model; first run: {ADD_MODEL.format(persona=key)}")
    directory = Path(source_dir).expanduser()
    if not directory.is_dir():
        raise WeightError(f"{directory}: no such directory")
    config = _read_json(directory / "adapter_config.json")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise WeightError(f"{directory}: only LoRA adapters are supported (peft_type LORA)")
    plan = _scan(directory, r"adapter_model\.bin", allow_pickle)
    if not {"adapter_model.safetensors", "adapter_model.bin"} & {n for n, _, _ in plan.files}:
        raise WeightError(f"{directory}: no adapter_model.safetensors")
    _check_fits(directory, base, plan, config, force)
    old = library.adapters.get(name)
    if old is not None:
        if _same_content(old, plan) and old.persona == key:
            return old
        if not replace:
            raise WeightError(f"an adapter named {name} is already stored; pass --replace")
    record = AdapterRecord(
        name,
        key,
        _write_files(library, plan, progress),
        base_model=config.get("base_model_name_or_path"),
        base_fingerprint=base.fingerprint,
        config={
            k: config.get(k)
            for k in ("r", "lora_alpha", "target_modules", "task_type", "peft_version")
        },
    )
    library.adapters[name] = record
    if activate:
        library.active[key] = name
    return record


def _identities(record: ModelRecord) -> set[str]:
    names = {record.name, record.source, record.model_id or ""}
    names |= {Path(n).name for n in list(names) if n}
    with contextlib.suppress(OSError):
        names.add(str(Path(record.source).resolve()))
    return {n.rstrip("/") for n in names if n}


def _check_fits(
    directory: Path, base: ModelRecord, plan: _Plan, config: dict[str, Any], force: bool
) -> None:
    wanted = config.get("base_model_name_or_path")
    meta = directory / "batos.json"
    if meta.is_file():
        wanted = _read_json(meta).get("base_model", wanted)
    if wanted and not force:
        candidates = {str(wanted).rstrip("/"), Path(str(wanted)).name}
        with contextlib.suppress(OSError):
            candidates.add(str(Path(str(wanted)).resolve()))
        if not candidates & _identities(base):
            raise WeightError(
                f"{directory}: adapter was made for base model {wanted!r}, but the persona's "
                f"model is {base.name!r} (stored from {base.source}); pass --force if they "
                "are the same model"
            )
    if base.config.get("quantization"):
        return  # pre-quantised weights have packed shapes; names were checked above
    for name, header in plan.headers.items():
        for tensor, t in header.items():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", tensor)
            if not m:
                continue
            target = base.tensor_shapes.get(m.group(1) + ".weight")
            shape = t["shape"]
            ok = target is not None and len(target) == 2 and len(shape) == 2
            ok = ok and (shape[1] == target[1] if m.group(2) == "A" else shape[0] == target[0])
            if not ok:
                raise WeightError(
                    f"{directory / name}: {tensor} {tuple(shape)} does not fit the persona's "
                    f"model {base.name!r} (base layer: {target}); it was made for another model"
                )


def adapter_persona(directory: Path) -> str | None:
    """Which persona an adapter folder in ``lora_adapters/`` belongs to.

    ``batos.json`` ``{"persona": "BRICK"}`` wins; otherwise the folder name's
    prefix before the first ``_``, ``-`` or ``.`` (``brick_humour`` -> BRICK).
    """
    meta = directory / "batos.json"
    if meta.is_file():
        persona = _read_json(meta).get("persona")
        if persona:
            return persona_key(str(persona))
    prefix = re.split(r"[_.-]", directory.name, maxsplit=1)[0]
    try:
        return persona_key(prefix)
    except WeightError:
        return None


def incarnate_adapters(
    library: WeightLibrary, lora_dir: str | os.PathLike, *, progress: Progress | None = None
) -> list[tuple[str, str]]:
    """Store each adapter folder of ``lora_dir`` not yet in the library.

    Returns ``(name, outcome)`` per folder: ``stored``, ``already stored`` or
    ``skipped: reason``. A folder that fails validation is skipped, not fatal.
    """
    root = Path(lora_dir)
    results: list[tuple[str, str]] = []
    if not root.is_dir():
        return results
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        name = directory.name
        try:
            if not (directory / "adapter_config.json").is_file():
                raise WeightError("no adapter_config.json")
            persona = adapter_persona(directory)
            if persona is None or persona not in library.models:
                raise WeightError(f"no model stored for persona {persona or '?'}")
            if name in library.adapters:
                results.append((name, "already stored"))
                continue
            store_adapter(library, name, persona, directory, progress=progress)
        except WeightError as e:
            results.append((name, f"skipped: {e}"))
            log.warning("LoRA adapter %s not stored: %s", directory, e)
            continue
        results.append((name, "stored"))
        log.info("stored LoRA adapter %s for %s", name, persona)
    return results
