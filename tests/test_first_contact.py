"""First contact: bad addresses, paths and options are refused at once, in one line,
before anything is created; a new image is made only where the user meant it.

Every case runs the real command (``batos.py``, ``chat_client.py``) in a subprocess.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel_process import BATOS, CHAT_CLIENT, PYTHON, KernelProcess, free_port, run_env

ONE_LINE_SECONDS = 20  # generous on a loaded machine; the point is "not after the slow part"


def batos(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(BATOS), *args], capture_output=True, text=True,
                          timeout=timeout, env=run_env(), cwd=cwd, stdin=subprocess.DEVNULL)


def chat(*args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(CHAT_CLIENT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env or run_env(), stdin=subprocess.DEVNULL)


def refused(done: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """Assert a one-line refusal with ``code`` naming ``phrases``; return the line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def nothing_created(directory: Path, before: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == before


# --- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "says"), [
    ("127.0.0.1:5650", "has no scheme: write tcp://127.0.0.1:5650"),
    ("garbage", "is not a ZeroMQ address; write tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "is not of the form tcp://HOST:PORT"),
    ("udp://127.0.0.1:5", "unsupported scheme 'udp'"),
])
def test_a_bad_endpoint_is_refused_at_once_by_the_client(endpoint, says):
    started = time.monotonic()
    done = chat("--ping", "--endpoint", endpoint)
    refused(done, 1, "--endpoint", says)
    assert time.monotonic() - started < ONE_LINE_SECONDS


def test_a_bad_endpoint_from_the_environment_is_named_as_such():
    done = chat("--ping", env=run_env(BATOS_ENDPOINT="127.0.0.1:5650"))
    refused(done, 1, "BATOS_ENDPOINT", "write tcp://127.0.0.1:5650")


def test_a_bad_endpoint_is_refused_by_the_kernel_before_any_image_exists(tmp_path):
    started = time.monotonic()
    done = batos("--db", str(tmp_path / "live_image.fs"), "--endpoint", "127.0.0.1:5650")
    refused(done, 2, "batos: endpoint '127.0.0.1:5650' has no scheme", "tcp://127.0.0.1:5650")
    assert time.monotonic() - started < ONE_LINE_SECONDS
    nothing_created(tmp_path, set())


@pytest.mark.parametrize(("zeo", "says"), [
    ("0.0.0.0:8100", "binds loopback only"),
    ("nonsense", "must be 'unix'"),
])
def test_a_bad_zeo_address_is_refused_before_any_image_exists(tmp_path, zeo, says):
    done = batos("--db", str(tmp_path / "live_image.fs"), "--zeo", zeo)
    refused(done, 2, says)
    nothing_created(tmp_path, set())


def test_a_port_in_use_is_refused_before_the_image_is_created(tmp_path):
    with KernelProcess(tmp_path / "first") as first:
        fresh = tmp_path / "second"
        fresh.mkdir()
        done = batos("--db", str(fresh / "live_image.fs"), "--endpoint", first.endpoint,
                     "--embedder", "hashing")
        refused(done, 2, f"cannot bind {first.endpoint}")
        nothing_created(fresh, set())


def test_a_locked_image_is_refused_before_the_bridge_binds(tmp_path):
    with KernelProcess(tmp_path) as kernel:
        port = free_port()
        done = batos("--db", kernel.db, "--endpoint", f"tcp://127.0.0.1:{port}")
        refused(done, 2, "is in use by PID", str(kernel.pid))


@pytest.mark.parametrize(("backend", "says"), [
    ("nonsense:x", "unknown cognition backend 'nonsense:x'"),
    ("replay:/no/such/cassette.jsonl", "replay cassette /no/such/cassette.jsonl does not exist"),
    ("llama-cpp:/no/such/model.gguf", "model file /no/such/model.gguf does not exist"),
    ("openai:127.0.0.1:8000/v1#m", "needs an http(s) URL"),
])
def test_a_backend_with_a_typo_is_refused_before_any_image_exists(tmp_path, backend, says):
    done = batos("--db", str(tmp_path / "live_image.fs"), "--backend", backend)
    refused(done, 2, says)
    nothing_created(tmp_path, set())


# --- image paths and creation -----------------------------------------------------------


def test_a_mistyped_db_creates_nothing_and_names_the_missing_directory(tmp_path):
    target = tmp_path / "nope" / "a" / "b" / "live.fs"
    done = batos("--db", str(target))
    refused(done, 2, f"directory {tmp_path / 'nope'} does not exist", "--create")
    nothing_created(tmp_path, set())


def test_create_makes_the_directories_and_says_the_image_is_new(tmp_path):
    target = tmp_path / "new" / "deeper" / "live_image.fs"
    kernel = KernelProcess(tmp_path, db=str(target), extra_args=["--create", "--log-level",
                                                                 "WARNING"])
    with kernel:
        assert target.exists()
    log = kernel.log_path.read_text()
    assert f"no image at {target}: creating a new, empty image there" in log


def test_a_new_image_in_an_existing_directory_needs_no_option(tmp_path):
    with KernelProcess(tmp_path, db=str(tmp_path / "mine.fs")) as kernel:
        assert (tmp_path / "mine.fs").exists()
    assert "creating a new, empty image" in kernel.log_path.read_text()


def test_a_db_that_is_a_directory_is_named_not_sent_to_fsrecover(tmp_path):
    done = batos("--db", str(tmp_path))
    line = refused(done, 2, "is a directory", f"--db {tmp_path / 'live_image.fs'}")
    assert "fsrecover" not in line


