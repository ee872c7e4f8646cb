"""The trial child: runs one generated method under process limits.

Started by trial.py as ``python -I -S -c <bootstrap>`` in a fresh working
directory; reads the job as JSON on stdin and writes the outcome as JSON on
stdout. Before any untrusted code runs it

1. asks the kernel for a new, empty network namespace (works when root);
2. imports everything the allowed modules need (nothing may load later);
3. sets RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC and
   RLIMIT_CORE=0;
4. installs an audit hook (which cannot be removed) refusing network use,
   process creation, ctypes, imports outside the allow-list, writes outside
   the working directory and reads outside it, the standard library and this
   package.

Also imported by trial.py (and the kernel) for :func:`to_plain`, :func:`pack`
and :func:`unpack`, so the module body stays light and free of side effects.
"""

from __future__ import annotations

import base64
import json
import linecache
import math
import os
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs the child ~7 ms of start-up
    from typing import Any

MAX_DEPTH = 24
MAX_NODES = 10_000
MAX_CHARS = 1_000_000
CAPTURE_CHARS = 8 * 1024
FILE_SIZE_LIMIT = 1 << 20
NETWORK_MODULES = frozenset(
    "socket _socket ssl _ssl http urllib ftplib smtplib poplib imaplib nntplib telnetlib "
    "xmlrpc asyncio select selectors socketserver".split()
)
_NETWORK_EVENT_PREFIXES = (
    "socket.",
    "http.",
    "urllib.",
    "ftplib.",
    "smtplib.",
    "poplib.",
    "imaplib.",
    "nntplib.",
    "telnetlib.",
)
_PROCESS_EVENTS = frozenset(
    "subprocess.Popen os.system os.exec os.posix_spawn os.spawn os.fork os.forkpty pty.spawn "
    "os.popen".split()
)
_PATH_WRITE_EVENTS = frozenset(
    "os.remove os.rename os.rmdir os.mkdir os.symlink os.link os.chmod os.chown os.truncate "
    "os.utime os.chflags os.setxattr os.removexattr os.mkfifo os.mknod shutil.rmtree "
    "shutil.copyfile shutil.copytree shutil.move shutil.make_archive shutil.copymode "
    "shutil.copystat".split()
)
_PATH_READ_EVENTS = frozenset({"os.listdir", "os.scandir"})
_REFUSED_EVENTS = frozenset(
    "sys.addaudithook resource.setrlimit resource.prlimit code.__new__ os.chdir os.fchdir "
    "os.chroot os.killpg signal.pthread_kill os.setuid os.setgid".split()
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


# -- plain data -------------------------------------------------------------------
class _Budget:
    def __init__(self, nodes: int, chars: int) -> None:
        self.nodes, self.chars = nodes, chars


def to_plain(
    value: Any,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    max_chars: int = MAX_CHARS,
) -> Any:
    """Plain data from a slot or result value, bounded in depth and size.

    None/bool/int/float/str/bytes stay; list/tuple/dict/set/frozenset are copied
    recursively; mapping-like objects (items() and keys() on their type) become
    dicts, other sized iterables with __getitem__ (persistent lists) become
    lists; anything else becomes the string ``"<opaque TYPE>"``. Only the
    object's type is consulted for that decision, so objects whose
    ``__getattr__`` does work are never woken up by it.
    """
    return _plain(value, max_depth, _Budget(max_nodes, max_chars))


def _plain(value: Any, depth: int, budget: _Budget) -> Any:
    if value is TRUNCATED:
        return value
    budget.nodes -= 1
    if budget.nodes < 0:
        return TRUNCATED
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return int(value) if value.bit_length() <= 12_000 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes, bytearray)):
        value = value if isinstance(value, str) else bytes(value)
        if len(value) > budget.chars:
            value = value[: max(budget.chars, 0)]
        budget.chars -= len(value)
        return str(value) if isinstance(value, str) else value
    if depth <= 0:
        return "<too deep>"
    kind = type(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth - 1, budget) for v in _bounded(value, budget)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict) or (
        callable(getattr(kind, "items", None)) and callable(getattr(kind, "keys", None))
    ):
        result = {}
        for pair in _bounded(value.items(), budget):
            if pair is TRUNCATED:
                result[TRUNCATED] = TRUNCATED
                break
            key, item = pair
            key = _plain(key, depth - 1, budget)
            try:
                hash(key)
            except TypeError:
                key = repr(key)
            result[key] = _plain(item, depth - 1, budget)
        return result
    if isinstance(value, (set, frozenset)):
        items = [_plain(v, depth - 1, budget) for v in _bounded(value, budget)]
        try:
            return set(items) if isinstance(value, set) else frozenset(items)
        except TypeError:
            return items
    if all(callable(getattr(kind, name, None)) for name in ("__len__", "__getitem__", "__iter__")):
        return [_plain(v, depth - 1, budget) for v in _bounded(value, budget)]
    return f"<opaque {kind.__name__}>"


