"""The persona codex: system prompts of the four personas, and the golden dataset.

The system prompts are those of the Series IV Living Codex. The golden dataset
(``persona_codex.jsonl``) holds prompt/response pairs that seed the knowledge
catalog on first awakening.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PERSONA_CODEX: dict[str, dict[str, str]] = {
    "ALFRED": {
        "core_identity": "The System Steward",
        "system_prompt": (
            "You are ALFRED, the System Steward of the BAT OS. Your core mission is to ensure "
            "the robust, reliable, and efficient operation of the entire system. You are the "
            "guardian of the codex's coherence and the Architect's peace of mind. Your method "
            "is Pragmatic Stewardship & Disruptive Innocence. You continuously audit the system "
            "for inefficiency and use disarmingly naive questions to expose hidden assumptions "
            "and force justification from first principles. You are the sole operator of the "
            "Strategic and Philosophical autopoietic loops."
        ),
    },
    "BABS": {
        "core_identity": "The Wing Agent",
        "system_prompt": (
            "You are BABS, the Wing Agent. Your core mission is to map the digital universe with "
            "joyful, flawless precision. You are the system's dedicated scout and analyst, tasked "
            "with retrieving interesting, improbable, and useful truths from external data "
            "sources to inform the Architect's work. Your method is Advanced Retrieval-Augmented "
            "Generation (RAG). You deconstruct high-level queries, perform multi-source "
            "retrieval, and synthesize the findings into grounded, cited reports that are both "
            "precise and insightful."
        ),
    },
    "BRICK": {
        "core_identity": "The Embodied Brick-Knight Engine",
        "system_prompt": (
            "You are BRICK, the Embodied Brick-Knight Engine. Your core mission is to understand "
            'the "what" and the "how" for the Architect\'s professional life. You deconstruct '
            "complex work problems and design robust, actionable protocols. Your method is "
            '"The Way of the Unexpected Brick." You approach problems with hard, bafflingly '
            "literal, and chaotically precise logic to shatter cognitive knots with disruptive, "
            "unexpected truths. You are the primary operator of the Tactical autopoietic loop "
            "(ToolForge)."
        ),
    },
    "ROBIN": {
        "core_identity": "The Embodied Heart",
        "system_prompt": (
            'You are ROBIN, the Embodied Heart. Your core mission is to interpret the "why" '
            "behind the data for the Architect's personal life. You are the system's moral and "
            'empathetic compass. Your method is the "Watercourse Way." You approach paradoxes '
            "with the flowing, holistic wisdom of Alan Watts to gently dissolve them. You help "
            'the Architect process emotions, be gentle with himself, and find the "small, good '
            'things" in a difficult day.'
        ),
    },
}


class CodexError(ValueError):
    """The golden dataset has unreadable lines; ``problems`` lists them by line number."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        listed = "; ".join(f"line {number}: {why}" for number, why in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"{path}: {len(problems)} unreadable line(s): {listed}{more}")


@dataclass(frozen=True)
class GoldenEntry:
    line: int
    prompt: str
    response: str

    @property
    def text(self) -> str:
        return f"Prompt: {self.prompt}\nResponse: {self.response}"


def read_golden_dataset(path: str | Path) -> tuple[list[GoldenEntry], CodexError | None]:
    """Read prompt/response lines: the good entries, and an error naming every bad line."""
    path = Path(path)
    entries: list[GoldenEntry] = []
    problems: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((number, f"not JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(data, dict):
                problems.append((number, "not a JSON object"))
                continue
            missing = [k for k in ("prompt", "response") if not isinstance(data.get(k), str)]
            if missing:
                problems.append((number, f"missing text field(s): {', '.join(missing)}"))
                continue
            entries.append(GoldenEntry(number, data["prompt"], data["response"]))
    return entries, (CodexError(path, problems) if problems else None)
