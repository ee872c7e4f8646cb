"""Opening, awakening and closing the living image, in real files and processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from batos_uvm.awakening import PERSONA_ROOTS, STATES, incarnate
from batos_uvm.codex import PERSONA_CODEX, read_golden_dataset
from batos_uvm.config import REPO_DIR, Settings, load_settings
from batos_uvm.image import ImageDamaged, open_image
from batos_uvm.objects import UvmObject

BATOS = str(REPO_DIR / "batos.py")


def settings_for(tmp_path: Path, **extra) -> Settings:
    return load_settings(None, {"db": str(tmp_path / "live_image.fs"), "zeo": "off", **extra},
                         environ={})


def test_incarnation_creates_the_primordial_objects_once(tmp_path):
    image = open_image(settings_for(tmp_path))
    try:
        conn = image.db.open()
        created = incarnate(conn.root())
        transaction.commit()
        root = conn.root()
        for name in ("traits_obj", "pLLM_obj", "genesis_obj", "knowledge_catalog_obj",
                     "psm_prototypes_obj", "orchestrator_obj", *PERSONA_ROOTS.values()):
            assert name in created and isinstance(root[name], UvmObject)
        brick = root["brick_prototype_obj"]
        assert brick.codex["system_prompt"] == PERSONA_CODEX["BRICK"]["system_prompt"]
        assert brick.name == "BRICK"
        assert [getattr(root["psm_prototypes_obj"], s).name for s in STATES] == list(STATES)
        assert root["genesis_obj"].responds_to("doesNotUnderstand")
        oids = {name: root[name]._p_oid for name in created if hasattr(root[name], "_p_oid")}
        conn.close()
    finally:
        image.close()
    image = open_image(settings_for(tmp_path))
    try:
        conn = image.db.open()
        assert incarnate(conn.root()) == []  # resumes, re-creates nothing
        assert {name: conn.root()[name]._p_oid for name in oids} == oids
        conn.close()
    finally:
        image.close()


def test_second_opener_gets_a_clear_in_use_error(tmp_path):
    settings = settings_for(tmp_path)
    image = open_image(settings)
    try:
        code = (
            "import sys; from batos_uvm.config import load_settings;"
            "from batos_uvm.image import open_image, ImageInUse\n"
            f"s = load_settings(None, {{'db': {str(settings.db_path)!r}, 'zeo': 'off'}}, environ={{}})\n"
            "try:\n    open_image(s)\nexcept ImageInUse as e:\n    print(e); sys.exit(3)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 3, result.stderr
        assert f"is in use by PID {os.getpid()}" in result.stdout
    finally:
        image.close()


def test_kernel_refuses_an_image_in_use(tmp_path):
    settings = settings_for(tmp_path)
    image = open_image(settings)
    try:
        result = subprocess.run(
            [sys.executable, BATOS, "--db", str(settings.db_path), "--zeo", "off",
             "--embedder", "hashing", "--endpoint", "tcp://127.0.0.1:0"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        image.close()
    assert result.returncode == 2
    assert "in use by PID" in result.stderr and "Traceback" not in result.stderr


def _committed_image(tmp_path: Path, transactions: int = 3) -> Path:
    path = tmp_path / "live_image.fs"
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    conn = db.open()
    for number in range(transactions):
        conn.root()[f"k{number}"] = UvmObject(value=number, padding="x" * 500)
        transaction.commit()
    db.close()
    for extra in path.parent.glob("live_image.fs.*"):
        if extra.suffix in {".index", ".lock", ".tmp"}:
            extra.unlink()
    return path


def test_truncated_image_is_refused_and_left_untouched(tmp_path):
    path = _committed_image(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])  # cut into the last committed transaction
    before = path.read_bytes()
    with pytest.raises(ImageDamaged) as info:
        open_image(settings_for(tmp_path))
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


def test_garbage_image_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "live_image.fs"
    path.write_bytes(b"this is not a FileStorage" * 10)
    with pytest.raises(ImageDamaged, match=str(path)):
        open_image(settings_for(tmp_path))
    assert path.read_bytes() == b"this is not a FileStorage" * 10


CRASH_DURING_COMMIT = """
import os, sys, transaction, ZODB, ZODB.FileStorage
from batos_uvm.objects import UvmObject
db = ZODB.DB(ZODB.FileStorage.FileStorage(sys.argv[1]))
conn = db.open()
conn.root()["late"] = UvmObject(value="never committed")
txn = transaction.get()
for resource in list(txn._resources):
    resource.tpc_begin(txn)
    resource.commit(txn)
    resource.tpc_vote(txn)