def _bounded(iterable: Any, budget: _Budget) -> Any:
    """Items while the budget lasts, then one ``TRUNCATED`` marker."""
    for item in iterable:
        if budget.nodes <= 0:
            yield TRUNCATED
            return
        yield item


TRUNCATED = "<truncated>"


def pack(value: Any) -> Any:
    """Plain data -> JSON, keeping tuple/set/frozenset/bytes/non-string keys apart."""
    if isinstance(value, list):
        return [pack(v) for v in value]
    if isinstance(value, tuple):
        return {"t": [pack(v) for v in value]}
    if isinstance(value, dict):
        return {"d": [[pack(k), pack(v)] for k, v in value.items()]}
    if isinstance(value, set):
        return {"s": [pack(v) for v in value]}
    if isinstance(value, frozenset):
        return {"f": [pack(v) for v in value]}
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode("ascii")}
    return value


def unpack(data: Any) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(data, list):
        return [unpack(v) for v in data]
    if isinstance(data, dict):
        if len(data) != 1:
            raise ValueError("a packed container has exactly one tag")
        [(tag, body)] = data.items()
        if tag == "t":
            return tuple(unpack(v) for v in body)
        if tag == "d":
            return {unpack(k): unpack(v) for k, v in body}
        if tag == "s":
            return {unpack(v) for v in body}
        if tag == "f":
            return frozenset(unpack(v) for v in body)
        if tag == "b":
            return base64.b64decode(body)
        raise ValueError(f"unknown packed tag {tag!r}")
    return data


# -- the sandbox ------------------------------------------------------------------
class SandboxRefusal(PermissionError):
    """Raised by the audit hook; also recorded, so swallowing it does not hide it."""


_refusals: list[str] = []


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


def install_audit_hook(
    workdir: str, read_roots: tuple[str, ...], allowed_imports: frozenset[str]
) -> None:
    """Refuse network, processes, ctypes, foreign imports and file access outside bounds."""
    workdir = os.path.realpath(workdir)
    readable = (workdir, *(os.path.realpath(r) for r in read_roots), "/dev/null", "/dev/urandom")
    own_pid = os.getpid()

    def resolve(path: Any) -> str:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return os.path.realpath(os.path.join(workdir, os.fspath(path)))

    def refuse(message: str) -> None:
        _refusals.append(message)
        raise SandboxRefusal(message)

    def check_write(path: Any) -> None:
        if isinstance(path, int):
            refuse(f"write outside the working directory refused: file descriptor {path}")
        elif isinstance(path, (str, bytes, os.PathLike)) and not _inside(resolve(path), (workdir,)):
            refuse(f"write outside the working directory refused: {os.fsdecode(path)}")

    def check_read(path: Any) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and not _inside(resolve(path), readable):
            refuse(f"read outside the allowed directories refused: {os.fsdecode(path)}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool((flags or 0) & _WRITE_FLAGS)
            )
            if writing:
                check_write(path)
            else:
                check_read(path)
        elif event == "import":
            top = str(args[0]).partition(".")[0]
            if top not in allowed_imports:
                if top in NETWORK_MODULES:
                    refuse(f"network access refused (import of {args[0]})")
                refuse(f"import of module {args[0]!r} refused")
        elif event.startswith(_NETWORK_EVENT_PREFIXES):
            refuse(f"network access refused ({event})")
        elif event in _PROCESS_EVENTS:
            refuse(f"process creation refused ({event})")
        elif event.startswith("ctypes."):
            refuse(f"ctypes refused ({event})")
        elif event in _PATH_WRITE_EVENTS:
            for path in args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]:
                check_write(path)
        elif event in _PATH_READ_EVENTS:
            check_read(args[0] if args and args[0] is not None else ".")
        elif event == "os.kill":
            if args[0] != own_pid:
                refuse(f"signalling other processes refused (pid {args[0]})")
        elif event in _REFUSED_EVENTS:
            refuse(f"{event} refused")

    sys.addaudithook(hook)


