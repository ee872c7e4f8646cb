"""The transformers backend on tiny models stored in a real FileStorage image."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from backend_conformance import BackendConformance, run  # noqa: E402
from tinymodel import TinyImage, build_lora_adapter, build_tiny_llama  # noqa: E402

from batos_uvm import weights as w  # noqa: E402
from batos_uvm.cognition.base import (  # noqa: E402
    CognitionError,
    CognitionUnavailable,
    InferenceRequest,
)
from batos_uvm.cognition.transformers_backend import TransformersBackend  # noqa: E402

pytestmark = pytest.mark.model

SYSTEM = "You are BRICK. Answer briefly."
PROMPT = "The living image keeps every object"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tf")
    base = build_tiny_llama(root / "base")
    return {
        "base": base,
        "other": build_tiny_llama(root / "other", hidden=128, seed=3),
        "lora1": build_lora_adapter(base, root / "lora1", seed=1),
        "lora2": build_lora_adapter(base, root / "lora2", seed=2),
    }


@pytest.fixture
def image(tmp_path: Path):
    img = TinyImage(tmp_path)
    yield img
    img.close()


def request(persona: str, max_tokens: int = 8, **kw: Any) -> InferenceRequest:
    return InferenceRequest(
        persona=persona, prompt=PROMPT, system=SYSTEM, max_tokens=max_tokens, **kw
    )


def reference(model_dir: Path, adapter: Path | None = None, max_new_tokens: int = 8) -> str:
    """What plain transformers (+ peft) answers from the source folders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def infer_all(backend: TransformersBackend, *requests: InferenceRequest) -> list[Any]:
    async def body() -> list[Any]:
        return [await backend.infer(r) for r in requests]

    return run(body())


def test_generates_from_the_image_after_a_restart(image: TinyImage, models) -> None:
    w.store_model(image.library, "ALFRED", models["base"])
    image.tm.commit()
    image.restart()
    backend = TransformersBackend(image.db)
    try:
        (done,) = infer_all(backend, request("alfred"))
        assert done.text == reference(models["base"])
        assert done.backend == "transformers" and done.model == "base"
        assert done.prompt_tokens > 5 and 0 < done.completion_tokens <= 8
        assert "base" in backend.describe()
    finally:
        run(backend.close())


def test_corrupted_blob_is_refused_after_restart(image: TinyImage, models) -> None:
    record = w.store_model(image.library, "ALFRED", models["base"])
    image.tm.commit()
    path = Path(record.files["model.safetensors"].blob.committed())
    image.restart()
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\1\2\3")
    backend = TransformersBackend(image.db)
    try:
        with pytest.raises(CognitionError, match="persona ALFRED.*model.safetensors.*damaged"):
            infer_all(backend, request("ALFRED"))
    finally:
        run(backend.close())


def test_personas_sharing_a_base_switch_by_adapter(image: TinyImage, models) -> None:
    lib = image.library
    w.store_model(lib, "ALFRED", models["base"])
    w.store_model(lib, "BRICK", "ALFRED")
    w.store_model(lib, "ROBIN", "ALFRED")
    w.store_adapter(lib, "brick_style", "BRICK", models["lora1"])
    w.store_adapter(lib, "robin_style", "ROBIN", models["lora2"])
    image.tm.commit()
    backend = TransformersBackend(image.db)
    try:
        order = ["BRICK", "ROBIN", "ALFRED", "BRICK", "ROBIN", "ALFRED"]
        out = [c.text for c in infer_all(backend, *(request(p) for p in order))]
        assert out[:3] == out[3:]  # greedy and the switch is clean: same answer again
        assert len(set(out[:3])) == 3
        assert out[0] == reference(models["base"], models["lora1"])
        assert out[1] == reference(models["base"], models["lora2"])
        assert out[2] == reference(models["base"])

        async def together() -> list[str]:  # one base, different adapters: serialised
            done = await asyncio.gather(*(backend.infer(request(p)) for p in order))
            return [c.text for c in done]

        assert run(together()) == out
        stats = backend.manager.stats
        assert stats["base_loads"] == 1 and stats["adapter_loads"] == 2
    finally:
        run(backend.close())


def test_adapter_added_later_needs_no_restart(image: TinyImage, models) -> None:
    w.store_model(image.library, "BRICK", models["base"])
    image.tm.commit()
    backend = TransformersBackend(image.db)
    try:
        (before,) = infer_all(backend, request("BRICK"))
        w.store_adapter(image.library, "brick_style", "BRICK", models["lora1"])
        image.tm.commit()  # another connection (as `models add-adapter` would be)
        (after,) = infer_all(backend, request("BRICK"))
        assert before.details["adapter"] is None and after.details["adapter"] == "brick_style"
        assert after.text != before.text
        assert backend.manager.stats["base_loads"] == 1
    finally:
        run(backend.close())


def one_model_budget(image: TinyImage, models) -> TransformersBackend:
    w.store_model(image.library, "ALFRED", models["base"])
    w.store_model(image.library, "BABS", models["other"])
    image.tm.commit()
    backend = TransformersBackend(image.db)
    sizes = [backend.manager.resolve(p).footprint for p in ("ALFRED", "BABS")]
    backend.manager.budget = max(sizes) + min(sizes) - 1  # room for one of the two
    return backend


def test_budget_unloads_the_least_recently_used(image: TinyImage, models) -> None:
    backend = one_model_budget(image, models)
    manager = backend.manager
    try:
        infer_all(backend, request("ALFRED"))
        assert [m["name"] for m in manager.loaded()] == ["base"]
        infer_all(backend, request("BABS"))
        assert [m["name"] for m in manager.loaded()] == ["other"]
        assert manager.stats["unloads"] == 1
        infer_all(backend, request("ALFRED"))
        assert manager.stats["base_loads"] == 3
        manager.budget = 1000
        with pytest.raises(CognitionError, match="more than the whole budget"):
            infer_all(backend, request("BABS"))
    finally:
        run(backend.close())


