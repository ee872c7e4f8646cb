"""Where the image lives: refusals before anything is created, and when a new image may be made.

A FileStorage image is a file (``live_image.fs``) beside its lock, index and
blob directory. Every problem with the place is found here, before the kernel
does any slow work and before a single file or directory exists: a ``--db``
that is a directory, a parent that is a file, a directory that cannot be
written. A new image is made only where the user clearly meant it: in a
directory that exists (the default ``live_image.fs`` in the current directory
always qualifies). A missing directory is usually a mistyped ``--db``, so it is
refused with its name, and made only when asked (``--create``).
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import Settings


class ImageError(RuntimeError):
    """The image cannot be opened; the message names the file and what to do."""


class ImagePathError(ImageError):
    """The image cannot live at this path; the one-line message says what to do instead."""


class ImageMissing(ImagePathError):
    """No image exists at the path and this command does not create one."""


class ImageInUse(ImageError):
    """Another process holds the image's lock."""


@dataclass(frozen=True)
class ImageLocation:
    """The checked place of a FileStorage image."""

    db_path: Path
    blob_path: Path
    exists: bool
    missing_dirs: list[Path] = field(default_factory=list)  # made by create_directories()

    def create_directories(self) -> None:
        for directory in self.missing_dirs:
            directory.mkdir(parents=True, exist_ok=True)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _missing_between(existing: Path, path: Path) -> list[Path]:
    missing = []
    while path != existing and not path.exists():
        missing.append(path)
        path = path.parent
    return missing[::-1]


def unwritable_reason(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (None when they can)."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    return None


def _refuse_unwritable(directory: Path, what: str) -> None:
    reason = unwritable_reason(directory)
    if reason is not None:
        raise ImagePathError(
            f"cannot write in {directory} ({reason}): {what}. Choose a writable place with "
            "--db, or look at this image read-only with `python batos.py shell`."
        )


def _check_parent_chain(path: Path, role: str, settings: Settings) -> list[Path]:
    """Directories to create for ``path``; refuses a file in the way or a missing directory."""
    parent = path.parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise ImagePathError(
            f"cannot put the {role} at {path}: {existing} is a file, not a directory"
        )
    missing = _missing_between(existing, parent)
    if missing and not settings.create:
        raise ImagePathError(
            f"directory {missing[0]} does not exist, so there is no {role} at {path}. "
            "Check the path (a mistyped --db would start a new, empty image), or pass --create "
            f"to create {parent} and a new image in it."
        )
    _refuse_unwritable(existing, f"the {role} cannot be created there")
    return missing


def check_image_location(
    settings: Settings, *, writable: bool = True, may_create: bool = True
) -> ImageLocation:
    """Check where ``settings`` puts a FileStorage image; nothing is created here.

    ``writable``: the caller will open the image for writing (its directory must
    accept the lock file, the index and blobs). ``may_create``: a missing image
    may be created (else :class:`ImageMissing`).
    """
    db_path, blob_path = settings.db_path, settings.blob_path
    if db_path.is_dir():
        raise ImagePathError(
            f"--db {db_path} is a directory; name the image file in it, "
            f"e.g. --db {db_path / 'live_image.fs'}"
        )
    if db_path.exists() and not db_path.is_file():
        raise ImagePathError(f"--db {db_path} is not a regular file; name an image file")
    if blob_path.exists() and not blob_path.is_dir():
        raise ImagePathError(
            f"the blob directory {blob_path} is a file; remove it or choose another with "
            "--blob-dir"
        )
    if db_path.exists():
        if writable:
            _refuse_unwritable(db_path.parent, "the image needs its lock and index files there")
            if blob_path.is_dir():
                _refuse_unwritable(blob_path, "the image stores its blobs there")
            elif blob_path.parent.is_dir():
                _refuse_unwritable(blob_path.parent, "the blob directory cannot be created")
        return ImageLocation(db_path, blob_path, exists=True)
    if not may_create:
        raise ImageMissing(f"no image at {db_path}")
    missing = _check_parent_chain(db_path, "image", settings)
    if not blob_path.exists() and blob_path.parent != db_path.parent:
        missing += [d for d in _check_parent_chain(blob_path, "blob directory", settings)
                    if d not in missing]
    return ImageLocation(db_path, blob_path, exists=False, missing_dirs=missing)


def describe_os_error(exc: OSError, db_path: Path) -> str:
    """One line for an OSError met while opening the image at ``db_path``."""
    where = exc.filename or db_path
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"cannot open image {db_path}: {exc.strerror} ({where}). Choose a writable place "
            "with --db, or look at it read-only with `python batos.py shell`."
        )
    return f"cannot open image {db_path}: {exc.strerror or exc} ({where})"


# --- the lock (standard library only: checked before ZODB is even imported) ---------------


def lock_holder(db_path: Path) -> str | None:
    """The PID written in the FileStorage lock file, if any."""
    try:
        text = db_path.with_name(db_path.name + ".lock").read_text().strip()
    except OSError:
        return None
    return text.split()[0] if text else None


def lock_is_held(db_path: Path) -> bool:
    """Whether some process holds the FileStorage lock (probed, never rewritten)."""
    try:
        handle = open(db_path.with_name(db_path.name + ".lock"), "rb")  # noqa: SIM115
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def pid_alive(pid: str | None) -> bool:
    if not pid or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def in_use_message(db_path: Path, pid: str | None) -> str:
    who = f"PID {pid}" if pid else "another process"
    return (
        f"image {db_path} is in use by {who}. Stop that kernel first, or open "
        "the live image through it with `python batos.py shell`."
    )


def preflight(settings: Settings) -> None:
    """Everything about the image a kernel can refuse before any slow work, creating nothing:
    the path and the creation rules, and a lock held by another process."""
    if not settings.is_file_storage:
        return
    location = check_image_location(settings)
    if location.exists and lock_is_held(location.db_path):
        raise ImageInUse(in_use_message(location.db_path, lock_holder(location.db_path)))
