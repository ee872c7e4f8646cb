"""The watchdog with real processes: tests/fake_kernel.py stands in for the kernel.

Each test runs min_watchdog_service.py as a subprocess with small backoffs and a health
command that asks the fake kernel's ready file, so every path (restart, crash loop,
signals, upgrades, rollbacks) runs for real in a few seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WATCHDOG = ROOT / "min_watchdog_service.py"
FAKE = Path(__file__).resolve().parent / "fake_kernel.py"

_spec = importlib.util.spec_from_file_location("min_watchdog_service", WATCHDOG)
wd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wd)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for a reaper is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class WatchdogRun:
    """One watchdog subprocess supervising the fake kernel inside ``tmp``."""

    def __init__(self, tmp: Path, fake_args=(), wd_args=(), repo: Path | None = None):
        self.tmp = tmp
        self.marker, self.ready = tmp / "marker.jsonl", tmp / "ready"
        self.logs, self.upgrade_dir = tmp / "logs", tmp / "upgrade"
        self.upgrade_dir.mkdir(exist_ok=True)
        self.image = tmp / "image.fs"
        probe = [sys.executable, str(FAKE), "--probe", str(self.ready)]
        cmd = [
            sys.executable,
            str(WATCHDOG),
            "--kernel",
            str(FAKE),
            "--log-dir",
            str(self.logs),
            "--health-cmd",
            json.dumps(probe),
            "--backoff-initial",
            "0.1",
            "--start-poll",
            "0.1",
            "--health-interval",
            "0.3",
            "--stop-timeout",
            "5",
            "--start-timeout",
            "10",
            "--upgrade-dir",
            str(self.upgrade_dir),
            "--upgrade-poll",
            "0.1",
            "--repo",
            str(repo or tmp),
            "--backup-dir",
            str(tmp / "backups"),
            *wd_args,
            "--",
            "--marker",
            str(self.marker),
            "--ready",
            str(self.ready),
            "--db",
            str(self.image),
            *fake_args,
        ]
        self.stderr_path = tmp / "watchdog.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=tmp, stdout=err, stderr=err)

    # -- observations
    def events(self, name: str | None = None) -> list[dict]:
        evs = read_jsonl(self.logs / "watchdog.jsonl")
        return [e for e in evs if name is None or e["event"] == name]

    def marks(self, name: str | None = None) -> list[dict]:
        return [m for m in read_jsonl(self.marker) if name is None or m["event"] == name]

    def status(self) -> dict:
        try:
            return json.loads((self.logs / "watchdog.status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_up(self, timeout: float = 15.0, not_pid: int | None = None) -> int:
        def up():
            st = self.status()
            pid = st.get("kernel_pid")
            return pid if st.get("state") == "up" and pid and pid != not_pid else None

        return wait_for(up, timeout)

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def drop_instructions(self, content: bytes | dict) -> None:
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        tmp = self.upgrade_dir / ".incoming"
        tmp.write_bytes(raw)
        os.replace(tmp, self.upgrade_dir / wd.INSTRUCTIONS)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for mark in self.marks("start"):  # never leave a kernel behind
            if alive(mark["pid"]):
                os.kill(mark["pid"], signal.SIGKILL)


@pytest.fixture
def runs():
    started: list[WatchdogRun] = []

    def make(*args, **kwargs) -> WatchdogRun:
        run = WatchdogRun(*args, **kwargs)
        started.append(run)
        return run

    yield make
    for run in started:
        run.close()


# --------------------------------------------------------------------------- supervision


def test_crash_is_restarted_with_exponential_backoff(tmp_path, runs):
    run = runs(
        tmp_path,
        ["--crash-after", "0.2"],
        ["--backoff-initial", "0.1", "--backoff-factor", "2", "--crash-loop-count", "50"],
    )
    wait_for(lambda: len(run.marks("start")) >= 4)
    delays = [e["details"]["delay_s"] for e in run.events("restart_scheduled")][:3]
    assert delays == [0.1, 0.2, 0.4]
    starts, exits = run.marks("start"), run.marks("exit")
    for n in range(3):  # the next kernel starts no earlier than crash time + delay
        assert exits[n]["code"] == 1
        assert starts[n + 1]["t"] - exits[n]["t"] >= delays[n] * 0.9
    assert all(
        e["details"]["reason"] == "kernel exited with code 1" for e in run.events("kernel_failed")
    )
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_children_of_a_crashed_kernel_are_killed(tmp_path, runs):
    child = tmp_path / "child.pid"
    run = runs(
        tmp_path,
        ["--crash-after", "0.5", "--child-pidfile", str(child)],
        ["--backoff-initial", "5"],
    )
    wait_for(child.exists)
    pid = int(wait_for(child.read_text))
    assert alive(pid)
    wait_for(lambda: run.events("restart_scheduled"))
    wait_for(lambda: not alive(pid), timeout=5)


def test_backoff_resets_after_a_healthy_period(tmp_path, runs):
    run = runs(
        tmp_path,
        ["--crash-after", "0.8"],
        ["--backoff-initial", "0.1", "--backoff-reset", "0.3", "--crash-loop-count", "50"],
    )
    wait_for(lambda: len(run.events("restart_scheduled")) >= 3)
    assert [e["details"]["delay_s"] for e in run.events("restart_scheduled")][:3] == [0.1] * 3
    assert run.events("backoff_reset")


def test_crash_loop_stops_and_reports_the_log_tail(tmp_path, runs):
    run = runs(
        tmp_path,
        ["--crash-after", "0", "--crash-code", "7", "--crash-lines", "60"],
        ["--backoff-initial", "0.05", "--crash-loop-count", "3", "--crash-loop-window", "30"],
    )
    assert run.wait_exit() == wd.EXIT_CRASH_LOOP
    assert len(run.marks("start")) == 3
    (loop,) = run.events("crash_loop")
    assert "crash loop" in loop["details"]["reason"]
    tail = loop["details"]["log_tail"]
    assert len(tail) == 50 and tail[-1] == "fake crash line 59"
    err = run.stderr()
    assert "crash loop: 3 failures" in err and "fake crash line 59" in err
    assert "fake crash line 59" in (run.logs / "kernel.log").read_text()
    assert run.status()["state"] == "crash_loop" and run.status()["kernel_pid"] is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_kernel_gracefully(tmp_path, runs, sig):
    run = runs(tmp_path)
    pid = run.wait_up()
    run.proc.send_signal(sig)
    assert run.wait_exit() == 0
    got = [m for m in run.marks("signal") if m["pid"] == pid]
    assert got and got[0]["signal"] == sig.name  # forwarded as received
    assert [m["code"] for m in run.marks("exit")] == [0]
    assert not alive(pid)
    assert not run.events("kernel_killed")
    assert run.status()["state"] == "stopped" and run.status()["kernel_pid"] is None


def test_kernel_ignoring_sigterm_is_killed_after_timeout(tmp_path, runs):
    run = runs(tmp_path, ["--ignore-sigterm"], ["--stop-timeout", "1"])
    pid = run.wait_up()
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0
    assert 0.9 <= time.monotonic() - t0 < 8
    assert run.marks("ignored") and not run.marks("exit")  # it never got to exit by itself
    assert run.events("kernel_killed")[0]["details"]["pid"] == pid
    assert run.events("kernel_stopped")[0]["details"]["exit_code"] == -signal.SIGKILL
    assert not alive(pid)


def test_kernel_exit_zero_stops_the_watchdog(tmp_path, runs):
    run = runs(tmp_path, ["--exit-after", "0.5"])
    assert run.wait_exit() == 0
    assert len(run.marks("start")) == 1
    assert run.events("kernel_exited") and not run.events("restart_scheduled")


def test_failed_health_checks_restart_the_kernel(tmp_path, runs):
    run = runs(
        tmp_path,
        ["--unready-after", "0.5"],
        ["--health-interval", "0.1", "--health-failures", "3", "--crash-loop-count", "50"],
    )
    first = run.wait_up()
    wait_for(lambda: len(run.marks("start")) >= 2)
    assert len(run.events("health_check_failed")) >= 3
    stopping = run.events("kernel_stopping")[0]["details"]
    assert stopping["pid"] == first and "3 consecutive failed health checks" in stopping["reason"]
    assert {"event": "signal", "signal": "SIGTERM"}.items() <= [
        m for m in run.marks("signal") if m["pid"] == first
    ][0].items()


def test_kernel_that_never_answers_is_restarted_after_start_timeout(tmp_path, runs):
    run = runs(tmp_path, ["--never-ready"], ["--start-timeout", "0.6", "--crash-loop-count", "50"])
    wait_for(lambda: len(run.marks("start")) >= 2)
    assert (
        "did not answer the health check within 0.6 s"
        in run.events("kernel_failed")[0]["details"]["reason"]
    )


# --------------------------------------------------------------------------- validation

GOOD = {
    "version": 1,
    "description": "example",
    "health_timeout": 120,
    "steps": [
        {"kind": "pip_install", "requirements": ["pkg==1.2"]},
        {"kind": "git_pull", "remote": "origin", "branch": "main"},
        {"kind": "git_checkout", "ref": "v1.2"},
        {"kind": "run", "argv": ["python", "scripts/migrate.py"], "timeout": 300},
    ],
}


def test_documented_example_is_valid():
    spec = wd.validate_instructions(json.dumps(GOOD).encode())
    assert [s["kind"] for s in spec["steps"]] == ["pip_install", "git_pull", "git_checkout", "run"]
    assert spec["steps"][0]["timeout"] == wd.STEP_TIMEOUTS["pip_install"]
    assert spec["health_timeout"] == 120.0


def _with_step(step: dict) -> dict:
    return {"version": 1, "steps": [step]}


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({"version": 2, "steps": [{"kind": "run", "argv": ["x"]}]}, "unsupported version"),
        ({"version": True, "steps": [{"kind": "run", "argv": ["x"]}]}, "unsupported version"),
        ({**GOOD, "extra": 1}, "unknown keys ['extra']"),
        ({"version": 1, "steps": []}, "steps must be a list"),
        ({"version": 1, "steps": [{"kind": "run", "argv": ["x"]}] * 21}, "1 to 20 steps"),
        (_with_step({"kind": "rm_rf"}), "unknown kind 'rm_rf'"),
        (_with_step({"kind": "run", "argv": "python migrate.py && rm -rf /"}), "not one string"),
        (_with_step({"kind": "run", "argv": []}), "list of 1 to"),
        (_with_step({"kind": "run", "argv": [""]}), "program name is empty"),
        (_with_step({"kind": "run", "argv": ["python", 3]}), "entries must be strings"),
        (_with_step({"kind": "run", "argv": ["x"], "shell": True}), "unknown keys ['shell']"),
        (_with_step({"kind": "run", "argv": ["x"], "timeout": 0}), "timeout"),
        (_with_step({"kind": "run", "argv": ["x"], "timeout": "5"}), "timeout"),
        (_with_step({"kind": "run", "argv": ["x"], "timeout": 99999}), "timeout"),
        (_with_step({"kind": "pip_install", "requirements": ["ok==1", 5]}), "must be strings"),
        (_with_step({"kind": "pip_install", "requirements": "pkg==1"}), "not one string"),
        (
            _with_step({"kind": "pip_install", "requirements": ["--index-url=http://evil"]}),
            "looks like a pip option",
        ),
        (
            _with_step({"kind": "pip_install", "requirements": ["-e", "."]}),
            "looks like a pip option",
        ),
        (
            _with_step({"kind": "pip_install", "requirements": ["https://evil/x.whl"]}),
            "URL or path",
        ),
        (
            _with_step({"kind": "pip_install", "requirements": ["pkg @ git+https://h/r"]}),
            "URL or path",
        ),
        (_with_step({"kind": "git_checkout", "ref": "--orphan"}), "not a plain git name"),
        (_with_step({"kind": "git_checkout", "ref": "a..b"}), "not a plain git name"),
        (_with_step({"kind": "git_pull", "remote": "origin; rm"}), "not a plain git name"),
        (b'{"version": 1, "version": 1, "steps": []}', "duplicate keys"),
        (b"{" + b" " * wd.MAX_INSTRUCTION_BYTES + b"}", "larger than"),
        (b"[" * 60000 + b"]" * 60000, "larger than"),
        (b"[" * 30000 + b"]" * 30000, "not valid UTF-8 JSON"),  # nesting beyond the recursion limit
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    ],
)
def test_malformed_instructions_are_rejected(data, fragment):
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(wd.InstructionError, match=None) as info:
        wd.validate_instructions(raw)
    assert fragment in str(info.value)


def test_urls_need_explicit_permission():
    step = {
        "kind": "pip_install",
        "requirements": ["pkg @ https://host/pkg.whl"],
        "allow_urls": True,
    }
    spec = wd.validate_instructions(json.dumps(_with_step(step)).encode())
    assert spec["steps"][0]["requirements"] == ["pkg @ https://host/pkg.whl"]


def test_kernel_option_and_free_path(tmp_path):
    args = ["--db", "a.fs", "--endpoint=tcp://127.0.0.1:7000", "--db=b.fs"]
    assert wd.kernel_option(args, "--db", "x") == "b.fs"
    assert wd.kernel_option(args, "--endpoint", "x") == "tcp://127.0.0.1:7000"
    assert wd.kernel_option([], "--endpoint", wd.DEFAULT_ENDPOINT) == wd.DEFAULT_ENDPOINT
    target = tmp_path / "update_instructions.json.done"
    assert wd.free_path(target) == target
    target.write_text("x")
    other = wd.free_path(target)
    assert other != target and other.name.startswith("update_instructions.json.")
    assert other.suffix == ".done"


# --------------------------------------------------------------------------- image backup


def make_image(db: Path) -> dict[str, bytes]:
    db.write_bytes(b"FS21" + os.urandom(3000))
    Path(f"{db}.index").write_bytes(os.urandom(500))
    blob = Path(f"{db}.blob")
    (blob / "0x00" / "0x01").mkdir(parents=True)
    (blob / ".layout").write_text("bushy\n")
    (blob / "0x00" / "0x01" / "0x03.blob").write_bytes(os.urandom(2048))
    return snapshot(db)


def snapshot(db: Path) -> dict[str, bytes]:
    files = {}
    for path in [db, Path(f"{db}.index"), *sorted(Path(f"{db}.blob").rglob("*"))]:
        if path.is_file():
            files[str(path.relative_to(db.parent))] = path.read_bytes()
    return files


def test_backup_and_restore_round_trip(tmp_path):
    db = tmp_path / "live_image.fs"
    before = make_image(db)
    backup = wd.backup_image(db, tmp_path / "backups")
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["items"]["blob"]["files"] == 2
    assert manifest["items"]["fs"]["bytes"] == len(before["live_image.fs"])
    # damage everything, add a stray blob, drop the index
    db.write_bytes(b"garbage")
    Path(f"{db}.index").unlink()
    (Path(f"{db}.blob") / "stray.blob").write_bytes(b"x")
    wd.restore_image(db, backup)
    assert snapshot(db) == before
    assert not list(tmp_path.glob("*.rollback-old"))


def test_restore_removes_files_absent_at_backup_time(tmp_path):
    db = tmp_path / "new.fs"
    backup = wd.backup_image(db, tmp_path / "backups")  # no image yet
    make_image(db)
    wd.restore_image(db, backup)
    assert not db.exists() and not Path(f"{db}.blob").exists()


# --------------------------------------------------------------------------- upgrades

MIGRATE = """\
import pathlib, sys
db = pathlib.Path(sys.argv[1])
db.write_bytes(db.read_bytes() + b"migrated\\n")
pathlib.Path(f"{db}.index").write_bytes(b"new index")
(pathlib.Path(f"{db}.blob") / "0x00" / "0x09.blob").write_bytes(b"new blob")
print("migration done")
"""


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_CONFIG_GLOBAL": os.devnull,  # no signing or hooks from the user's own config
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    out = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path) -> dict:
    """A scratch checkout on branch main at v1; tags v2 (adds migrate.py), v3 (breaks it)."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "VERSION").write_text("1\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "v1")
    git(path, "tag", "v1")
    (path / "VERSION").write_text("2\n")
    (path / "migrate.py").write_text(MIGRATE)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "v2")
    git(path, "tag", "v2")
    (path / "BROKEN").write_text("the kernel refuses to start with this file\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "v3")
    git(path, "tag", "v3")
    git(path, "reset", "-q", "--hard", "v1")
    return {
        "path": path,
        **{t: git(path, "rev-parse", t + "^{commit}") for t in ("v1", "v2", "v3")},
    }


def upgrade_run(tmp_path, runs, repo) -> tuple[WatchdogRun, dict, int]:
    run = runs(tmp_path, ["--fail-if-exists", str(repo["path"] / "BROKEN")], repo=repo["path"])
    before = make_image(run.image)
    return run, before, run.wait_up()


def wait_result(run: WatchdogRun, suffix: str, timeout: float = 30.0) -> dict:
    wait_for(lambda: list(run.upgrade_dir.glob(wd.INSTRUCTIONS + "*" + suffix)), timeout)
    (path,) = run.upgrade_dir.glob("update_instructions.result*.json")
    return json.loads(path.read_text())


def test_upgrade_success(tmp_path, runs, repo):
    run, before, old_pid = upgrade_run(tmp_path, runs, repo)
    run.drop_instructions(
        {
            "version": 1,
            "description": "to v2",
            "health_timeout": 10,
            "steps": [
                {"kind": "git_checkout", "ref": "v2"},
                {"kind": "run", "argv": ["python", "migrate.py", str(run.image)], "timeout": 30},
            ],
        }
    )
    result = wait_result(run, ".done")
    assert result["outcome"] == "success", result
    assert result["previous_commit"] == repo["v1"] and result["new_commit"] == repo["v2"]
    assert git(repo["path"], "rev-parse", "HEAD") == repo["v2"]
    assert [s["kind"] for s in result["steps"]] == ["git_checkout", "run"]
    migrate = result["steps"][1]
    assert migrate["exit_code"] == 0 and "migration done" in migrate["output_tail"]
    assert migrate["argv"][0] == sys.executable  # "python" means the kernel's interpreter
    assert run.image.read_bytes().endswith(b"migrated\n")
    backup = Path(result["backup"])  # the backup holds the image as it was before
    assert (backup / "image.fs").read_bytes() == before["image.fs"]
    assert (backup / "image.fs.blob" / "0x00" / "0x01" / "0x03.blob").read_bytes() == before[
        "image.fs.blob/0x00/0x01/0x03.blob"
    ]
    assert not (run.upgrade_dir / wd.INSTRUCTIONS).exists()
    new_pid = run.wait_up(not_pid=old_pid)
    assert alive(new_pid) and not alive(old_pid)
    assert [m["signal"] for m in run.marks("signal") if m["pid"] == old_pid] == ["SIGTERM"]
    assert run.status()["last_upgrade"]["outcome"] == "success"


FAILURES = {
    "run_exit_1": (
        [{"kind": "run", "argv": ["python", "-c", "import sys; sys.exit(1)"]}],
        "step 3 (run) exited with code 1",
    ),
    "run_timeout": (
        [{"kind": "run", "argv": ["python", "-c", "import time; time.sleep(60)"], "timeout": 0.5}],
        "step 3 (run) timed out",
    ),
    "git_bad_ref": (
        [{"kind": "git_checkout", "ref": "no-such-ref"}],
        "step 3 (git_checkout) exited with code 1",
    ),
    "kernel_broken": (
        [{"kind": "git_checkout", "ref": "v3"}],
        "after the upgrade: kernel exited with code 1 early",
    ),
    "pip_missing": (
        [{"kind": "pip_install", "requirements": ["batos-no-such-package-xyz==0.0"]}],
        "step 3 (pip_install) exited with code 1",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_upgrade_rolls_back_image_and_code(tmp_path, runs, repo, case):
    run, before, old_pid = upgrade_run(tmp_path, runs, repo)
    extra, reason = FAILURES[case]
    run.drop_instructions(
        {
            "version": 1,
            "health_timeout": 5,
            "steps": [
                {"kind": "git_checkout", "ref": "v2"},
                {"kind": "run", "argv": ["python", "migrate.py", str(run.image)]},
                *extra,
            ],
        }
    )
    result = wait_result(run, ".failed", timeout=120)
    assert result["outcome"] == "rolled_back", result
    assert reason in result["reason"]
    assert result["steps"][1]["exit_code"] == 0  # the migration did change the image ...
    assert snapshot(run.image) == before  # ... and the rollback put it back, byte for byte
    assert git(repo["path"], "rev-parse", "HEAD") == repo["v1"]
    assert git(repo["path"], "symbolic-ref", "--short", "HEAD") == "main"
    rb = result["rollback"]
    assert rb["code_restored"] is True and rb["image_restored"] is True
    assert rb["kernel_healthy"] is True
    for step in result["steps"]:
        assert {"argv", "exit_code", "duration", "output_tail"} <= step.keys()
    if case == "pip_missing":  # what was installed before, for a manual package rollback
        assert "pytest==" in (Path(result["backup"]) / "pip-freeze.txt").read_text()
    new_pid = run.wait_up(not_pid=old_pid)
    assert run.status()["last_upgrade"]["outcome"] == "rolled_back"
    assert alive(new_pid)


def test_malformed_instructions_leave_the_kernel_running(tmp_path, runs, repo):
    run, before, pid = upgrade_run(tmp_path, runs, repo)
    bad = [
        (b"{this is not json", "not valid UTF-8 JSON"),
        (json.dumps(_with_step({"kind": "reboot"})).encode(), "unknown kind 'reboot'"),
        (
            json.dumps(_with_step({"kind": "run", "argv": "python migrate.py"})).encode(),
            "not one string",
        ),
    ]
    for n, (raw, fragment) in enumerate(bad, 1):
        run.drop_instructions(raw)
        wait_for(lambda n=n: len(list(run.upgrade_dir.glob(wd.INSTRUCTIONS + "*.failed"))) == n)
        results = [
            json.loads(p.read_text())
            for p in run.upgrade_dir.glob("update_instructions.result*.json")
        ]
        assert len(results) == n
        (latest,) = [r for r in results if fragment in (r["reason"] or "")]
        assert latest["outcome"] == "rejected" and latest["steps"] == []
    assert run.status()["kernel_pid"] == pid and run.status()["state"] == "up"
    assert len(run.marks("start")) == 1 and not run.marks("signal")
    assert snapshot(run.image) == before
    assert git(repo["path"], "rev-parse", "HEAD") == repo["v1"]
    assert not (tmp_path / "backups").exists()


def test_stop_signal_during_upgrade_rolls_back_and_exits(tmp_path, runs, repo):
    run, before, pid = upgrade_run(tmp_path, runs, repo)
    run.drop_instructions(
        {
            "version": 1,
            "steps": [
                {"kind": "git_checkout", "ref": "v2"},
                {"kind": "run", "argv": ["python", "migrate.py", str(run.image)]},
                {"kind": "run", "argv": ["python", "-c", "import time; time.sleep(60)"]},
            ],
        }
    )
    wait_for(lambda: len(run.events("upgrade_step")) == 2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0
    result = wait_result(run, ".failed")
    assert result["outcome"] == "rolled_back"
    assert result["steps"][2]["error"] == "interrupted by a stop signal"
    assert snapshot(run.image) == before
    assert git(repo["path"], "rev-parse", "HEAD") == repo["v1"]
    assert len(run.marks("start")) == 1 and not alive(pid)  # no kernel started on the way out


def test_upgrade_interrupted_by_a_killed_watchdog_is_rolled_back_on_restart(tmp_path, runs, repo):
    run, before, _ = upgrade_run(tmp_path, runs, repo)
    run.drop_instructions(
        {
            "version": 1,
            "steps": [
                {"kind": "git_checkout", "ref": "v2"},
                {"kind": "run", "argv": ["python", "migrate.py", str(run.image)]},
                {"kind": "run", "argv": ["python", "-c", "import time; time.sleep(3)"]},
            ],
        }
    )
    wait_for(lambda: len(run.events("upgrade_step")) == 2)
    run.proc.kill()  # the watchdog dies mid-upgrade: image migrated, code at v2
    run.proc.wait()
    assert git(repo["path"], "rev-parse", "HEAD") == repo["v2"]
    assert (run.upgrade_dir / (wd.INSTRUCTIONS + ".processing")).exists()
    again = runs(tmp_path, ["--fail-if-exists", str(repo["path"] / "BROKEN")], repo=repo["path"])
    again.wait_up()
    result = wait_result(again, ".failed")
    assert result["outcome"] == "rolled_back" and "interrupted" in result["reason"]
    assert snapshot(run.image) == before
    assert git(repo["path"], "rev-parse", "HEAD") == repo["v1"]
    assert not (run.upgrade_dir / (wd.INSTRUCTIONS + ".processing")).exists()


def test_git_pull_that_breaks_the_kernel_is_reset(tmp_path, runs, repo):
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo["path"]), str(origin)], check=True)
    git(repo["path"], "remote", "add", "origin", str(origin))
    git(origin, "update-ref", "refs/heads/main", repo["v3"])  # upstream now ships the break
    run, before, _ = upgrade_run(tmp_path, runs, repo)
    run.drop_instructions(
        {
            "version": 1,
            "health_timeout": 5,
            "steps": [
                {"kind": "git_pull", "remote": "origin", "branch": "main"},
                {"kind": "run", "argv": ["python", "migrate.py", str(run.image)]},
            ],
        }
    )
    result = wait_result(run, ".failed")
    assert result["outcome"] == "rolled_back" and result["new_commit"] == repo["v3"]
    assert result["steps"][0]["argv"][-4:] == ["pull", "--ff-only", "origin", "main"]
    assert git(repo["path"], "rev-parse", "HEAD") == repo["v1"]
    assert git(repo["path"], "symbolic-ref", "--short", "HEAD") == "main"
    assert snapshot(run.image) == before


def test_old_backups_are_pruned(tmp_path):
    for n in range(4):
        (tmp_path / f"image-2026010{n}T000000000000Z").mkdir()
    (tmp_path / "keep-me").mkdir()
    wd.prune_backups(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "image-20260102T000000000000Z",
        "image-20260103T000000000000Z",
        "keep-me",
    ]
    wd.prune_backups(tmp_path, 0)
    assert len(list(tmp_path.iterdir())) == 3


def test_backup_with_a_separate_blob_dir(tmp_path):
    db, blobs = tmp_path / "data.fs", tmp_path / "blobs"
    db.write_bytes(b"FS21 data")
    (blobs / "0x01").mkdir(parents=True)
    (blobs / "0x01" / "a.blob").write_bytes(b"blob bytes")
    backup = wd.backup_image(db, tmp_path / "backups", blobs)
    assert (backup / "data.fs.blob" / "0x01" / "a.blob").read_bytes() == b"blob bytes"
    (blobs / "0x01" / "a.blob").write_bytes(b"changed")
    wd.restore_image(db, backup, blobs)
    assert (blobs / "0x01" / "a.blob").read_bytes() == b"blob bytes"
    assert not Path(f"{db}.blob").exists()


# --------------------------------------------------------------------------- the real kernel


def test_real_kernel_is_supervised_through_the_default_probe(tmp_path):
    """batos.py behind the watchdog, health from chat_client.py --ping (the default probe)."""
    pytest.importorskip("zmq")
    pytest.importorskip("ZODB")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    logs = tmp_path / "logs"
    cmd = [
        sys.executable,
        str(WATCHDOG),
        "--log-dir",
        str(logs),
        "--start-poll",
        "0.3",
        "--upgrade-dir",
        str(tmp_path),
        "--repo",
        str(tmp_path),
        "--",
        "--db",
        str(tmp_path / "live_image.fs"),
        "--endpoint",
        f"tcp://127.0.0.1:{port}",
        "--demo",
        "--embedder",
        "hashing",
    ]
    with (tmp_path / "watchdog.stderr").open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=err, stderr=err, env=env)
    try:
        status = logs / "watchdog.status.json"
        pid = wait_for(
            lambda: (
                status.exists()
                and json.loads(status.read_text())["state"] == "up"
                and json.loads(status.read_text())["kernel_pid"]
            ),
            timeout=120,
        )
        # the kernel answers while it still opens its image: stop it once the image is there
        wait_for(lambda: (tmp_path / "live_image.fs").exists(), timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not alive(pid)
        stopped = [e for e in read_jsonl(logs / "watchdog.jsonl") if e["event"] == "kernel_stopped"]
        assert stopped[-1]["details"]["exit_code"] == 0  # the kernel shut down by itself
        assert (tmp_path / "live_image.fs").stat().st_size > 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError, ValueError, TypeError):  # never leave a kernel behind
            os.kill(
                json.loads((logs / "watchdog.status.json").read_text())["kernel_pid"],
                signal.SIGKILL,
            )