def test_a_lease_keeps_its_model_loaded(image: TinyImage, models) -> None:
    backend = one_model_budget(image, models)
    manager = backend.manager

    async def body() -> None:
        async with manager.lease("ALFRED") as lease:
            waiting = asyncio.create_task(backend.infer(request("BABS")))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # BABS waits: ALFRED's model is in use
            assert [m["name"] for m in manager.loaded()] == ["base"]
            with lease.activated() as (model, tokenizer):
                assert model is not None and tokenizer is not None
        done = await waiting
        assert done.model == "other"
        assert [m["name"] for m in manager.loaded()] == ["other"]
        manager.wait_timeout = 0.2
        async with manager.lease("BABS"):
            with pytest.raises(CognitionError, match="waited"):
                await backend.infer(request("ALFRED"))

    try:
        run(body())
    finally:
        run(backend.close())


def test_four_bit_on_cpu(image: TinyImage, models) -> None:
    import bitsandbytes as bnb

    w.store_model(image.library, "BRICK", models["base"])
    w.store_adapter(image.library, "brick_style", "BRICK", models["lora1"])
    image.tm.commit()
    backend = TransformersBackend(image.db, load_in_4bit=True)
    try:
        plain = backend.manager.resolve("BRICK").footprint
        (done,) = infer_all(backend, request("BRICK"))
        assert done.text.strip() and done.completion_tokens > 0
        entry = next(iter(backend.manager._loaded.values()))
        kinds = {type(m) for m in entry.model.modules()}
        assert any(issubclass(k, bnb.nn.Linear4bit) for k in kinds)
        assert plain < TransformersBackend(image.db).manager.resolve("BRICK").footprint
        assert "4-bit" in backend.describe()
    finally:
        run(backend.close())


def test_stop_strings_and_token_budget(image: TinyImage, models) -> None:
    w.store_model(image.library, "ALFRED", models["base"])
    image.tm.commit()
    backend = TransformersBackend(image.db)
    try:
        (full,) = infer_all(backend, request("ALFRED", max_tokens=12))
        found = re.search(r"[A-Za-z]{2,}", full.text[4:])  # a stop string the tokens can spell
        assert found, full.text
        stop = found.group()
        (cut,) = infer_all(backend, request("ALFRED", max_tokens=12, stop=(stop,)))
        assert cut.text == full.text[: full.text.index(stop)]
        assert cut.completion_tokens < full.completion_tokens
        (short,) = infer_all(backend, request("ALFRED", max_tokens=2))
        assert short.completion_tokens <= 2
    finally:
        run(backend.close())


def test_persona_without_model_says_how_to_store_one(image: TinyImage) -> None:
    backend = TransformersBackend(image.db)
    try:
        with pytest.raises(CognitionUnavailable, match=r"python batos.py models add BRICK SOURCE"):
            infer_all(backend, request("BRICK"))
    finally:
        run(backend.close())


def test_backends_from_config_share_one_manager(image: TinyImage, models) -> None:
    w.store_model(image.library, "BRICK", models["base"])
    w.store_model(image.library, "ROBIN", "BRICK")
    w.store_adapter(image.library, "robin_style", "ROBIN", models["lora2"])
    image.tm.commit()
    with pytest.raises(CognitionUnavailable, match="unknown config keys.*'budget'"):
        TransformersBackend.from_config({"backend": "transformers", "budget": 3}, db=image.db)
    cfg = {"backend": "transformers", "budget_gb": 2, "dtype": "float32"}
    brick = TransformersBackend.from_config(cfg, db=image.db)
    robin = TransformersBackend.from_config({**cfg, "max_new_tokens": 4}, db=image.db)
    assert brick.manager is robin.manager and brick.manager.budget == 2 << 30
    a, b = infer_all(brick, request("BRICK")) + infer_all(robin, request("ROBIN", max_tokens=9))
    assert a.text != b.text and b.completion_tokens <= 4
    assert brick.manager.stats["base_loads"] == 1
    run(brick.close())
    (again,) = infer_all(robin, request("BRICK"))  # the manager outlives the first backend
    assert again.text.startswith(a.text[:4])
    run(robin.close())
    assert brick.manager.loaded() == []


def test_cognition_routes_personas_to_one_transformers_backend(image: TinyImage, models):
    from batos_uvm.cognition import Cognition

    w.store_model(image.library, "BRICK", models["base"])
    w.store_model(image.library, "ALFRED", "BRICK")
    image.tm.commit()
    cognition = Cognition({"BRICK": "transformers", "ALFRED": "transformers"}, db=image.db)

    async def body() -> list[Any]:
        try:
            return [await cognition.infer(request(p)) for p in ("BRICK", "ALFRED")]
        finally:
            await cognition.close()

    brick, alfred = run(body())
    assert brick.backend == alfred.backend == "transformers" and brick.text == alfred.text


class TestTransformersConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path, models):
        img = TinyImage(tmp_path)
        w.store_model(img.library, "BRICK", models["base"])
        img.tm.commit()
        yield lambda: TransformersBackend(img.db)
        img.close()

    @pytest.fixture
    def broken_backend_factory(self, tmp_path: Path):
        img = TinyImage(tmp_path)
        yield lambda: TransformersBackend(img.db)  # nothing stored
        img.close()

    @pytest.fixture
    def slow_request(self) -> InferenceRequest:
        return InferenceRequest(persona="BRICK", prompt=PROMPT, max_tokens=200)
