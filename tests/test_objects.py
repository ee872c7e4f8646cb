"""UvmObject on a real FileStorage: slots, delegation, clone, methods as source."""

from __future__ import annotations

import pickle

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from batos_uvm import primitives
from batos_uvm.guardian import GuardianViolation
from batos_uvm.objects import (
    MethodRecord,
    SelectorNotUnderstood,
    UvmObject,
    check_selector,
    format_oid,
    parse_oid,
)


class Image:
    """A FileStorage in a temporary directory that can be closed and reopened."""

    def __init__(self, path):
        self.path = str(path / "image.fs")
        self.db = None
        self.open()

    def open(self):
        self.db = ZODB.DB(ZODB.FileStorage.FileStorage(self.path))
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(transaction_manager=self.tm)
        return self.conn.root()

    def commit(self):
        self.tm.commit()

    def restart(self):
        self.close()
        return self.open()

    def close(self):
        self.tm.abort()
        self.conn.close()
        self.db.close()


@pytest.fixture
def image(tmp_path):
    img = Image(tmp_path)
    yield img
    img.close()


def test_slots_live_in_the_objects_own_state(image):
    root = image.conn.root()
    obj = UvmObject(name="alpha", count=3)
    root["obj"] = obj
    image.commit()
    assert obj.name == "alpha" and obj.count == 3
    assert obj.__dict__["count"] == 3  # one record, ordinary attribute
    assert dict(obj._slots) == {"name": "alpha", "count": 3}
    obj._slots["count"] = 4
    assert obj.count == 4 and obj._p_changed
    image.commit()
    root = image.restart()
    assert root["obj"].count == 4
    assert sorted(root["obj"].slot_names()) == ["count", "name"]


def test_multi_parent_delegation_is_ordered_and_depth_first(image):
    left_base = UvmObject(colour="left-base", only_left_base=1)
    left = UvmObject(parents=[left_base])
    right = UvmObject(colour="right", only_right=2)
    child = UvmObject(parents=[left, right])
    image.conn.root()["child"] = child
    image.commit()
    # depth first: left's own ancestor answers before the second parent
    assert child.colour == "left-base"
    assert child.only_right == 2
    assert [o for o in child.ancestors()] == [child, left, left_base, right]


def test_shadowing_and_cache_follow_changes(image):
    proto = UvmObject(greeting="hello")
    child = proto.clone()
    image.conn.root()["child"] = child
    image.commit()
    assert child.greeting == "hello"
    proto.greeting = "bonjour"  # a prototype change is seen at once
    assert child.greeting == "bonjour"
    child.greeting = "hi"  # the child's own slot shadows the prototype
    assert child.greeting == "hi" and proto.greeting == "bonjour"
    del child.greeting
    assert child.greeting == "bonjour"
    image.commit()
    root = image.restart()
    assert root["child"].greeting == "bonjour"
    assert "greeting" not in root["child"]._slots


def test_cached_values_are_never_pickled(image):
    proto = UvmObject(secret="from the prototype")
    child = proto.clone(own=1)
    image.conn.root()["child"] = child
    image.commit()
    assert child.secret == "from the prototype"
    assert "secret" in child.__dict__  # cached for speed ...
    assert "secret" not in child.__getstate__()  # ... but not part of the record
    child.own = 2
    image.commit()
    root = image.restart()
    assert "secret" not in root["child"].__getstate__()
    assert root["child"].secret == "from the prototype"


def test_parent_cycles_terminate_with_a_clear_error(image):
    a = UvmObject(x=1)
    b = UvmObject(parents=[a])
    a.parents = [b]  # a <-> b
    image.conn.root()["a"] = a
    image.commit()
    assert b.x == 1
    with pytest.raises(SelectorNotUnderstood) as info:
        b.missing_selector
    assert "missing_selector" in str(info.value)
    assert format_oid(b._p_oid) in str(info.value)
    assert isinstance(info.value, AttributeError)


def test_private_and_special_names_never_delegate():
    parent = UvmObject()
    parent._v_cache = "volatile of the parent"
    parent._private = "parent only"
    child = parent.clone()
    with pytest.raises(AttributeError):
        child._v_cache
    with pytest.raises(AttributeError):
        child._private
    with pytest.raises(AttributeError):
        child.__reduce_special__
    # pickling probes dunders on half-built objects; it must not recurse
    clone = pickle.loads(pickle.dumps(UvmObject(x=1)))
    assert clone.x == 1


def test_clone_delegates_instead_of_copying(image):
    proto = UvmObject(items=[1, 2])
    child = proto.clone(extra=True)
    assert child.parents == [proto]
    assert child.items is proto.items  # shared, Self-style
    assert "items" not in child._slots
    image.conn.root()["child"] = child
    image.commit()


