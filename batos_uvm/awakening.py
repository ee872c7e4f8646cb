"""The Prototypal Awakening: the primordial objects of a new image.

``incarnate`` creates whatever is missing and touches nothing that exists, so
it serves both the first run and later runs (and adds objects a newer kernel
introduces). The caller owns the transaction.
"""

from __future__ import annotations

import time
from typing import Any

from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

from .codex import PERSONA_CODEX
from .objects import UvmObject

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

    def make_orchestrator() -> UvmObject:
        orchestrator = UvmObject(
            parents=[pllm, root["alfred_prototype_obj"], traits], label="orchestrator_obj"
        )
        orchestrator.install_primitive("start_cognitive_cycle", "orchestrator.start")
        return orchestrator

    ensure("orchestrator_obj", make_orchestrator)
    ensure("cycles", OOBTree)  # cycle id -> CycleRecord, every cycle ever run
    ensure("active_cycles", OOBTree)  # cycle id -> the kernel running it
    return created


def persona_object(root: Any, persona: str) -> UvmObject:
    return root[PERSONA_ROOTS[persona.upper()]]
