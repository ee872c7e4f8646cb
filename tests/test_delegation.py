"""The delegation cache on real ZODB connections: local invalidation, no pinning, LRU."""

from __future__ import annotations

import gc
import weakref

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.LOBTree import LOBTree
from ZODB.MappingStorage import MappingStorage

from batos_uvm.delegation import dependent_count
from batos_uvm.objects import UvmObject


def open_db(tmp_path, **kwargs):
    return ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "image.fs")), **kwargs)


def test_a_write_drops_only_the_entries_that_depend_on_the_written_object(tmp_path):
    db = open_db(tmp_path)
    conn = db.open()
    proto = UvmObject(kind="proto", colour="red")
    children = [proto.clone(n=i) for i in range(50)]
    conn.root()["children"] = children
    transaction.commit()
    assert all(child.kind == "proto" and child.colour == "red" for child in children)
    assert all("kind" in child.__dict__ for child in children)  # cached for plain reads

    children[0].n = 99  # a leaf's own slot: nobody else depends on it
    assert all("kind" in child.__dict__ for child in children)
    proto.colour = "blue"  # only the entries for 'colour' depend on this write
    assert all("kind" in child.__dict__ for child in children)
    assert not any("colour" in child.__dict__ for child in children)
    assert all(child.colour == "blue" for child in children)
    proto.parents = []  # the walk itself may change: every entry through proto goes
    assert not any("kind" in child.__dict__ for child in children)
    assert children[3].kind == "proto"
    transaction.abort()
    db.close()


def test_a_write_to_a_middle_object_reaches_entries_that_passed_through_it(tmp_path):
    top = UvmObject(colour="top")
    middle = UvmObject(parents=[top])
    child = UvmObject(parents=[middle])
    assert child.send("colour") == "top"
    middle.colour = "middle"  # shadows top's slot for everyone below
    assert child.colour == "middle" and child.send("colour") == "middle"
    middle.install_method("colour_name", "def colour_name(self):\n    return 'm'\n")
    assert child.colour_name() == "m"
    top.install_method("colour_name", "def colour_name(self):\n    return 't'\n")
    assert child.colour_name() == "m"  # middle's method still comes first
    middle.remove_method("colour_name")
    assert child.colour_name() == "t"


def test_cached_entries_pin_no_object(tmp_path):
    db = open_db(tmp_path)
    conn = db.open()
    proto = UvmObject(kind="proto")
    tree = conn.root()["objects"] = LOBTree({i: proto.clone(n=i) for i in range(2000)})
    conn.root()["proto"] = proto
    transaction.commit()
    conn.cacheMinimize()
    del tree
    readers = []
    for obj in conn.root()["objects"].values():
        assert obj.kind == "proto"
        readers.append(weakref.ref(obj))
    del obj
    proto = conn.root()["proto"]
    assert dependent_count(proto) == 2000
    conn.cacheMinimize()
    gc.collect()
    assert sum(ref() is not None for ref in readers) == 0  # all of them could go
    assert dependent_count(proto) == 0
    assert len(conn._cache) < 100
    db.close()


def test_sends_keep_the_receiver_warm_in_zodbs_cache(tmp_path):
    db = open_db(tmp_path, cache_size=100)
    conn = db.open()
    proto = UvmObject(kind="proto")
    proto.install_method("answer", "def answer(self):\n    return 42\n")
    hot = proto.clone()
    conn.root()["hot"] = hot
    conn.root()["cold"] = LOBTree({i: UvmObject(n=i) for i in range(1000)})
    transaction.commit()
    conn.cacheMinimize()
    hot = conn.root()["hot"]
    assert hot.send("answer") == 42
    loads_before = conn.getTransferCounts()[0]
    for start in range(0, 1000, 50):  # a scan through cold objects, with the hot one in use
        for number in range(start, start + 50):
            conn.root()["cold"][number].n  # noqa: B018
        assert hot.send("answer") == 42
        conn.cacheGC()  # what every transaction boundary does
    assert hot._p_status != "ghost", "the object in use was evicted before cold ones"
    loads = conn.getTransferCounts()[0] - loads_before
    assert loads < 1100  # the cold objects and their buckets, not the hot one again
    db.close()


def test_invalidation_by_another_connection_reaches_a_ghost_prototype():
    db = ZODB.DB(MappingStorage())
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    proto = UvmObject(colour="red")
    child = proto.clone()
    conn.root().update(proto=proto, child=child)
    tm.commit()
    assert child.send("colour") == "red"
    proto._p_deactivate()  # evicted by the cache: its dependents must still hear
    other_tm = transaction.TransactionManager()
    other = db.open(transaction_manager=other_tm)
    other.root()["proto"].colour = "blue"
    other_tm.commit()
    other.close()
    tm.begin()
    assert child.send("colour") == "blue" and child.colour == "blue"
    db.close()


def test_an_aborted_write_leaves_no_stale_entry():
    db = ZODB.DB(MappingStorage())
    conn = db.open()
    proto = UvmObject(colour="red")
    child = proto.clone()
    conn.root()["child"] = child
    transaction.commit()
    proto.colour = "blue"
    assert child.colour == "blue"
    transaction.abort()
    assert child.colour == "red"
    db.close()


def test_a_method_installed_by_another_connection_reaches_cached_lookups():
    db = ZODB.DB(MappingStorage())
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    proto = UvmObject()
    proto.install_method("answer", "def answer(self):\n    return 1\n")
    child = proto.clone()
    conn.root().update(proto=proto, child=child)
    tm.commit()
    assert child.send("answer") == 1
    other_tm = transaction.TransactionManager()
    other = db.open(transaction_manager=other_tm)
    other.root()["proto"].install_method("answer", "def answer(self):\n    return 2\n")
    other_tm.commit()
    tm.begin()
    assert child.send("answer") == 2 and child.answer() == 2
    other.root()["proto"].remove_method("answer")
    other_tm.commit()
    other.close()
    tm.begin()
    assert child.lookup("answer") is None
    db.close()
