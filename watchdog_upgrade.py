"""BAT OS watchdog, allopoietic upgrades: update_instructions.json, image backup, rollback.

The watchdog (min_watchdog_service.py, beside this file) imports this module; the
:class:`Upgrades` mixin gives its ``Watchdog`` the upgrade half of its work:
validate the instructions, back up the image, apply the steps, check the new
kernel, roll code and image back on failure, and write the result log. The
file and subprocess helpers both halves use live here too, so that this module
never imports the watchdog. Standard library only, like the watchdog: it must
keep working after an upgrade breaks the virtualenv. See docs/UPGRADES.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

INSTRUCTIONS = "update_instructions.json"
RESULT = "update_instructions.result.json"
MAX_INSTRUCTION_BYTES = 64 * 1024
MAX_STEPS, MAX_REQUIREMENTS, MAX_ARGV, MAX_TIMEOUT = 20, 50, 256, 3600.0
STEP_TIMEOUTS = {"pip_install": 900.0, "git_pull": 120.0, "git_checkout": 120.0, "run": 300.0}
STEP_KEYS = {  # kind -> (required keys, optional keys)
    "pip_install": ({"requirements"}, {"allow_urls", "timeout"}),
    "git_pull": (set(), {"remote", "branch", "timeout"}),
    "git_checkout": ({"ref"}, {"timeout"}),
    "run": ({"argv"}, {"timeout"}),
}
GIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]*$")  # never starts with '-': no options
URL_OR_PATH = re.compile(r"[/\\:@]|^[.~]")
SIGKILL = getattr(signal, "SIGKILL", 9)  # Windows has no SIGKILL; signal_group maps it
TAIL_BYTES = 4000


# == helpers shared with supervision ===========================================================
def utc_now(stamp: bool = False) -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S%fZ") if stamp else now.isoformat(timespec="milliseconds")


def exit_text(rc: int | None) -> str:
    if rc is not None and rc < 0 and -rc in signal.valid_signals():
        return f"was killed by {signal.Signals(-rc).name}"
    return f"exited with code {rc}"


def write_json(path: Path, data: Any) -> None:
    """Write atomically so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def free_path(path: Path) -> Path:
    """``path`` if unused, else the same name with a timestamp before its last suffix."""
    while path.exists() or path.is_symlink():
        path = path.with_name(f"{path.stem}.{utc_now(stamp=True)}{path.suffix}")
    return path


