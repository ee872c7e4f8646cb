"""The Prototypal Awakening: the primordial objects of a new image, and a kernel's start.

``incarnate`` creates whatever is missing and touches nothing that exists, so
it serves both the first run and later runs (and adds objects a newer kernel
introduces); its caller owns the transaction. ``awaken`` is what a kernel does
on every start: incarnate, mark cycles of dead kernels interrupted, ingest
the golden dataset once, store configured models, incarnate LoRA adapters.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import transaction
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

from .codex import PERSONA_CODEX, read_golden_dataset
from .config import PERSONAS, Settings
from .objects import UvmObject

log = logging.getLogger("batos.awakening")

STATES = ("IDLE", "DECOMPOSING", "DELEGATING", "SYNTHESIZING", "VALIDATING", "COMPLETE", "FAILED")
PERSONA_ROOTS = {
    "ALFRED": "alfred_prototype_obj",
    "BRICK": "brick_prototype_obj",
    "ROBIN": "robin_prototype_obj",
    "BABS": "babs_prototype_obj",
}
IMAGE_FORMAT = 1


def _weight_library() -> Any:
    from .weights import WeightLibrary

    return WeightLibrary()


def _catalog_store() -> Any:
    from .catalog import CatalogStore

    return CatalogStore()


def incarnate(root: Any) -> list[str]:
    """Create the missing primordial objects under ``root``; return their names."""
    created: list[str] = []

    def ensure(name: str, make: Any) -> Any:
        if name not in root:
            root[name] = make()
            created.append(name)
        return root[name]

    meta = ensure("image_meta", PersistentMapping)
    meta.setdefault("format", IMAGE_FORMAT)
    meta.setdefault("created", time.time())

    def make_traits() -> UvmObject:
        traits = UvmObject(label="traits_obj")
        traits.install_primitive("doesNotUnderstand", "doesNotUnderstand")
        traits.install_primitive("clone", "clone")
        traits.install_primitive("describe", "describe")
        return traits

    traits = ensure("traits_obj", make_traits)

    def make_pllm() -> UvmObject:
        pllm = UvmObject(parents=[traits], label="pLLM_obj")
        pllm.install_primitive("infer", "infer")
        return pllm

    pllm = ensure("pLLM_obj", make_pllm)
    if "weights" not in pllm.slot_names():
        pllm.weights = _weight_library()
    ensure("genesis_obj", lambda: UvmObject(parents=[pllm, traits], label="genesis_obj"))

    def make_catalog() -> UvmObject:
        catalog = UvmObject(parents=[traits], label="knowledge_catalog_obj")
        catalog.store = _catalog_store()
        catalog.install_primitive("search", "catalog.search")
        catalog.install_primitive("index", "catalog.index")
        return catalog

    ensure("knowledge_catalog_obj", make_catalog)

    for persona, root_name in PERSONA_ROOTS.items():
        codex = dict(PERSONA_CODEX[persona], name=persona)
        ensure(
            root_name,
            lambda codex=codex, root_name=root_name: UvmObject(
                parents=[pllm, traits], label=root_name, name=codex["name"], codex=codex
            ),
        )

    def make_states() -> UvmObject:
        machine = UvmObject(parents=[traits], label="psm_prototypes_obj")
        for state in STATES:
            prototype = UvmObject(parents=[traits], label=f"state {state}", name=state)
            prototype.install_primitive("process", f"psm.{state}")
            setattr(machine, state, prototype)
        return machine

    ensure("psm_prototypes_obj", make_states)

    # The orchestrator's state lives in the image; cycles are driven by the
    # kernel (cycle.Orchestrator), which needs a worker of its own and so is
    # not a message a method could send from inside a worker.
    ensure(
        "orchestrator_obj",
        lambda: UvmObject(
            parents=[pllm, root["alfred_prototype_obj"], traits], label="orchestrator_obj"
        ),
    )
    ensure("cycles", OOBTree)  # cycle id -> CycleRecord, every cycle ever run
    ensure("active_cycles", OOBTree)  # cycle id -> the kernel running it
    return created


def persona_object(root: Any, persona: str) -> UvmObject:
    return root[PERSONA_ROOTS[persona.upper()]]


def awaken(
    db: Any, settings: Settings, embedder: Any, owner_alive: Callable[[dict[str, Any]], bool]
) -> None:
    """Bring an image to life for a starting kernel; each step commits on its own."""
    from .cycle import mark_interrupted

    tm = transaction.TransactionManager(explicit=True)
    connection = db.open(transaction_manager=tm)
    try:
        with tm:
            root = connection.root()
            created = incarnate(root)
            if created:
                log.info("prototypal awakening: incarnated %s", ", ".join(created))
            interrupted = mark_interrupted(root, owner_alive)
            if interrupted:
                log.warning("marked %d interrupted cycle(s): %s", len(interrupted),
                            ", ".join(interrupted))
            meta = root["image_meta"]
            if not meta.get("codex_ingested"):
                ingest_golden_dataset(root, settings.codex, embedder)
                meta["codex_ingested"] = time.time()
        for persona in PERSONAS:
            with tm:
                persist_configured_model(connection.root(), settings, persona)
        with tm:
            provide_default_model(connection.root(), settings)
        with tm:
            incarnate_lora_adapters(connection.root(), settings.lora_dir)
    finally:
        connection.close()


def ingest_golden_dataset(root: Any, path: str, embedder: Any) -> None:
    entries, problems = read_golden_dataset(path)
    if problems:
        log.warning("%s", problems)
    store = root["knowledge_catalog_obj"].store
    for entry in entries:
        store.add_document(
            f"golden_dataset_{entry.line}",
            entry.text,
            {"source": "golden_dataset", "line": entry.line},
            embedder,
        )
    log.info("ingested %d golden dataset entries from %s", len(entries), path)


def provide_default_model(root: Any, settings: Settings) -> None:
    """Personas with nothing configured get the installed code model (see default_brain)."""
    from .default_brain import provide_default_model as provide
    from .weights import WeightError

    try:
        provide(root, settings)
    except (WeightError, OSError) as exc:  # no model is better than no kernel
        log.warning("the default code model could not be stored: %s", exc)


def persist_configured_model(root: Any, settings: Settings, persona: str) -> None:
    """Store a transformers persona's configured model when it is available locally."""
    config = settings.persona_backend(persona)
    if isinstance(config, str):
        config = {"backend": config.partition(":")[0]}
    if config.get("backend") != "transformers":
        return
    from .weights import WeightError, library_from_root, store_model

    library = library_from_root(root, create=True)
    if persona in library.models:
        return
    source = config.get("model") or config.get("source")
    how = (f"add one with: python batos.py models add {persona} SOURCE (a local folder "
           "or a model id in the local Hugging Face cache)")
    if not source:
        log.warning("%s thinks with transformers but no model is stored; %s", persona, how)
        return
    try:
        record = store_model(library, persona, source)
    except (WeightError, OSError) as exc:
        log.warning("%s: model %s is not available locally (%s); %s", persona, source, exc, how)
        return
    log.info("%s: stored model %s in the image (%d bytes)", persona, source, record.total_size)


def incarnate_lora_adapters(root: Any, lora_dir: str) -> None:
    from .weights import incarnate_adapters

    if os.path.isdir(lora_dir):
        try:
            incarnate_adapters(root["pLLM_obj"].weights, lora_dir)
        except Exception as exc:  # an unusable adapter must not stop the kernel
            log.warning("LoRA adapters in %s not incarnated: %s", lora_dir, exc)
