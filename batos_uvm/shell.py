"""The BAT OS shell: a Python console on the living image, also while the kernel runs.

``python batos.py shell [--db PATH] [--write] [-c CODE]`` picks its way in:

* ``--db zeo://HOST:PORT``: a ZEO client of that server;
* a kernel serving the image (its address file ``<image>.zeo.json`` names a live
  process): a ZEO client of the kernel's own server, so the kernel keeps running
  and each sees the other's commits;
* no kernel: the FileStorage itself (a process that holds the file's lock without
  serving ZEO makes that impossible, and the shell says so).

Read-only unless ``--write``: a live session uses ZEO's read-only client, an
offline one a read-only FileStorage, and ``commit()`` refuses either way. The
session keeps one connection and one transaction open; ``sync()``, ``abort()``
and ``commit()`` start a new one, which is when the kernel's later commits show.
See docs/SHELL.md.
"""

from __future__ import annotations

import ast
import builtins
import code as code_module
import contextlib
import json
import logging
import os
import pprint
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import transaction
import ZODB
from ZODB.POSException import ConflictError

from . import image as img
from . import primitives
from .config import Settings
from .listing import cycles_table, when
from .logs import quiet_third_party
from .objects import UvmObject, describe_briefly, format_oid, parse_oid

__all__ = ["ReadOnlyShell", "ShellError", "ShellSession", "open_session", "run_code",
           "run_shell"]

ROOT_NAMES = {  # console name -> root key
    "genesis": "genesis_obj", "traits": "traits_obj", "catalog": "knowledge_catalog_obj",
    "alfred": "alfred_prototype_obj", "brick": "brick_prototype_obj",
    "robin": "robin_prototype_obj", "babs": "babs_prototype_obj",
    "orchestrator": "orchestrator_obj", "pllm": "pLLM_obj",
}
HELPERS = ("ls(obj)  src(obj, selector[, version])  history(obj, selector)  cycles(n=10)  "
           "cycle(id)\n         find(text, k=5)  get(oid)  commit(note='')  abort()  sync()")
CONNECT_TIMEOUT = 3.0


class ShellError(RuntimeError):
    """The shell cannot open the image, or refuses an operation; the message says why."""


class ReadOnlyShell(ShellError):
    """``commit()`` in a read-only session."""


class Listing(str):
    """Text meant for reading: the console shows it as is, not as a quoted repr."""

    def __repr__(self) -> str:
        return str(self)


class HitList(list):  # type: ignore[type-arg]
    """Catalog hits (``find``) that print as a numbered list."""

    def __repr__(self) -> str:
        lines = []
        for number, hit in enumerate(self, 1):
            text = " ".join(hit.text.split())
            text = text if len(text) <= 160 else text[:157] + "..."
            lines.append(f"{number}. {hit.score:.3f}  {hit.doc_id}\n   {text}")
        return "\n".join(lines) or "(no hits)"



# --- opening the image --------------------------------------------------------------


def _check_listening(address: img.Address, who: str) -> None:
    """Fail fast instead of ZEO's long wait when nothing listens at ``address``."""
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(CONNECT_TIMEOUT)
                probe.connect(address)
        else:
            with socket.create_connection(address, timeout=CONNECT_TIMEOUT):
                pass
    except OSError as exc:
        raise ShellError(f"{who}, but nothing answers at {img.format_address(address)} "
                         f"({exc.strerror or exc}). Is it still starting or stopping? "
                         "Try again in a moment.") from None


def _in_use_message(db_path: Path) -> str:
    pid = img.lock_holder(db_path)
    return (
        f"image {db_path} is locked by {f'PID {pid}' if pid else 'another process'}, which "
        "does not serve it over ZEO (a kernel started with --zeo off or still starting, or a "
        "--write shell). A direct open while a kernel runs is impossible: the FileStorage "
        "lock forbids it. Run the kernel with its ZEO server (the default) and the shell "
        "connects through it, or stop that process first."
    )


def _zeo_uri_address(uri: str) -> tuple[str, int]:
    host, _, port = uri.removeprefix("zeo://").split("?", 1)[0].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ShellError(f"ZEO address {uri!r} must look like zeo://HOST:PORT")
    return host.strip("[]"), int(port)