# == instructions ==============================================================================
class InstructionError(ValueError):
    """update_instructions.json is malformed or asks for something not allowed."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(obj := dict(pairs)) != len(pairs):  # JSON would silently keep the last one
        raise InstructionError(f"duplicate keys in {sorted(obj)}")
    return obj


def _check_keys(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    missing, unknown = required - obj.keys(), obj.keys() - required - optional
    if missing:
        raise InstructionError(f"{where}: missing keys {sorted(missing)}")
    if unknown:
        raise InstructionError(f"{where}: unknown keys {sorted(unknown)}")


def _timeout(value: Any, default: float | None, where: str) -> float | None:
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_TIMEOUT
    ):
        raise InstructionError(f"{where}: must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    return float(value)


def _git_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not GIT_NAME.match(value) or ".." in value:
        raise InstructionError(f"{where}: {value!r} is not a plain git name")
    return value


def _string_list(value: Any, limit: int, where: str) -> list[str]:
    if isinstance(value, str):
        raise InstructionError(f"{where}: must be a list of strings, not one string (no shell)")
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        raise InstructionError(f"{where}: must be a list of 1 to {limit} strings")
    for item in value:
        if not isinstance(item, str) or "\0" in item or len(item) > 4096:
            raise InstructionError(f"{where}: entries must be strings, got {item!r:.80}")
    return list(value)


def _validate_step(n: int, step: Any) -> dict[str, Any]:
    where = f"step {n}"
    if not isinstance(step, dict):
        raise InstructionError(f"{where}: must be an object")
    kind = step.get("kind")
    if kind not in STEP_KEYS:
        raise InstructionError(f"{where}: unknown kind {kind!r}; allowed: {sorted(STEP_KEYS)}")
    required, optional = STEP_KEYS[kind]
    _check_keys(step, required | {"kind"}, optional, where)
    out: dict[str, Any] = {"kind": kind}
    out["timeout"] = _timeout(step.get("timeout"), STEP_TIMEOUTS[kind], f"{where}.timeout")
    if kind == "pip_install":
        allow_urls = step.get("allow_urls", False)
        if not isinstance(allow_urls, bool):
            raise InstructionError(f"{where}.allow_urls: must be true or false")
        reqs = _string_list(step["requirements"], MAX_REQUIREMENTS, f"{where}.requirements")
        for req in reqs:
            if not req.strip() or len(req) > 300 or any(ord(c) < 32 for c in req):
                raise InstructionError(f"{where}: bad requirement {req!r:.80}")
            if req.lstrip().startswith("-"):
                raise InstructionError(f"{where}: {req!r} looks like a pip option; not allowed")
            if not allow_urls and URL_OR_PATH.search(req):
                raise InstructionError(
                    f"{where}: {req!r} looks like a URL or path; set allow_urls to allow it"
                )
        out["requirements"] = reqs
    elif kind == "git_pull":
        out["remote"] = _git_name(step.get("remote", "origin"), f"{where}.remote")
        out["branch"] = _git_name(step["branch"], f"{where}.branch") if "branch" in step else None
    elif kind == "git_checkout":
        out["ref"] = _git_name(step["ref"], f"{where}.ref")
    else:
        out["argv"] = _string_list(step["argv"], MAX_ARGV, f"{where}.argv")
        if not out["argv"][0]:
            raise InstructionError(f"{where}.argv: the program name is empty")
    return out


def validate_instructions(raw: bytes) -> dict[str, Any]:
    """Parse and check update_instructions.json; returns the normalised spec."""
    if len(raw) > MAX_INSTRUCTION_BYTES:
        raise InstructionError(f"file is larger than {MAX_INSTRUCTION_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except InstructionError:
        raise
    except (ValueError, RecursionError) as exc:  # also absurd nesting and huge numbers
        raise InstructionError(f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InstructionError("the top level must be a JSON object")
    _check_keys(data, {"version", "steps"}, {"description", "health_timeout"}, "top level")
    if type(data["version"]) is not int or data["version"] != 1:
        raise InstructionError(f"unsupported version {data['version']!r}; expected 1")
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > 4000:
        raise InstructionError("description must be a string of at most 4000 characters")
    steps = data["steps"]
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
        raise InstructionError(f"steps must be a list of 1 to {MAX_STEPS} steps")
    return {
        "version": 1,
        "description": description,
        "steps": [_validate_step(n, s) for n, s in enumerate(steps, 1)],
        "health_timeout": _timeout(data.get("health_timeout"), None, "health_timeout"),
    }


# == processes =================================================================================
def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """Start ``argv`` in its own process group so the whole tree can be signalled."""
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.name == "nt":
            proc.kill() if sig == SIGKILL else proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(
    proc: subprocess.Popen,
    grace: float,
    force: Callable[[], bool] = lambda: False,
    sig: int = signal.SIGTERM,
) -> bool:
    """Signal the group, SIGKILL it after ``grace`` s (or once ``force()``). True if killed."""
    signal_group(proc, sig)
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline and not force():
        time.sleep(0.05)
    killed = proc.poll() is None
    signal_group(proc, SIGKILL)  # also kills children left behind in the group
    proc.wait()
    return killed


def run_command(
    argv: list[str],
    cwd: Path,
    timeout: float,
    env: dict | None = None,
    abort: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run argv (never via a shell); capture exit code, duration and the output's tail."""
    rec: dict[str, Any] = {"argv": argv, "cwd": str(cwd), "exit_code": None, "timed_out": False}
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: a chatty step cannot block
        try:
            proc = spawn(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            rec["error"] = f"cannot start: {exc}"
        else:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    rec["timed_out"] = True
                    break
                if abort():
                    rec["error"] = "interrupted by a stop signal"
                    break
                time.sleep(0.05)
            if proc.returncode is None:
                terminate(proc, 5.0)
            rec["exit_code"] = proc.returncode
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - TAIL_BYTES))
        rec["output_tail"] = out.read().decode("utf-8", "replace")
    rec["duration"] = round(time.monotonic() - start, 3)
    return rec