os._exit(9)  # die between vote and finish
"""


def test_uncommitted_tail_from_a_crash_is_discarded(tmp_path):
    path = _committed_image(tmp_path)
    good_size = path.stat().st_size
    result = subprocess.run([sys.executable, "-c", CRASH_DURING_COMMIT, str(path)], timeout=60)
    assert result.returncode == 9
    assert path.stat().st_size > good_size  # the uncommitted transaction is in the file
    image = open_image(settings_for(tmp_path))
    try:
        conn = image.db.open()
        assert "late" not in conn.root() and conn.root()["k2"].value == 2
        conn.close()
    finally:
        image.close()


def test_golden_dataset_reports_bad_lines_by_number(tmp_path):
    path = tmp_path / "codex.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\nnot json\n[1]\n{"prompt": "only"}\n\n'
                    '{"prompt": "c", "response": "d"}\n')
    entries, problems = read_golden_dataset(path)
    assert [e.line for e in entries] == [1, 6]
    assert [number for number, _ in problems.problems] == [2, 3, 4]
    assert "line 2: not JSON" in str(problems) and "line 4: missing text field(s): response" in str(problems)
    shipped, none = read_golden_dataset(REPO_DIR / "persona_codex.jsonl")
    assert none is None and len(shipped) >= 7


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_kernel_shuts_down_cleanly_on_signal(tmp_path, sig):
    db = tmp_path / "live_image.fs"
    process = subprocess.Popen(
        [sys.executable, BATOS, "--db", str(db), "--embedder", "hashing",
         "--endpoint", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 120
        for line in process.stdout:
            if "kernel ready" in line or time.time() > deadline:
                break
        assert (tmp_path / "live_image.fs.zeo.json").exists()
        process.send_signal(sig)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not (tmp_path / "live_image.fs.zeo.json").exists()
    # the storage was closed: the lock is free and everything committed is there
    storage = ZODB.FileStorage.FileStorage(str(db), read_only=True)
    db_obj = ZODB.DB(storage)
    root = db_obj.open().root()
    assert "genesis_obj" in root and root["image_meta"]["codex_ingested"]
    db_obj.close()


def test_settings_from_toml_and_environment(tmp_path):
    config = tmp_path / "batos.toml"
    config.write_text('[kernel]\nworkers = 3\nbackend = "replay:x.jsonl"\n'
                      '[personas.brick]\nbackend = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n')
    settings = load_settings(config, {"max_attempts": 5}, environ={"BATOS_WORKERS": "4"})
    assert settings.workers == 4 and settings.max_attempts == 5
    assert settings.persona_backend("BRICK")["backend"] == "openai"
    assert settings.persona_backend("ROBIN") == "replay:x.jsonl"
    assert settings.blob_path.name == "live_image.fs.blob"
    bad = tmp_path / "bad.toml"
    bad.write_text("[kernel]\nworkers = 'many'\n")
    with pytest.raises(ValueError, match="workers"):
        load_settings(bad, environ={})
    assert json.dumps(settings.personas)


def test_a_damaged_status_byte_before_committed_data_is_refused(tmp_path):
    import struct

    path = _committed_image(tmp_path)
    data = bytearray(path.read_bytes())
    # the first transaction starts after the 4-byte file header; its status byte
    # follows the 8-byte tid and the 8-byte length
    data[4 + 16] = ord("c")
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(ImageDamaged):
        open_image(settings_for(tmp_path))
    assert path.read_bytes() == before
    assert struct.calcsize(">8sQcHHH") == 23


def test_a_zero_filled_tail_is_discarded(tmp_path):
    path = _committed_image(tmp_path)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 4096)  # what a filesystem may leave after a power cut
    image = open_image(settings_for(tmp_path))
    try:
        conn = image.db.open()
        assert conn.root()["k2"].value == 2
        conn.close()
    finally:
        image.close()


def test_the_image_is_served_on_a_private_unix_socket(tmp_path):
    import stat

    settings = load_settings(None, {"db": str(tmp_path / "live_image.fs")}, environ={})
    image = open_image(settings)
    try:
        address = json.loads((tmp_path / "live_image.fs.zeo.json").read_text())
        socket_path = Path(address["socket"])
        assert address["pid"] == os.getpid() and socket_path.exists()
        mode = socket_path.parent.stat().st_mode
        assert stat.S_IMODE(mode) == 0o700
        assert "unix socket" in image.description
        conn = image.db.open()
        conn.root()["x"] = 1
        transaction.commit()
        conn.close()
    finally:
        image.close()
    assert not (tmp_path / "live_image.fs.zeo.json").exists()


def test_the_index_can_be_saved_while_serving(tmp_path):
    settings = load_settings(None, {"db": str(tmp_path / "live_image.fs")}, environ={})
    image = open_image(settings)
    index = tmp_path / "live_image.fs.index"
    try:
        conn = image.db.open()
        conn.root()["x"] = UvmObject(value=1)
        transaction.commit()
        index.unlink(missing_ok=True)
        assert image.save_index() is True and index.exists()
        assert image.save_index() is False  # nothing new since
        conn.close()
    finally:
        image.close()