def test_ghosts_load_on_first_read(image):
    obj = UvmObject(value=42)
    image.conn.root()["obj"] = obj
    image.commit()
    obj._p_deactivate()
    assert obj._p_status == "ghost"
    assert obj.value == 42


def test_repr_names_oid_slots_and_methods(image):
    obj = UvmObject(label="genesis_obj", colour="blue")
    obj.install_method("hello", "def hello(self):\n    return 'hi'\n")
    image.conn.root()["obj"] = obj
    image.commit()
    text = repr(obj)
    assert "genesis_obj" in text and "colour" in text and "hello" in text
    assert format_oid(obj._p_oid) in text


def test_installed_method_survives_restart_and_binds_self(image):
    obj = UvmObject(base=10)
    obj.install_method(
        "add", "def add(self, amount):\n    return self.base + amount\n", cycle_id="c-1"
    )
    image.conn.root()["obj"] = obj
    image.commit()
    assert obj.add(5) == 15
    root = image.restart()
    restored = root["obj"]
    assert restored.add(1) == 11
    record = restored.method_history("add")[0]
    assert isinstance(record, MethodRecord)
    assert (record.version, record.author, record.cycle_id) == (1, "architect", "c-1")


def test_methods_are_inherited_and_bound_to_the_receiver(image):
    proto = UvmObject(n=1)
    proto.install_method("describe_n", "def describe_n(self):\n    return f'n={self.n}'\n")
    child = proto.clone(n=7)
    assert child.describe_n() == "n=7"
    assert proto.describe_n() == "n=1"


def test_version_history_and_revert(image):
    obj = UvmObject()
    image.conn.root()["obj"] = obj
    obj.install_method("answer", "def answer(self):\n    return 1\n")
    obj.install_method("answer", "def answer(self):\n    return 2\n", author="BRICK")
    assert obj.answer() == 2
    obj.revert_method("answer", 1)
    assert obj.answer() == 1
    history = obj.method_history("answer")
    assert [r.version for r in history] == [1, 2, 3]
    assert history[-1].note == "revert to version 1"
    assert obj.method_source("answer", 2).strip().endswith("return 2")
    image.commit()
    root = image.restart()
    assert root["obj"].answer() == 1
    with pytest.raises(ValueError, match="no version 9"):
        root["obj"].revert_method("answer", 9)


def test_method_change_on_a_prototype_reaches_cached_children(image):
    proto = UvmObject()
    proto.install_method("v", "def v(self):\n    return 'old'\n")
    child = proto.clone()
    assert child.v() == "old"
    proto.install_method("v", "def v(self):\n    return 'new'\n")
    assert child.v() == "new"


def test_generated_methods_run_in_a_cell_not_in_this_process():
    import os

    obj = UvmObject()
    obj.install_method(
        "peek", "def peek(self):\n    return sorted(k for k in ('b', 'a'))\n"
    )
    assert obj.peek() == ["a", "b"]
    assert not hasattr(obj.peek, "__func__")  # nothing compiled here
    obj.install_method("pid", "def pid(self):\n    return id(self)\n")
    assert obj.pid() != id(obj)
    obj.install_method("who", "def who(self):\n    return repr(self)\n")
    assert obj.who().startswith("<UvmObject")  # a proxy of the receiver, in another process
    assert os.getpid() not in (obj.pid(),)


def test_install_audits_by_default():
    obj = UvmObject()
    with pytest.raises(GuardianViolation) as info:
        obj.install_method("grow", "def grow(self):\n    import os\n    return 1\n")
    assert info.value.rule == "import"
    assert "grow" not in obj.methods()
    obj.install_method("grow", "def grow(self):\n    self.size = 1\n")  # no flag needed
    obj.grow()
    assert obj.size == 1


def test_slot_names_starting_with_an_underscore_are_refused():
    proto = UvmObject()
    with pytest.raises(ValueError, match="belong to the kernel"):
        proto.clone(_methods={})
    with pytest.raises(ValueError, match="belong to the kernel"):
        UvmObject(_label_="x")


def test_primitives_are_referenced_by_name_not_stored_as_functions(image):
    calls = []
    primitives.register("test.echo", lambda receiver, value: calls.append(value) or value)
    try:
        obj = UvmObject()
        obj.install_primitive("echo", "test.echo")
        image.conn.root()["obj"] = obj
        image.commit()
        assert obj.echo(5) == 5 and calls == [5]
        state = pickle.dumps(obj.__getstate__())
        assert b"<lambda>" not in state and b"test.echo" in state
        primitives.unregister("test.echo")
        root = image.restart()
        with pytest.raises(primitives.PrimitiveUnavailable, match="test.echo"):
            root["obj"].echo(1)
    finally:
        primitives.unregister("test.echo")


