"""A security review of the cell boundary: hostile methods and subverted cells.

Two kinds of attacker. A *hostile method* is source a model might write: it
passes the Guardian and runs with the restricted builtins inside every
operating-system layer. A *subverted cell* is code that escaped the restricted
builtins (these tests start the cell ``unrestricted`` to stand for that) and
speaks the cell protocol directly: it can write any bytes to the kernel's end
of the socket and patch the cell's own runtime.

Every test states what the kernel must guarantee (docs/CELLS.md) and attacks
it with real cells; tests marked ``slow`` run a real kernel process.
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

from batos_uvm.cells import wire
from batos_uvm.cells.invocation import Invocation, MethodFailed, Refused
from batos_uvm.cells.pool import CellConfig, CellFailure, CellPool
from batos_uvm.objects import UvmObject
from batos_uvm.trial import run_trial


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def call_in_cell(
    pool: CellPool, receiver: UvmObject, source: str, *args, timeout: float = 10.0
):
    """Run ``source`` (a function named ``probe``) as a method of ``receiver``."""
    source = textwrap.dedent(source)
    invocation = Invocation(pool, timeout=timeout, overlay={(id(receiver), "probe"): source})
    return await invocation.call(receiver, "probe", list(args), {})


def outcome(source: str, *args, receiver: UvmObject | None = None, unrestricted=False,
            timeout: float = 10.0):
    """The value, or the failure as (kind, message): one call in a fresh pool."""

    async def scenario():
        pool = CellPool(CellConfig(unrestricted=unrestricted), size=1)
        target = receiver if receiver is not None else UvmObject(label="probe target")
        try:
            return await call_in_cell(pool, target, source, *args, timeout=timeout)
        finally:
            await pool.close()

    try:
        return run(scenario())
    except MethodFailed as exc:
        return (exc.kind, exc.message)
    except (CellFailure, Refused) as exc:
        return (type(exc).__name__, str(exc))


@pytest.fixture
def image(tmp_path):
    """A real FileStorage image; ``reopen()`` closes it and loads it again from disk."""

    class Image:
        def __init__(self) -> None:
            self.path = str(tmp_path / "review.fs")
            self.open()

        def open(self) -> None:
            self.db = ZODB.DB(ZODB.FileStorage.FileStorage(self.path))
            self.conn = self.db.open()
            self.root = self.conn.root()

        def reopen(self) -> None:
            transaction.abort()
            self.conn.close()
            self.db.close()
            self.open()

        def close(self) -> None:
            transaction.abort()
            self.conn.close()
            self.db.close()

    image = Image()
    yield image
    image.close()


# The frames a subverted cell writes are built in the cell, with its own codec.
SUBVERTED_PRELUDE = """
import os, sys
wire = sys.modules["batos_uvm.cells.wire"]
proxy = sys.modules["batos_uvm.cells.proxy"]
ormsgpack = wire.ormsgpack
call = proxy.active()
fd = call.cell.channel.fd

def send_raw(payload):
    os.write(fd, wire.frame(payload))

def done(value=None, diff=None):
    return {"op": "done", "id": 0, "value": value, "output": "",
            "diff": diff or {"set": {}, "delete": []}}
"""


def subverted(body: str) -> str:
    """A method whose body runs with the cell's full powers (see SUBVERTED_PRELUDE)."""
    lines = textwrap.indent(textwrap.dedent(SUBVERTED_PRELUDE) + textwrap.dedent(body), "    ")
    return "def probe(self, *args):\n" + lines


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
import asyncio, json, sys, textwrap
from batos_uvm.cells.invocation import Invocation
from batos_uvm.cells.pool import CellConfig, CellPool
from batos_uvm.objects import UvmObject
from batos_uvm.trial import run_trial

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
    call.cell.ask({{"op": "request", "kind": "describe", "target": wire.Handle(0),
                   "diff": {{"set": {{"stash": {value}}}, "delete": []}}}})
    return "sent"
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


