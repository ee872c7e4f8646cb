"""Persona models from the image in memory: loaded, shared and swapped within a budget.

:class:`ModelManager` (one per kernel, transient) loads a persona's model from its
blobs through a view of links (see ``batos_uvm.weight_views``), keeps loaded models
within a memory budget by unloading the least recently used unleased ones, and
switches personas that share a base model by activating their LoRA adapter.

Leases: ``async with manager.lease("BRICK") as lease`` pins the model while a
cycle uses it: it is neither unloaded nor replaced. All leases on one base share
the one loaded copy (never a second copy); generation on that base is serialised,
each call activating its own persona's adapter first. A request for another
model that does not fit beside leased ones waits until a lease ends (up to
``wait_timeout`` seconds); a model larger than the whole budget is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import transaction

from .. import weights as w
from ..weight_views import FileRef, close_view, committed_files, open_view, verify_files
from .base import CognitionError, CognitionUnavailable

log = logging.getLogger(__name__)

GiB = 1 << 30
OVERHEAD = 1.1  # activations, KV cache and allocator slack on top of the weights
NF4_BYTES = 0.5 + 0.016  # 4 bits per weight + double-quantised block scales
DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2}


def default_budget(device: str) -> int:
    """8 GiB of VRAM on CUDA; half the physical RAM on CPU (8 GiB if unknown)."""
    if device.startswith("cuda"):
        return 8 * GiB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    peft_name: str  # unique per content, so a replaced adapter is loaded afresh
    files: list[FileRef]
    size: int


@dataclass(frozen=True)
class ModelSpec:
    """What loading a persona needs, read from the image (usable without a connection)."""

    persona: str
    key: str  # the base model's fingerprint: personas with the same weights share a load
    name: str
    files: list[FileRef]
    footprint: int
    prequantised: bool
    stored_dtype: str | None
    adapter: AdapterSpec | None


@dataclass(eq=False)
class _Loaded:
    key: str
    name: str
    footprint: int
    ready: bool = False
    model: Any = None
    tokenizer: Any = None
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    adapters: set[str] = field(default_factory=set)
    lora_layers: list[Any] | None = None  # for a fast switch; None: use peft's set_adapter
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time


class Lease:
    """A persona's model pinned in memory for the holder; see :meth:`activated`."""

    def __init__(self, spec: ModelSpec, entry: _Loaded) -> None:
        self.spec, self._entry = spec, entry
        self.persona, self.model_name = spec.persona, spec.name
        self.adapter = spec.adapter.name if spec.adapter else None

    @contextlib.contextmanager
    def activated(self) -> Iterator[tuple[Any, Any]]:
        """Lock the model and switch it to this persona's adapter (or none); blocking."""
        entry = self._entry
        with entry.lock:
            model = entry.model
            if self.spec.adapter is not None:
                name = self.spec.adapter.peft_name
                if model.active_adapter != name:
                    _switch_adapter(model, name, entry.lora_layers)
                yield model, entry.tokenizer
            elif hasattr(model, "disable_adapter"):  # a PeftModel: run the bare base
                with model.disable_adapter():
                    yield model, entry.tokenizer
            else:
                yield model, entry.tokenizer


