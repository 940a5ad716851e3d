"""`rlaif eval`: report arithmetic on known judgments, and the real CLI on real human labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlaif.judge.data import load_preferences
from rlaif.judge.evaluation import presentation_order, summarize
from rlaif.judge.types import OrderJudgment, PairwiseJudgment, Preference

DATA = Path(__file__).parent / "data"


def _always_first(chosen_is_a: bool, mass: float = 0.9) -> PairwiseJudgment:
    """What a purely position-biased judge says: whichever response is shown first wins with 0.9."""
    ab = OrderJudgment(order="ab", prob_first=0.9, prob_a=0.9, label_mass=mass)
    ba = OrderJudgment(order="ba", prob_first=0.9, prob_a=0.1, label_mass=mass)
    return PairwiseJudgment(prob_a=0.5, preference=Preference.TIE, consistent=False, margin=0.0, per_order=[ab, ba],
                            label_mass=mass, rubric_id="r", rubric_version="1", engine="e", model="m", mode="logprob")


def test_position_biased_judge_is_exposed():
    examples = load_preferences(DATA / "llmbar_natural_sample.json")
    chosen_is_a = [presentation_order(e) for e in examples]
    report = summarize([_always_first(a) for a in chosen_is_a], chosen_is_a, examples, seconds=1.0)
    first_slot_winners = sum(chosen_is_a) / len(chosen_is_a)
    assert report.accuracy_file_order == pytest.approx(first_slot_winners)
    assert report.accuracy_swapped_order == pytest.approx(1 - first_slot_winners)
    assert report.accuracy == 0.5 and report.tie_rate == 1.0 and report.position_consistency == 0.0
    assert any("position consistency" in w for w in report.warnings)
    assert any("within noise" in w for w in report.warnings)
    assert report.mean_label_mass == pytest.approx(0.9) and not any("label mass" in w for w in report.warnings)


def test_low_label_mass_is_warned_about():
    examples = load_preferences(DATA / "llmbar_natural_sample.json")
    chosen_is_a = [presentation_order(e) for e in examples]
    report = summarize([_always_first(a, mass=0.2) for a in chosen_is_a], chosen_is_a, examples, seconds=1.0)
    assert report.mean_label_mass == pytest.approx(0.2)
    assert any("label mass is 0.20" in w for w in report.warnings)


def test_good_judge_has_no_warnings():
    examples = load_preferences(DATA / "llmbar_natural_sample.json")
    chosen_is_a = [presentation_order(e) for e in examples]
    judgments = []
    for a in chosen_is_a:  # a perfect, consistent judge
        p = 0.95 if a else 0.05
        judgments.append(PairwiseJudgment(
            prob_a=p, preference=Preference.A if a else Preference.B, consistent=True, margin=0.9,
            per_order=[OrderJudgment(order="ab", prob_first=p, prob_a=p, label_mass=0.99),
                       OrderJudgment(order="ba", prob_first=1 - p, prob_a=p, label_mass=0.99)],
            label_mass=0.99, rubric_id="r", rubric_version="1", engine="e", model="m", mode="logprob"))
    report = summarize(judgments, chosen_is_a, examples, seconds=2.0)
    assert report.accuracy == 1.0 and report.accuracy_ci95[0] > 0.5
    assert report.warnings == []
    assert report.ece == pytest.approx(0.05)
    assert report.judgments_per_second == pytest.approx(len(examples) / 2.0)


def test_orderless_formats_get_a_seeded_mixed_order():
    examples = load_preferences(DATA / "hh_rlhf_harmless_base_test_first500_sample.jsonl")
    orders = [presentation_order(e, seed=0) for e in examples]
    assert 0 < sum(orders) < len(orders), "chosen must not always sit in the same slot"
    assert orders == [presentation_order(e, seed=0) for e in examples]


@pytest.mark.slow
def test_eval_cli_on_real_labels(tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "rlaif", "eval", "--data", str(DATA / "llmbar_natural_sample.json"), "--limit", "3",
         "--out", str(out), "--cache-path", str(tmp_path / "cache.sqlite")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    report, last = json.loads(lines[0]), json.loads(lines[-1])
    assert last["accuracy"] == report["accuracy"] and last["n"] == 3
    for key in ("accuracy_file_order", "accuracy_swapped_order", "position_consistency", "tie_rate", "ece",
                "shorter_answer_baseline", "judgments_per_second", "accuracy_ci95"):
        assert key in report
    assert (out / "reliability.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    recomputed = sum((r["prob_a"] > 0.5) == r["chosen_is_a"] if r["prob_a"] != 0.5 else 0.5 for r in rows) / 3
    assert recomputed == pytest.approx(report["accuracy"])
    assert "WARNING" in proc.stderr  # 3 pairs can never be told apart from chance


def test_eval_cli_clean_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlaif", "eval", "--data", str(tmp_path / "missing.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