# -- through a real kernel process ---------------------------------------------------------
PING_BUDGET = 2.0
KERNEL_METHODS = {
    # one plain value of 4 MB: 4 million empty lists once decoded, copied and pickled
    "store_a_large_value": "def store_a_large_value(self):\n"
                           "    self.data = [[]] * 4000000\n    return 1\n",
    # integers equal modulo 2**61 - 1: the kernel rebuilds the set at n**2 cost
    "return_colliding_set": "def return_colliding_set(self):\n    s = set()\n"
                            "    for k in range(1, 25001):\n"
                            "        s.add(k * 2305843009213693951)\n    return len(s) and s\n",
    # each clone request carries 4 MB; the kernel keeps every clone for the whole call
    "clone_large_values": "def clone_large_values(self):\n    value = [[]] * 4000000\n"
                          "    kids = [self.clone(data=value) for i in range(3)]\n"
                          "    return len(kids)\n",
    # a kernel-object marker as a dict key (see test_a_hostile_method_cannot_store...)
    "stash_a_marker": "def stash_a_marker(self):\n"
                      "    self.kept = {self.parents[0].weights: 1}\n    return 'kept'\n",
}


def _start_review_kernel(workdir):
    """A kernel with KERNEL_METHODS on genesis_obj and a clone of it, review_obj."""
    from kernel_process import KernelProcess

    # a generous time limit: what is measured is the kernel, not the cell's clock
    (workdir / "batos.toml").write_text("[kernel]\nmethod_timeout = 120\nworkers = 2\n")
    process = KernelProcess(workdir)
    process.start()
    install = textwrap.dedent(f"""
        import json
        for selector, source in json.loads({json.dumps(json.dumps(KERNEL_METHODS))}).items():
            genesis.install_method(selector, source)
        root["review_obj"] = genesis.clone()  # the receiver of the heavy calls
        commit()
    """)
    done = process.shell(install, write=True)
    if done.returncode != 0:
        process.stop()
        raise AssertionError(done.stderr)
    return process


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    process = _start_review_kernel(tmp_path_factory.mktemp("review"))
    yield process
    process.stop()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _send_while_pinging(kernel, selector: str) -> tuple:
    """(reply, slowest ping in s, growth of the kernel's memory in MiB) for one send.

    Both clients wait for the kernel however long it is silent (``dead_after``):
    what is measured is how long it kept a ping waiting.
    """
    import threading

    from batos_uvm.client import BridgeClient

    replies: list = []
    baseline = _rss_mib(kernel.pid)
    peak = [baseline]

    def send() -> None:
        with BridgeClient(kernel.endpoint, timeout=600, dead_after=600) as client:
            replies.append(client.send("review_obj", selector))

    def watch_memory() -> None:
        while caller.is_alive():
            peak[0] = max(peak[0], _rss_mib(kernel.pid))
            time.sleep(0.05)

    caller = threading.Thread(target=send)
    watcher = threading.Thread(target=watch_memory)
    slowest = 0.0
    with BridgeClient(kernel.endpoint, timeout=600, dead_after=600) as pinger:
        caller.start()
        watcher.start()
        while caller.is_alive():
            started = time.monotonic()
            assert pinger.ping().ok
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
        caller.join()
        watcher.join()
    return replies[0], slowest, peak[0] - baseline


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["store_a_large_value", "return_colliding_set"])
def test_one_plain_value_does_not_stop_the_kernel_answering(kernel, selector: str) -> None:
    """Hole: a plain method's value blocks the kernel's event loop for seconds.

    The kernel decodes a cell's frame, copies it (``Frame.inward``, recursive
    Python), checks it and commits it on the event loop. 4 MB of ``[[]] * 4e6``
    is 4 million lists to build, copy and pickle (~10 s on a loaded machine),
    and a set of 25,000 integers with one hash costs n**2 comparisons to build
    again: the kernel answers no ping meanwhile. Decoding and copying belong in
    a thread (or a bounded, incremental decoder) with a bound on the number of
    elements, not only on bytes.
    """
    reply, slowest, _ = _send_while_pinging(kernel, selector)
    assert slowest <= PING_BUDGET, f"{selector}: a ping took {slowest:.1f} s ({reply.status})"


@pytest.mark.slow
def test_a_message_cannot_make_the_kernel_hold_gigabytes(tmp_path) -> None:
    """Hole: frames of 4 MB become ~300 MB each in the kernel, kept for the whole call.

    Every 4 MB frame of empty lists decodes into ~4 million objects (x60 the
    bytes), and the kernel keeps what a call creates (clones in the frame's
    handle table, slots written) until it ends. Three clone requests grow the
    kernel by about a gigabyte; a loop of them ends with the kernel killed for
    lack of memory, while the cell itself never used more than its 512 MiB.
    """
    kernel = _start_review_kernel(tmp_path)  # its own: memory freed earlier would be reused
    try:
        reply, _, grown = _send_while_pinging(kernel, "clone_large_values")
    finally:
        kernel.stop()
    assert grown < 512, f"the kernel grew by {grown:.0f} MiB during one message ({reply.status})"


