"""The llama.cpp backend on a real GGUF written from a tiny transformers Llama model.

The same weights answer through transformers and through llama.cpp; greedy decoding
must give the same tokens and the same text on both paths (plain and chat template).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (optional extra 'llama'); CI installs it",
)

from backend_conformance import BackendConformance, run  # noqa: E402
from gguf_writer import write_gguf  # noqa: E402
from tinymodel import build_tiny_llama  # noqa: E402

from batos_uvm.cognition.base import (  # noqa: E402
    CognitionError,
    CognitionUnavailable,
    InferenceRequest,
)
from batos_uvm.cognition.llama_cpp_backend import LlamaCppBackend  # noqa: E402

pytestmark = pytest.mark.model

PROMPT = "The living image keeps every object"
N_CTX = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model folder, its GGUF with and without chat template, and transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("llama")
    model_dir = build_tiny_llama(root / "hf", seed=0)
    return {
        "dir": model_dir,
        "chat_gguf": write_gguf(model_dir, root / "tiny-chat.gguf"),
        "plain_gguf": write_gguf(model_dir, root / "tiny-plain.gguf", chat_template=False),
        "tok": AutoTokenizer.from_pretrained(str(model_dir)),
        "model": AutoModelForCausalLM.from_pretrained(str(model_dir)).eval(),
    }


def hf_greedy(tiny: dict[str, Any], ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = tiny["model"].generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False,
        )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    eos = tiny["tok"].eos_token_id
    return new[: new.index(eos)] if eos in new else new


def byte_level_text(tok: Any, ids: list[int]) -> str:
    """Text of byte-level BPE ids, dropping incomplete UTF-8 (as llama.cpp's text does)."""
    # GPT-2's byte<->unicode table: printable bytes stand for themselves, others 256+n.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    decoder = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    pieces = tok.convert_ids_to_tokens(ids, skip_special_tokens=True)
    raw = b"".join(bytes(decoder[ch] for ch in piece) for piece in pieces)
    return raw.decode("utf-8", errors="ignore")


def test_gguf_tokens_match_transformers(tiny: dict[str, Any]) -> None:
    """The written GGUF itself: same prompt tokens, same greedy continuation."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny["plain_gguf"]), n_ctx=N_CTX, n_threads=2, verbose=False)
    try:
        ids = tiny["tok"](PROMPT)["input_ids"]
        assert llm.tokenize(PROMPT.encode(), add_bos=True, special=True) == ids
        expected = hf_greedy(tiny, ids, 32)
        got: list[int] = []
        for token in llm.generate(ids, temp=0.0):
            if token == llm.token_eos() or len(got) == len(expected):
                break
            got.append(token)
        assert got == expected
    finally:
        llm.close()


def test_plain_completion_matches_transformers(tiny: dict[str, Any]) -> None:
    ids = tiny["tok"](PROMPT)["input_ids"]
    expected_ids = hf_greedy(tiny, ids, 32)
    backend = LlamaCppBackend(tiny["plain_gguf"], n_ctx=N_CTX)

    async def body() -> Any:
        try:
            return await backend.infer(
                InferenceRequest(persona="BRICK", prompt=PROMPT, max_tokens=32)
            )
        finally:
            await backend.close()

    completion = run(body())
    assert completion.text == byte_level_text(tiny["tok"], expected_ids)
    assert completion.completion_tokens == len(expected_ids)
    assert completion.prompt_tokens == len(ids)
    assert completion.backend == "llama-cpp" and completion.model == "tiny-plain.gguf"
    assert completion.details["chat_template"] is False


def test_chat_template_matches_transformers(tiny: dict[str, Any]) -> None:
    messages = [
        {"role": "system", "content": "You are ROBIN."},
        {"role": "user", "content": "What is the gentle path?"},
    ]
    ids = tiny["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expected_ids = hf_greedy(tiny, ids, 24)
    backend = LlamaCppBackend(tiny["chat_gguf"], n_ctx=N_CTX)
    request = InferenceRequest(
        persona="ROBIN", system="You are ROBIN.", prompt="What is the gentle path?", max_tokens=24
    )

    async def body() -> Any:
        try:
            return await backend.infer(request)
        finally:
            await backend.close()

    completion = run(body())
    assert completion.details["chat_template"] is True
    assert completion.prompt_tokens == len(ids)
    assert completion.text == byte_level_text(tiny["tok"], expected_ids)


NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_template_without_system_role(tiny: dict[str, Any], tmp_path: Path) -> None:
    """A template that refuses 'system' gets the system prompt inside the user turn."""
    path = write_gguf(tiny["dir"], tmp_path / "nosys.gguf", chat_template=NO_SYSTEM_TEMPLATE)
    merged = [{"role": "user", "content": "You are BABS.\n\nFind the facts."}]
    ids = tiny["tok"].apply_chat_template(
        merged, chat_template=NO_SYSTEM_TEMPLATE, add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expected = byte_level_text(tiny["tok"], hf_greedy(tiny, ids, 16))
    backend = LlamaCppBackend(path, n_ctx=N_CTX)
    request = InferenceRequest(
        persona="BABS", system="You are BABS.", prompt="Find the facts.", max_tokens=16
    )

    async def body() -> Any:
        try:
            return await backend.infer(request)
        finally:
            await backend.close()

    completion = run(body())
    assert completion.prompt_tokens == len(ids) and completion.text == expected


def test_broken_template_is_a_cognition_error(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = write_gguf(
        tiny["dir"], tmp_path / "bad.gguf", chat_template="{{ raise_exception('no') }}"
    )
    backend = LlamaCppBackend(path, n_ctx=N_CTX)

    async def body() -> None:
        try:
            await backend.infer(InferenceRequest(persona="X", prompt="hi"))
        finally:
            await backend.close()

    with pytest.raises(CognitionError, match="cannot build the prompt for bad.gguf"):
        run(body())


def test_deterministic_across_calls_and_stop_strings(tiny: dict[str, Any]) -> None:
    backend = LlamaCppBackend(tiny["chat_gguf"], n_ctx=N_CTX)
    request = InferenceRequest(persona="BRICK", prompt=PROMPT, system="Be brief.", max_tokens=24)

    async def body() -> tuple[Any, Any, Any, Any]:
        try:
            first = await backend.infer(request)
            other = await backend.infer(InferenceRequest(persona="BABS", prompt="facts"))
            again = await backend.infer(request)
            stop = first.text[6:9]
            stopped = await backend.infer(
                InferenceRequest(
                    persona="BRICK", prompt=PROMPT, system="Be brief.", max_tokens=24, stop=(stop,)
                )
            )
            return first, other, again, stopped
        finally:
            await backend.close()

    first, other, again, stopped = run(body())
    assert len(first.text) > 9 and first.text == again.text != other.text
    assert stopped.text == first.text[: first.text.index(first.text[6:9])]
    assert stopped.details["finish_reason"] == "stop"
    assert first.details["finish_reason"] == "length"


def test_max_tokens_is_exact(tiny: dict[str, Any]) -> None:
    backend = LlamaCppBackend(tiny["plain_gguf"], n_ctx=N_CTX)

    async def body() -> list[int]:
        try:
            counts = []
            for n in (1, 2, 5, 17, 64):
                done = await backend.infer(
                    InferenceRequest(persona="X", prompt=PROMPT, max_tokens=n)
                )
                counts.append(done.completion_tokens)
            return counts
        finally:
            await backend.close()

    assert run(body()) == [1, 2, 5, 17, 64]


def test_missing_and_garbage_files(tmp_path: Path, tiny: dict[str, Any]) -> None:
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(CognitionError, match="nowhere.gguf.*does not exist"):
        LlamaCppBackend(missing)

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CognitionError, match="garbage.gguf.*not a GGUF"):
        LlamaCppBackend(garbage)

    # Right magic, truncated body: only llama.cpp can tell, when it loads.
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny["plain_gguf"].read_bytes()[:2000])
    backend = LlamaCppBackend(truncated)

    async def body() -> None:
        try:
            await backend.infer(InferenceRequest(persona="X", prompt="hi"))
        finally:
            await backend.close()

    with pytest.raises(CognitionError, match="cannot load GGUF model .*truncated.gguf"):
        run(body())


def test_prompt_longer_than_context(tiny: dict[str, Any]) -> None:
    backend = LlamaCppBackend(tiny["plain_gguf"], n_ctx=32)

    async def body() -> None:
        try:
            await backend.infer(InferenceRequest(persona="X", prompt=PROMPT * 10))
        finally:
            await backend.close()

    with pytest.raises(CognitionError, match="does not fit n_ctx=32"):
        run(body())


def test_from_config_and_chat_switch(tiny: dict[str, Any]) -> None:
    backend = LlamaCppBackend.from_config(
        {"model_path": str(tiny["chat_gguf"]), "n_ctx": 256, "n_threads": 1, "chat": False}
    )
    assert (backend.n_ctx, backend.n_threads) == (256, 1)
    assert "not loaded yet" in backend.describe()

    async def body() -> Any:
        try:
            await backend.load()
            assert "loaded" in backend.describe() and backend.uses_chat_template is False
            return await backend.infer(InferenceRequest(persona="X", prompt=PROMPT, max_tokens=4))
        finally:
            await backend.close()

    assert run(body()).details["chat_template"] is False
    assert "closed" in backend.describe()
    assert LlamaCppBackend.from_config({"model_path": str(tiny["chat_gguf"])}).n_threads == min(
        2, os.cpu_count() or 1
    )
    with pytest.raises(CognitionUnavailable, match="model_path"):
        LlamaCppBackend.from_config({"n_ctx": 128})
    with pytest.raises(CognitionUnavailable, match="unknown config keys"):
        LlamaCppBackend.from_config({"model_path": str(tiny["chat_gguf"]), "ctx": 128})
    forced = LlamaCppBackend(tiny["plain_gguf"], chat=True)
    with pytest.raises(CognitionError, match="no chat template"):
        run(forced.infer(InferenceRequest(persona="X", prompt="hi")))
    run(forced.close())


def test_prefix_streaming_and_sampling(tiny: dict[str, Any]) -> None:
    """A forced start, text as it is written, and per-request temperature and seed."""
    backend = LlamaCppBackend(tiny["plain_gguf"], n_ctx=N_CTX)
    chunks: list[str] = []

    def ask(**fields: Any) -> InferenceRequest:
        return InferenceRequest(persona="X", prompt=PROMPT, max_tokens=20, **fields)

    async def body() -> tuple[Any, ...]:
        try:
            plain = await backend.infer(ask())
            prefixed = await backend.infer(ask(prefix=" every", on_text=chunks.append))
            again = await backend.infer(ask(prefix=" every"))
            sampled = [await backend.infer(ask(temperature=1.5, seed=s)) for s in (1, 2, 1)]
            cut = await backend.infer(ask(prefix=" every", prefix_stop=(prefixed.text[8:11],)))
            ignored = await backend.infer(ask(prefix_stop=(plain.text[2:4],)))
            return plain, prefixed, again, sampled, cut, ignored
        finally:
            await backend.close()

    plain, prefixed, again, sampled, cut, ignored = run(body())
    assert prefixed.text.startswith(" every") and prefixed.details["prefixed"] is True
    assert prefixed.text == again.text  # greedy after the same prefix: the same text
    assert "".join(chunks) == prefixed.text[len(" every") :]  # streamed, in order
    assert len(chunks) > 1
    assert sampled[0].text == sampled[2].text != plain.text  # a seed repeats itself
    assert sampled[0].details["temperature"] == 1.5 and sampled[1].details["seed"] == 2
    assert cut.text == prefixed.text[: prefixed.text.index(prefixed.text[8:11], 6)]
    assert ignored.text == plain.text  # prefix_stop only applies after a prefix


def test_sha256_is_checked_before_loading(tiny: dict[str, Any], tmp_path: Path) -> None:
    import hashlib

    good = hashlib.sha256(tiny["plain_gguf"].read_bytes()).hexdigest()
    ok = LlamaCppBackend(tiny["plain_gguf"], n_ctx=N_CTX, sha256=good, name="tiny")
    bad = LlamaCppBackend(tiny["plain_gguf"], n_ctx=N_CTX, sha256="0" * 64)

    async def body() -> Any:
        try:
            done = await ok.infer(InferenceRequest(persona="X", prompt=PROMPT, max_tokens=2))
            with pytest.raises(CognitionError, match="damaged.*nothing was loaded"):
                await bad.infer(InferenceRequest(persona="X", prompt=PROMPT, max_tokens=2))
            return done
        finally:
            await ok.close()
            await bad.close()

    assert run(body()).model == "tiny"
    assert "llama-cpp: tiny (" in ok.describe()


class TestLlamaCppConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tiny: dict[str, Any]):
        return lambda: LlamaCppBackend(tiny["chat_gguf"], n_ctx=N_CTX)

    @pytest.fixture
    def broken_backend_factory(self, tmp_path: Path):
        return lambda: LlamaCppBackend(tmp_path / "missing.gguf")

    @pytest.fixture
    def slow_request(self) -> InferenceRequest:
        # ~400 tokens keep even the tiny model busy for a noticeable time.
        return InferenceRequest(persona="BRICK", prompt=PROMPT, max_tokens=400)