def open_session(settings: Settings, *, write: bool = False) -> ShellSession:
    """Open the image named by ``settings.db`` the way the shell does (see the module doc)."""
    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        for name in ("ZEO", "ZODB", "zc.lockfile"):  # they log every connection: noise here
            logging.getLogger(name).setLevel(logging.WARNING)
    quiet_third_party()
    read_only = not write
    session = dict(read_only=read_only, settings=settings)
    if settings.db.startswith("zeo://"):
        address = _zeo_uri_address(settings.db)
        _check_listening(address, f"--db names the ZEO server {img.format_address(address)}")
        import ZEO

        blob_dir = settings.blob_dir or tempfile.mkdtemp(prefix="batos-shell-blobs-")
        client = ZEO.client(address, blob_dir=blob_dir, shared_blob_dir=False,
                            read_only=read_only, wait_timeout=30)
        cleanup = None if settings.blob_dir else (
            lambda: shutil.rmtree(blob_dir, ignore_errors=True))
        return ShellSession(ZODB.DB(client, cache_size=20_000), live=True, cleanup=cleanup,
                            description=f"ZEO server {img.format_address(address)}", **session)
    if not settings.is_file_storage:  # zconfig:// and other zodburi schemes
        image = img.open_image(settings)
        note = " (read-only is enforced by the shell)" if read_only else ""
        return ShellSession(image.db, live=True, cleanup=image.close,
                            description=image.description + note, **session)
    db_path = settings.db_path
    address = img.running_kernel_address(db_path)
    if address is not None:
        try:
            pid = json.loads(img.address_file_for(db_path).read_text()).get("pid")
        except (OSError, ValueError):
            pid = "?"
        stale = db_path.exists() and not img.lock_is_held(db_path)
        if stale:  # a killed kernel's address file, its PID since reused: nobody serves
            address = None
        else:
            _check_listening(address, f"the kernel (PID {pid}) says it serves {db_path}")
    if address is not None:
        return ShellSession(
            img.open_zeo_client(address, settings, read_only=read_only), live=True,
            description=f"the live image of the running kernel (PID {pid}): {db_path} via "
            f"ZEO {img.format_address(address)}", **session)
    if not db_path.exists():
        raise ShellError(f"no image at {db_path}. Start the kernel once to create it "
                         f"(python batos.py --db {db_path}), or name another with --db.")
    if img.lock_is_held(db_path):
        raise ShellError(_in_use_message(db_path))
    try:
        image = img.open_image(settings, serve_zeo=False, read_only=read_only)
    except img.ImageInUse:
        raise ShellError(_in_use_message(db_path)) from None
    return ShellSession(image.db, live=False, cleanup=image.close,
                        description=f"{db_path} (opened directly: no kernel running)", **session)


# --- the session and its helpers ----------------------------------------------------------


