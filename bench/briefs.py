"""Mission briefs to working methods with a real code model, judged by hidden checks.

    python bench/briefs.py                       # the default model, all briefs, default vs baseline
    python bench/briefs.py --model 0.5b --briefs 1-8 --variants default
    python bench/briefs.py --variants default,no-prefix,no-advisory --briefs 1,5,9

Each brief (bench/brief_set.py) is translated once, as the chat client would
(the model translator, falling back to the rules), and then sent to a kernel
per variant, alternating which variant goes first. Every kernel runs in this
process with the default settings (its own image, the default model stored in
it as on a real start, MiniLM embeddings, the real trial) except the cycle
options the variant changes. After the brief's own call grew and ran the
method, hidden checks call it with other arguments. Every brief gets a fresh
object (a child of genesis), so briefs do not see each other's methods except
through the catalog, as on a real machine.

Prints per brief and per variant: briefs correct, attempts per brief, p50/p95
and min/median/max cycle time, generated tokens per second, and each
variant's ratio to the first one (the baseline). ``--json`` writes every
result. Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# As batos.py does: idle torch threads must not spin on the cores the model needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import transaction  # noqa: E402
from brief_set import BRIEFS, Brief, passes  # noqa: E402
from legacy_cycle import LEGACY  # noqa: E402

from batos_uvm.config import load_settings  # noqa: E402
from batos_uvm.kernel import Kernel  # noqa: E402
from batos_uvm.model_catalog import choose  # noqa: E402
from batos_uvm.model_fetch import installed  # noqa: E402
from batos_uvm.model_translator import HybridTranslator, LlamaTranslator  # noqa: E402
from batos_uvm.objects import UvmObject  # noqa: E402
from batos_uvm.prompts import PERSISTENCE_RULE, synthesis_prompt  # noqa: E402
from batos_uvm.synthesis import DEFAULT_OPTIONS, CycleOptions  # noqa: E402
from batos_uvm.translator import RuleTranslator  # noqa: E402


def _without_covenant(*args: Any, **kwargs: Any) -> str:
    return synthesis_prompt(*args, **kwargs).replace(" " + PERSISTENCE_RULE, "")


def _without_advice(*args: Any, **kwargs: Any) -> str:
    return synthesis_prompt(*args, **kwargs, advice=False)


VARIANTS: dict[str, tuple[CycleOptions, bool]] = {  # name -> (options, send the intent)
    "baseline": (LEGACY, False),
    "default": (DEFAULT_OPTIONS, True),
    "no-intent": (DEFAULT_OPTIONS, False),
    "no-prefix": (dataclasses.replace(DEFAULT_OPTIONS, force_prefix=False), True),
    "no-advisory": (dataclasses.replace(DEFAULT_OPTIONS, advisory_examples=False), True),
    "greedy-retries": (dataclasses.replace(DEFAULT_OPTIONS, sampled_retries=False), True),
    "persona-voice": (dataclasses.replace(DEFAULT_OPTIONS, code_system=False), True),
    "all-context": (dataclasses.replace(DEFAULT_OPTIONS, min_similarity=-1.0), True),
    "no-repair": (dataclasses.replace(DEFAULT_OPTIONS, repair_state=False), True),
    "no-plan": (dataclasses.replace(DEFAULT_OPTIONS, plan_with_model=False), True),
    "no-covenant-rule": (dataclasses.replace(DEFAULT_OPTIONS, prompt=_without_covenant), True),
    "no-advice": (dataclasses.replace(DEFAULT_OPTIONS, prompt=_without_advice), True),
}


@dataclasses.dataclass
class Outcome:
    brief: int
    variant: str
    selector: str
    correct: bool
    status: str
    attempts: int
    cycle_s: float
    tokens: int
    llm_s: float
    reason: str = ""
    checks: list[str] = dataclasses.field(default_factory=list)
    attempts_detail: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def parse_selection(text: str, count: int) -> list[int]:
    if not text:
        return list(range(1, count + 1))
    chosen: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        chosen += range(int(low), int(high or low) + 1)
    return [n for n in chosen if 1 <= n <= count]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


async def ignore(event: dict[str, Any]) -> None:
    return None


class Bench:
    def __init__(
        self, variant: str, workdir: Path, model_setting: str, max_attempts: int, threads: int
    ) -> None:
        self.variant = variant
        self.options, self.with_intent = VARIANTS[variant]
        self.settings = load_settings(None, {
            "db": str(workdir / variant / "live_image.fs"), "zeo": "off", "model": model_setting,
            "metacognition_log": str(workdir / variant / "metacognition.jsonl"),
            "max_attempts": max_attempts, "model_threads": threads,
        }, environ={})  # fmt: skip
        (workdir / variant).mkdir(parents=True)
        self.kernel = Kernel(self.settings)

    async def start(self) -> None:
        await self.kernel.start(serve_bridge=False)
        self.kernel.cycle_options = self.options

    async def run(self, number: int, brief: Brief, command: dict[str, Any]) -> Outcome:
        target = f"brief_{number}_obj"
        self._make_target(target)
        selector, args = command["selector"], list(command.get("args", []))
        intent = command.get("intent", "") if self.with_intent else ""
        started = time.perf_counter()
        reply = await self.kernel.send(target, selector, args, dict(command.get("kwargs", {})),
                                       ignore, intent=intent)  # fmt: skip
        cycle_s = time.perf_counter() - started
        record = self._record(reply.cycle_id) if reply.cycle_id else {}
        self.last_record = record
        calls = record.get("llm_calls", [])
        outcome = Outcome(
            number, self.variant, selector, False, reply.status,
            len(record.get("attempts", [])), cycle_s,
            sum(c.get("completion_tokens", 0) for c in calls),
            sum(c.get("seconds", 0.0) for c in calls),
            reason=(reply.error.reason if reply.error else "")[:300],
            attempts_detail=[
                {k: a.get(k) for k in ("reply", "code", "reason", "repairs", "warnings")}
                for a in record.get("attempts", [])
            ],
        )  # fmt: skip
        if reply.status != "COMPLETE":
            return outcome
        history = [reply.result]
        ok = brief.first is None or _safe(brief.first, reply.result)
        outcome.checks.append(f"own call -> {reply.result!r:.60}{'' if ok else ' WRONG'}")
        for check in brief.checks:
            answer = await self.kernel.send(target, selector, list(check.args), {}, ignore)
            result = answer.result if answer.status == "COMPLETE" else answer.error
            good = answer.status == "COMPLETE" and passes(check, answer.result, history)
            outcome.checks.append(f"{check.args!r:.40} -> {result!r:.60}{'' if good else ' WRONG'}")
            history.append(answer.result)
            ok = ok and good
        outcome.correct = ok
        return outcome

    def _make_target(self, name: str) -> None:
        connection = self.kernel.image.db.open(transaction_manager=transaction.TransactionManager())
        try:
            root = connection.root()
            root[name] = UvmObject(parents=[root["genesis_obj"]], label=name)
            connection.transaction_manager.commit()
        finally:
            connection.close()

    def _record(self, cycle_id: str) -> dict[str, Any]:
        connection = self.kernel.image.db.open(transaction_manager=transaction.TransactionManager())
        try:
            return dict(connection.root()["cycles"][cycle_id].data)
        finally:
            connection.transaction_manager.abort()
            connection.close()

    async def stop(self) -> None:
        await self.kernel.stop()


def _safe(check: Any, value: Any) -> bool:
    try:
        return bool(check(value))
    except Exception:
        return False


def translate(translator: Any, brief: Brief) -> tuple[dict[str, Any] | None, float, str]:
    started = time.perf_counter()
    translation = translator.translate(brief.text)
    seconds = time.perf_counter() - started
    if translation.command is None or translation.command.command != "send":
        return None, seconds, translation.message
    return dict(translation.command.fields), seconds, translation.translator


def show_attempts(record: dict[str, Any]) -> None:
    for call in record.get("llm_calls", []):
        print(
            f"        {call['state']:<12} {call['prompt_tokens']:>4} + {call['completion_tokens']:>4} "
            f"tokens {call['seconds']:6.1f} s"
        )
    for attempt in record.get("attempts", []):
        print(
            f"      attempt {attempt['attempt']}: {attempt.get('reason') or 'ok'}"
            f" {attempt.get('repairs') or ''} {attempt.get('warnings') or ''}"
        )
        print("        | " + "\n        | ".join(str(attempt.get("reply", "")).splitlines()))


def record_cassette(path: Path, outcomes: list[Outcome], model: str) -> None:
    """The models' real replies, as lines of a replay cassette (tests replay them)."""
    with path.open("a", encoding="utf-8") as cassette:
        for outcome in outcomes:
            for number, attempt in enumerate(outcome.attempts_detail, 1):
                verdict = attempt.get("reason") or "ok"
                line = {
                    "persona": "BRICK", "state": "SYNTHESIZING",
                    "prompt_contains": f"'{outcome.selector}'", "response": attempt["reply"],
                    "comment": f"{model}, {outcome.variant}, brief {outcome.brief}, attempt "
                               f"{number}: {verdict[:120]}",
                }  # fmt: skip
                cassette.write(json.dumps(line, ensure_ascii=False) + "\n")