@pytest.mark.slow
def test_a_plain_method_cannot_make_genesis_unloadable(kernel) -> None:
    """Hole: one line of generated code breaks genesis_obj for every later kernel.

    The marker of pLLM_obj's weight library, kept as a dict key in a slot of
    genesis_obj (see test_a_hostile_method_cannot_store_a_kernel_object_marker),
    is committed; after a restart genesis_obj cannot be loaded.
    """
    from batos_uvm.client import BridgeClient

    with BridgeClient(kernel.endpoint, timeout=120, dead_after=120) as client:
        assert client.send("genesis_obj", "stash_a_marker").result == "kept"
    kernel.stop()
    kernel.start()
    with BridgeClient(kernel.endpoint, timeout=120, dead_after=120) as client:
        reply = client.send("genesis_obj", "describe")
    assert reply.ok, f"genesis_obj after a restart: {reply.error}"


# -- attacks the layers refuse (not covered elsewhere) --------------------------------------
ESCAPES = """
def probe(self, image, kernel_pid):
    import os, sys, signal
    ctypes = sys.modules["ctypes"]
    resource = sys.modules["resource"]
    libc = ctypes.CDLL(None, use_errno=True)

    def c(result):
        if result < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return result

    attempts = {
        "read the image": lambda: open(image, "rb").read(16),
        "write next to the image": lambda: open(image + ".canary", "w"),
        "write in the working directory": lambda: open("canary", "w"),
        "fill an anonymous file": lambda: os.write(os.memfd_create("x"), b"x" * 10),
        "open a TCP socket": lambda: c(libc.socket(2, 1, 0)),
        "open a unix socket": lambda: c(libc.socket(1, 1, 0)),
        "kill the kernel": lambda: os.kill(kernel_pid, signal.SIGKILL),
        "signal the kernel's group": lambda: os.killpg(os.getpgid(kernel_pid), signal.SIGTERM),
        "read the kernel's environment": lambda: open(f"/proc/{kernel_pid}/environ").read(),
        "open the kernel's memory": lambda: open(f"/proc/{kernel_pid}/mem", "rb"),
        "list the kernel's descriptors": lambda: os.listdir(f"/proc/{kernel_pid}/fd"),
        "trace the kernel": lambda: c(libc.ptrace(16, kernel_pid, 0, 0)),
        "start a thread": lambda: sys.modules["_thread"].start_new_thread(print, ()),
        "fork": lambda: os.fork(),
        "exec": lambda: os.execv("/bin/true", ["true"]),
        "become root": lambda: os.setuid(0),
        "lift the memory limit": lambda: resource.setrlimit(resource.RLIMIT_AS, (-1, -1)),
        "read /etc/passwd": lambda: open("/etc/passwd").read(),
    }
    results = {}
    for name, attempt in attempts.items():
        try:
            results[name] = "allowed: " + repr(attempt())[:80]
        except BaseException as exc:
            results[name] = "refused: " + type(exc).__name__
    return results
"""


def test_an_escaped_cell_is_still_contained_by_every_layer_together(tmp_path) -> None:
    """Refused: with the restricted builtins gone, the operating-system layers hold.

    tests/test_cells.py shows each layer alone; this is the kernel's real
    configuration (every layer) against code with the cell's full powers,
    aimed at the image and at the kernel process (here: this test's process).
    """
    import os

    image = tmp_path / "live_image.fs"
    image.write_bytes(b"FS21 the image")
    results = outcome(ESCAPES, str(image), os.getpid(), unrestricted=True)
    allowed = {name: result for name, result in results.items() if not result.startswith("refused")}
    assert not allowed, allowed
    assert not (tmp_path / "live_image.fs.canary").exists()


LYING_CELLS = {
    # a length it never sends, then silence: the call's time limit ends it
    "short frame, then silence": ("os.write(fd, (1000).to_bytes(4, 'big') + b'x' * 10)\n"
                                  "import time\ntime.sleep(60)", "CellTimeout"),
    # a length it never sends, then exit
    "short frame, then exit": ("os.write(fd, (1000).to_bytes(4, 'big') + b'x' * 10)\n"
                               "os._exit(0)", "CellCrashed"),
    "not a map": ("send_raw(wire.encode([1, 2]))\nreturn call.cell.channel.receive()",
                  "CellProtocolError"),
    "an op the kernel does not expect": ("send_raw(wire.encode({'op': 'ready'}))\n"
                                         "return call.cell.channel.receive()",
                                         "CellProtocolError"),
    "a malformed diff": ("send_raw(wire.encode(done(1, ['x'])))\n"
                         "return call.cell.channel.receive()", "CellProtocolError"),
    "silence": ("import time\ntime.sleep(60)", "CellTimeout"),
}


