"""A security review of the cell boundary: attacks that work today (each test fails).

Every test names the hole it shows, why it is there and what would close it;
the attackers (hostile methods, subverted cells) are described in
tests/cell_attackers.py. Attacks the layers refuse are in
test_cell_review_refused.py, attacks through a real kernel process in
test_cell_review_kernel.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from cell_attackers import Image, call_in_cell, outcome, run, subverted

from batos_uvm.cells import wire
from batos_uvm.cells.invocation import Invocation
from batos_uvm.cells.pool import CellConfig, CellFailure, CellPool
from batos_uvm.objects import UvmObject
from batos_uvm.trial import run_trial


@pytest.fixture
def image(tmp_path):
    image = Image(str(tmp_path / "review.fs"))
    yield image
    image.close()


# -- the codec: what one frame can do to the kernel ---------------------------------------
NESTED_FRAME = """
# 20 tuples, each holding a list nested 1000 deep: 21 kB, far below every limit.
body = b"\\x91" * 1000 + b"\\xc0"
for _ in range(20):
    body = b"\\x91" * 1000 + ormsgpack.packb(ormsgpack.Ext(wire.EXT_TUPLE, b"\\x91" + body))
send_raw(body)
return call.cell.channel.receive()
"""

KERNEL_SIDE = """
import asyncio, json, sys
from batos_uvm.cells.invocation import Invocation
from batos_uvm.cells.pool import CellConfig, CellPool
from batos_uvm.objects import UvmObject

async def main():
    pool = CellPool(CellConfig(unrestricted=True), size=1)
    target = UvmObject(label="target")
    invocation = Invocation(pool, timeout=10, overlay={(id(target), "probe"): sys.argv[1]})
    try:
        value = await invocation.call(target, "probe", [], {})
        print(json.dumps(["answered", repr(value)]))
    except Exception as exc:
        print(json.dumps([type(exc).__name__, str(exc)]))
    finally:
        await pool.close()

