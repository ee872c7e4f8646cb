"""Whether a trial passes: the call that was asked for decides; the model's examples advise.

A trial runs the call the user made (``requested``) and the examples the
model wrote for itself. Small models often get their own examples wrong
(``True`` for ``true``, a sample copied from the prompt, a fixed timestamp),
so a wrong or failing model example does not fail a method whose requested
call succeeded: it is kept as a warning in the cycle's record. When the
trial failed as a whole (a timeout, a crash) while model examples were in it,
the caller runs it again with the requested call alone (:func:`needs_rerun`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .reprs import safe_repr


@dataclass
class Verdict:
    ok: bool
    reason: str | None
    warnings: list[str] = field(default_factory=list)


def _requested(example: Any) -> bool:
    return bool(getattr(example, "requested", False))


def judge(trial: Any) -> Verdict:
    """The verdict on a finished trial (a ``TrialResult``)."""
    if trial.ok:
        return Verdict(True, None)
    examples = list(trial.examples or [])
    asked = [e for e in examples if _requested(e)]
    failed = [e for e in examples if not e.ok]
    # Waived only when what failed are the model's own examples, each by a wrong
    # value or an exception on its input (not a time limit, a crash or a refusal),
    # and every requested call ran and succeeded.
    if (
        failed
        and asked
        and all(e.ok for e in asked)
        and all(not _requested(e) and _answered(e) for e in failed)
    ):
        return Verdict(True, None, [_describe(e) for e in failed])
    return Verdict(False, trial.reason)


def _answered(example: Any) -> bool:
    """The method returned or raised on this example (its cell did not fail)."""
    error = example.error
    return error is None or str(error).startswith(("expected ", "raised "))


def needs_rerun(trial: Any, had_model_examples: bool) -> bool:
    """True when a failed trial should run again without the model's examples."""
    if trial.ok or not had_model_examples:
        return False
    return not any(_requested(e) and not e.ok for e in trial.examples or [])


def _describe(example: Any) -> str:
    args = ", ".join(safe_repr(a, 60) for a in example.args)
    return f"model example ({args}) ignored: {example.error}"