def command_ok(rec: dict[str, Any]) -> bool:
    return rec["exit_code"] == 0 and not rec["timed_out"] and "error" not in rec


def command_problem(rec: dict[str, Any]) -> str:
    if rec["timed_out"]:
        return f"timed out after {rec['duration']:.1f} s"
    return rec.get("error") or exit_text(rec["exit_code"])


# == image backup ==============================================================================
def image_paths(db: Path, blob_dir: Path | None = None) -> dict[str, Path]:
    return {"fs": db, "index": Path(f"{db}.index"), "blob": blob_dir or Path(f"{db}.blob")}


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file or a directory tree."""
    if not path.is_dir():
        return path.stat().st_size, 1
    sizes = [(Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files]
    return sum(sizes), len(sizes)


def copy_verified(src: Path, dst: Path) -> dict[str, int]:
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)
    want, got = tree_size(src), tree_size(dst)
    if want != got:
        raise OSError(f"copy of {src} is incomplete: {got} (bytes, files) instead of {want}")
    return {"bytes": want[0], "files": want[1]}


def backup_image(db: Path, backup_root: Path, blob_dir: Path | None = None) -> Path:
    """Copy .fs, .index and the blob dir (the kernel must be stopped) into a new folder."""
    dest = free_path(backup_root / f"image-{utc_now(stamp=True)}")
    dest.mkdir(parents=True)
    items: dict[str, Any] = {}
    for key, src in image_paths(db, blob_dir).items():
        items[key] = None
        if src.exists():
            name = f"{db.name}.{key}" if key != "fs" else db.name
            items[key] = {"name": name, "path": str(src), **copy_verified(src, dest / name)}
    write_json(dest / "manifest.json", {"db": str(db), "created_at": utc_now(), "items": items})
    return dest


def prune_backups(backup_root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` image backups (0 keeps all; names sort by time)."""
    if keep > 0:
        for old in sorted(backup_root.glob("image-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore_image(db: Path, backup: Path, blob_dir: Path | None = None) -> None:
    """Replace .fs, .index and the blob dir with the backup's copies (absent ones removed)."""
    items = json.loads((backup / "manifest.json").read_text(encoding="utf-8"))["items"]
    for key, path in image_paths(db, blob_dir).items():
        aside = path.with_name(path.name + ".rollback-old")
        _remove(aside)
        if path.exists() or path.is_symlink():
            os.replace(path, aside)
        if items[key]:
            copy_verified(backup / items[key]["name"], path)
        _remove(aside)


# == upgrades ==================================================================================
class UpgradeFailed(Exception):
    """A step or the post-upgrade health check failed; the upgrade is rolled back."""


class Upgrades:
    """The upgrade half of the watchdog; mixed into ``Watchdog``, whose state it uses.

    The host also provides ``log``, ``set_state``, ``start_kernel``,
    ``stop_kernel`` and ``wait_healthy`` (see min_watchdog_service.py).
    """

    cfg: argparse.Namespace
    db: Path | None
    blob_dir: Path | None
    proc: subprocess.Popen | None
    state: str
    stop_signal: int
    seen_instructions: tuple[int, int] | None
    last_upgrade: dict[str, Any] | None

    def poll_upgrade(self) -> None:
        path = self.cfg.upgrade_dir / INSTRUCTIONS
        try:
            st = path.stat()
        except OSError:
            self.seen_instructions = None
            return
        seen, self.seen_instructions = self.seen_instructions, (st.st_size, st.st_mtime_ns)
        if seen == self.seen_instructions:  # unchanged for one poll: the writer has finished
            self.seen_instructions = None
            self.upgrade(path)

    def upgrade(self, path: Path) -> None:
        claimed = path.with_name(INSTRUCTIONS + ".processing")
        os.replace(path, claimed)  # claimed before anything runs: never applied twice
        result_path = free_path(path.with_name(RESULT))
        result: dict[str, Any] = {
            "instructions": str(path),
            "received_at": utc_now(),
            "outcome": "in_progress",
            "reason": None,
            "description": None,
            "steps": [],
            "backup": None,
            "previous_commit": None,
            "previous_branch": None,
            "new_commit": None,
            "restore_code": False,
        }
        write_json(result_path, result)
        try:
            with claimed.open("rb") as f:
                spec = validate_instructions(f.read(MAX_INSTRUCTION_BYTES + 1))
        except (OSError, InstructionError) as exc:
            result.update(outcome="rejected", reason=f"rejected: {exc}")
            self.log("upgrade_rejected", reason=str(exc), kernel_pid=self.proc and self.proc.pid)
        else:
            result["description"] = spec["description"]
            self.apply_upgrade(spec, result, lambda: write_json(result_path, result))
        done = free_path(
            path.with_name(
                INSTRUCTIONS + (".done" if result["outcome"] == "success" else ".failed")
            )
        )
        os.replace(claimed, done)
        result.update(finished_at=utc_now(), instructions_file=str(done))
        write_json(result_path, result)
        self.last_upgrade = {
            "outcome": result["outcome"],
            "reason": result["reason"],
            "result": str(result_path),
            "finished_at": result["finished_at"],
        }
        self.set_state(self.state)

    def git(self, *args: str) -> str | None:
        rec = run_command(
            ["git", "-C", str(self.cfg.repo), *args],
            self.cfg.repo,
            60,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
        return rec["output_tail"].strip() if command_ok(rec) else None

    def step_command(self, step: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        git_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        repo = ["git", "-C", str(self.cfg.repo)]
        if step["kind"] == "pip_install":
            pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
            return [self.cfg.python, "-m", "pip", "install", *step["requirements"]], pip_env
        if step["kind"] == "git_pull":
            branch = [step["branch"]] if step["branch"] else []
            return [*repo, "pull", "--ff-only", step["remote"], *branch], git_env
        if step["kind"] == "git_checkout":
            return [*repo, "checkout", step["ref"]], git_env
        argv = step["argv"]  # "python" means the kernel's interpreter (the venv's)
        return [self.cfg.python if argv[0] == "python" else argv[0], *argv[1:]], dict(os.environ)

    def apply_upgrade(
        self, spec: dict[str, Any], result: dict[str, Any], save: Callable[[], None]
    ) -> None:
        self.log("upgrade_started", description=spec["description"], steps=len(spec["steps"]))
        self.set_state("upgrading")
        self.stop_kernel("upgrade")
        try:
            if self.db is None:
                raise OSError("the image is not a local FileStorage (--db is a URI)")
            backup = backup_image(self.db, self.cfg.backup_dir, self.blob_dir)
        except OSError as exc:  # nothing was changed yet: run the old kernel again
            result.update(outcome="failed", reason=f"image backup failed: {exc}")
            self.log("upgrade_failed", reason=result["reason"])
            self.start_kernel()
            return
        result["backup"] = str(backup)
        # code is rolled back only when git steps ran: a reset would also wipe local edits
        result["restore_code"] = any(s["kind"].startswith("git_") for s in spec["steps"])
        result["previous_commit"] = self.git("rev-parse", "HEAD")
        result["previous_branch"] = self.git("symbolic-ref", "-q", "--short", "HEAD")
        if any(s["kind"] == "pip_install" for s in spec["steps"]):  # packages: manual rollback
            try:
                freeze = subprocess.run(
                    [self.cfg.python, "-m", "pip", "freeze"],
                    text=True,
                    capture_output=True,
                    timeout=120,
                ).stdout
            except (OSError, subprocess.TimeoutExpired) as exc:
                freeze = f"# pip freeze failed: {exc}\n"
            (backup / "pip-freeze.txt").write_text(freeze, encoding="utf-8")
        save()
        try:
            for n, step in enumerate(spec["steps"], 1):
                argv, env = self.step_command(step)
                rec = {
                    "kind": step["kind"],
                    **run_command(
                        argv, self.cfg.repo, step["timeout"], env, lambda: bool(self.stop_signal)
                    ),
                }
                result["steps"].append(rec)
                save()
                self.log(
                    "upgrade_step",
                    n=n,
                    kind=step["kind"],
                    exit_code=rec["exit_code"],
                    duration_s=rec["duration"],
                )
                if not command_ok(rec):
                    raise UpgradeFailed(f"step {n} ({step['kind']}) {command_problem(rec)}")
            result["new_commit"] = self.git("rev-parse", "HEAD")
            self.start_kernel()
            ok, detail = self.wait_healthy(spec["health_timeout"] or self.cfg.start_timeout)
            if not ok:
                raise UpgradeFailed(f"after the upgrade: {detail}")
        except UpgradeFailed as exc:
            result.update(outcome="rolled_back", reason=str(exc))
            self.log("upgrade_failed", reason=str(exc))
            self.rollback(result, save)
            return
        result["outcome"] = "success"
        self.log("upgrade_succeeded", new_commit=result["new_commit"])
        prune_backups(self.cfg.backup_dir, self.cfg.keep_backups)

    def rollback(
        self, result: dict[str, Any], save: Callable[[], None], restart: bool = True
    ) -> None:
        """Restore code and image, then start the previous kernel and check it answers."""
        self.set_state("rolling_back")
        self.stop_kernel("rollback")
        rb: dict[str, Any] = {"steps": [], "code_restored": None, "image_restored": False}
        result["rollback"] = rb
        prev, branch = result.get("previous_commit"), result.get("previous_branch")
        try:
            if prev and result.get("restore_code"):
                cmds = (
                    [["checkout", "-f", branch], ["reset", "--hard", prev]]
                    if branch
                    else [["checkout", "-f", "--detach", prev]]
                )
                for args in cmds:
                    rb["steps"].append(
                        run_command(["git", "-C", str(self.cfg.repo), *args], self.cfg.repo, 120)
                    )
                rb["code_restored"] = self.git("rev-parse", "HEAD") == prev
            if result.get("backup"):
                restore_image(self.db, Path(result["backup"]), self.blob_dir)
                rb["image_restored"] = True
        except (OSError, KeyError, ValueError) as exc:
            rb["error"] = f"{type(exc).__name__}: {exc}"
        if rb.get("error") or rb["code_restored"] is False:
            result["outcome"] = "rollback_incomplete"
        self.log(
            "upgrade_rolled_back",
            code_restored=rb["code_restored"],
            image_restored=rb["image_restored"],
            error=rb.get("error"),
        )
        save()
        if restart and not self.stop_signal:
            self.start_kernel()
            rb["kernel_healthy"], detail = self.wait_healthy(self.cfg.start_timeout)
            if not rb["kernel_healthy"]:  # the supervision loop takes over from here
                result["reason"] += f"; the previous kernel did not come back: {detail}"
                self.log("rollback_kernel_unhealthy", detail=detail)
            save()

    def recover_interrupted_upgrade(self) -> None:
        """A previous watchdog died mid-upgrade: roll back and mark the file failed."""
        claimed = self.cfg.upgrade_dir / (INSTRUCTIONS + ".processing")
        if not claimed.exists():
            return
        for path in sorted(self.cfg.upgrade_dir.glob("update_instructions.result*.json")):
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(result, dict) and result.get("outcome") == "in_progress":
                result.update(
                    outcome="rolled_back",
                    reason="interrupted: the watchdog stopped during the upgrade",
                )
                self.rollback(result, lambda p=path, r=result: write_json(p, r), restart=False)
        os.replace(claimed, free_path(self.cfg.upgrade_dir / (INSTRUCTIONS + ".failed")))
        self.log("upgrade_interrupted_recovered", file=str(claimed))