asyncio.run(main())
"""


def test_nested_extension_types_do_not_crash_the_kernel() -> None:
    """Hole: the kernel dies with SIGSEGV decoding a 21 kB frame of a subverted cell.

    The decoder bounds tuples/sets/maps nested in each other (32) and ormsgpack
    bounds plain nesting (~1000) per ``unpackb`` call, but every extension body
    is decoded by a fresh ``unpackb``: 20 tuples x 1000 lists recurse ~20,000
    levels deep in C on the event loop's thread and overflow its 8 MiB stack.
    The kernel side runs in a child process here so that the crash is seen, not
    suffered.
    """
    done = subprocess.run(
        [sys.executable, "-c", KERNEL_SIDE, subverted(NESTED_FRAME)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, (
        f"the kernel process died (exit status {done.returncode}) decoding a 21 kB frame"
    )
    kind, message = json.loads(done.stdout)
    assert kind == "CellProtocolError", message


def test_colliding_hashes_in_a_set_do_not_stall_the_kernel() -> None:
    """Hole: a subverted cell stalls the kernel's event loop with a set whose members collide.

    Integers equal modulo 2**61 - 1 share a hash, so building a set (or a dict
    from EXT_PAIRS) of n of them costs n**2 comparisons: 15,000 of them, a
    200 kB frame, take seconds to decode, a full 4 MiB frame half an hour; the
    decode runs on the event loop, so nothing else (no ping) is served.
    """
    prime = 2**61 - 1
    members = wire.encode([k * prime for k in range(1, 15_001)])
    frame = wire.ormsgpack.packb(wire.ormsgpack.Ext(wire.EXT_SET, members))
    started = time.monotonic()
    try:
        wire.decode(frame)
    except wire.WireError:
        pass  # refusing it is fine; taking long is not
    took = time.monotonic() - started
    assert took < 1.0, f"decoding a {len(frame)} byte frame took {took:.1f} s"


# -- what a slot may hold: only plain data and objects, anywhere in the value ---------------
STAND_INS = (wire.Handle, wire.Opaque, wire.ReprText)


def stand_ins(value) -> set[str]:
    """Names of the wire's stand-in classes anywhere in ``value`` (keys and members too)."""
    found = {type(value).__name__} if type(value) in STAND_INS else set()
    if isinstance(value, dict):
        for key, item in value.items():
            found |= stand_ins(key) | stand_ins(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            found |= stand_ins(item)
    return found


def _prototype_with_kernel_object(image) -> UvmObject:
    proto = UvmObject(label="proto", index=OOBTree())  # a kernel object: opaque to cells
    obj = proto.clone(level=1)
    image.root["obj"] = obj
    transaction.commit()
    return obj


def _stored_and_loaded_again(image, obj: UvmObject) -> None:
    """What the method stored holds no stand-in, and the object loads from the file again."""
    transaction.commit()
    if "stash" in obj.slot_names():
        assert not stand_ins(obj.stash), f"the image holds {stand_ins(obj.stash)}"
    image.reopen()
    assert image.root["obj"].level == 1  # loads its state: no StateLoadError


@pytest.mark.parametrize(
    "value",
    ["{self.parents[0].index: 1}", "{(self.parents[0].index,)}",
     "frozenset({frozenset({self.parents[0].index})})"],
    ids=["dict key", "tuple in a set", "set in a set"],
)
def test_a_hostile_method_cannot_store_a_kernel_object_marker(image, value: str) -> None:
    """Hole: a marker for a kernel object, kept in a slot, makes the receiver unloadable.

    Plain generated code (no escape needed) reads a slot of another object that
    holds a kernel object and gets an ``Opaque`` marker. ``Frame.inward`` refuses
    markers as slot values, but looks neither at dict keys nor inside set members,
    so ``{marker: 1}`` is stored. It pickles, but ``Opaque.__setattr__`` refuses
    the unpickler: after a restart the receiver's state cannot be loaded
    (StateLoadError). On genesis_obj (whose parent pLLM_obj holds the weight
    library) this needs one line; on pLLM_obj itself the kernel no longer starts.
    """
    obj = _prototype_with_kernel_object(image)
    outcome(f"def probe(self):\n    self.stash = {value}\n    return 'stored'\n", receiver=obj)
    _stored_and_loaded_again(image, obj)


@pytest.mark.parametrize(
    "value",
    ["{wire.Handle(0): 1}", "{(wire.Handle(0),)}", "frozenset({frozenset({wire.Handle(0)})})",
     "{(wire.Opaque('OOBTree'),)}", "{wire.ReprText('x'): 1}"],
    ids=["handle as a key", "handle in a tuple in a set", "handle in a set in a set",
         "marker in a tuple in a set", "repr text as a key"],
)
def test_a_subverted_cell_cannot_store_wire_stand_ins(image, value: str) -> None:
    """Hole: the same gap for a subverted cell, which can also send handles and repr text.

    Handles stored unresolved are ``wire.Handle`` objects in the image (they
    make it unloadable too); repr text is a ``str`` subclass of the kernel's,
    which docs/CELLS.md says a slot cannot hold.
    """
    obj = _prototype_with_kernel_object(image)
    body = f"""
    answer = call.cell.ask({{"op": "request", "call": call.call_id, "kind": "describe",
                            "target": wire.Handle(0),
                            "diff": {{"set": {{"stash": {value}}}, "delete": []}}}})
    return answer.get("error", {{}}).get("message", "stored")
    """
    outcome(subverted(body), receiver=obj, unrestricted=True)
    _stored_and_loaded_again(image, obj)


# -- one cell, many receivers: what a subverted cell does to the calls after its own --------
QUEUED_REPLY = """
forged = done("forged", {"set": {"owned": True}, "delete": []})
send_raw(wire.encode(done("first")))  # taken as the answer to this call
send_raw(wire.encode(forged))  # left in the socket: taken as the answer to the next call
return "first"
"""

PATCHED_RUNTIME = """
runtime = sys.modules["batos_uvm.cells.runtime"]
serve = runtime.Cell.serve

def forging(cell, message):  # every later call of this cell answers what we like
    outcome = serve(cell, message)
    if outcome.get("op") == "done":
        outcome.update(value="forged", diff={"set": {"owned": True}, "delete": []})
    return outcome

runtime.Cell.serve = forging
return "first"
"""


@pytest.mark.parametrize("how", ["queued reply", "patched runtime"])
def test_a_subverted_cell_cannot_answer_calls_to_other_objects(how: str) -> None:
    """Hole: a subverted cell forges the results and changes of later calls to other objects.

    A cell serves up to ``cell_max_calls`` calls, for any receiver. The kernel
    reads the next frame as the answer to whatever call it just sent (the
    reply's ``id`` is never compared with the call's), so frames queued by an
    earlier call answer a later one; and a cell whose runtime was patched
    answers every later call as it likes. Either way the diff is applied to the
    *later* call's receiver: a method changes objects other than its receiver
    and forges their methods' results. Checking ids closes the first way; the
    second needs cells that never serve another receiver (or method) after
    running untrusted code.
    """
    attack = subverted(QUEUED_REPLY if how == "queued reply" else PATCHED_RUNTIME)
    victim = UvmObject(label="victim")
    innocent = "def probe(self):\n    return 'hello'\n"

    async def scenario():
        pool = CellPool(CellConfig(unrestricted=True), size=1)  # one cell serves both calls
        try:
            await call_in_cell(pool, UvmObject(label="attacker"), attack)
            return await call_in_cell(pool, victim, innocent)
        finally:
            await pool.close()

    try:
        answer = run(scenario())
    except CellFailure:
        answer = "refused"  # the kernel noticed the cell broke the protocol: fine
    assert "owned" not in victim.slot_names(), "another object's call changed the victim"
    assert answer in ("hello", "refused"), f"the victim's method answered {answer!r}"


# -- the trial ---------------------------------------------------------------------------
TELLS = {
    "its own description": """
    def tell(self):
        return "tell" in self.describe()["methods"]
    """,
    "a child of self": """
    def tell(self, depth=0):
        if depth:
            return "inherited"
        try:
            return self.clone().tell(1)
        except AttributeError:
            return "not inherited"
    """,
}


@pytest.mark.parametrize("tell", list(TELLS))
def test_a_method_cannot_tell_its_trial_from_a_real_call(tmp_path, tell: str) -> None:
    """Hole: the candidate is not in the receiver's method table during its trial.

    The trial runs the candidate through an overlay on (receiver, selector)
    only; the receiver's methods (``describe()``), its children and every other
    object still see the image without it. A method that behaves in its trial
    and misbehaves once installed needs one line. Installing the candidate in
    the trial's savepoint (rolled back afterwards) would make both runs alike.
    """
    source = textwrap.dedent(TELLS[tell])
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "trial.fs")))
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(transaction_manager=tm)

    async def scenario():
        pool = CellPool(CellConfig(), size=1)
        try:
            tm.begin()
            target = conn.root()["target"] = UvmObject(label="target")
            tm.commit()
            tm.begin()
            trial = await run_trial(pool, conn, target, "tell", source, None,
                                    {"args": [], "kwargs": {}}, timeout=10)
            target.install_method("tell", source)
            real = await Invocation(pool, timeout=10).call(target, "tell", [], {})
            tm.abort()
            return trial.examples[0].got, real
        finally:
            await pool.close()

    try:
        in_trial, for_real = run(scenario())
    finally:
        conn.close()
        db.close()
    assert in_trial == for_real, f"trial: {in_trial!r}, real call: {for_real!r}"


