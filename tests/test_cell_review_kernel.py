"""A security review of the cell boundary, through a real kernel process.

Plain generated methods (no escape from the restricted builtins needed),
installed with ``batos.py shell --write`` (the Guardian passes them) and sent
through the bridge while another client pings the kernel. Each test fails
today; see test_cell_review.py for the same holes shown on cells alone.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time

import pytest
from kernel_process import KernelProcess

from batos_uvm.client import BridgeClient

pytestmark = pytest.mark.slow

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
    # a kernel-object marker as a dict key (test_cell_review.py shows why it breaks)
    "stash_a_marker": "def stash_a_marker(self):\n"
                      "    self.kept = {self.parents[0].weights: 1}\n    return 'kept'\n",
}


def _start_review_kernel(workdir) -> KernelProcess:
    """A kernel with KERNEL_METHODS on genesis_obj and a clone of it, review_obj."""
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


@pytest.mark.parametrize("selector", ["store_a_large_value", "return_colliding_set"])
def test_one_plain_value_does_not_stop_the_kernel_answering(kernel, selector: str) -> None:
    """Hole: a plain method's value blocks the kernel's event loop for seconds.

    The kernel decodes a cell's frame, copies it (``Frame.inward``, recursive
    Python), checks it and commits it on the event loop. 4 MB of ``[[]] * 4e6``
    is 4 million lists to build, copy and pickle (~26 s here, on a loaded machine),
    and a set of 25,000 integers with one hash costs n**2 comparisons to build
    again: the kernel answers no ping meanwhile. Decoding and copying belong in
    a thread (or a bounded, incremental decoder) with a bound on the number of
    elements, not only on bytes.
    """
    reply, slowest, _ = _send_while_pinging(kernel, selector)
    assert slowest <= PING_BUDGET, f"{selector}: a ping took {slowest:.1f} s ({reply.status})"


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


def test_a_plain_method_cannot_make_genesis_unloadable(kernel) -> None:
    """Hole: one line of generated code breaks genesis_obj for every later kernel.

    The marker of pLLM_obj's weight library, kept as a dict key in a slot of
    genesis_obj (see test_a_hostile_method_cannot_store_a_kernel_object_marker),
    is committed; after a restart genesis_obj cannot be loaded.
    """
    with BridgeClient(kernel.endpoint, timeout=120, dead_after=120) as client:
        stashed = client.send("genesis_obj", "stash_a_marker")
        assert stashed.result == "kept" or "cannot read" in stashed.error.reason  # refused
    kernel.stop()
    kernel.start()
    with BridgeClient(kernel.endpoint, timeout=120, dead_after=120) as client:
        reply = client.send("genesis_obj", "describe")
    assert reply.ok, f"genesis_obj after a restart: {reply.error}"
