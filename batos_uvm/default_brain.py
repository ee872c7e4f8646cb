"""The model personas think with when nothing else is configured.

Set-up (``./puter.sh setup``, or ``python batos.py models fetch``) installs a
code model into the model cache (:mod:`batos_uvm.model_fetch`). When a kernel
starts, every persona with no backend of its own and no model in the image
gets that model stored in the image (linked, not copied). A persona whose
stored model is a GGUF file then thinks through llama.cpp on the committed
blob, one with a transformers model through the transformers backend.

The setting ``model`` chooses: ``auto`` (the default: the 1.5B code model, or
the 0.5B one on machines with little memory, whichever is installed), a
catalogue name, or ``none`` (no default model).
"""

from __future__ import annotations

import logging
from typing import Any

import transaction

from .config import PERSONAS, Settings
from .model_catalog import MODELS, CatalogModel, UnknownModel, choose, for_this_machine
from .model_fetch import installed

log = logging.getLogger("batos.default_brain")

N_CTX = 4096  # prompt, feedback on a retry and a method fit with room to spare
FETCH_HINT = "install one with `python batos.py models fetch` (or ./puter.sh setup)"


def unconfigured_personas(settings: Settings) -> list[str]:
    """Personas with no backend of their own and no default backend."""
    return [p for p in PERSONAS if not settings.persona_backend(p)]


def installed_choice(setting: str) -> tuple[CatalogModel, Any] | None:
    """The model the setting names, if it is installed; ``auto`` takes any installed one."""
    try:
        wanted = choose(setting)
    except UnknownModel as exc:
        log.warning("setting model: %s", exc)
        return None
    if wanted is None:
        return None
    path = installed(wanted)
    if path is not None:
        return wanted, path
    if setting.strip().lower() in ("", "auto"):
        preferred = for_this_machine()
        for other in (m for m in MODELS if m is not wanted):
            path = installed(other)
            if path is not None:
                log.info("%s is not installed; using %s", preferred.name, other.name)
                return other, path
    return None


def provide_default_model(root: Any, settings: Settings) -> list[str]:
    """Store the chosen model for unconfigured personas (caller commits).

    Personas get it when they have no model, or another catalogue model (the
    setting changed); a model stored by hand (``models add``) stays.
    """
    from .gguf_store import store_gguf
    from .weights import library_from_root

    library = library_from_root(root, create=True)
    unconfigured = unconfigured_personas(settings)
    if not unconfigured or settings.model.strip().lower() == "none":
        return []
    found = installed_choice(settings.model)
    if found is None:
        missing = [p for p in unconfigured if p not in library.models]
        if missing:
            log.warning("no code model is installed for %s; %s", ", ".join(missing), FETCH_HINT)
        return []
    model, path = found
    needy = [
        p for p in unconfigured
        if p not in library.models
        or (library.models[p].config.get("catalog") and library.models[p].name != model.name)
    ]  # fmt: skip
    if not needy:
        return []
    record, how = store_gguf(library, needy, path, name=model.name, source=str(path),
                             sha256=model.sha256, info=model_info(model),
                             jar=root._p_jar, replace=True)  # fmt: skip
    log.info("%s think with %s (%s into the image from %s)",
             ", ".join(needy), model.title, how, path)  # fmt: skip
    return needy


def model_info(model: CatalogModel) -> dict[str, Any]:
    # "catalog": installed by models fetch, so a change of the setting ``model`` replaces it
    return {"title": model.title, "licence": model.licence, "upstream": model.upstream,
            "architecture": "qwen2", "quantization": "Q4_K_M", "catalog": True}  # fmt: skip


def backend_for_stored_model(db: Any, persona: str, threads: int = 0) -> dict[str, Any] | None:
    """The backend configuration for a persona's stored model, or None when it has none."""
    from .gguf_store import gguf_file, is_gguf_record
    from .weights import WeightError, library_from_root

    tm = transaction.TransactionManager()
    connection = db.open(transaction_manager=tm)
    try:
        try:
            library = library_from_root(connection.root())
        except WeightError:
            return None
        record = library.models.get(persona.upper())
        if record is None:
            return None
        if not is_gguf_record(record):
            return {"backend": "transformers"}
        ref = gguf_file(record)
        config = {"backend": "llama-cpp", "model_path": ref.path, "sha256": ref.sha256,
                  "n_ctx": N_CTX, "name": ref.name}  # fmt: skip
        if threads > 0:
            config["n_threads"] = threads
        return config
    finally:
        tm.abort()
        connection.close()
