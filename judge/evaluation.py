"""Evaluate a judge against human preference labels (`rlaif eval`).

For every human-labeled pair the debiased judge gives P(response in slot A is better); the
report puts side by side (data/README.md asks for exactly this):
- debiased accuracy with a Wilson 95% interval, and the accuracy of each single order (file
  order, and swapped), which exposes a position-biased judge: one that always says "A" gets
  the share of first-slot winners in file order and its complement swapped;
- position consistency (both orders agree) and the tie rate;
- calibration of the soft label (ECE + a reliability diagram PNG);
- the "pick the shorter answer" baseline, a bar a judge must clear to mean anything;
- throughput (pairs judged per second, both orders each).

Warnings are raised when position consistency is below 50% or the accuracy interval
contains 50%, so nobody trains a policy on a judge that is noise on this data.
Formats without a presentation order (hh-rlhf, TRL jsonl list chosen first by role) get a
seeded per-item order, so "file order" never silently means "chosen always first".
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from rlaif.judge.calibration import CalibrationReport, example_hash, held_out_report
from rlaif.judge.data import PreferenceExample, load_preferences_with_stats
from rlaif.judge.judges import PairwiseJudge
from rlaif.judge.metrics import (accuracy, expected_calibration_error, plot_reliability_diagram, reliability_bins,
                           shorter_answer_baseline, wilson_interval)
from rlaif.judge.types import PairwiseItem, PairwiseJudgment, Preference, low_label_mass_warning


class EvalReport(BaseModel):
    """Everything `rlaif eval` reports; written to `report.json` in the output folder."""

    data: str
    format: str
    n: int = Field(description="Pairs judged (rows with a usable human label).")
    dropped: dict[str, int] = Field(description="Rows skipped and why (e.g. PandaLM majority ties).")
    rubric_id: str
    engine: str
    mode: str
    accuracy: float = Field(description="Debiased accuracy: P(chosen) > 0.5 counts 1, exactly 0.5 counts 0.5.")
    accuracy_ci95: tuple[float, float]
    accuracy_file_order: float = Field(description="Accuracy using only the order the file presents (one pass).")
    accuracy_swapped_order: float = Field(description="Accuracy using only the swapped order.")
    position_consistency: float = Field(description="Share of pairs whose two orders prefer the same response.")
    tie_rate: float
    ece: float = Field(description="Expected calibration error of P(slot A better) against the human label (10 bins).")
    shorter_answer_baseline: float
    mean_label_mass: float = Field(description=(
        "Mean P(the judge's reply is exactly a label) before normalizing over the labels; a warning below 0.5."))
    judgments_per_second: float
    seconds: float
    reliability_plot: str | None = None
    calibration: CalibrationReport | None = Field(None, description=(
        "With --calibration: the metrics above are calibrated; this holds before/after on the held-out pairs."))
    warnings: list[str] = Field(default_factory=list)


def presentation_order(example: PreferenceExample, seed: int = 0) -> bool:
    """True when the chosen response is shown in slot A (file order, or a seeded coin when the file has none)."""
    if example.chosen_position is not None:
        return example.chosen_position == 1
    digest = hashlib.sha256(f"{seed}:{example.id}".encode()).digest()
    return digest[0] % 2 == 0


def evaluate(judge: PairwiseJudge, data: str | Path, *, limit: int | None = None, out_dir: str | Path | None = None,
             batch_size: int = 16, seed: int = 0,
             progress: Callable[[int], None] | None = None) -> tuple[EvalReport, list[PairwiseJudgment]]:
    """Judge every labeled pair in `data` and compute the report (and plot, when `out_dir` is set)."""
    loaded = load_preferences_with_stats(data, limit=limit)
    examples = loaded.examples
    if not examples:
        raise ValueError(f"{data}: no usable labeled pairs (dropped: {loaded.dropped})")
    chosen_is_a = [presentation_order(e, seed) for e in examples]
    items = [PairwiseItem(prompt=e.prompt, response_a=e.chosen if a else e.rejected,
                          response_b=e.rejected if a else e.chosen) for e, a in zip(examples, chosen_is_a)]
    started = time.perf_counter()
    judgments: list[PairwiseJudgment] = []
    for start in range(0, len(items), batch_size):
        judgments.extend(judge.judge(items[start:start + batch_size]))
        if progress:
            progress(min(batch_size, len(items) - start))
    seconds = time.perf_counter() - started
    report = summarize(judgments, chosen_is_a, examples, seconds=seconds)
    report_fields = {"data": str(data), "format": loaded.format.value,
                     "dropped": {reason.value: count for reason, count in loaded.dropped.items()},
                     "rubric_id": judge.rubric.id, "engine": judge.engine.engine_id, "mode": judge.mode}
    report = report.model_copy(update=report_fields)
    calibration = getattr(judge, "calibration", None)
    if calibration is not None:
        hashes = [example_hash(e.prompt, e.chosen, e.rejected) for e in examples]
        held = held_out_report(calibration, judgments, [1.0 if a else 0.0 for a in chosen_is_a], hashes, judge.tie_margin)
        report = report.model_copy(update={"calibration": held, "warnings": [*report.warnings, *held.warnings]})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        prob_a = np.array([j.prob_a for j in judgments])
        plot = plot_reliability_diagram(reliability_bins(prob_a, np.array(chosen_is_a, dtype=float)),
                                        out / "reliability.png", title=f"{judge.rubric.id} on {Path(data).name}",
                                        xlabel="judge's P(response in slot A is better)")
        report = report.model_copy(update={"reliability_plot": str(plot)})
        (out / "report.json").write_text(report.model_dump_json(indent=2))
        with (out / "judgments.jsonl").open("w") as handle:
            for example, a, judgment in zip(examples, chosen_is_a, judgments):
                handle.write(json.dumps({"id": example.id, "chosen_is_a": a, **judgment.model_dump(mode="json")}) + "\n")
    return report, judgments


def summarize(judgments: Sequence[PairwiseJudgment], chosen_is_a: Sequence[bool], examples: Sequence[PreferenceExample],
              *, seconds: float) -> EvalReport:
    """Metrics from judgments and the human labels (`chosen_is_a[i]`: the human-preferred response sat in slot A)."""
    outcome_a = np.array(chosen_is_a, dtype=float)  # (N,) 1 when slot A holds the human-preferred response
    prob_a = np.array([j.prob_a for j in judgments])  # (N,)
    file_a = np.array([j.per_order[0].prob_a for j in judgments])
    swapped_a = np.array([j.per_order[1].prob_a for j in judgments])
    n = len(judgments)
    acc = accuracy(prob_a, outcome_a)
    low, high = wilson_interval(acc * n, n)
    consistency = float(np.mean([j.consistent for j in judgments]))
    report = EvalReport(
        data="", format="", n=n, dropped={}, rubric_id="", engine="", mode="",
        accuracy=acc, accuracy_ci95=(low, high),
        accuracy_file_order=accuracy(file_a, outcome_a), accuracy_swapped_order=accuracy(swapped_a, outcome_a),
        position_consistency=consistency,
        tie_rate=float(np.mean([j.preference is Preference.TIE for j in judgments])),
        ece=expected_calibration_error(prob_a, outcome_a), shorter_answer_baseline=shorter_answer_baseline(examples),
        mean_label_mass=float(np.mean([j.label_mass for j in judgments])),
        judgments_per_second=n / seconds if seconds > 0 else float("inf"), seconds=seconds)
    return report.model_copy(update={"warnings": judge_warnings(report)})


def judge_warnings(report: EvalReport) -> list[str]:
    """Plain-language reasons not to trust this judge on this data."""
    warnings = []
    mass = low_label_mass_warning(report.mean_label_mass)
    if mass:
        warnings.append(mass)
    if report.position_consistency < 0.5:
        warnings.append(f"position consistency is {report.position_consistency:.0%} (< 50%): the judge mostly follows the "
                        "presentation order, not the content; its preferences are dominated by position bias")
    low, high = report.accuracy_ci95
    if low <= 0.5 <= high:
        warnings.append(f"accuracy {report.accuracy:.1%} is within noise of 50% (95% CI {low:.1%}-{high:.1%}, n={report.n}): "
                        "this judge is indistinguishable from a coin flip on this data")
    if report.accuracy <= report.shorter_answer_baseline:
        warnings.append(f"accuracy {report.accuracy:.1%} does not beat the pick-the-shorter-answer baseline "
                        f"({report.shorter_answer_baseline:.1%})")
    return warnings
