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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import transaction
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

from .codex import PERSONA_CODEX, read_golden_dataset
from .config import PERSONAS, Settings
from .migration import IMAGE_FORMAT, backup_image, migrate_image, needs_migration
from .objects import UvmObject, seal

log = logging.getLogger("batos.awakening")

STATES = ("IDLE", "DECOMPOSING", "DELEGATING", "SYNTHESIZING", "VALIDATING", "COMPLETE", "FAILED")
PERSONA_ROOTS = {
    "ALFRED": "alfred_prototype_obj",
    "BRICK": "brick_prototype_obj",
    "ROBIN": "robin_prototype_obj",
    "BABS": "babs_prototype_obj",
}


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
    seal_kernel_objects(root)
    return created


# The kernel's machinery: generated methods are not grown on these, nor may change them.
KERNEL_OBJECTS = ("traits_obj", "pLLM_obj", "knowledge_catalog_obj", "psm_prototypes_obj",
                  "orchestrator_obj")


def seal_kernel_objects(root: Any) -> None:
    """Mark the kernel's own objects (also in images made before they were marked)."""
    for name in KERNEL_OBJECTS:
        obj = root.get(name)
        if isinstance(obj, UvmObject):
            seal(obj)
    machine = root.get("psm_prototypes_obj")
    if isinstance(machine, UvmObject):
        for state in STATES:
            prototype = machine._slots.get(state)
            if isinstance(prototype, UvmObject):
                seal(prototype)


def persona_object(root: Any, persona: str) -> UvmObject:
    return root[PERSONA_ROOTS[persona.upper()]]


def awaken(
    db: Any, settings: Settings, embedder: Any, owner_alive: Callable[[dict[str, Any]], bool]
) -> None:
    """Bring an image to life for a starting kernel; each step commits on its own.

    A serving kernel runs the three steps separately: the objects before it
    answers, the catalog and the models in the background (kernel.Kernel.start).
    """
    awaken_objects(db, owner_alive, settings)
    awaken_catalog(db, settings, embedder)
    awaken_models(db, settings)


@contextmanager
def _connection(db: Any) -> Iterator[tuple[Any, transaction.TransactionManager]]:
    tm = transaction.TransactionManager(explicit=True)
    connection = db.open(transaction_manager=tm)
    try:
        yield connection, tm
    finally:
        connection.close()


def awaken_objects(
    db: Any, owner_alive: Callable[[dict[str, Any]], bool], settings: Settings | None = None
) -> None:
    """The primordial objects (fast): migrate an older image, incarnate what is missing,
    mark dead kernels' cycles."""
    from .catalog import set_index_directory
    from .cycle import mark_interrupted

    if settings is not None and settings.is_file_storage:
        # the catalog's vector index is kept beside the image
        set_index_directory(settings.db_path.with_name(settings.db_path.name + ".catalog-index"))
    with _connection(db) as (connection, tm):
        if settings is not None:
            with tm:
                if needs_migration(connection.root()):
                    migrate(connection, settings)
        with tm:
            root = connection.root()
            created = incarnate(root)
            if created:
                log.info("prototypal awakening: incarnated %s", ", ".join(created))
            interrupted = mark_interrupted(root, owner_alive)
            if interrupted:
                log.warning("marked %d interrupted cycle(s): %s", len(interrupted),
                            ", ".join(interrupted))


def awaken_catalog(db: Any, settings: Settings, embedder: Any) -> None:
    """Ingest the golden dataset into the catalog once per image (needs the embedder)."""
    with _connection(db) as (connection, tm), tm:
        root = connection.root()
        meta = root["image_meta"]
        if not meta.get("codex_ingested"):
            ingest_golden_dataset(root, settings.codex, embedder)
            meta["codex_ingested"] = time.time()


def awaken_models(db: Any, settings: Settings) -> None:
    """Store configured transformers models and incarnate the LoRA adapters."""
    with _connection(db) as (connection, tm):
        for persona in PERSONAS:
            with tm:
                persist_configured_model(connection.root(), settings, persona)
        with tm:
            provide_default_model(connection.root(), settings)
        with tm:
            incarnate_lora_adapters(connection.root(), settings.lora_dir)


def migrate(connection: Any, settings: Settings) -> None:
    """Bring an image of an older format up to date, after backing up its file."""
    where = "no file backup (not a FileStorage image; its history keeps the old records)"
    if settings.is_file_storage:
        where = f"backup of the image file at {backup_image(settings.db_path)}"
    log.warning("image format is older than %d: migrating (%s)", IMAGE_FORMAT, where)
    started = time.monotonic()
    converted = migrate_image(connection)
    log.warning(
        "image migrated to format %d: methods of %d object(s) moved into per-method records "
        "in %.1f s; %s", IMAGE_FORMAT, converted, time.monotonic() - started, where,
    )


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