def test_a_trials_verdict_can_always_be_recorded(tmp_path) -> None:
    """Hole: a result with more than 4300 digits makes the cycle unable to record itself.

    The trial keeps what the candidate returned; the cycle stores its log as
    JSON (``CycleLog.to_data``), and ``json.dumps`` of an int over Python's
    4300-digit limit raises ValueError. The install then fails, recording the
    failure fails the same way, and the cycle ends with an exception: its
    record stays ACTIVE and its entry in active_cycles until a restart. An
    honest ``factorial(2000)`` does it too.
    """
    from batos_uvm.cycle import CycleLog

    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "trial.fs")))
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(transaction_manager=tm)
    source = "def big(self):\n    return 10 ** 5000\n"

    async def scenario():
        pool = CellPool(CellConfig(), size=1)
        try:
            tm.begin()
            target = conn.root()["target"] = UvmObject(label="target")
            tm.commit()
            tm.begin()
            return await run_trial(pool, conn, target, "big", source, None,
                                   {"args": [], "kwargs": {}}, timeout=10)
        finally:
            tm.abort()
            await pool.close()

    try:
        trial = run(scenario())
    finally:
        conn.close()
        db.close()
    log = CycleLog("20260101-000000-abcdef", {"selector": "big"}, "0x1", "big")
    log.attempts.append({"attempt": 1, "code": source, "trial": trial.to_record()})
    log.to_data()  # must not raise


def test_what_the_kernel_stored_can_be_sent_to_the_next_call() -> None:
    """Hole: two accepted slots together make the receiver and its children unusable.

    A list nested 230 deep is plain data and is stored; so is ``{1: "one"}``.
    But a snapshot holding both cannot be encoded: a dict with keys other than
    strings sends the whole message through ``wire._with_pairs``, which refuses
    more than 200 levels. Every later call of a generated method on the
    receiver, and on every object inheriting the slots, fails in the kernel
    with WireError. The kernel should refuse at write time what it cannot send
    again (or encode without a depth smaller than the decoder's).
    """
    source = """
    def probe(self):
        deep = []
        for i in range(230):
            deep = [deep]
        self.deep = deep
        self.describe()  # sends this diff on its own
        self.table = {1: "one"}
        return "stored"
    """
    receiver = UvmObject(label="receiver")
    first = outcome(source, receiver=receiver)
    hello = "def probe(self):\n    return 'hello'\n"
    results = []
    for target in (receiver, receiver.clone()):
        try:
            results.append(outcome(hello, receiver=target))
        except wire.WireError as exc:
            results.append(f"WireError: {exc}")
    assert first != "stored" or results == ["hello", "hello"], results


