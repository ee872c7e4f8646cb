"""Methods in records of their own: install cost, loading, and migrating older images."""

from __future__ import annotations

import logging
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from persistent import Persistent
from persistent.mapping import PersistentMapping

from batos_uvm.awakening import migrate
from batos_uvm.config import load_settings
from batos_uvm.method_store import MethodTable
from batos_uvm.migration import IMAGE_FORMAT, needs_migration
from batos_uvm.objects import MethodRecord, SelectorNotUnderstood, UvmObject

SOURCE = (
    "def {name}(self, x=1):\n"
    '    """Scale x by {n} and add one; a method of typical size."""\n'
    "    return x * {n} + 1\n"
)


def source(n: int) -> str:
    return SOURCE.format(name=f"m_{n}", n=n)


def open_db(path):
    return ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))


def test_an_install_writes_the_same_few_bytes_however_many_methods_there_are(tmp_path):
    path = tmp_path / "image.fs"
    db = open_db(path)
    conn = db.open()
    obj = conn.root()["obj"] = UvmObject()
    growth = {}
    held = 0
    for count in (10, 1000):
        for n in range(held, count):
            obj.install_method(f"m_{n}", source(n))
        held = count + 1
        transaction.commit()
        before = path.stat().st_size
        new = source(count)
        obj.install_method(f"m_{count}", new)
        transaction.commit()
        growth[count] = path.stat().st_size - before
    assert growth[1000] < 2 * growth[10]  # not proportional to the methods held
    assert growth[1000] < 3 * len(new) + 1024
    # a new version of an existing method does not rewrite the other versions
    for _ in range(20):
        obj.install_method("m_0", source(0))
    transaction.commit()
    before = path.stat().st_size
    obj.install_method("m_0", source(0))
    transaction.commit()
    assert path.stat().st_size - before < 3 * len(source(0)) + 1024
    assert [r.version for r in obj.method_history("m_0")] == list(range(1, 23))
    db.close()


def test_the_objects_own_record_does_not_hold_its_methods(tmp_path):
    db = open_db(tmp_path / "image.fs")
    conn = db.open()
    obj = conn.root()["obj"] = UvmObject(name="holder")
    for n in range(200):
        obj.install_method(f"m_{n}", source(n))
    transaction.commit()
    record, _ = db.storage.load(obj._p_oid)
    assert len(record) < 300
    obj._p_activate()
    assert isinstance(obj.__dict__["_method_store"], MethodTable)
    conn.cacheMinimize()
    obj = conn.root()["obj"]
    assert obj.send("m_150", 2) == 301
    # one lookup loads the object, the path to one selector and that version, not all 200
    assert conn._cache.cache_non_ghost_count < 15
    db.close()


def test_history_revert_and_remove_work_on_the_stored_records(tmp_path):
    db = open_db(tmp_path / "image.fs")
    conn = db.open()
    obj = conn.root()["obj"] = UvmObject()
    obj.install_method("answer", "def answer(self):\n    return 1\n")
    obj.install_method("answer", "def answer(self):\n    return 2\n", author="BRICK")
    obj.revert_method("answer", 1)
    transaction.commit()
    conn.cacheMinimize()
    obj = conn.root()["obj"]
    assert obj.answer() == 1
    assert [(r.version, r.author) for r in obj.method_history("answer")] == [
        (1, "architect"), (2, "BRICK"), (3, "architect")]  # fmt: skip
    assert isinstance(obj.methods()["answer"], MethodRecord)
    obj.remove_method("answer")
    with pytest.raises(SelectorNotUnderstood):
        obj.answer()
    with pytest.raises(SelectorNotUnderstood):
        obj.remove_method("answer")
    db.close()


def legacy_object(**slots) -> UvmObject:
    """A UvmObject in the format-1 layout: every version inside its own state."""
    obj = UvmObject(**slots)
    record = MethodRecord("answer", 1, "def answer(self):\n    return 41\n", None,
                          time.time(), "architect", "cycle-1")  # fmt: skip
    Persistent.__setattr__(obj, "_methods", {"answer": [record]})
    return obj


def test_an_object_of_the_old_layout_still_answers_and_converts_on_install():
    obj = legacy_object()
    assert obj.answer() == 41 and obj.method_history("answer")[0].cycle_id == "cycle-1"
    obj.install_method("answer", "def answer(self):\n    return 42\n")
    assert "_methods" not in obj.__dict__
    assert [r.version for r in obj.method_history("answer")] == [1, 2]
    assert obj.answer() == 42


def test_a_format_1_image_is_migrated_once_with_a_backup(tmp_path, caplog):
    path = tmp_path / "live_image.fs"
    db = open_db(path)
    conn = db.open()
    root = conn.root()
    root["image_meta"] = PersistentMapping(format=1)
    proto = root["proto_obj"] = legacy_object(kind="proto")
    root["nested"] = PersistentMapping(deep=[legacy_object(parents=[proto])])
    transaction.commit()
    assert needs_migration(root)
    settings = load_settings(None, {"db": str(path), "zeo": "off"}, environ={})
    with caplog.at_level(logging.WARNING, logger="batos.awakening"):
        migrate(conn, settings)
        transaction.commit()
    assert "migrated to format 2" in caplog.text and "2 object(s)" in caplog.text
    backups = list(tmp_path.glob("live_image.fs.format1-*.bak"))
    assert len(backups) == 1 and str(backups[0]) in caplog.text
    assert root["image_meta"]["format"] == IMAGE_FORMAT and not needs_migration(root)
    db.close()

    db = open_db(path)
    root = db.open().root()
    child = root["nested"]["deep"][0]
    child._p_activate()
    assert "_methods" not in child.__dict__ and child.answer() == 41
    assert child.kind == "proto"
    db.close()
    old = open_db(backups[0])  # the backup is the image as it was
    proto = old.open().root()["proto_obj"]
    proto._p_activate()
    assert "_methods" in proto.__dict__
    old.close()