def _lora_layers(model: Any) -> list[Any] | None:
    """The model's LoRA layers, or None if it has modules a plain layer switch would miss."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = []
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
            return None
        if isinstance(module, BaseTunerLayer):
            layers.append(module)
    return layers


def _switch_adapter(model: Any, name: str, layers: list[Any] | None) -> None:
    """Activate adapter ``name``; what PeftModel.set_adapter does, minus its two module walks.

    peft walks all modules twice per switch (~0.45 ms of ~0.7 ms on a 120 MB model);
    the LoRA layers were collected once when the adapter was loaded.
    """
    if layers is None or any(layer.merged for layer in layers):
        model.set_adapter(name, inference_mode=True)
        return
    for layer in layers:
        layer.set_adapter(name, inference_mode=True)
    model.base_model.active_adapter = name
    model.active_adapter = name


class ModelManager:
    """Loads, shares, swaps and unloads persona models within a memory budget."""

    def __init__(
        self,
        db: Any,
        *,
        device: str | None = None,
        budget_bytes: int | None = None,
        load_in_4bit: bool | None = None,
        dtype: str | None = None,
        verify: bool = True,
        wait_timeout: float = 600.0,
    ) -> None:
        import torch

        self.db = db
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.budget = budget_bytes if budget_bytes is not None else default_budget(self.device)
        cuda = self.device.startswith("cuda")
        self.load_in_4bit = cuda if load_in_4bit is None else load_in_4bit
        self.dtype = dtype or ("auto" if not cuda else _cuda_dtype())
        self.verify, self.wait_timeout = verify, wait_timeout
        self.stats: Counter[str] = Counter()
        self._loaded: dict[str, _Loaded] = {}
        self._views: dict[str, Any] = {}
        self._db_lock = threading.Lock()
        self._tm = transaction.TransactionManager()
        self._conn: Any = None
        self._cond: asyncio.Condition | None = None
        self._cond_loop: asyncio.AbstractEventLoop | None = None

    # -- reading the image ----------------------------------------------------------------

    def library(self) -> w.WeightLibrary | None:
        """The weight library as of the latest commit, if any (caller holds ``_db_lock``)."""
        if self._conn is None:
            self._conn = self.db.open(transaction_manager=self._tm)
        self._tm.abort()  # start afresh: see adapters and models added since the last call
        try:
            return w.library_from_root(self._conn.root())
        except w.WeightError:
            return None

    def resolve(self, persona: str, adapter: str | None = None) -> ModelSpec:
        """Read what loading ``persona`` (with ``adapter`` or its active one) needs."""
        with self._db_lock:
            library = self.library()
            key = w.persona_key(persona)
            record = library.models.get(key) if library is not None else None
            if library is None or record is None:
                raise CognitionUnavailable(_no_model(key))
            if record.config.get("format") == "gguf":
                raise CognitionUnavailable(
                    f"persona {key}'s model {record.name} is a GGUF file, which thinks through "
                    "llama.cpp: leave the persona's backend unset (or set llama-cpp)"
                )
            name = adapter if adapter is not None else library.active.get(key)
            aspec = None
            if name:
                arec = library.adapters.get(name)
                if arec is None or arec.base_fingerprint != record.fingerprint:
                    raise CognitionError(f"adapter {name} is not stored for {key}'s model")
                safe = re.sub(r"\W", "_", name)
                aspec = AdapterSpec(
                    name, f"{safe}_{arec.fingerprint[:8]}", committed_files(arec), arec.total_size
                )
            return ModelSpec(
                key,
                record.fingerprint,
                record.name,
                committed_files(record),
                self.estimate(record),
                bool(record.config.get("quantization")),
                record.config.get("stored_dtype"),
                aspec,
            )

    def estimate(self, record: w.ModelRecord) -> int:
        """Bytes the model will take once loaded, from its weight sizes and the load options."""
        cfg = record.config
        params, linear = record.parameters, record.linear_parameters
        stored = DTYPE_SIZE.get(cfg.get("stored_dtype") or "", 4)
        size = stored if self.dtype == "auto" else DTYPE_SIZE.get(self.dtype, 4)
        if self.dtype == "auto" and cfg.get("stored_dtype") == "F16" and self.device == "cpu":
            size = 4  # loaded as float32, see _load_base
        if cfg.get("quantization") or not params:
            weights = cfg.get("weight_bytes") or record.total_size
        elif self.load_in_4bit:
            weights = linear * NF4_BYTES + (params - linear) * size  # embeddings stay as is
        else:
            weights = params * size
        return int(weights * OVERHEAD)

    # -- leases ---------------------------------------------------------------------------

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or self._cond_loop is not loop:
            self._cond, self._cond_loop = asyncio.Condition(), loop
        return self._cond

    @contextlib.asynccontextmanager
    async def lease(self, persona: str, adapter: str | None = None) -> AsyncIterator[Lease]:
        """Pin ``persona``'s model (loading it, and its adapter, if needed) for the block."""
        try:
            spec = await asyncio.to_thread(self.resolve, persona, adapter)
        except w.WeightError as e:
            raise CognitionError(str(e)) from e
        entry = await self._acquire(spec)
        try:
            if spec.adapter is not None and spec.adapter.peft_name not in entry.adapters:
                try:
                    await asyncio.to_thread(self._load_adapter, entry, spec)
                except w.WeightError as e:
                    raise CognitionError(str(e)) from e
                except Exception as e:
                    raise CognitionError(
                        f"loading adapter {spec.adapter.name} for {spec.persona} failed: "
                        f"{type(e).__name__}: {e}"
                    ) from e
            yield Lease(spec, entry)
        finally:
            cond = self._condition()
            async with cond:
                entry.leases -= 1
                entry.last_used = time.monotonic()
                cond.notify_all()

    async def _acquire(self, spec: ModelSpec) -> _Loaded:
        if spec.footprint > self.budget:
            raise CognitionError(
                f"{spec.persona}'s model {spec.name} needs ~{spec.footprint / GiB:.2f} GiB, "
                f"more than the whole budget of {self.budget / GiB:.2f} GiB: raise the budget "
                "or load it in 4-bit"
            )
        cond = self._condition()
        deadline = time.monotonic() + self.wait_timeout
        async with cond:
            while True:
                entry = self._loaded.get(spec.key)
                if entry is not None and entry.ready:
                    entry.leases += 1
                    return entry
                victims = self._make_room(spec.footprint) if entry is None else None
                if victims is not None:
                    entry = _Loaded(spec.key, spec.name, spec.footprint, leases=1)
                    self._loaded[spec.key] = entry
                    break
                remaining = deadline - time.monotonic()
                try:  # another task loads this model, or leased models fill the budget
                    await asyncio.wait_for(cond.wait(), max(remaining, 0.001))
                except TimeoutError:
                    busy = ", ".join(e.name for e in self._loaded.values() if e.leases)
                    raise CognitionError(
                        f"waited {self.wait_timeout:.0f} s for memory to load {spec.name} "
                        f"for {spec.persona}; in use: {busy or 'nothing'}"
                    ) from None
        try:
            if victims:
                await asyncio.to_thread(self._free, victims)
            entry.model, entry.tokenizer = await asyncio.to_thread(self._load_base, spec)
        except BaseException as e:
            async with cond:
                del self._loaded[spec.key]
                cond.notify_all()
            self._free([entry])
            if isinstance(e, w.WeightError):
                raise CognitionError(str(e)) from e
            if isinstance(e, Exception):
                raise CognitionError(
                    f"loading {spec.persona}'s model {spec.name} failed: {type(e).__name__}: {e}"
                ) from e
            raise
        async with cond:
            entry.ready = True
            cond.notify_all()
        return entry

    def _make_room(self, needed: int) -> list[_Loaded] | None:
        """Pick least recently used unleased models to unload so ``needed`` fits.

        Returns them (already out of the accounting; the caller frees them), or
        None, unloading nothing, when even all idle models would not make room.
        """
        used = sum(e.footprint for e in self._loaded.values())
        idle = sorted(
            (e for e in self._loaded.values() if e.ready and not e.leases),
            key=lambda e: e.last_used,
        )
        victims = []
        while used + needed > self.budget and idle:
            victims.append(idle.pop(0))
            used -= victims[-1].footprint
        if used + needed > self.budget:
            return None
        for victim in victims:
            del self._loaded[victim.key]
            self.stats["unloads"] += 1
        return victims

    def _free(self, entries: list[_Loaded]) -> None:
        """Drop unloaded models (in a worker thread: a full gc pass can take 0.2 s)."""
        alive = []
        for entry in entries:
            with contextlib.suppress(TypeError):
                alive.append(weakref.ref(entry.model))
            entry.model = entry.tokenizer = None
            log.info("unloaded %s", entry.name)
        if any(ref() is not None for ref in alive):  # only reference cycles need the collector
            gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # -- loading (worker threads) ---------------------------------------------------------

    def _view(self, key: str, files: list[FileRef]) -> Any:
        """The folder of links for ``files``, made once per process and reused on reloads.

        Removing links to long blob paths costs ~2 ms each on ext4, so views live
        until :meth:`close`; one is remade if a link no longer resolves (image packed).
        """
        with self._db_lock:
            view = self._views.get(key)
            if view is None or not all(os.path.exists(view / f.name) for f in files):
                if view is not None:
                    close_view(view)
                view = self._views[key] = open_view(files)
            return view

    def _load_base(self, spec: ModelSpec) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        if self.verify:
            verify_files(spec.files, f"persona {spec.persona}'s model {spec.name}")
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
        dtype = self.dtype
        if dtype == "auto" and spec.stored_dtype == "F16" and self.device == "cpu":
            dtype = "float32"  # float16 kernels on CPU are slow or missing
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
        if self.load_in_4bit and not spec.prequantised:
            compute = torch.bfloat16 if dtype in ("auto", "float32") else getattr(torch, dtype)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
            kwargs["device_map"] = {"": self.device if self.device != "cuda" else 0}
        elif self.device != "cpu":
            kwargs["device_map"] = {"": self.device}
        started = time.perf_counter()
        directory = self._view(spec.key, spec.files)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        model.eval()
        self.stats["base_loads"] += 1
        log.info("loaded %s in %.2f s", spec.name, time.perf_counter() - started)
        return model, tokenizer

    def _load_adapter(self, entry: _Loaded, spec: ModelSpec) -> None:
        from peft import PeftModel

        adapter = spec.adapter
        assert adapter is not None
        if self.verify:
            verify_files(adapter.files, f"persona {spec.persona}'s adapter {adapter.name}")
        with entry.lock:  # never change the model under a running generation
            if adapter.peft_name in entry.adapters:
                return
            directory = self._view(adapter.peft_name, adapter.files)
            if isinstance(entry.model, PeftModel):
                entry.model.load_adapter(directory, adapter_name=adapter.peft_name)
            else:
                entry.model = PeftModel.from_pretrained(
                    entry.model, directory, adapter_name=adapter.peft_name
                )
            entry.model.eval()
            entry.lora_layers = _lora_layers(entry.model)
            entry.adapters.add(adapter.peft_name)
            entry.footprint += adapter.size
        self.stats["adapter_loads"] += 1

    def loaded(self) -> list[dict[str, Any]]:
        """What is in memory now (for logs, tests and ``describe``)."""
        return [
            {
                "name": e.name,
                "bytes": e.footprint,
                "leases": e.leases,
                "adapters": sorted(e.adapters),
            }
            for e in self._loaded.values()
        ]

    def close(self) -> None:
        entries = list(self._loaded.values())
        self._loaded.clear()
        self._free(entries)
        with self._db_lock:
            for view in self._views.values():
                close_view(view)
            self._views.clear()
            if self._conn is not None:
                self._tm.abort()
                self._conn.close()
                self._conn = None


def _cuda_dtype() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _no_model(persona: str) -> str:
    return (
        f"no model is stored for persona {persona}: store one with "
        f"`python batos.py models add {persona} SOURCE` "
        "(SOURCE: a model folder or a model id in the local Hugging Face cache)"
    )


_SHARED: dict[tuple[int, tuple[tuple[str, Any], ...]], list[Any]] = {}  # -> [manager, users]
_SHARED_LOCK = threading.Lock()


def shared_manager(db: Any, **options: Any) -> ModelManager:
    """One manager per database and options, however many backends use it (one per kernel)."""
    key = (id(db), tuple(sorted(options.items())))
    with _SHARED_LOCK:
        slot = _SHARED.get(key)
        if slot is None or slot[0].db is not db:
            slot = _SHARED[key] = [ModelManager(db, **options), 0]
        slot[1] += 1
        return slot[0]


def release_manager(manager: ModelManager) -> None:
    """Drop one user of a shared manager; the last one closes it."""
    with _SHARED_LOCK:
        for key, slot in list(_SHARED.items()):
            if slot[0] is manager:
                slot[1] -= 1
                if slot[1] > 0:
                    return
                del _SHARED[key]
    manager.close()