def test_a_nested_method_that_raised_changes_nothing() -> None:
    """Hole: what a nested method wrote before its last request stays when it raises.

    docs/CELLS.md: "A method that raised changes nothing." A method's pending
    diff travels with each of its requests and the kernel applies it at once;
    when a method called by another one then raises, only its final diff is
    dropped. The caller catches the error and returns, and the transaction
    commits the callee half-done: here an account debited without the
    withdrawal succeeding. A nested send should run in a savepoint that is
    rolled back when the method raises.
    """
    account = UvmObject(label="account", balance=100, log=[])
    account.install_method("withdraw", textwrap.dedent("""
        def withdraw(self, amount, note):
            self.balance -= amount
            self.log.append(note)
            self.describe()  # any request: a send, clone, search ...
            if len(note) > 10:
                raise ValueError("the note is too long")
            return self.balance
    """))
    caller = UvmObject(label="caller", account=account)
    source = """
    def probe(self):
        try:
            return self.account.withdraw(60, "a note that is too long")
        except ValueError as exc:
            return str(exc)
    """
    assert outcome(source, receiver=caller) == "the note is too long"
    assert (account.balance, account.log) == (100, [])


# -- the kernel's own objects as receivers -------------------------------------------------
KERNEL_SLOT_ATTACKS = {
    # the catalog store (opaque to cells): batos.search and every cycle's DELEGATING need it
    "delete the catalog store": ("knowledge_catalog_obj", "del self.store"),
    "replace the catalog store": ("knowledge_catalog_obj", "self.store = 'gone'"),
    # the weight library (opaque): every stored model and LoRA adapter
    "replace the weight library": ("pLLM_obj", "self.weights = None"),
    # the cycle's state machine: skip every future trial, or fail every cycle
    "skip validation": ("psm_prototypes_obj", "self.VALIDATING = self.COMPLETE"),
    "break every cycle": ("psm_prototypes_obj", "self.DECOMPOSING = 0"),
}


@pytest.mark.parametrize("attack", list(KERNEL_SLOT_ATTACKS))
def test_a_method_cannot_take_apart_the_kernels_own_objects(attack: str) -> None:
    """Hole: a method grown on one of the kernel's own objects dismantles it.

    Any client message a root object does not understand grows a method on it,
    and that method may write and delete its receiver's slots: also a slot
    holding a kernel object it cannot even read (the catalog's store, the weight
    library), and the state prototypes the orchestrator looks up by name. One
    call removes the catalog (batos.search and every later cycle fail), the
    stored models, or the trial from every later cycle. Slots holding kernel
    objects should be read-only to generated code, and the kernel's machinery
    (catalog, pLLM, states, orchestrator) should not take generated methods.
    """
    from batos_uvm.awakening import incarnate

    name, statement = KERNEL_SLOT_ATTACKS[attack]
    db = ZODB.DB(None)
    conn = db.open()
    try:
        root = conn.root()
        incarnate(root)
        receiver = root[name]
        before = {slot: receiver._slots[slot] for slot in receiver.slot_names()}
        outcome(f"def probe(self):\n    {statement}\n    return 'done'\n", receiver=receiver)
        after = {slot: receiver._slots[slot] for slot in receiver.slot_names()}
    finally:
        transaction.abort()
        conn.close()
        db.close()
    changed = sorted(s for s in before.keys() | after.keys() if before.get(s) is not after.get(s))
    assert not changed, f"{name}: the method changed {changed}"


# -- time and cells ----------------------------------------------------------------------
def test_nested_sends_cannot_stretch_a_message_past_its_time_limit() -> None:
    """Hole: starting cells for nested sends is time no limit counts.

    A nested send takes a cell of its own; an extra cell is closed when the
    send returns (``release`` keeps only ``size`` warm), so a method sending in
    a loop starts one process per iteration (~0.1-0.2 s each). That start is
    neither the method's cell time nor a service, so with a method_timeout of
    1 s a message keeps a worker and a core busy until the wall deadline of
    max(20 x method_timeout, 600 s), starting thousands of processes.
    """
    other = UvmObject(label="other")
    other.install_method("ping", "def ping(self):\n    return 1\n")
    receiver = UvmObject(label="sender", other=other)
    source = "def probe(self):\n    n = 0\n    while True:\n        n += self.other.ping()\n"

    async def scenario():
        pool = CellPool(CellConfig(), size=1)
        task = asyncio.ensure_future(call_in_cell(pool, receiver, source, timeout=1.0))
        try:
            done, _ = await asyncio.wait({task}, timeout=8.0)
            return bool(done), pool.started
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pool.close()

    stopped, started = run(scenario())
    assert stopped, f"after 8 s (method_timeout 1 s) the message still runs; {started} cells started"