class ShellSession:
    """An open image and the console's helpers (usable from Python too).

    One connection, one transaction manager; ``close()`` aborts anything
    uncommitted and closes the database.
    """

    def __init__(self, db: ZODB.DB, *, description: str, read_only: bool, live: bool,
                 settings: Settings, cleanup: Callable[[], None] | None = None) -> None:
        self.db, self.description, self.settings = db, description, settings
        self.read_only, self.live = read_only, live
        self._cleanup = cleanup
        self._embedder: Any = None
        self._closed = False
        self.tm = transaction.TransactionManager()
        self.connection = db.open(transaction_manager=self.tm)
        self.tm.begin()

    @property
    def root(self) -> Any:
        return self.connection.root()

    def pending(self) -> int:
        """Objects changed in this session and not yet committed."""
        return len(getattr(self.connection, "_registered_objects", ()))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for step in (self.tm.abort, self.connection.close, self.db.close):
            with contextlib.suppress(Exception):
                step()
        if self._cleanup is not None:
            self._cleanup()

    def banner(self) -> str:
        mode = ("READ-ONLY: commit() is refused (open the shell with --write to change the "
                "image)" if self.read_only else "WRITABLE (--write): commit() writes to the "
                "image" + (", and the running kernel sees it" if self.live else ""))
        names = ["root"] + [short for short, key in ROOT_NAMES.items() if key in self.root]
        refresh = ("The kernel's later commits show after sync(), abort() or commit()."
                   if self.live else "Offline: the image on disk; no kernel is running.")
        return (f"BAT OS shell on {self.description}\n{mode}\nNames:   {' '.join(names)}\n"
                f"Helpers: {HELPERS}\n{refresh}")

    def namespace(self) -> dict[str, Any]:
        names: dict[str, Any] = {"__name__": "__batos_shell__", "root": self.root,
                                 "conn": self.connection, "db": self.db, "session": self}
        names.update({short: self.root.get(key) for short, key in ROOT_NAMES.items()})
        for helper in (self.ls, self.src, self.history, self.cycles, self.cycle, self.find,
                       self.get, self.commit, self.abort, self.sync):
            names[helper.__name__] = helper
        return names

    def _resolve(self, obj: Any) -> Any:
        """Objects pass through; a string names a root object or an oid."""
        if not isinstance(obj, str):
            return obj
        key = ROOT_NAMES.get(obj, obj)
        return self.root[key] if key in self.root else self.get(obj)

    def get(self, oid: str | int | bytes) -> Any:
        """The object with this oid (``'0x2a'``, ``42`` or 8 bytes)."""
        if isinstance(oid, int):
            oid = oid.to_bytes(8, "big")
        elif isinstance(oid, str):
            try:
                oid = parse_oid(oid)
            except ValueError:
                raise ShellError(f"{oid!r} is neither a root name nor an oid; root names: "
                                 f"{', '.join(sorted(self.root))}") from None
        try:
            return self.connection.get(oid)
        except Exception as exc:  # POSKeyError and friends
            raise ShellError(f"no object with oid {format_oid(oid)} ({exc})") from None

    def ls(self, obj: Any) -> Listing:
        """Slots, parents, own and inherited methods of an object (or keys of a mapping)."""
        obj = self._resolve(obj)
        if not isinstance(obj, UvmObject):
            return _ls_other(obj)
        info = obj.describe()
        lines = [f"{info['label'] or '(unlabelled)'}  oid={info['oid']}",
                 "  parents: " + (", ".join(info["parents"]) or "(none)")]
        slots = {k: v for k, v in info["slots"].items() if k != "parents"}
        methods = info["methods"]
        lines.append("  slots:" + ("" if slots else " (none)"))
        width = max(map(len, slots), default=0)
        lines += [f"    {name.ljust(width)} = {value}" for name, value in sorted(slots.items())]
        lines.append("  methods:" + ("" if methods else " (none)"))
        width = max(map(len, methods), default=0)
        for name, meta in sorted(methods.items()):
            cycle = f"  cycle {meta['cycle_id']}" if meta["cycle_id"] else ""
            lines.append(f"    {name.ljust(width)}  v{meta['version']} {meta['kind']:<9} "
                         f"by {meta['author']}{cycle}")
        inherited: dict[str, list[str]] = {}
        seen = set(methods)
        for ancestor in list(obj.ancestors())[1:]:
            owner = ancestor.__dict__.get("_label") or format_oid(ancestor._p_oid)
            for name in sorted(set(ancestor.methods()) - seen):
                inherited.setdefault(owner, []).append(name)
                seen.add(name)
        if inherited:
            lines.append("  inherited: " + "; ".join(
                f"{', '.join(names)} (from {owner})" for owner, names in inherited.items()))
        return Listing("\n".join(lines))

    def src(self, obj: Any, selector: str, version: int | None = None) -> Listing:
        """Source of a method (current version, or ``version``), found through the parents."""
        obj = self._resolve(obj)
        history = obj.method_history(selector)
        record = history[-1] if version is None else next(
            (r for r in history if r.version == version), None)
        if record is None:
            raise ShellError(f"{selector!r} has no version {version} "
                             f"(versions 1..{len(history)})")
        cycle = f", cycle {record.cycle_id}" if record.cycle_id else ""
        return Listing(f"# {selector} v{record.version} of {len(history)}, {record.kind}, by "
                       f"{record.author}{cycle}, {when(record.created)}\n"
                       + obj.method_source(selector, record.version).rstrip("\n"))

    def history(self, obj: Any, selector: str) -> Listing:
        """Every version of a method, oldest first."""
        obj = self._resolve(obj)
        records = obj.method_history(selector)  # also loads obj, so its label shows
        lines = [f"{selector} of {describe_briefly(obj)}:"]
        for record in records:
            body = (f"primitive {record.primitive}" if record.primitive
                    else f"{len((record.source or '').splitlines())} lines")
            cycle = f"  cycle {record.cycle_id}" if record.cycle_id else ""
            note = f"  ({record.note})" if record.note else ""
            lines.append(f"  v{record.version}  {when(record.created)}  {record.author:<9} "
                         f"{body}{cycle}{note}")
        return Listing("\n".join(lines))

    def cycles(self, n: int = 10) -> Listing:
        """The last ``n`` cognitive cycles, newest first (``cycle(id)`` shows one in full)."""
        from .kernel import recent_cycles

        rows = recent_cycles(self.root, int(n)) if "cycles" in self.root else []
        return Listing(cycles_table(rows))

    def cycle(self, cycle_id: str) -> dict[str, Any]:
        """The full record of one cycle (an id, or a unique prefix or suffix of one)."""
        records = self.root.get("cycles")
        record = None if records is None else records.get(cycle_id)
        if record is None:
            matches = [key for key in (records.keys() if records is not None else ())
                       if key.startswith(cycle_id) or key.endswith(cycle_id)]
            if len(matches) != 1:
                raise ShellError(f"no cycle {cycle_id!r}" if not matches else
                                 f"{cycle_id!r} matches {len(matches)} cycles: "
                                 f"{', '.join(matches[:5])}")
            record = records[matches[0]]
        return dict(record.data, cycle_id=record.cycle_id, status=record.status)

    def search(self, store: Any, text: str, k: int) -> list[Any]:
        # The embedder that built the catalog, as recorded in it: vectors of
        # another model are not comparable (catalog.EmbedderMismatchError).
        name = getattr(store, "embedder_name", None)
        if name is not None and (self._embedder is None or self._embedder.name != name):
            from .text import embedder_from_name

            self._embedder = embedder_from_name(name)
        if name is not None and getattr(self._embedder, "loaded", True) is False:
            print(f"loading the embedding model {name} for the search (a few seconds, "
                  "once per session) ...", file=sys.stderr, flush=True)
        return store.search(str(text), self._embedder if name else None, top_k=int(k))

    def find(self, text: str, k: int = 5) -> HitList:
        """Search the knowledge catalog (keywords and meaning), best first."""
        catalog = self.root.get("knowledge_catalog_obj")
        if catalog is None:
            raise ShellError("this image has no knowledge catalog")
        return HitList(self.search(catalog.store, text, k))

    def commit(self, note: str = "") -> Listing:
        """Write this session's changes to the image (refused in a read-only shell)."""
        count = self.pending()
        if self.read_only:
            raise ReadOnlyShell(
                "this shell is read-only: nothing was written"
                + (f" ({count} changed object(s) are pending)" if count else "")
                + ". Open it with `python batos.py shell --write` to commit; abort() discards "
                "the pending changes.")
        txn = self.tm.get()
        txn.user = "batos-shell"
        txn.note(note or "change made in the BAT OS shell")
        try:
            self.tm.commit()
        except ConflictError:
            self.tm.abort()
            self.tm.begin()
            raise ShellError(
                "conflict: the kernel changed the same object(s) meanwhile, so nothing was "
                "written and your changes were discarded. The objects now show the kernel's "
                "version; make the change again and commit().") from None
        self.tm.begin()
        return Listing(f"committed {count} changed object(s)")

    def abort(self) -> Listing:
        """Discard uncommitted changes and see the image as it is now."""
        count = self.pending()
        self.tm.abort()
        self.tm.begin()
        return Listing(f"discarded {count} changed object(s)" if count else "nothing to discard")

    def sync(self) -> Listing:
        """See the latest committed state (e.g. a method the kernel just installed)."""
        if count := self.pending():
            raise ShellError(f"{count} changed object(s) are not committed: commit() or "
                             "abort() first (sync() would discard them)")
        self.connection.sync()
        return Listing("in sync with the image" + (" (live)" if self.live else " (offline)"))


