"""Sentence splitting, embedders and semantic chunking (batos_uvm.text)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from batos_uvm import text
from batos_uvm.text import (
    Embedder,
    HashingEmbedder,
    MiniLMEmbedder,
    default_embedder,
    embedder_from_name,
    semantic_chunk_spans,
    semantic_chunks,
    split_long,
    split_sentences,
)

# --------------------------------------------------------------- splitting


def test_punkt_model_is_the_real_one() -> None:
    # An untrained Punkt splits after "Dr."; the packaged English model does not.
    assert text._punkt_splitter() is not None
    assert split_sentences("Dr. Smith went home. He slept.") == [
        "Dr. Smith went home.",
        "He slept.",
    ]


def test_punkt_handles_abbreviations_numbers_and_paragraphs() -> None:
    got = split_sentences(
        "The U.S. economy grew 3.5 percent in 2020. Was it enough? Nobody knew!\n\n"
        "A heading without a full stop\n\nThe next paragraph."
    )
    assert got == [
        "The U.S. economy grew 3.5 percent in 2020.",
        "Was it enough?",
        "Nobody knew!",
        "A heading without a full stop",
        "The next paragraph.",
    ]


@pytest.mark.parametrize("blank", ["", "   ", "\n\n\t"])
def test_blank_text_has_no_sentences(blank: str) -> None:
    assert split_sentences(blank) == []


def test_split_sentences_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        split_sentences(b"bytes")  # type: ignore[arg-type]


def test_regex_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text, "_punkt_splitter", lambda: None)
    assert split_sentences("Dr. Smith went home. He slept. Did he? Yes.\n\nnext") == [
        "Dr. Smith went home.",
        "He slept.",
        "Did he?",
        "Yes.",
        "next",
    ]
    assert split_sentences("no punctuation at all") == ["no punctuation at all"]
    assert split_sentences('He said "Stop." Then he left. (It was late.) Done.') == [
        'He said "Stop."',
        "Then he left.",
        "(It was late.)",
        "Done.",
    ]


def test_splitting_needs_no_nltk_data_and_never_downloads(tmp_path) -> None:
    # A fresh interpreter with an empty NLTK_DATA and nltk.download sabotaged.
    code = (
        "import nltk\n"
        "def boom(*a, **k): raise SystemExit('nltk.download called')\n"
        "nltk.download = boom\n"
        "import sys\n"
        "from batos_uvm.text import split_sentences\n"
        "assert split_sentences('Dr. Smith went home. He slept.') == "
        "['Dr. Smith went home.', 'He slept.']\n"
        "assert 'sentence_transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NLTK_DATA": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_split_long_cuts_at_whitespace() -> None:
    long = " ".join(["word"] * 100)  # 499 characters
    pieces = split_long(["short.", long, "x" * 25], max_chars=50)
    assert pieces[0] == "short."
    assert all(len(p) <= 50 for p in pieces)
    assert pieces[-1] == "x" * 25
    assert " ".join(pieces[1:-1]) == long  # cut only at spaces
    assert split_long(["y" * 120], max_chars=50) == ["y" * 50, "y" * 50, "y" * 20]


# --------------------------------------------------------------- embedders


def test_hashing_embedder_contract() -> None:
    emb = HashingEmbedder(dim=64)
    assert isinstance(emb, Embedder)
    vectors = emb.encode(["The cat sat.", "the CAT sat", "", "dogs bark loudly"])
    assert vectors.dtype == np.float32 and vectors.shape == (4, 64)
    norms = np.linalg.norm(vectors, axis=1)
    assert norms[[0, 1, 3]] == pytest.approx(1.0, abs=1e-5)
    assert norms[2] == 0.0  # nothing to embed
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-5)  # case-blind
    assert emb.encode([]).shape == (0, 64)


def test_hashing_embedder_is_deterministic_across_processes() -> None:
    code = (
        "from batos_uvm.text import HashingEmbedder\n"
        "print(HashingEmbedder().encode(['stable hashing please'])[0].tobytes().hex())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(runs) == 1
    here = HashingEmbedder().encode(["stable hashing please"])[0].tobytes().hex()
    assert runs == {here}


def test_hashing_embedder_downweights_stop_words() -> None:
    emb = HashingEmbedder()
    a, b, c = emb.encode(["the cat", "the dog", "cat"])
    assert float(a @ c) > 0.9  # "the" barely matters
    assert abs(float(a @ b)) < 0.1


def test_embedder_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(default_embedder("hashing"), HashingEmbedder)
    assert isinstance(default_embedder("minilm"), MiniLMEmbedder)
    assert isinstance(default_embedder("auto"), MiniLMEmbedder)
    with pytest.raises(ValueError):
        default_embedder("word2vec")
    monkeypatch.setattr(text, "minilm_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="non-semantic"):
        assert isinstance(default_embedder("auto"), HashingEmbedder)
    with pytest.raises(RuntimeError):
        default_embedder("minilm")


def test_embedder_from_name_round_trips() -> None:
    assert embedder_from_name(HashingEmbedder(128).name).dim == 128
    assert isinstance(embedder_from_name(MiniLMEmbedder.name), MiniLMEmbedder)
    with pytest.raises(ValueError):
        embedder_from_name("nonsense")


def test_importing_text_does_not_import_sentence_transformers() -> None:
    code = (
        "import sys, batos_uvm.text as t\n"
        "e = t.default_embedder('minilm')\n"
        "assert not e.loaded\n"
        "print(sorted(m for m in ('sentence_transformers', 'torch', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_minilm_embedder_is_semantic_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    emb = MiniLMEmbedder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vectors = emb.encode(
            ["feline", "Cats purr and chase mice.", "The stock exchange fell on Monday."]
        )
    assert emb.loaded and os.environ["HF_HUB_OFFLINE"] == "1"
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-4)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.15
    assert emb.encode([]).shape == (0, 384)


# ---------------------------------------------------------------- chunking


def _unit(rows: list[list[float]]) -> np.ndarray:
    m = np.asarray(rows, dtype=np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_chunks_break_at_the_topic_shift() -> None:
    sentences = ["Cats purr.", "Cats nap.", "Cats hunt.", "Bonds fell.", "Stocks rose."]
    emb = _unit([[1, 0.1], [1, 0.12], [1, 0.08], [0.05, 1], [0.1, 1]])
    chunks = semantic_chunks(sentences, emb, percentile=30)
    assert chunks == ["Cats purr. Cats nap. Cats hunt.", "Bonds fell. Stocks rose."]


def test_one_sentence_is_one_chunk_and_none_is_none() -> None:
    assert semantic_chunks(["Only one."], _unit([[1, 0]])) == ["Only one."]
    assert semantic_chunks([], np.zeros((0, 2))) == []
    # identical sentences: no topic shift, so only the size bounds cut
    same = ["Same."] * 3
    assert semantic_chunks(same, _unit([[1, 0]] * 3)) == ["Same. Same. Same."]


def test_chunks_are_bounded_by_sentences_and_characters() -> None:
    sentences = [f"Sentence number {i} is here." for i in range(20)]
    emb = _unit([[1, 0]] * 20)  # one topic throughout
    by_count = semantic_chunks(sentences, emb, max_sentences=6, max_chars=10_000)
    assert [c.count("Sentence") for c in by_count] == [6, 6, 6, 2]
    by_chars = semantic_chunks(sentences, emb, max_sentences=100, max_chars=90)
    assert all(len(c) <= 90 for c in by_chars)
    assert " ".join(by_chars) == " ".join(sentences)  # nothing lost or reordered


def test_chunk_spans_cover_every_sentence_once() -> None:
    rng = np.random.default_rng(7)
    sentences = [f"s{i}." for i in range(57)]
    emb = _unit(rng.normal(size=(57, 8)).tolist())
    spans = semantic_chunk_spans(sentences, emb, percentile=25, max_sentences=5)
    assert spans[0][0] == 0 and spans[-1][1] == 57
    assert all(a < b <= a + 5 for a, b in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_chunking_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        semantic_chunks(["a.", "b."], _unit([[1, 0]]))  # one row for two sentences
    with pytest.raises(ValueError):
        semantic_chunks(["a.", "b."], _unit([[1, 0], [0, 1]]), percentile=120)
    with pytest.raises(ValueError):
        semantic_chunks(["a.", "b."], _unit([[1, 0], [0, 1]]), max_sentences=0)