def enter_network_namespace() -> bool:
    """Move this process into a new network namespace with no interfaces up."""
    import ctypes  # only here: loaded before the audit hook refuses ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: die with the parent
        return libc.unshare(0x40000000) == 0  # CLONE_NEWNET
    except (AttributeError, OSError):  # not Linux: the audit hook still refuses sockets
        return False


def set_limits(limits: dict) -> None:
    import resource

    cpu = max(1, math.ceil(float(limits["cpu_seconds"])))
    memory = int(limits["memory_bytes"])
    for name, value in (
        ("RLIMIT_CPU", (cpu, cpu + 1)),
        ("RLIMIT_AS", (memory, memory)),
        ("RLIMIT_FSIZE", (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT)),
        ("RLIMIT_NOFILE", (32, 32)),
        ("RLIMIT_NPROC", (0, 0)),
        ("RLIMIT_CORE", (0, 0)),
    ):
        resource.setrlimit(getattr(resource, name), value)


class _Capture:
    """Bounded stand-in for stdout/stderr while untrusted code runs."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0

    def write(self, text: str) -> int:
        room = CAPTURE_CHARS - self.size
        if room > 0:
            self.parts.append(str(text)[:room])
            self.size += len(self.parts[-1])
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.parts)


# -- running the job --------------------------------------------------------------
class TrialSelf:
    """The trial's ``self``: slot copies as attributes, sibling methods on demand."""

    def __getattr__(self, name: str) -> Any:
        function = _lookup(name) if not name.startswith("__") else None
        if function is None:
            raise AttributeError(f"trial copy of the target has no slot {name!r}")
        return types.MethodType(function, self)

    def __repr__(self) -> str:
        return "<trial copy of the target>"


_siblings: dict[str, Any] = {}
_sibling_sources: dict[str, str] = {}
_compile: Any = None


def _lookup(name: str) -> Any:
    if name not in _siblings and name in _sibling_sources:
        filename, source = f"<method {name}>", _sibling_sources[name]
        linecache.cache[filename] = (0, None, source.splitlines(True), filename)
        try:
            _siblings[name] = _compile(source, name, filename)
        except Exception as exc:
            raise RuntimeError(
                f"sibling method {name!r} does not compile: {type(exc).__name__}: {exc}"
            ) from None
    return _siblings.get(name)


def _compile_full(source: str, selector: str, filename: str) -> Any:
    """Unrestricted compile, used only to test the process sandbox on its own."""
    namespace: dict[str, Any] = {"__name__": "batos_method"}
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    if not isinstance(namespace.get(selector), types.FunctionType):
        raise ValueError(f"the source does not define a function named {selector!r}")
    return namespace[selector]


def _no_argument_call(function: Any) -> bool:
    code = function.__code__
    required = code.co_argcount - len(function.__defaults__ or ())
    kwonly = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    return required <= 1 and all(k in (function.__kwdefaults__ or {}) for k in kwonly)


