"""Loading persona models from the image, and switching personas, against baselines.

Builds a ~120 MB Llama model locally (hidden 512, 8 layers, vocab 4096) and two
LoRA adapters, stores them in a fresh FileStorage image, then times (median of
warm runs, all in this one process):

  (a) from_pretrained from a plain folder                      the baseline
  (b) from the image: a view of links to the committed blobs   goal <= 1.1x (a)
      as a kernel loads a model again (its files were verified before)
  (b') the same, as the first load in a kernel process: the sha256 check of
      every file (the kernel's path) plus the load
  (c) the seed's way: blob holding a tar -> temp tar -> extract -> load
  (d) a persona switch through ModelManager: two personas on one base with
      different adapters, against two personas on two bases that do not fit
      together (every switch reloads)                          goal >= 20x faster

    python bench/swap.py [--runs 11] [--hidden 512 --layers 8 --vocab 4096]

Not a test: it prints figures and ratios; the goals are marked met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from tinymodel import TinyImage, build_lora_adapter, build_tiny_llama  # noqa: E402

from batos_uvm import weights as w  # noqa: E402
from batos_uvm.cognition.model_manager import ModelManager  # noqa: E402


def interleaved(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Seconds per run of each function; rounds alternate their order so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm: page cache, imports, allocator
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(runs):
        for name in names if round_ % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            result = fns[name]()
            times[name].append(time.perf_counter() - started)
            del result
    return times


def spread(samples: list[float]) -> str:
    return (f"{min(samples) * 1000:7.1f} / {statistics.median(samples) * 1000:7.1f} / "
            f"{max(samples) * 1000:7.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    opts = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM
    from ZODB.blob import Blob

    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="batos-bench-"))
    try:
        print(f"building model (hidden {opts.hidden}, {opts.layers} layers) in {work} ...")
        base = build_tiny_llama(work / "base", hidden=opts.hidden, layers=opts.layers,
                                vocab=opts.vocab)  # fmt: skip
        other = build_tiny_llama(work / "other", hidden=opts.hidden, layers=opts.layers,
                                 vocab=opts.vocab, seed=1)  # fmt: skip
        lora = [build_lora_adapter(base, work / f"lora{i}", seed=i) for i in (1, 2)]
        size = sum(p.stat().st_size for p in base.iterdir())

        image = TinyImage(work / "image")
        lib = image.library
        started = time.perf_counter()
        w.store_model(lib, "ALFRED", base)
        image.tm.commit()
        store_s = time.perf_counter() - started
        w.store_model(lib, "BRICK", "ALFRED")
        w.store_model(lib, "ROBIN", "ALFRED")
        w.store_adapter(lib, "brick_style", "BRICK", lora[0])
        w.store_adapter(lib, "robin_style", "ROBIN", lora[1])
        w.store_model(lib, "BABS", other)
        tar_path = work / "seed.tar"  # the seed kept one blob holding a tar of the folder
        with tarfile.open(tar_path, "w") as tar:
            tar.add(base, arcname="model")
        tar_blob = Blob()
        with open(tar_path, "rb") as src, tar_blob.open("w") as dst:
            shutil.copyfileobj(src, dst)
        image.conn.root()["seed_tar"] = tar_blob
        image.tm.commit()
        record = lib.models["ALFRED"]
        refs = w.committed_files(record)

        started = time.perf_counter()
        w.verify_files(refs, "ALFRED")
        verify_s = time.perf_counter() - started

        def plain() -> object:
            return AutoModelForCausalLM.from_pretrained(base)

        views: list[Path] = []

        def from_image() -> object:
            view = w.open_view(refs)
            views.append(view)  # a fresh view per load; ModelManager reuses one per model
            return AutoModelForCausalLM.from_pretrained(view)

        def from_image_first() -> object:
            w.forget_verified()  # as in a fresh kernel process
            w.verify_files(refs, "ALFRED")
            return from_image()

        def seed_way() -> object:
            tmp = Path(tempfile.mkdtemp(prefix="batos-seed-"))
            try:
                shutil.copyfile(tar_blob.committed(), tmp / "model.tar")
                with tarfile.open(tmp / "model.tar") as tar:
                    tar.extractall(tmp / "x", filter="data")
                return AutoModelForCausalLM.from_pretrained(tmp / "x" / "model")
            finally:
                shutil.rmtree(tmp)

        print(f"model: {size / 1e6:.0f} MB; stored in the image in {store_s:.2f} s; "
              f"first-load sha256 check {verify_s:.2f} s (once per process)")  # fmt: skip
        times = interleaved(
            {"a": plain, "b": from_image, "b'": from_image_first, "c": seed_way}, opts.runs
        )
        a, b, b1, c = (statistics.median(times[k]) for k in ("a", "b", "b'", "c"))
        started = time.perf_counter()
        for view in views:
            w.close_view(view)
        unlink = (time.perf_counter() - started) / len(views)

        switch_adapter, switch_reload, counts = persona_switches(image, opts.runs)
        image.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{opts.runs} warm runs each, alternating (min / median / max; ratio of medians)")
    print(f"(a) plain folder, from_pretrained      {spread(times['a'])}   1.00x")
    print(f"(b) image, view of blob links           {spread(times['b'])}   {b / a:.2f}x  "
          f"goal <= 1.1x: {'met' if b <= 1.1 * a else 'missed'}")  # fmt: skip
    first = spread(times["b'"])
    print(f"(b') first load in a process (+sha256)  {first}   {b1 / a:.2f}x")
    print(f"    removing a view (once, at close)    {unlink * 1000:8.1f} ms")
    print(f"(c) seed: blob tar -> copy -> extract   {spread(times['c'])}   {c / a:.2f}x")
    print(f"(d) persona switch, shared base+LoRA    {switch_adapter * 1000:8.2f} ms")
    print(f"    persona switch, full reload         {switch_reload * 1000:8.1f} ms   "
          f"adapter switch {switch_reload / switch_adapter:.0f}x faster; goal >= 20x: "
          f"{'met' if switch_reload >= 20 * switch_adapter else 'missed'}")  # fmt: skip
    print(f"    ModelManager counts: {counts}")


def persona_switches(image: TinyImage, runs: int) -> tuple[float, float, dict[str, int]]:
    """Median time to get a persona's model ready (lease + adapter activation).

    Two managers in one loop: one where BRICK and ROBIN share a base and differ by
    adapter, one whose budget holds only one of ALFRED's and BABS's models, so each
    switch unloads one and loads the other. Rounds alternate between the two.
    """
    shared = ModelManager(image.db, device="cpu")
    single = ModelManager(image.db, device="cpu")
    fits_one = max(single.resolve(p).footprint for p in ("ALFRED", "BABS"))
    single.budget = fits_one + fits_one // 2

    async def switch(manager: ModelManager, persona: str) -> float:
        started = time.perf_counter()
        async with manager.lease(persona) as lease:
            with lease.activated():
                pass
        return time.perf_counter() - started

    async def rounds() -> tuple[list[float], list[float]]:
        adapter_s: list[float] = []
        reload_s: list[float] = []
        for i in range(2 * runs + 2):
            a = await switch(shared, ("BRICK", "ROBIN")[i % 2])
            b = await switch(single, ("ALFRED", "BABS")[i % 2])
            if i >= 2:  # the first two rounds load the bases and adapters
                adapter_s.append(a)
                reload_s.append(b)
        return adapter_s, reload_s

    adapter_s, reload_s = asyncio.run(rounds())
    counts = {"shared": dict(shared.stats), "one budget": dict(single.stats)}
    shared.close()
    single.close()
    return statistics.median(adapter_s), statistics.median(reload_s), counts


if __name__ == "__main__":
    main()
