"""Loading stored weights: verified, linked views of committed blob files.

Loading builds a *view*: a temporary directory of symlinks to the committed blob
files (``blob.committed()``), handed to ``from_pretrained``; nothing is extracted
or copied. Where symlinks are not allowed (Windows without developer mode) a hard
link is used, and only if that fails too (another filesystem) a copy, with a
warning. Each file's size and sha256 are checked once per process before use.

The error types and file hashing live here, below ``batos_uvm.weights`` (which
stores records and re-exports these names), so neither module imports the other
in a cycle. Only the standard library is needed at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .weights import _Stored

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class WeightError(ValueError):
    """A model or adapter cannot be stored or loaded; the message names the file."""


class WeightIntegrityError(WeightError):
    """A stored file no longer matches its sha256."""


def hash_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileRef:
    """A committed blob file, resolved while a connection is open, usable without it."""

    name: str
    path: str
    size: int
    sha256: str


_VERIFIED: set[tuple[str, str]] = set()  # (committed path, sha256): checked in this process


def committed_files(record: _Stored) -> list[FileRef]:
    """Paths of the record's committed blob files (needs the record's connection open)."""
    return [
        FileRef(name, f.blob.committed(), f.size, f.sha256)
        for name, f in sorted(record.files.items())
    ]


def verify_files(refs: list[FileRef], label: str, *, force: bool = False) -> int:
    """Check size and sha256 of files not yet verified in this process; return bytes hashed."""
    hashed = 0
    for ref in refs:
        if not force and (ref.path, ref.sha256) in _VERIFIED:
            continue
        try:
            size = os.path.getsize(ref.path)
            actual = hash_file(ref.path) if size == ref.size else f"size {size} != {ref.size}"
        except OSError as e:
            actual = f"unreadable ({e.strerror})"
        if actual != ref.sha256:
            raise WeightIntegrityError(
                f"{label}: file {ref.name} is damaged in the image (sha256 expected "
                f"{ref.sha256[:16]}..., got {actual[:24]}; blob {ref.path}); store it again "
                "or restore the image from a backup"
            )
        hashed += ref.size
        _VERIFIED.add((ref.path, ref.sha256))
    return hashed


def forget_verified() -> None:
    """Forget which files were verified (as a process restart would)."""
    _VERIFIED.clear()


def _link(target: str, link: Path) -> str:
    try:
        os.symlink(target, link)
        return "symlink"
    except (OSError, NotImplementedError):
        pass
    try:
        os.link(target, link)
        return "hardlink"
    except OSError:
        log.warning("cannot link %s; copying it (no symlink or hard link possible)", target)
        shutil.copyfile(target, link)
        return "copy"


def open_view(refs: list[FileRef], *, prefix: str = "batos-view-") -> Path:
    """A new temporary directory whose entries link to the blob files (see :func:`close_view`).

    Blob paths are long, so on ext4 each link is a "slow symlink" whose removal
    costs a journal write (~2 ms): the model manager keeps a view for the life of
    the process and reuses it on reloads, off the load path.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        for ref in refs:
            _link(ref.path, directory / ref.name)
    except BaseException:
        close_view(directory)
        raise
    return directory


def close_view(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def file_view(refs: list[FileRef], *, prefix: str = "batos-view-") -> Iterator[Path]:
    """:func:`open_view` for the duration of a ``with`` block."""
    directory = open_view(refs, prefix=prefix)
    try:
        yield directory
    finally:
        close_view(directory)


@contextlib.contextmanager
def materialise(record: _Stored, *, label: str = "", verify: bool = True) -> Iterator[Path]:
    """Verify (once per process) and link a record's files; yields the directory."""
    refs = committed_files(record)
    if verify:
        verify_files(refs, label or getattr(record, "name", "?"))
    with file_view(refs) as directory:
        yield directory


def verify_record(record: _Stored, label: str = "") -> list[str]:
    """Hash every file now; returns one problem line per damaged file (empty if all good)."""
    problems = []
    for ref in committed_files(record):
        try:
            verify_files([ref], label or record.name, force=True)
        except WeightIntegrityError as e:
            problems.append(str(e))
    return problems
