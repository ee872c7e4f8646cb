"""The operating-system layers that contain a cell, each usable and testable on its own.

Applied by the cell to itself, in this order, before it accepts any call:

``network``      a new, empty network namespace (needs root or user namespaces)
``user``         when started as root: switch to the unprivileged user ``nobody``
``rlimits``      address space, CPU seconds, open files, file size 0, no new processes
``no_new_privs`` no exec can ever gain privileges (also required by Landlock and seccomp)
``landlock``     no writes anywhere; reads only below the Python installation;
                 from ABI 4 no TCP bind/connect; from ABI 6 no signals or abstract
                 sockets outside the cell
``seccomp``      system calls that create processes, open sockets, trace, mount,
                 set clocks, change identity, load modules or write files fail
                 with EPERM

Where a layer is missing (an older kernel, not root, macOS) the cell runs with
the others and says which protect it; ``batos.py doctor`` shows the list.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LAYERS = ("network", "user", "rlimits", "no_new_privs", "landlock", "seccomp")
NOBODY = 65534

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000
_SYS_LANDLOCK_CREATE_RULESET = 444  # the same on x86_64 and aarch64
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


class LayerUnavailable(Exception):
    """This layer cannot be applied here; the message says why."""


# -- each layer ---------------------------------------------------------------------------
def die_with_parent() -> None:
    """The cell gets SIGKILL when the kernel process dies (Linux)."""
    try:
        _c().prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    except AttributeError:
        pass


def enter_network_namespace() -> str:
    if not hasattr(os, "unshare"):
        libc = _c()
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise LayerUnavailable(os.strerror(ctypes.get_errno()))
    else:
        try:
            os.unshare(_CLONE_NEWNET)
        except OSError as exc:
            raise LayerUnavailable(exc.strerror or str(exc)) from None
    return "a new network namespace without interfaces"


def drop_user() -> str:
    if os.geteuid() != 0:
        raise LayerUnavailable(f"not started as root (runs as uid {os.geteuid()})")
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return f"uid/gid {NOBODY} (nobody), no capabilities"


def set_rlimits(memory_bytes: int, cpu_seconds: int, open_files: int = 32) -> str:
    limits = (
        ("RLIMIT_AS", memory_bytes),
        ("RLIMIT_CPU", cpu_seconds),
        ("RLIMIT_NOFILE", open_files),
        ("RLIMIT_FSIZE", 0),
        ("RLIMIT_NPROC", 0),
        ("RLIMIT_CORE", 0),
    )
    for name, value in limits:
        number = getattr(resource, name, None)
        if number is not None:
            resource.setrlimit(number, (value, value) if name != "RLIMIT_CPU" else (value, value))
    return f"address space {memory_bytes // 2**20} MiB, CPU {cpu_seconds} s, files {open_files}, file size 0, processes 0"


def set_no_new_privs() -> str:
    try:
        result = _c().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except AttributeError:
        raise LayerUnavailable("prctl is not available (not Linux)") from None
    if result != 0:
        raise LayerUnavailable(os.strerror(ctypes.get_errno()))
    return "set"


def landlock_abi() -> int:
    """The Landlock ABI this kernel offers (0: none)."""
    try:
        version = _c().syscall(
            _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION
        )
    except AttributeError:
        return 0
    return max(int(version), 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_FS_READ = (1 << 2) | (1 << 3)  # READ_FILE | READ_DIR
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}


def _fs_rights(abi: int) -> int:
    return _FS_BY_ABI[max(k for k in _FS_BY_ABI if k <= abi)]


def apply_landlock(read_roots: list[str]) -> str:
    """Deny every file system access except reading below ``read_roots``."""
    abi = landlock_abi()
    if abi < 1:
        raise LayerUnavailable("this kernel has no Landlock")
    attr = _RulesetAttr(
        handled_access_fs=_fs_rights(abi),
        handled_access_net=3 if abi >= 4 else 0,  # BIND_TCP | CONNECT_TCP
        scoped=3 if abi >= 6 else 0,  # ABSTRACT_UNIX_SOCKET | SIGNAL
    )
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    libc = _c()
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise LayerUnavailable(f"creating a ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        for root in read_roots:
            try:
                fd = os.open(root, _O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = _PathBeneathAttr(allowed_access=_FS_READ, parent_fd=fd)
                if libc.syscall(
                    _SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH,
                    ctypes.byref(rule), 0,
                ) != 0:
                    raise LayerUnavailable(
                        f"adding a rule for {root} failed: {os.strerror(ctypes.get_errno())}"
                    )
            finally:
                os.close(fd)
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            raise LayerUnavailable(f"restricting failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    extras = []
    if abi >= 4:
        extras.append("no TCP")
    if abi >= 6:
        extras.append("no signals or abstract sockets outside")
    return f"ABI {abi}: no writes, reads only below {', '.join(read_roots)}" + (
        f"; {', '.join(extras)}" if extras else ""
    )


# System calls a cell never needs. Denied with EPERM (clone3 with ENOSYS, so the
# C library falls back to clone, which is checked by its flags).
DENIED_SYSCALLS = tuple(
    """
    fork vfork execve execveat ptrace process_vm_readv process_vm_writev kcmp
    pidfd_open pidfd_getfd pidfd_send_signal tkill
    socket socketpair connect bind listen accept accept4
    io_uring_setup io_uring_enter io_uring_register
    mount umount2 pivot_root chroot unshare setns move_mount open_tree fsopen fsmount
    fsconfig fspick mount_setattr
    clock_settime clock_adjtime adjtimex settimeofday
    reboot kexec_load kexec_file_load init_module finit_module delete_module swapon swapoff
    acct quotactl sethostname setdomainname syslog vhangup iopl ioperm bpf perf_event_open
    userfaultfd keyctl add_key request_key lookup_dcookie open_by_handle_at name_to_handle_at
    setuid setgid setreuid setregid setresuid setresgid setgroups setfsuid setfsgid capset
    mknod mknodat creat unlink unlinkat rename renameat renameat2 mkdir mkdirat rmdir link
    linkat symlink symlinkat chmod fchmod fchmodat chown fchown lchown fchownat truncate
    ftruncate utime utimes utimensat futimesat setxattr lsetxattr fsetxattr removexattr
    lremovexattr fremovexattr setrlimit personality
    """.split()
)
_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)


_seccomp: Any = None
_seccomp_problem = "not loaded"


def preload() -> None:
    """Load libseccomp's wrapper while files can still be read."""
    global _seccomp, _seccomp_problem
    try:
        import pyseccomp

        _seccomp = pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:
        _seccomp_problem = str(exc)