def summarise(outcomes: list[Outcome], variants: list[str], count: int) -> None:
    print("\nvariant          correct   attempts  cycle p50   p95    min/median/max (s)   tok/s")
    base: dict[str, float] = {}
    for variant in variants:
        mine = [o for o in outcomes if o.variant == variant]
        if not mine:
            continue
        times = [o.cycle_s for o in mine]
        correct = sum(o.correct for o in mine)
        attempts = statistics.mean(o.attempts for o in mine)
        tokens, seconds = sum(o.tokens for o in mine), sum(o.llm_s for o in mine)
        p50 = percentile(times, 0.5)
        row = (f"{variant:<16} {correct:>3}/{len(mine):<4} {attempts:>6.2f}   {p50:>7.1f} "
               f"{percentile(times, 0.95):>7.1f}   {min(times):5.1f}/{statistics.median(times):5.1f}/"
               f"{max(times):5.1f}   {tokens / seconds if seconds else 0:5.1f}")  # fmt: skip
        if not base:
            base = {"correct": correct or 1, "p50": p50}
        else:
            row += f"   x{correct / base['correct']:.2f} correct, x{p50 / base['p50']:.2f} p50"
        print(row)
    print(f"({count} briefs; tok/s = generated tokens / seconds in model calls, prompt included)")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="auto", help="catalogue model: auto, 1.5b, 0.5b")
    parser.add_argument("--briefs", default="", help="e.g. 1-8,12 (default: all)")
    parser.add_argument(
        "--variants",
        default="baseline,default",
        help=f"comma list, the first is the baseline; known: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--translator", choices=("model", "rules"), default="model")
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="model CPU threads (default: the kernel's, one per core up to 2); "
        "on a machine busy with other work 1 is much faster",
    )
    parser.add_argument("--verbose", action="store_true", help="print every attempt's code")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument("--cassette", type=Path,
                        help="append every SYNTHESIZING reply here as a replay cassette line")
    args = parser.parse_args()
    model = choose(args.model)
    path = installed(model) if model else None
    if path is None:
        print(f"error: {args.model} is not installed: python batos.py models fetch {args.model}")
        return 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        return 1
    numbers = parse_selection(args.briefs, len(BRIEFS))
    translator = (HybridTranslator(LlamaTranslator(str(path), n_threads=args.threads or None))
                  if args.translator == "model" else RuleTranslator())  # fmt: skip
    print(f"{model.title}: {len(numbers)} briefs x {variants} (translator: {translator.name})")
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="batos-briefs-") as tmp:
        benches = [Bench(v, Path(tmp), model.name, args.max_attempts, args.threads)
                   for v in variants]  # fmt: skip
        for bench in benches:
            await bench.start()
        try:
            for index, number in enumerate(numbers):
                brief = BRIEFS[number - 1]
                command, seconds, how = translate(translator, brief)
                if command is None:
                    print(f"#{number:<2} not translated ({how}): {brief.text}")
                    for variant in variants:
                        outcomes.append(Outcome(number, variant, "-", False, "UNTRANSLATED",
                                                0, 0.0, 0, 0.0, how))  # fmt: skip
                    continue
                call = f"{command['selector']}({', '.join(map(repr, command.get('args', [])))})"
                print(f"#{number:<2} {brief.text[:70]!r} -> {call} [{how}, {seconds:.1f} s]")
                order = benches if index % 2 == 0 else benches[::-1]
                for bench in order:
                    outcome = await bench.run(number, brief, command)
                    outcomes.append(outcome)
                    mark = "ok " if outcome.correct else "BAD"
                    print(
                        f"    {bench.variant:<14} {mark} {outcome.status:<8} attempts "
                        f"{outcome.attempts}  {outcome.cycle_s:5.1f} s  {outcome.reason[:90]}"
                    )
                    for line in outcome.checks if not outcome.correct else ():
                        print(f"        {line}")
                    if args.verbose:
                        show_attempts(bench.last_record)
        finally:
            for bench in benches:
                await bench.stop()
    summarise(outcomes, variants, len(numbers))
    if args.cassette:
        record_cassette(args.cassette, outcomes, model.name)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