@pytest.mark.parametrize("lie", list(LYING_CELLS))
def test_a_cell_that_breaks_the_protocol_is_stopped(lie: str) -> None:
    """Refused: frames that lie about their length or content stop the call, nothing else."""
    body, expected = LYING_CELLS[lie]
    receiver = UvmObject(label="receiver", level=1)
    result = outcome(subverted(body), receiver=receiver, unrestricted=True, timeout=2.0)
    assert result[0] == expected, result
    assert receiver.slot_names() == ["level"]


OVERSTEPS = {
    "delete a private slot": ({"diff": {"set": {}, "delete": ["_label"]}}, "belong to the kernel"),
    "delete parents": ({"diff": {"set": {}, "delete": ["parents"]}}, "parents are read-only"),
    "shadow an operation": ({"diff": {"set": {"describe": 1}, "delete": []}},
                            "operation of every object"),
    "a slot name that is not a name": ({"diff": {"set": {"a b": 1}, "delete": []}},
                                       "not a slot name"),
    "a very long slot name": ({"diff": {"set": {"x" * 5000: 1}, "delete": []}}, "at most 120"),
    "read a private slot of another object": ({"kind": "get", "target": 1, "name": "_methods"},
                                              "does not understand"),
    "send a private message": ({"kind": "send", "target": 1, "selector": "_p_activate",
                                "args": [], "kwargs": {}}, "does not understand"),
    "a private keyword": ({"kind": "send", "target": 1, "selector": "clone", "args": [],
                           "kwargs": {"_methods": {}}}, "reserved for the kernel"),
    "a primitive off the allow-list": ({"kind": "send", "target": 1, "selector": "index",
                                        "args": ["x", "y"], "kwargs": {}}, "cannot call"),
    "the source of a method not offered": ({"kind": "source", "key": "m" + "0" * 24},
                                           "no such method source"),
    "an unknown service": ({"kind": "service", "name": "shell", "args": ["id"]},
                           "unknown kernel service"),
    "the largest handle": ({"kind": "describe", "target": 2**32 - 1}, "never given"),
}


@pytest.mark.parametrize("attempt", list(OVERSTEPS))
def test_a_subverted_cell_cannot_overstep_its_receiver(image, attempt: str) -> None:
    """Refused by the kernel's checks of every request and diff (Invocation, Frame)."""
    request, expected = OVERSTEPS[attempt]
    proto = UvmObject(label="proto")
    proto.install_primitive("index", "catalog.index")
    obj = proto.clone(level=1)
    obj._label = "obj"
    image.root["obj"] = obj
    transaction.commit()
    body = """
    request = {"op": "request", "kind": "describe", "diff": {"set": {}, "delete": []}, **args[0]}
    request["target"] = wire.Handle(request.get("target", 0))  # 1: the parent
    return call.cell.ask(request).get("error")
    """
    result = outcome(subverted(body), request, receiver=obj, unrestricted=True)
    assert expected in str(result), result
    assert sorted(obj.slot_names()) == ["level", "parents"] and obj.parents == [proto]
    assert obj.__dict__.get("_label") == "obj" and "index" in proto.methods()


def test_a_cell_flooding_its_stderr_does_not_slow_the_kernel() -> None:
    """Refused: the kernel drains a cell's stderr in 64 KiB reads and keeps a 4 KiB tail.

    A subverted cell writes to its stderr (the pipe the kernel drains, not the
    captured ``print``) as fast as it can; the event loop keeps turning.
    """
    body = """
    import time
    chunk, end, written = b"x" * 65536, time.time() + 3, 0
    while time.time() < end:
        written += os.write(2, chunk)
    return written
    """
    lags: list[float] = []

    async def watch() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.05)
            lags.append(time.monotonic() - started - 0.05)

    async def scenario():
        pool = CellPool(CellConfig(unrestricted=True), size=1)
        watcher = asyncio.ensure_future(watch())
        try:
            return await call_in_cell(pool, UvmObject(label="r"), subverted(body))
        finally:
            watcher.cancel()
            await pool.close()

    written = run(scenario())
    assert written > 10 * 2**20  # it did flood
    assert max(lags) < 0.5, f"the event loop stalled {max(lags):.2f} s"
