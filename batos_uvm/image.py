"""Opening the living image: FileStorage, ZEO or any zodburi URI.

The kernel owns the image file. It checks the file before writing to it (a
damaged file is refused, never rewritten), holds the FileStorage lock (a second
kernel gets "image is in use by PID ..."), and serves the storage over ZEO so the
shell, or a second kernel, can share the live image. By default that is a unix
socket in a directory only the kernel's user can enter (ZEO itself
authenticates nobody); TCP on loopback is available for kernels that must share
an image across users. An address file beside the image tells them where.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ZODB
import ZODB.FileStorage
from ZODB.POSException import StorageError

from .config import LOOPBACK_HOSTS, ZEO_OFF, Settings
from .image_path import (
    ImageError,
    ImageInUse,
    ImageMissing,
    ImagePathError,
    check_image_location,
    describe_os_error,
    in_use_message,
    lock_holder,
    lock_is_held,
    pid_alive,
    preflight,
)

__all__ = [
    "ImageError",
    "ImageInUse",
    "ImageDamaged",
    "ImageMissing",
    "ImagePathError",
    "OpenImage",
    "lock_holder",
    "lock_is_held",
    "open_image",
    "preflight",
    "open_zeo_client",
    "running_kernel_address",
]

log = logging.getLogger("batos.image")

Address = tuple[str, int] | str  # (host, port) over TCP, or a unix socket path

_TRANSACTION_HEADER = ">8sQcHHH"  # tid, length, status, user, description, extension lengths
_TRANSACTION_HEADER_SIZE = struct.calcsize(_TRANSACTION_HEADER)


class ImageDamaged(ImageError):
    pass


def check_image_file(db_path: Path) -> None:
    """Refuse a damaged image before FileStorage gets a chance to rewrite it.

    FileStorage opened for writing truncates anything after the last good
    transaction. That is right for an uncommitted tail left by a crash during
    commit (its status byte is still 'c'), and wrong for a file cut short or
    damaged, where committed data would be cut away: refuse those.
    """
    if not db_path.exists() or db_path.stat().st_size == 0:
        return
    if lock_is_held(db_path):
        # A live kernel is writing it: what looks like a torn tail is its commit.
        raise ImageInUse(in_use_message(db_path, lock_holder(db_path)))
    try:
        storage = ZODB.FileStorage.FileStorage(str(db_path), read_only=True)
    except (StorageError, OSError, ValueError, struct.error, KeyError) as exc:
        raise ImageDamaged(
            f"image file {db_path} cannot be read ({type(exc).__name__}: {exc}). "
            "It was not modified. Restore it from a backup, or try "
            f"`python -m ZODB.scripts.fsrecover {db_path} {db_path}.recovered`."
        ) from exc
    try:
        good_end = storage._pos
    finally:
        storage.close()
    size = db_path.stat().st_size
    if size <= good_end:
        return
    with open(db_path, "rb") as handle:
        handle.seek(good_end)
        header = handle.read(_TRANSACTION_HEADER_SIZE)
        handle.seek(good_end)
        tail = handle.read(1024 * 1024) if size - good_end <= 1024 * 1024 else b"x"
    if tail and not tail.strip(b"\0"):
        log.warning("discarding a zero-filled tail left by a crash in %s", db_path)
        # FileStorage cuts it off (keeping it as .tr0), but the storage doing so
        # remembers the zero header's time stamp; later opens start clean.
        ZODB.FileStorage.FileStorage(str(db_path)).close()
        return
    if len(header) == _TRANSACTION_HEADER_SIZE:
        _, length, status = struct.unpack(_TRANSACTION_HEADER, header)[:3]
        # Only the last transaction can be an unfinished commit: anything after
        # it would be committed data that truncation would destroy.
        if status == b"c" and good_end + length + 8 >= size:
            log.warning("discarding an uncommitted transaction left by a crash in %s", db_path)
            return
    raise ImageDamaged(
        f"image file {db_path} is damaged or truncated: committed data ends at byte "
        f"{good_end} but the file has {size} bytes. It was not modified. "
        "Restore it from a backup, or inspect it with "
        f"`python -m ZODB.scripts.fstest {db_path}`."
    )


@dataclass
class OpenImage:
    """An open image: the database the kernel uses, and the ZEO server if it serves one."""

    db: ZODB.DB
    description: str
    zeo_address: Address | None = None
    address_file: Path | None = None
    _server: Any = None
    _storage: Any = None
    _closed: bool = field(default=False, repr=False)
    _indexed_at: int = field(default=-1, repr=False)

    def save_index(self) -> bool:
        """Write the FileStorage index now, so a restart after a crash scans little.

        FileStorage writes it only on a clean close; after SIGKILL the next open
        re-reads every transaction since. Returns whether an index was written.
        """
        storage = self._server.storages["1"] if self._server is not None else self._storage
        if not isinstance(storage, ZODB.FileStorage.FileStorage) or self._closed:
            return False
        with storage._lock:  # commits update the index and position under this lock
            if storage._pos == self._indexed_at:
                return False
            storage._save_index()
            self._indexed_at = storage._pos
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.db.close()
        if self._server is not None:
            self._server.close()
            if isinstance(self.zeo_address, str):  # our private socket: gone with the server
                Path(self.zeo_address).unlink(missing_ok=True)
        elif self._storage is not None:
            self._storage.close()
        if self.address_file is not None:
            try:
                if json.loads(self.address_file.read_text()).get("pid") == os.getpid():
                    self.address_file.unlink()
            except (OSError, ValueError):
                pass


def address_file_for(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".zeo.json")


def running_kernel_address(db_path: Path) -> Address | None:
    """The ZEO address of a live kernel serving this image, if one is."""
    path = address_file_for(db_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not pid_alive(str(data.get("pid"))):
        return None
    if "socket" in data:
        return str(data["socket"])
    return (data["host"], int(data["port"]))


def format_address(address: Address) -> str:
    return f"unix socket {address}" if isinstance(address, str) else f"{address[0]}:{address[1]}"


def private_socket_path(db_path: Path) -> Path:
    """A short socket path in a directory only this user can enter."""
    directory = Path(tempfile.gettempdir()) / f"batos-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ImageError(
            f"{directory} must be a directory owned by this user with mode 0700; "
            "remove it or fix its permissions"
        )
    digest = hashlib.sha256(str(db_path).encode()).hexdigest()[:16]
    return directory / f"{digest}.sock"


def _open_file_storage(settings: Settings, *, read_only: bool = False) -> Any:
    db_path = settings.db_path
    location = check_image_location(settings, writable=not read_only, may_create=not read_only)
    check_image_file(db_path)
    if not location.exists:
        # A warning, so it shows at every log level a user runs with.
        log.warning("no image at %s: creating a new, empty image there", db_path)
        location.create_directories()
    try:
        if not read_only:
            settings.blob_path.mkdir(exist_ok=True)
        return ZODB.FileStorage.FileStorage(
            str(db_path), blob_dir=str(settings.blob_path), read_only=read_only
        )
    except OSError as exc:
        raise ImageError(describe_os_error(exc, db_path)) from None
    except Exception as exc:
        if type(exc).__name__ == "LockError":
            raise ImageInUse(in_use_message(db_path, lock_holder(db_path))) from None
        raise


def _parse_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ImageError(f"ZEO address {text!r} must look like HOST:PORT")
    return host, int(port)


def open_image(
    settings: Settings, *, serve_zeo: bool | None = None, read_only: bool = False
) -> OpenImage:
    """Open the image named by ``settings.db`` for this process."""
    cache_size = 20_000
    if not settings.is_file_storage:
        return _open_uri(settings, cache_size)
    storage = _open_file_storage(settings, read_only=read_only)
    if serve_zeo is None:
        serve_zeo = settings.zeo.lower() not in ZEO_OFF
    if not serve_zeo:
        db = ZODB.DB(storage, cache_size=cache_size)
        return OpenImage(db=db, description=f"file {settings.db_path}", _storage=storage)
    return _serve_over_zeo(settings, storage, cache_size)


def _serve_over_zeo(settings: Settings, storage: Any, cache_size: int) -> OpenImage:
    import ZEO
    from ZEO.StorageServer import StorageServer

    try:
        if settings.zeo.lower() == "unix":
            socket_path = private_socket_path(settings.db_path)
            socket_path.unlink(missing_ok=True)  # we hold the image lock: it is stale
            bind: Address = str(socket_path)
        else:
            host, port = _parse_host_port(settings.zeo)
            if host not in LOOPBACK_HOSTS:
                raise ImageError(f"the ZEO server binds loopback only (got {host})")
            bind = (host, port)
        server = StorageServer(bind, {"1": storage})
    except Exception:
        storage.close()
        raise
    server.start_thread()
    address: Address = bind if isinstance(bind, str) else tuple(server.acceptor.addr[:2])
    client = ZEO.client(
        address, blob_dir=str(settings.blob_path), shared_blob_dir=True, wait_timeout=30
    )
    db = ZODB.DB(client, cache_size=cache_size)
    address_file = address_file_for(settings.db_path)
    where = (
        {"socket": address}
        if isinstance(address, str)
        else {"host": address[0], "port": address[1]}
    )
    tmp = address_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({**where, "pid": os.getpid()}))
    os.replace(tmp, address_file)
    return OpenImage(
        db=db,
        description=f"file {settings.db_path} served over ZEO at {format_address(address)}",
        zeo_address=address,
        address_file=address_file,
        _server=server,
    )


def open_zeo_client(address: Address, settings: Settings, *, read_only: bool = False) -> ZODB.DB:
    """Connect to a kernel's storage server (shell, second kernel)."""
    import ZEO

    kwargs: dict[str, Any] = {"wait_timeout": 30, "read_only": read_only}
    if settings.is_file_storage and settings.blob_path.exists():
        kwargs.update(blob_dir=str(settings.blob_path), shared_blob_dir=True)
    else:
        kwargs.update(blob_dir=str(Path(settings.db_path.parent, ".zeo-client-blobs")))
    return ZODB.DB(ZEO.client(address, **kwargs), cache_size=20_000)


def _open_uri(settings: Settings, cache_size: int) -> OpenImage:
    """zeo://HOST:PORT?blob_dir=..., zconfig://FILE, or any zodburi scheme."""
    uri = settings.db
    if uri.startswith("zeo://"):
        rest = uri.removeprefix("zeo://").split("?", 1)[0]
        address = _parse_host_port(rest)
        import ZEO

        blob_dir = settings.blob_dir or str(Path(".zeo-client-blobs").resolve())
        client = ZEO.client(address, blob_dir=blob_dir, shared_blob_dir=False, wait_timeout=30)
        db = ZODB.DB(client, cache_size=cache_size)
        return OpenImage(db=db, description=f"ZEO server {address[0]}:{address[1]}")
    import zodburi

    try:
        factory, dbkw = zodburi.resolve_uri(uri)
    except (KeyError, ValueError) as exc:
        raise ImageError(f"cannot open image {uri!r}: {exc}") from None
    storage = factory()
    dbkw.setdefault("cache_size", cache_size)
    db = ZODB.DB(storage, **dbkw)
    return OpenImage(db=db, description=uri)