def apply_seccomp() -> str:
    if _seccomp is None:
        preload()
    seccomp = _seccomp
    if seccomp is None:
        raise LayerUnavailable(f"libseccomp is not usable: {_seccomp_problem}")
    deny = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.CTL_NNP, 0)  # no_new_privs is its own layer
    known = 0
    for name in DENIED_SYSCALLS:
        try:
            rules.add_rule(deny, name)
            known += 1
        except (OSError, ValueError, RuntimeError):
            pass  # not a system call on this architecture
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    rules.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    pid = os.getpid()
    rules.add_rule(deny, "kill", seccomp.Arg(0, seccomp.NE, pid))
    rules.add_rule(deny, "tgkill", seccomp.Arg(0, seccomp.NE, pid))
    # prlimit64 only to read limits, or to set the CPU limit (the runner does, per call)
    rules.add_rule(deny, "prlimit64", seccomp.Arg(1, seccomp.NE, resource.RLIMIT_CPU),
                   seccomp.Arg(2, seccomp.NE, 0))
    for flag in _WRITE_FLAGS:  # opening for writing, also where Landlock is missing
        rules.add_rule(deny, "openat", seccomp.Arg(2, seccomp.MASKED_EQ, flag, flag))
        try:
            rules.add_rule(deny, "open", seccomp.Arg(1, seccomp.MASKED_EQ, flag, flag))
        except (OSError, ValueError, RuntimeError):
            pass  # aarch64 has no open(2)
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "openat2")
    rules.load()
    return f"{known + 8} system call rules: no processes, sockets, tracing, mounts, clocks, writes"


# -- all of them ----------------------------------------------------------------------------
def apply(config: dict[str, Any], read_roots: list[str]) -> dict[str, str]:
    """Apply the layers ``config["layers"]`` names; return each layer's status.

    A status starting with "active" protects the cell; anything else says why not.
    """
    wanted = set(config.get("layers", LAYERS))
    status: dict[str, str] = {}
    die_with_parent()

    def attempt(name: str, action: Any, *args: Any) -> None:
        if name not in wanted:
            status[name] = "off (not requested)"
            return
        try:
            status[name] = "active: " + action(*args)
        except LayerUnavailable as exc:
            status[name] = f"unavailable: {exc}"

    attempt("network", enter_network_namespace)
    attempt("user", drop_user)
    attempt(
        "rlimits",
        set_rlimits,
        int(config.get("memory_bytes", 512 * 2**20)),
        int(config.get("cpu_seconds", 3600)),
    )
    attempt("no_new_privs", set_no_new_privs)
    if status.get("no_new_privs", "").startswith("active"):
        attempt("landlock", apply_landlock, read_roots)
        attempt("seccomp", apply_seccomp)
    else:
        for name in ("landlock", "seccomp"):
            if name in wanted:
                status[name] = "unavailable: needs no_new_privs"
            else:
                status[name] = "off (not requested)"
    return status


def set_call_cpu_limit(seconds: float) -> None:
    """Allow the next call ``seconds`` of CPU on top of what this cell has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    want = int(used + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (want, hard))