def test_send_uses_does_not_understand(image):
    seen = []
    primitives.register("test.dnu", lambda receiver, selector, args, kwargs: seen.append(
        (selector, args, kwargs)) or "grown")
    try:
        obj = UvmObject(value=3)
        assert obj.send("value") == 3
        with pytest.raises(SelectorNotUnderstood):
            obj.send("missing")  # no doesNotUnderstand in the chain
        traits = UvmObject()
        traits.install_primitive("doesNotUnderstand", "test.dnu")
        obj.parents = [traits]
        assert obj.send("missing", 1, key=2) == "grown"
        assert seen == [("missing", [1], {"key": 2})]
    finally:
        primitives.unregister("test.dnu")


def test_another_connection_sees_committed_changes_and_drops_stale_cache(image):
    proto = UvmObject(level=1)
    child = proto.clone()
    image.conn.root()["proto"] = proto
    image.conn.root()["child"] = child
    image.commit()
    assert child.level == 1  # cached in this connection
    other_tm = transaction.TransactionManager()
    other = image.db.open(transaction_manager=other_tm)
    other.root()["proto"].level = 2
    other_tm.commit()
    other.close()
    image.tm.begin()  # transaction boundary: invalidations are processed
    assert image.conn.root()["child"].level == 2


@pytest.mark.parametrize(
    "selector, reason",
    [("", "non-empty"), ("not valid", "identifier"), ("class", "keyword"),
     ("__init__", "reserved"), ("_p_jar", "reserved"), ("x" * 121, "120")],
)
def test_bad_selectors_are_refused(selector, reason):
    with pytest.raises(ValueError, match=reason):
        check_selector(selector)


def test_oid_round_trip():
    assert parse_oid(format_oid(b"\x00" * 7 + b"\x2a")) == b"\x00" * 7 + b"\x2a"
    assert parse_oid("42") == parse_oid("0x2a")
    with pytest.raises(ValueError):
        parse_oid("0x" + "f" * 17)


def test_cache_is_dropped_when_a_reloaded_prototype_changes(tmp_path):
    import gc

    from ZODB.MappingStorage import MappingStorage

    db = ZODB.DB(MappingStorage())
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    proto = UvmObject(color="red")
    middle = UvmObject(parents=[proto])
    child = UvmObject(parents=[middle])
    conn.root().update(child=child, middle=middle, proto=proto)
    tm.commit()
    del proto, middle
    assert child.color == "red"
    tm.commit()
    for name in ("middle", "proto"):
        conn.root()[name]._p_deactivate()  # what the cache's garbage collection does
    conn.root()._p_deactivate()
    gc.collect()
    conn.root()["proto"].color = "blue"
    tm.commit()
    assert child.color == "blue"
    db.close()


def test_internals_are_not_reachable_by_a_message():
    obj = UvmObject(balance=10)
    obj.install_method("peek", "def peek(self):\n    return 1\n")
    for selector in ("_methods", "_v_cached", "__dict__", "_p_jar"):
        with pytest.raises(SelectorNotUnderstood):
            obj.lookup(selector)
        with pytest.raises(SelectorNotUnderstood):
            obj.send(selector)
    assert not obj.responds_to("peek_") and obj.responds_to("peek")


def test_operations_cannot_be_overwritten_by_slots_or_methods():
    obj = UvmObject()
    for name in ("lookup", "send", "clone", "install_method", "methods"):
        with pytest.raises(AttributeError, match="operation of every UvmObject"):
            setattr(obj, name, "x")
    with pytest.raises(ValueError, match="operation of every UvmObject"):
        obj.install_method("send", "def send(self):\n    return 1\n")
    with pytest.raises(AttributeError):
        UvmObject(lookup=1)
    assert obj.lookup("nothing") is None


def test_bound_primitives_are_immutable():
    obj = UvmObject()
    obj.install_primitive("copy_of_me", "clone")
    bound = obj.copy_of_me
    with pytest.raises(AttributeError):
        bound.name = "infer"
    assert isinstance(bound(), UvmObject)


def test_unknown_messages_without_a_kernel_are_errors():
    traits = UvmObject()
    traits.install_primitive("doesNotUnderstand", "doesNotUnderstand")
    with pytest.raises(SelectorNotUnderstood, match="grow_me"):
        UvmObject(parents=[traits]).send("grow_me")