def test_a_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "plain").write_text("not a directory")
    done = batos("--db", str(tmp_path / "plain" / "live_image.fs"))
    refused(done, 2, f"{tmp_path / 'plain'} is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def read_only_run(directory: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run argv with ``directory`` mounted read-only (a private mount namespace: we run
    as root here, so permissions alone would not stop a write)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a directory read-only")
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"')
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, str(directory), *argv],
                          capture_output=True, text=True, timeout=120, env=run_env(),
                          stdin=subprocess.DEVNULL)
    if "mount:" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
    return done


def test_a_read_only_directory_is_refused_for_a_new_image(tmp_path):
    done = read_only_run(tmp_path, PYTHON, str(BATOS), "--db", str(tmp_path / "live_image.fs"))
    refused(done, 2, f"cannot write in {tmp_path} (read-only file system)")


def test_an_existing_image_on_a_read_only_mount_is_refused_and_stays_readable(tmp_path):
    with KernelProcess(tmp_path):
        pass
    done = read_only_run(tmp_path, PYTHON, str(BATOS), "--db", str(tmp_path / "live_image.fs"))
    refused(done, 2, "read-only file system", "batos.py shell")
    done = read_only_run(tmp_path, PYTHON, str(BATOS), "shell", "--db",
                         str(tmp_path / "live_image.fs"), "-c", "print(sorted(root)[:2])")
    assert done.returncode == 0 and "active_cycles" in done.stdout, done.stderr


def test_models_list_on_a_missing_image_creates_nothing(tmp_path):
    done = batos("models", "list", "--db", str(tmp_path / "live_image.fs"))
    refused(done, 1, f"no image at {tmp_path / 'live_image.fs'}", "Start BAT OS once")
    nothing_created(tmp_path, set())


def test_models_add_refuses_an_unknown_persona(tmp_path):
    with KernelProcess(tmp_path):
        pass
    done = batos("models", "add", "NOBODY", str(tmp_path), "--db", str(tmp_path / "live_image.fs"))
    refused(done, 1, "unknown persona 'NOBODY'", "ALFRED, BRICK, ROBIN, BABS")


def test_models_list_shows_what_each_persona_thinks_with(tmp_path):
    with KernelProcess(tmp_path):
        pass
    config = tmp_path / "batos.toml"
    config.write_text('[personas.BRICK]\nbackend = "openai"\nbase_url = "http://gpu:8000/v1"\n'
                      'model = "coder"\n')
    done = batos("models", "list", "--db", str(tmp_path / "live_image.fs"),
                 "--config", str(config))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["persona", "thinks", "with"]
    assert lines[1].startswith("ALFRED") and "nothing configured" in lines[1]
    assert lines[2].startswith("BRICK") and "openai: http://gpu:8000/v1 model coder" in lines[2]
    assert "no models stored yet" in done.stdout


# --- options and help ---------------------------------------------------------------------


def test_bad_options_are_one_line_with_the_documented_codes(tmp_path):
    refused(chat("--bogus"), 1, "unrecognized arguments: --bogus", "--help")
    refused(chat("--ping", "--timeout", "0"), 1, "--timeout: 0 must be greater than 0")
    refused(batos("--log-level", "LOUD"), 2, "invalid choice: 'LOUD'")
    refused(batos("models", "add"), 2, "required: persona, source")


def test_batos_help_describes_zeo_as_it_is():
    done = batos("--help")
    text = " ".join(done.stdout.split())
    assert "'unix' (the default" in text and "127.0.0.1:0" not in text
    assert "--create" in text


def test_puter_help_prints_the_usage_and_nothing_of_the_script():
    done = subprocess.run([str(Path(BATOS).parent / "puter.sh"), "--help"], capture_output=True,
                          text=True, timeout=60, env=run_env())
    assert done.returncode == 0
    assert done.stdout.startswith("BAT OS launcher")
    assert "set -euo" not in done.stdout and "### end of help" not in done.stdout
    assert "./puter.sh status" in done.stdout


def test_puter_status_names_a_malformed_endpoint():
    done = subprocess.run([str(Path(BATOS).parent / "puter.sh"), "status"], capture_output=True,
                          text=True, timeout=120, env=run_env(BATOS_ENDPOINT="127.0.0.1:5650"))
    assert done.returncode == 1, done.stderr
    assert "BATOS_ENDPOINT: endpoint '127.0.0.1:5650' has no scheme" in done.stderr


def test_puter_status_exit_codes():
    puter = str(Path(BATOS).parent / "puter.sh")
    done = subprocess.run([puter, "status"], capture_output=True, text=True, timeout=120,
                          env=run_env(BATOS_ENDPOINT=f"tcp://127.0.0.1:{free_port()}"))
    assert done.returncode == 3 and "no kernel answers at" in done.stderr, done.stderr


def test_no_traceback_when_a_client_is_interrupted_while_waiting(tmp_path):
    import signal

    proc = subprocess.Popen([PYTHON, str(CHAT_CLIENT), "--endpoint",
                             f"tcp://127.0.0.1:{free_port()}", "--call", "genesis_obj", "x"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env())
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "stopped waiting" in err


def test_the_client_history_keeps_no_huge_lines(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    history = tmp_path / "history"
    child = pexpect.spawn(sys.executable, [str(CHAT_CLIENT), "--endpoint",
                                           f"tcp://127.0.0.1:{free_port()}", "--dead-after",
                                           "0.3", "--history", str(history)],
                          env=run_env(), encoding="utf-8", timeout=30)
    child.expect_exact("batos> ")
    child.sendline("/frobnicate " + "x" * 5000)
    child.expect_exact("unknown command")
    child.expect_exact("batos> ")
    child.sendline("/help")
    child.expect_exact("batos> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    kept = history.read_text().splitlines()
    assert kept == ["/help", "/quit"]