def _error(exc: BaseException) -> tuple[str, str]:
    import traceback

    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<method")
    ]
    text = "".join(traceback.format_list(frames)) + "".join(
        traceback.format_exception_only(type(exc), exc)
    )
    message = f"raised {type(exc).__name__}: {exc}"
    return message[:500], ("Traceback (most recent call last):\n" + text)[-4000:]


def _state(target: TrialSelf) -> dict:
    return {
        k: json.dumps(pack(to_plain(v)), sort_keys=True)
        for k, v in vars(target).items()
        if k != "_p_changed"
    }


def _call(function: Any, slots: Any, args: list, kwargs: dict) -> dict:
    target = TrialSelf()
    vars(target).update(unpack(slots))
    before = _state(target)
    try:
        value = function(target, *args, **kwargs)
    except MemoryError:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure of untrusted code is a result
        message, trace = _error(exc)
        return {"got": None, "error": message, "traceback": trace}
    try:
        after, got = _state(target), pack(to_plain(value))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a mapping-like result whose items() fails
        message, trace = _error(exc)
        return {"got": None, "error": f"result is not plain data: {message}", "traceback": trace}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed and vars(target).get("_p_changed") is not True:
        error = f"changed slot {changed[0]!r} without setting self._p_changed = True"
        return {"got": got, "error": error, "traceback": None}
    return {"got": got, "error": None, "traceback": None}


def run_job(job: dict) -> dict:
    """Compile and call the method; every outcome becomes part of the returned dict."""
    global _compile
    from batos_uvm import restricted

    _compile = restricted.compile_method if job.get("restricted", True) else _compile_full
    _sibling_sources.update(job.get("methods") or {})
    result: dict[str, Any] = {"examples": [], "called": False}
    selector = job["selector"]
    linecache.cache["<method>"] = (0, None, job["source"].splitlines(True), "<method>")
    try:
        function = _compile(job["source"], selector, "<method>")
    except MemoryError:
        raise
    except BaseException as exc:  # noqa: BLE001
        result["compile_error"], result["traceback"] = _error(exc)
        return result
    _siblings[selector] = function
    examples = job.get("examples")
    if examples is None:
        if not _no_argument_call(function):
            return result
        examples = [{"args": [], "kwargs": pack({})}]
    result["called"] = True
    for example in examples:
        outcome = _call(function, job["slots"], unpack(example["args"]), unpack(example["kwargs"]))
        result["examples"].append(outcome)
        if _refusals:
            break
    return result


def main() -> None:
    """Entry point of the child process."""
    out = sys.stdout.buffer
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    protections = ["rlimits", "audit-hook"]
    if enter_network_namespace():
        protections.append("network-namespace")
    from batos_uvm import guardian, restricted  # noqa: F401 - loaded before the hook

    preload = sorted(guardian.ALLOWED_MODULES) + ["_strptime", "traceback", "linecache"]
    for name in preload:
        __import__(name)
    package_dir = os.path.dirname(os.path.abspath(__file__))
    stdlib_dir = os.path.dirname(os.__file__)
    set_limits(job["limits"])
    install_audit_hook(
        os.getcwd(), (stdlib_dir, package_dir), guardian.ALLOWED_MODULES | {"encodings"}
    )
    capture = _Capture()
    real = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = capture  # type: ignore[assignment]
    try:
        result = run_job(job)
    except MemoryError:
        result = {"fatal": "memory limit exceeded (MemoryError)"}
    finally:
        sys.stdout, sys.stderr = real  # a crash of the runner itself shows on stderr
    result["refusal"] = _refusals[0] if _refusals else None
    result["protections"] = protections
    result["stdout"] = capture.text()
    data = json.dumps(result, ensure_ascii=True).encode("ascii")
    view = memoryview(data)
    while view:  # os.write: no audit event, and no buffered stream to fail
        view = view[os.write(out.fileno(), view) :]