def _ls_other(obj: Any) -> Listing:
    keys = getattr(obj, "keys", None)
    if not callable(keys):
        return Listing(repr(obj))
    names = list(keys())
    lines = [f"{type(obj).__name__} with {len(names)} key(s)"]
    for key in names[:200]:
        value = obj[key]
        if isinstance(value, UvmObject):
            value._p_activate()  # a ghost's label is not loaded yet
        shown = describe_briefly(value) if isinstance(value, UvmObject) else type(value).__name__
        lines.append(f"  {key!s:<24} {shown}")
    if len(names) > 200:
        lines.append(f"  ... and {len(names) - 200} more")
    return Listing("\n".join(lines))


# --- running ----------------------------------------------------------------------------


def _display(value: Any) -> None:
    """sys.displayhook for the shell: listings as text, data pretty-printed."""
    if value is None:
        return
    builtins._ = value  # type: ignore[attr-defined]
    if isinstance(value, (Listing, HitList, UvmObject)):
        print(repr(value))
    else:
        print(pprint.pformat(value, width=100, sort_dicts=False))


@contextlib.contextmanager
def _shell_process(session: ShellSession) -> Iterator[None]:
    """Display hook, and the catalog search primitive the kernel would provide."""
    previous = sys.displayhook
    sys.displayhook = _display
    primitives.register("catalog.search", lambda catalog, query, top_k=5: [
        {"doc_id": h.doc_id, "text": h.text, "score": round(h.score, 4)}
        for h in session.search(catalog.store, query, top_k)])
    try:
        yield
    finally:
        sys.displayhook = previous
        primitives.unregister("catalog.search")


