"""`rlaif winrate`: the summary math, policy resolution, and the command end to end on the real model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlaif.judge.metrics import length_controlled_win_rate, wilson_interval
from rlaif.judge.types import OrderJudgment, PairwiseJudgment, Preference
from rlaif.policy_training.winrate import resolve_policy_spec, summarize
from rlaif.cli import build_app


def judgment(prob_a: float, preference: Preference, consistent: bool = True) -> PairwiseJudgment:
    return PairwiseJudgment(
        prob_a=prob_a, preference=preference, consistent=consistent, margin=abs(prob_a - 0.5) * 2,
        per_order=[OrderJudgment(order="ab", prob_first=prob_a, prob_a=prob_a, label_mass=0.9),
                   OrderJudgment(order="ba", prob_first=1 - prob_a, prob_a=prob_a, label_mass=0.9)],
        label_mass=0.9, rubric_id="helpfulness", rubric_version="1", engine="test", model="test", mode="logprob")


def test_summary_counts_ties_as_half_and_reports_lengths():
    judgments = [judgment(0.9, Preference.A),  # policy wins
                 judgment(0.8, Preference.A),  # policy wins
                 judgment(0.2, Preference.B),  # base wins
                 judgment(0.52, Preference.TIE, consistent=False)]  # orders disagree -> tie
    policy_len, base_len = [30, 25, 10, 12], [10, 12, 20, 12]
    summary = summarize(judgments, policy_len, base_len, ["x" * 5] * 4, ["y" * 3] * 4)
    assert (summary["wins"], summary["losses"], summary["ties"], summary["n"]) == (2, 1, 1, 4)
    assert summary["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert summary["win_rate_ci95"] == pytest.approx(list(wilson_interval(2.5, 4)))
    assert summary["mean_prob_policy_better"] == pytest.approx((0.9 + 0.8 + 0.2 + 0.52) / 4)
    assert summary["consistent_frac"] == pytest.approx(0.75)
    lc = length_controlled_win_rate([0.9, 0.8, 0.2, 0.52], [20, 13, -10, 0])
    assert summary["length_controlled_win_rate"] == pytest.approx(lc.win_rate)
    assert summary["length_slope"] > 0  # here the longer answer won: the fit must see it
    assert summary["mean_length_tokens"] == {"policy": 19.25, "base": 13.5}
    assert summary["mean_length_chars"] == {"policy": 5.0, "base": 3.0}
    with pytest.raises(ValueError, match="no comparisons"):
        summarize([], [], [], [], [])


def test_calibrated_summary_also_reads_the_judges_own_probabilities():
    """With a calibration, the same judgments are summarized twice: calibrated (the headline) and raw."""
    raw = [judgment(0.52, Preference.TIE, consistent=False), judgment(0.49, Preference.TIE, consistent=False),
           judgment(0.55, Preference.A)]
    calibrated = [j.model_copy(update={"prob_a": p, "preference": pref, "consistent": True, "calibration": "c1",
                                       "raw_prob_a": j.prob_a, "raw_consistent": j.consistent})
                  for j, p, pref in zip(raw, (0.8, 0.3, 0.95), (Preference.A, Preference.B, Preference.A))]
    summary = summarize(calibrated, [10, 10, 10], [10, 10, 10], ["x"] * 3, ["y"] * 3)
    assert summary["mean_prob_policy_better"] == pytest.approx((0.8 + 0.3 + 0.95) / 3)
    assert summary["consistent_frac"] == 1.0
    raw_summary = summary["uncalibrated"]
    assert raw_summary["mean_prob_policy_better"] == pytest.approx((0.52 + 0.49 + 0.55) / 3)
    assert raw_summary["consistent_frac"] == pytest.approx(1 / 3)
    assert "uncalibrated" not in summarize(raw, [10, 10, 10], [10, 10, 10], ["x"] * 3, ["y"] * 3)


def test_policy_spec_resolution(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6 is half-written: never picked
        (run / f"checkpoint-{step}" / "policy").mkdir(parents=True)
        if complete:
            (run / f"checkpoint-{step}" / ".complete").write_text("ok\n")
    assert resolve_policy_spec(str(run)) == str(run / "checkpoint-4" / "policy")
    assert resolve_policy_spec(str(run / "checkpoint-2")) == str(run / "checkpoint-2" / "policy")
    assert resolve_policy_spec(str(run / "checkpoint-2" / "policy")) == str(run / "checkpoint-2" / "policy")
    assert resolve_policy_spec("hf:some/model") == "some/model"
    assert Path(resolve_policy_spec("default")).is_dir()


def test_winrate_cli_end_to_end_identical_models_tie(tmp_path):
    # Same model on both sides, greedy: identical answers, so the debiased verdict is exactly
    # 0.5 for every prompt (a position-biased judge would not give that), every outcome is a
    # tie and the win rate is 0.5 with lengths equal.
    prompts = tmp_path / "heldout.jsonl"
    rows = [{"prompt": "Name a fruit."}, {"prompt": "What is 3 + 4?"}, {"prompt": "Say hello in French."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "winrate"
    result = CliRunner().invoke(build_app(), [
        "winrate", "--base", "default", "--policy", "default", "--prompts", str(prompts), "--limit", "3",
        "--engine", "default", "--max-new-tokens", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["n"] == 3 and summary["ties"] == 3 and summary["win_rate"] == pytest.approx(0.5)
    # One bar per stage on stderr, each run to its total (responses, then pairs), with a rate.
    for stage, unit in (("base answers", "response"), ("policy answers", "response"), ("judging", "pair")):
        bar = [line for line in re.split(r"[\r\n]", result.stderr) if f"winrate: {stage}" in line]
        assert bar and "3/3" in bar[-1] and (f"{unit}/s" in bar[-1] or f"s/{unit}" in bar[-1]), (stage, bar)
    assert summary["mean_prob_policy_better"] == pytest.approx(0.5, abs=1e-6)
    assert summary["length_controlled_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert summary["mean_length_tokens"]["policy"] == summary["mean_length_tokens"]["base"] > 0
    lo, hi = summary["win_rate_ci95"]
    assert lo < 0.5 < hi and summary["rubric"] == "helpfulness"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in rows]
    assert all(s["policy_response"] == s["base_response"] and s["winner"] == "tie" for s in samples)
    assert all(0 < s["policy_tokens"] <= 6 for s in samples)
    assert json.loads((out / "summary.json").read_text())["win_rate"] == summary["win_rate"]


def test_winrate_cli_rejects_two_judges(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(build_app(), ["winrate", "--policy", "default", "--prompts", str(prompts),
                                              "--engine", "default", "--judge-url", "http://127.0.0.1:1"])
    assert result.exit_code != 0 and "either --engine or --judge-url" in result.output


def test_judge_pairs_over_http_equals_in_process():
    # The --judge-url path: same verdicts as judging in process with the engine the service runs.
    from rlaif.judge.judges import PairwiseJudge
    from rlaif.judge.types import PairwiseItem
    from rlaif.policy_training.winrate import WinRateSettings, judge_pairs
    from rlaif.service.app import create_app
    from rlaif.service.settings import ServiceSettings
    from tests.fake_engines import DeterministicEngine, ServerThread

    engine = DeterministicEngine()
    items = [PairwiseItem(prompt="Say hi.", response_a="Hi!", response_b="No."),
             PairwiseItem(prompt="2+2?", response_a="5", response_b="4")]
    with ServerThread(create_app(ServiceSettings(cache=False, max_wait_ms=1), engine=engine)) as server:
        settings = WinRateSettings(base="default", policy="default", prompts="unused", engine=None,
                                   judge_url=server.url)
        remote, name = judge_pairs(items, settings)
    local = PairwiseJudge(engine, "helpfulness").judge(items)
    assert name == server.url
    assert [j.prob_a for j in remote] == pytest.approx([j.prob_a for j in local])
    assert [j.preference for j in remote] == [j.preference for j in local]
