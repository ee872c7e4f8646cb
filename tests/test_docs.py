"""The docs say what BAT OS does: their transcripts are run and compared with the real output
(tests/doc_transcripts.py says how), and their tables match the code."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_transcripts import normalise, run_step, setup_kernel, transcripts

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TRANSCRIPTS = [t for doc in DOCS for t in transcripts(doc)]


def test_the_docs_hold_checked_transcripts():
    assert {t.doc for t in TRANSCRIPTS} >= {"CHAT.md", "SHELL.md"}


@pytest.mark.slow
@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[t.name for t in TRANSCRIPTS])
def test_transcript(transcript, tmp_path):
    kernel = setup_kernel(transcript, tmp_path)
    try:
        for step in transcript.steps:
            expected, actual = run_step(step, kernel)
            assert normalise(actual) == normalise(expected), (
                f"{transcript.doc}: `{step.command}` printed:\n" + "\n".join(actual))
    finally:
        kernel.stop()