class _Console(code_module.InteractiveConsole):
    def showtraceback(self) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ShellError):  # a refusal or a clear message: no traceback
            self.write(f"{type(exc).__name__}: {exc}\n")
        elif type(exc).__name__ == "ClientDisconnected":
            self.write("the kernel's ZEO server is gone (the kernel stopped?). Leave the "
                       "shell and open it again.\n")
        else:
            super().showtraceback()


def run_code(session: ShellSession, source: str) -> int:
    """Run ``source`` like ``python -c``, showing the value of a final expression: 0, or 1."""
    namespace = session.namespace()
    with _shell_process(session):
        try:
            tree = ast.parse(source, "<shell -c>")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<shell -c>", "exec"), namespace)  # noqa: S102 - the user's code
            if last is not None:
                expression = ast.Expression(last.value)
                _display(eval(compile(expression, "<shell -c>", "eval"), namespace))  # noqa: S307
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:
            sys.stdout.flush()
            # Start the traceback at the user's code, not at this function.
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
            return 1
        finally:
            sys.stdout.flush()
    return 0


def interact(session: ShellSession) -> int:
    """The interactive console with readline history and tab completion."""
    namespace = session.namespace()
    history = Path(os.environ.get("BATOS_SHELL_HISTORY")
                   or Path.home() / ".batos_shell_history")
    try:
        import readline
        import rlcompleter

        readline.set_completer(rlcompleter.Completer(namespace).complete)
        readline.parse_and_bind("tab: complete")
        readline.set_history_length(2000)
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
    except ImportError:  # no readline on this platform: a plain console still works
        readline = None  # type: ignore[assignment]
    try:
        with _shell_process(session):
            _Console(namespace).interact(banner=session.banner(), exitmsg="")
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(history)
    return 0


def run_shell(settings: Settings, *, write: bool = False, code: str | None = None) -> int:
    """``batos.py shell``: the console, or ``code`` run non-interactively.

    Exit status: 0, 1 when ``code`` raised (traceback on stderr), 2 when the
    image cannot be opened (the reason on stderr).
    """
    try:
        session = open_session(settings, write=write)
    except (ShellError, img.ImageError) as exc:
        print(f"batos shell: {exc}", file=sys.stderr)
        return 2
    try:
        if code is None:
            status = interact(session)
        else:
            print(session.banner().splitlines()[0]
                  + (" [read-only]" if session.read_only else " [--write]"), file=sys.stderr)
            status = run_code(session, code)
        if session.pending() and not session.read_only:
            print(f"batos shell: {session.pending()} uncommitted change(s) discarded (call "
                  "commit() to keep changes)", file=sys.stderr)
        return status
    finally:
        session.close()
