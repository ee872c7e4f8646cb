"""The default model: stored in the image without a copy, and thought with when nothing is set.

A tiny GGUF model written by the tests stands in for the catalogue's code
model (whose 1.1 GB are only used by the tests marked ``model``); everything
else is the real path: the model cache, the awakening, the blob, llama.cpp.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import transaction

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra 'llama')")

from gguf_writer import write_gguf  # noqa: E402
from tinymodel import build_tiny_llama  # noqa: E402

from batos_uvm import default_brain, model_catalog  # noqa: E402
from batos_uvm.config import load_settings  # noqa: E402
from batos_uvm.gguf_store import is_gguf_record, store_gguf  # noqa: E402
from batos_uvm.kernel import Kernel  # noqa: E402
from batos_uvm.model_fetch import installed  # noqa: E402
from batos_uvm.models_cli import run_models_command  # noqa: E402
from batos_uvm.weights import WeightError, library_from_root  # noqa: E402

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return write_gguf(build_tiny_llama(root / "hf", seed=0), root / "tiny-coder.gguf")


@pytest.fixture
def cached(tiny_gguf, tmp_path, monkeypatch) -> model_catalog.CatalogModel:
    """The tiny model installed in a model cache of its own, as the only catalogue model."""
    cache = tmp_path / "models"
    cache.mkdir()
    path = cache / "tiny-coder.gguf"
    path.write_bytes(tiny_gguf.read_bytes())
    data = path.read_bytes()
    model = model_catalog.CatalogModel(
        name="tiny-coder", title="Tiny coder", filename=path.name, size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), parts=(), hub_repo="nobody/tiny",
        upstream="https://example.invalid", licence="MIT", resident_bytes=1, download_bytes=1,
    )  # fmt: skip
    monkeypatch.setenv("BATOS_MODEL_DIR", str(cache))
    monkeypatch.setattr(default_brain, "MODELS", (model,))
    monkeypatch.setattr(default_brain, "for_this_machine", lambda memory=None: model)
    monkeypatch.setattr(
        default_brain, "choose", lambda name, memory=None: None if name == "none" else model
    )
    assert installed(model) == path  # hashed once, stamped
    return model


def settings(tmp_path: Path, **more):
    return load_settings(None, {
        "db": str(tmp_path / "live_image.fs"), "zeo": "off", "embedder": "hashing",
        "metacognition_log": str(tmp_path / "audit.jsonl"), "max_attempts": 1,
        "trial_wall_seconds": 3.0, **more}, environ={})  # fmt: skip


def run(coro, timeout: float = 300.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_kernel_with_nothing_configured_thinks_with_the_installed_model(tmp_path, cached):
    kernel = Kernel(settings(tmp_path))
    events: list[dict] = []

    async def progress(event: dict) -> None:
        events.append(event)

    async def scenario():
        await kernel.start(serve_bridge=False)
        try:
            return await kernel.send("genesis_obj", "double", [2], {}, progress,
                                     intent="create a method that doubles a number")  # fmt: skip
        finally:
            await kernel.stop()

    reply = run(scenario())
    # a random tiny model writes no valid method, but it was the one asked, through llama.cpp
    conn = kernel.image or None
    assert reply.status == "FAILED" and reply.cycle_id
    assert not reply.replayed
    db_path = tmp_path / "live_image.fs"
    from batos_uvm.image import open_image

    image = open_image(settings(tmp_path), serve_zeo=False)
    try:
        connection = image.db.open(transaction_manager=transaction.TransactionManager())
        root = connection.root()
        data = root["cycles"][reply.cycle_id].data
        calls = data["llm_calls"]
        assert {c["backend"] for c in calls} == {"llama-cpp"}
        assert {c["model"] for c in calls} == {"tiny-coder.gguf"}
        assert data["brief"]["intent"] == "create a method that doubles a number"
        library = library_from_root(root)
        record = library.models["BRICK"]
        assert is_gguf_record(record) and all(library.models[p] is record
                                              for p in ("ALFRED", "BABS", "ROBIN"))  # fmt: skip
        blob = next(iter(record.files.values())).blob.committed()
        # one copy on disk: the blob is the cached file itself
        assert (
            os.stat(blob).st_ino
            == (Path(os.environ["BATOS_MODEL_DIR"]) / "tiny-coder.gguf").stat().st_ino
        )
        connection.close()
    finally:
        image.close()
    assert conn is not None and db_path.exists()
    # the model's text streamed to the progress listener while it was written
    chunks = [e for e in events if e.get("text")]
    assert chunks and all(e["state"] in ("DECOMPOSING", "SYNTHESIZING") for e in chunks)
    assert {e["persona"] for e in chunks} <= {"BABS", "BRICK"}
    synthesizing = next(e for e in events if e["state"] == "SYNTHESIZING" and not e.get("text"))
    assert synthesizing["persona"] == "BRICK" and "writing double" in synthesizing["detail"]
    # streamed text repeats its state's announcement, so a client showing states sees one line
    assert {e["detail"] for e in chunks if e["state"] == "SYNTHESIZING"} == {synthesizing["detail"]}


def test_model_none_and_configured_personas_are_left_alone(tmp_path, cached):
    kernel = Kernel(settings(tmp_path, model="none"))

    async def scenario():
        await kernel.start(serve_bridge=False)
        try:
            return await kernel.send("genesis_obj", "double", [2], {}, _ignore)
        finally:
            await kernel.stop()

    reply = run(scenario())
    assert reply.status == "FAILED" and "models fetch" in reply.error.reason


async def _ignore(event: dict) -> None:
    return None


def test_models_add_takes_a_gguf_file_and_list_shows_it(tmp_path, tiny_gguf):
    from batos_uvm.image import open_image

    image = open_image(settings(tmp_path), serve_zeo=False)
    try:
        out, err = io.StringIO(), io.StringIO()
        args = Namespace(models_command="add", persona="robin", source=str(tiny_gguf),
                         replace=False, allow_pickle=False)  # fmt: skip
        assert run_models_command(args, image.db, out=out, err=err) == 0, err.getvalue()
        assert "ROBIN: GGUF model tiny-coder (linked)" in out.getvalue()
        out = io.StringIO()
        assert run_models_command(Namespace(models_command="list"), image.db, out=out) == 0
        assert "ROBIN    tiny-coder  GGUF" in out.getvalue()
        out = io.StringIO()
        assert run_models_command(Namespace(models_command="verify", persona=None), image.db,
                                  out=out, err=err) == 0  # fmt: skip
        assert "1 files, ok" in out.getvalue()
    finally:
        image.close()


def test_store_gguf_shares_identical_models_and_refuses_what_is_not_gguf(tmp_path, tiny_gguf):
    from batos_uvm.image import open_image

    image = open_image(settings(tmp_path), serve_zeo=False)
    tm = transaction.TransactionManager()
    connection = image.db.open(transaction_manager=tm)
    try:
        from batos_uvm.awakening import incarnate

        incarnate(connection.root())
        library = library_from_root(connection.root(), create=True)
        first, how = store_gguf(library, ["BRICK"], tiny_gguf, name="a", source="x", jar=connection)
        assert how == "linked"
        second, how = store_gguf(
            library, ["ROBIN"], tiny_gguf, name="b", source="y", jar=connection
        )
        assert second is first and how == "shared"
        not_gguf = tmp_path / "model.gguf"
        not_gguf.write_bytes(b"PK\x03\x04 a zip file")
        with pytest.raises(WeightError, match="not a GGUF file"):
            store_gguf(library, ["ALFRED"], not_gguf, name="c", source="z", jar=connection)
        other = tmp_path / "other.gguf"
        other.write_bytes(tiny_gguf.read_bytes() + b"\0")
        with pytest.raises(WeightError, match="already has model a; pass --replace"):
            store_gguf(library, ["BRICK"], other, name="d", source="w", jar=connection)
        tm.commit()
    finally:
        tm.abort()
        connection.close()
        image.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
