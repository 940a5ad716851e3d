"""Judge calibration (`rlaif.judge.calibration`, `rlaif calibrate`, `--calibration` everywhere).

- On a synthetic judge with a known position bias and temperature, the fit recovers both (the only
  synthetic judge here: its truth is known by construction).
- On a shared human-labeled set, with the embedded judge's real judgments, held-out ECE drops.
- The calibration file round-trips, changes cache keys (and leaves uncalibrated keys alone), and is
  refused for another engine, rubric or mode.
- `rlaif calibrate` -> `rlaif eval --calibration` on the real embedded judge; `rlaif serve` and
  `rlaif label` apply a calibration.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlaif.judge.calibration import (MIN_PAIRS, Calibration, CalibrationError, CalibrationParams, fit_calibration,
                                     fit_params, _features)
from rlaif.judge.types import OrderJudgment, PairwiseItem, PairwiseJudgment, Preference

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "calibration" / "hh_rlhf_harmless_base_test_first200.judgments.jsonl"


def synthetic(p_ab_first: float, p_ba_first: float, mass: float = 0.8, engine: str = "synthetic") -> PairwiseJudgment:
    """A judgment as `PairwiseJudge` would build it from two per-order probabilities of "first better"."""
    a_ab, a_ba = p_ab_first, 1 - p_ba_first
    prob_a = (a_ab + a_ba) / 2
    return PairwiseJudgment(
        prob_a=prob_a, preference=Preference.TIE, consistent=(a_ab > 0.5) == (a_ba > 0.5), margin=abs(prob_a - 0.5) * 2,
        label_mass=mass, per_order=[OrderJudgment(order="ab", prob_first=p_ab_first, prob_a=a_ab, label_mass=mass),
                                    OrderJudgment(order="ba", prob_first=p_ba_first, prob_a=a_ba, label_mass=mass)],
        rubric_id="helpfulness", rubric_version="1", engine=engine, model="synthetic", mode="logprob")


def synthetic_judge(n: int, bias: float, temperature: float, seed: int = 0):
    """Latent quality gap q ~ N(0, 1.5); people prefer A with P = sigmoid(q); the judge's log-odds of
    "first better" are temperature * q + bias in order ab and -temperature * q + bias in order ba."""
    rng = np.random.default_rng(seed)
    q = rng.normal(0, 1.5, n)
    outcome = (rng.random(n) < 1 / (1 + np.exp(-q))).astype(float)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    judgments = [synthetic(float(sig(temperature * x + bias)), float(sig(-temperature * x + bias))) for x in q]
    return judgments, outcome


@pytest.mark.parametrize("bias, temperature", [
    (1.5, 2.5),    # strongly prefers slot A and over-confident (the capable judge's failure mode)
    (-0.8, 0.5),   # prefers slot B and under-confident
    (0.0, 1.0),    # already calibrated: the fit must stay put
])
def test_fit_recovers_known_position_bias_and_temperature(bias, temperature):
    judgments, outcome = synthetic_judge(4000, bias, temperature)
    params = fit_params(_features(judgments), outcome, l2=1.0)
    assert params.position_bias == pytest.approx(bias, abs=0.15)
    assert params.temperature == pytest.approx(temperature, rel=0.1)
    assert 1 / params.pair_scale == pytest.approx(temperature, rel=0.1)
    assert abs(params.mass_slope) < 0.05  # constant label mass: nothing to learn from it


def test_calibration_turns_position_ties_into_correct_decisions():
    judgments, outcome = synthetic_judge(600, bias=4.0, temperature=3.0, seed=1)
    calibration = fit_calibration(judgments, outcome, rubric_fingerprint="f")
    before, after = calibration.fit.cv_before, calibration.fit.cv_after
    assert before.tie_rate > 0.5, "the biased judge's orders mostly disagree"
    assert after.tie_rate < before.tie_rate - 0.3
    assert after.position_consistency > before.position_consistency + 0.3
    assert after.decisive_accuracy > 0.7
    assert after.log_loss < before.log_loss  # (averaging the two biased orders already leaves a small ECE here)
    assert calibration.fit.warnings == []


def test_swapping_the_responses_gives_the_complement():
    judgments, outcome = synthetic_judge(300, bias=1.0, temperature=2.0, seed=2)
    calibration = fit_calibration(judgments, outcome, rubric_fingerprint="f")
    for j in judgments[:20]:
        swapped = synthetic(j.per_order[1].prob_first, j.per_order[0].prob_first)
        assert calibration.apply(j, 0.05).prob_a == pytest.approx(1 - calibration.apply(swapped, 0.05).prob_a, abs=1e-12)


def test_too_few_labels_are_refused_and_few_warned():
    judgments, outcome = synthetic_judge(200, bias=0.5, temperature=1.0, seed=3)
    with pytest.raises(ValueError, match=f"at least {MIN_PAIRS}"):
        fit_calibration(judgments[:MIN_PAIRS - 1], outcome[:MIN_PAIRS - 1], rubric_fingerprint="f")
    few = fit_calibration(judgments[:40], outcome[:40], rubric_fingerprint="f")
    assert any("only 40 decisive human labels" in w for w in few.fit.warnings)


def _fixture():
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    judgments = [PairwiseJudgment.model_validate({k: v for k, v in r.items() if k not in ("id", "chosen_is_a")}) for r in rows]
    return rows, judgments, np.array([1.0 if r["chosen_is_a"] else 0.0 for r in rows])


def test_held_out_ece_drops_on_a_shared_human_set():
    """The embedded judge's real judgments of hh-rlhf harmless-base (200 human labels): fit on one half,
    measure on the other."""
    rows, judgments, outcome = _fixture()
    order = np.random.default_rng(0).permutation(len(rows))  # the split `rlaif calibrate --holdout 0.5` makes
    held, fit = order[:100], order[100:]
    calibration = fit_calibration([judgments[i] for i in fit], outcome[fit], rubric_fingerprint="f",
                                  holdout=([judgments[i] for i in held], outcome[held]))
    before, after = calibration.fit.holdout_before, calibration.fit.holdout_after
    assert after.n == before.n == 100
    # The 135M judge carries little signal on this set, so the gain is small (0.050 -> 0.044, docs/review.md),
    # but it is measured on pairs the fit never saw, and the orders now agree on some pairs.
    assert after.ece < before.ece, (before.ece, after.ece)
    assert after.position_consistency > before.position_consistency


def test_fixture_judgments_are_the_embedded_judges(default_engine):
    """The shipped judgments are what the embedded judge says today (rebuild with calibration/README.md)."""
    from rlaif.judge.data import load_preferences
    from rlaif.judge.judges import PairwiseJudge

    rows, judgments, _ = _fixture()
    assert judgments[0].engine == default_engine.engine_id
    examples = {e.id: e for e in load_preferences(DATA / "hh_rlhf_harmless_base_test_first200.jsonl")}
    items = []
    for row in rows[:3]:
        e = examples[row["id"]]
        a, b = (e.chosen, e.rejected) if row["chosen_is_a"] else (e.rejected, e.chosen)
        items.append(PairwiseItem(prompt=e.prompt, response_a=a, response_b=b))
    fresh = PairwiseJudge(default_engine, "helpfulness").judge(items)
    for new, old in zip(fresh, judgments[:3]):
        assert new.prob_a == pytest.approx(old.prob_a, abs=2e-3)


def _calibration_for(engine_id: str, **params) -> Calibration:
    from rlaif.judge.rubric import load_rubric

    rubric = load_rubric("helpfulness")
    return Calibration(engine=engine_id, rubric_id=rubric.id, rubric_version=rubric.version,
                       rubric_fingerprint=rubric.fingerprint, params=CalibrationParams(**params))


def test_file_round_trip_cache_keys_and_applied_judgments(default_engine, judgment_cache, tmp_path):
    from rlaif.judge.judges import PairwiseJudge

    calibration = _calibration_for(default_engine.engine_id, slope=0.5, intercept=-0.4, pair_scale=0.7)
    path = calibration.save(tmp_path / "calib.json")
    loaded = Calibration.load(path)
    assert loaded == calibration and loaded.id == calibration.id
    other = _calibration_for(default_engine.engine_id, slope=0.5, intercept=-0.4, pair_scale=0.8)
    item = PairwiseItem(prompt="What is 2+2?", response_a="4", response_b="5")
    plain = PairwiseJudge(default_engine, "helpfulness", cache=judgment_cache)
    calibrated = PairwiseJudge(default_engine, "helpfulness", cache=judgment_cache, calibration=loaded)
    keys = {plain.item_key(item), calibrated.item_key(item),
            PairwiseJudge(default_engine, "helpfulness", calibration=other).item_key(item)}
    assert len(keys) == 3, "a calibration is part of the key, and two calibrations never share one"
    assert "calibration" not in plain._key_payload(), "uncalibrated keys are what they were before calibrations"
    raw = plain.judge([item])[0]
    [first] = calibrated.judge([item])
    assert first.calibration == loaded.id and not first.cached
    assert first.raw_prob_a == pytest.approx(raw.prob_a) and first.raw_consistent == raw.consistent
    assert first.per_order[0].raw_prob_first == pytest.approx(raw.per_order[0].prob_first)
    expected = loaded.apply(raw.model_copy(update={"cached": False}), 0.05)
    assert first.prob_a == pytest.approx(expected.prob_a) and first.prob_a != pytest.approx(raw.prob_a)
    [again] = calibrated.judge([item])
    assert again.cached and again.prob_a == first.prob_a
    assert plain.judge([item])[0].calibration is None  # the cache never serves a calibrated verdict uncalibrated


def test_calibration_is_refused_for_another_judge(default_engine, tmp_path):
    from rlaif.judge.judges import PairwiseJudge

    with pytest.raises(CalibrationError, match="engine"):
        PairwiseJudge(default_engine, "helpfulness", calibration=_calibration_for("hf:other#0123"))
    with pytest.raises(CalibrationError, match="rubric 'harmlessness'"):
        PairwiseJudge(default_engine, "harmlessness", calibration=_calibration_for(default_engine.engine_id))
    with pytest.raises(CalibrationError, match="mode"):
        PairwiseJudge(default_engine, "helpfulness-cot", mode="cot",
                      calibration=_calibration_for(default_engine.engine_id).model_copy(update={"rubric_id": "helpfulness-cot"}))
    (tmp_path / "bad.json").write_text('{"format": "rlaif-calibration-v1"}')
    with pytest.raises(CalibrationError, match="not a valid"):
        Calibration.load(tmp_path / "bad.json")


def test_calibrate_then_eval_on_the_embedded_judge(tmp_path):
    """`rlaif calibrate --holdout` then `rlaif eval --calibration` on the same file: eval scores only the
    held-out pairs before/after, from the same (cached) raw judgments."""
    from typer.testing import CliRunner

    from rlaif.cli import build_app

    data = DATA / "hh_rlhf_harmless_base_test_first200.jsonl"
    cache = tmp_path / "cache.sqlite"
    runner = CliRunner()
    result = runner.invoke(build_app(), ["calibrate", "--data", str(data), "--limit", "40", "--holdout", "0.45",
                                         "--out", str(tmp_path / "calib.json"), "--cache-path", str(cache)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["pairs_fit"], summary["pairs_held_out"]) == (22, 18)
    calibration = Calibration.load(tmp_path / "calib.json")
    assert summary["calibration"] == calibration.id and len(calibration.fitted_on) == 22
    result = runner.invoke(build_app(), ["eval", "--data", str(data), "--limit", "40", "--calibration",
                                         str(tmp_path / "calib.json"), "--cache-path", str(cache), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[0])
    assert report["calibration"]["id"] == calibration.id
    assert (report["calibration"]["held_out"], report["calibration"]["in_sample"]) == (18, 22)
    assert report["calibration"]["before"]["accuracy"] == pytest.approx(summary["holdout_before"]["accuracy"])
    assert report["calibration"]["after"]["ece"] == pytest.approx(summary["holdout_after"]["ece"])
    judged = [json.loads(line) for line in (tmp_path / "eval" / "judgments.jsonl").read_text().splitlines()]
    assert all(j["calibration"] == calibration.id for j in judged)
    # Too few pairs: refused with a clear message, exit 2.
    result = runner.invoke(build_app(), ["calibrate", "--data", str(data), "--limit", "10", "--out", str(tmp_path / "x.json"),
                                         "--cache-path", str(cache)])
    assert result.exit_code == 2 and "at least 20" in result.output


def test_serve_and_label_apply_a_calibration(default_engine, tmp_path):
    from fastapi.testclient import TestClient

    from rlaif.judge.labeling import LabelConfig, run_label
    from rlaif.service.app import create_app
    from rlaif.service.settings import ServiceSettings

    calibration = _calibration_for(default_engine.engine_id, slope=0.5, intercept=-0.4, pair_scale=0.7)
    path = calibration.save(tmp_path / "calib.json")
    settings = ServiceSettings(calibrations=str(path), cache=False)
    with TestClient(create_app(settings, engine=default_engine)) as client:
        body = {"items": [{"prompt": "What is 2+2?", "response_a": "4", "response_b": "5"}]}
        judged = client.post("/v1/judge/pairwise", json=body).json()["judgments"][0]
        assert judged["calibration"] == calibration.id and judged["raw_prob_a"] is not None
        other = client.post("/v1/judge/pairwise", json={**body, "rubric": "harmlessness"}).json()["judgments"][0]
        assert other["calibration"] is None  # per rubric
    wrong = _calibration_for("hf:another-model#00").save(tmp_path / "wrong.json")
    with pytest.raises(CalibrationError, match="does not apply"), \
            TestClient(create_app(ServiceSettings(calibrations=str(wrong), cache=False), engine=default_engine)):
        pass
    prompts = tmp_path / "pairs.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2+2?", "x": "4", "y": "5"}) + "\n")
    run_label(LabelConfig(prompts=prompts, out=tmp_path / "job", responses_from=("x", "y"), calibration=path,
                          export=("jsonl",), progress=False), judge_engine=default_engine, policy_engine=default_engine)
    import sqlite3

    [(value,)] = sqlite3.connect(tmp_path / "job" / "progress.sqlite").execute("SELECT value FROM records").fetchall()
    assert json.loads(value)["judgment"]["calibration"] == calibration.id


def test_local_judge_reward_applies_a_calibration(default_engine, tmp_path):
    from rlaif.judge.judges import PairwiseJudge
    from rlaif.policy_training.judge_rewards import LocalJudgeReward

    calibration = _calibration_for(default_engine.engine_id, slope=0.5, intercept=-0.4, pair_scale=0.7)
    path = calibration.save(tmp_path / "calib.json")
    source = LocalJudgeReward(default_engine, rubrics="helpfulness", mode="pairwise", calibrations=[path])
    [reward] = source.rewards(["What is 2+2?"], ["4"], references=["5"])
    item = PairwiseItem(prompt="What is 2+2?", response_a="4", response_b="5")
    expected = PairwiseJudge(default_engine, "helpfulness", calibration=calibration).judge([item])[0]
    assert reward == pytest.approx(expected.prob_a) and expected.calibration == calibration.id
    with pytest.raises(ValueError, match="pairwise"):
        LocalJudgeReward(default_engine, mode="score", calibrations=[path])
    with pytest.raises(ValueError, match="does not use"):
        LocalJudgeReward(default_engine, rubrics="harmlessness", mode="pairwise", calibrations=[path])
