"""GGUF models (llama.cpp) kept in the living image, stored without a second copy.

A GGUF model is one file: it is stored as one blob of a ``ModelRecord`` whose
``config["format"]`` is ``"gguf"``, beside the transformers models of
:mod:`batos_uvm.weights`, so ``models list`` and ``models verify`` show and
check it like any other. Storing it hard-links the file into the storage's
blob directory and lets ZODB take the link over (``Blob.consumeFile``
renames): the model cache and the image then share the file's one copy on
disk. Where a link is impossible (another file system, ZEO, Windows FAT) the
file is streamed into the blob while it is hashed. The caller commits.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from persistent.mapping import PersistentMapping
from ZODB.blob import Blob

from .weight_views import FileRef, WeightError, hash_file
from .weights import (
    ModelRecord,
    Progress,
    WeightFile,
    WeightLibrary,
    persona_key,
    stream_into_blob,
)

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
FORMAT = "gguf"


def is_gguf_record(record: Any) -> bool:
    return getattr(record, "config", {}).get("format") == FORMAT


def check_gguf(path: Path) -> int:
    """The file's size; WeightError unless it is a readable GGUF file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise WeightError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise WeightError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return size


def store_gguf(
    library: WeightLibrary,
    personas: list[str],
    path: str | os.PathLike[str],
    *,
    name: str,
    source: str,
    sha256: str | None = None,
    info: dict[str, Any] | None = None,
    progress: Progress | None = None,
    replace: bool = False,
    jar: Any = None,
) -> tuple[ModelRecord, str]:
    """Store the GGUF file at ``path`` for ``personas``; returns (record, how it was stored).

    ``sha256`` is the file's known hash (e.g. verified by the model cache); without it
    the file is hashed first. An identical model already in the image is shared.
    ``how`` is "linked", "copied" or "shared". ``jar`` is the connection the blob
    belongs to (default: the library's; a library created in this transaction has none yet).
    """
    path = Path(path).expanduser()
    keys = [persona_key(p) for p in personas]
    size = check_gguf(path)
    digest = sha256 or hash_file(path)
    for key in keys:
        current = library.models.get(key)
        same = is_gguf_record(current) and _file(current).sha256 == digest
        if current is not None and not same and not replace:
            raise WeightError(f"persona {key} already has model {current.name}; pass --replace")
    filename = path.name
    shared = next(
        (r for r in set(library.models.values())
         if is_gguf_record(r) and _file(r).sha256 == digest),
        None,
    )  # fmt: skip
    how = "shared"
    record = shared
    if record is None:
        blob, how = _blob_from(jar or library._p_jar, path, digest, size, progress)
        files = PersistentMapping({filename: WeightFile(filename, size, digest, blob)})
        config = {"format": FORMAT, "architecture": "gguf", **(info or {})}
        record = ModelRecord(name, source, files, model_id=name, config=config)
    for key in keys:
        library.models[key] = record
        library.active.pop(key, None)  # a LoRA adapter of another model does not apply
    return record, how


def _file(record: Any) -> WeightFile:
    return next(iter(record.files.values()))


def gguf_file(record: Any) -> FileRef:
    """The committed blob of a GGUF record (needs the record's connection open)."""
    stored = _file(record)
    return FileRef(stored.name, stored.blob.committed(), stored.size, stored.sha256)


def _blob_from(
    jar: Any, path: Path, digest: str, size: int, progress: Progress | None
) -> tuple[Blob, str]:
    blob = Blob()
    if jar is not None:
        jar.add(blob)  # its uncommitted file lives in the storage's temporary directory
        try:
            temporary = Path(jar.db()._storage.temporaryDirectory())
            link = temporary / f"gguf-{uuid.uuid4().hex}.link"
            os.link(path, link)
        except (OSError, AttributeError) as exc:
            log.info("cannot link %s into the blob directory (%s); copying it", path, exc)
        else:
            blob.consumeFile(str(link))  # a rename: the blob is the cached file's inode
            return blob, "linked"
    _copy_into(blob, path, digest, size, progress)
    return blob, "copied"


def _copy_into(blob: Blob, path: Path, digest: str, size: int, progress: Progress | None) -> None:
    copied, count = stream_into_blob(
        blob, path, lambda done: progress(path.name, done, size) if progress else None
    )
    if count != size or copied != digest:
        raise WeightError(f"{path}: changed while being stored; nothing was stored")
