"""Tests for judge/metrics.py: hand-computed cases, slow reference implementations, and
synthetic data with a known answer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rlaif.judge.data import PreferenceExample, load_preferences
from rlaif.judge.metrics import (
    SLOPE_L2,
    ReliabilityBin,
    accuracy,
    expected_calibration_error,
    fit_logistic,
    is_within_noise,
    length_controlled_win_rate,
    plot_reliability_diagram,
    reliability_bins,
    shorter_answer_baseline,
    wilson_interval,
)

HH_SAMPLE = Path(__file__).parent / "data" / "hh_rlhf_harmless_base_test_first500_sample.jsonl"


def _example(chosen: str, rejected: str) -> PreferenceExample:
    return PreferenceExample(prompt="p", chosen=chosen, rejected=rejected, source="test", id="test-0")


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("probs", "outcomes", "expected"),
    [
        ([0.9, 0.8], None, 1.0),  # always favours chosen
        ([0.9, 0.2, 0.5], None, 0.5),  # right, wrong, tie (half credit): 1.5 / 3
        ([0.9, 0.2, 0.5], [1, 0, 1], 2.5 / 3),  # second item: the other side was better, so 0.2 is right
        ([0.1, 0.4], [1, 1], 0.0),  # always favours the rejected response
    ],
)
def test_accuracy(probs: list[float], outcomes: list[int] | None, expected: float) -> None:
    assert accuracy(probs, outcomes) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("probs", "outcomes", "message"),
    [
        ([], None, "empty"),
        ([1.2], None, r"\[0, 1\]"),
        ([float("nan")], None, "finite"),
        ([0.5, 0.5], [1], "outcomes has 1 entries but probs has 2"),
        ([0.5], [0.7], "outcomes must be 0 or 1"),
    ],
)
def test_accuracy_rejects_bad_input(probs: list[float], outcomes: list[float] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        accuracy(probs, outcomes)


# --------------------------------------------------------------------------------------------
# Wilson interval and noise check
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (50, 100, 0.4038, 0.5962),  # textbook value for a 50% proportion at n=100
        (0, 10, 0.0, 0.2775),  # Wilson stays inside [0, 1] where Wald would give [0, 0]
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # 30.8% of 263: asymmetric around p_hat
        (0, 0, 0.0, 1.0),  # no data: anything is possible
    ],
)
def test_wilson_interval_known_values(k: float, n: int, low: float, high: float) -> None:
    got_low, got_high = wilson_interval(k, n)
    assert got_low == pytest.approx(low, abs=5e-4)
    assert got_high == pytest.approx(high, abs=5e-4)


@pytest.mark.parametrize(("k", "n"), [(3, 7), (12.5, 40), (77, 100), (450, 500)])
def test_wilson_bounds_solve_the_score_equation(k: float, n: int) -> None:
    # Reference from the definition: the bounds are the p where |p_hat - p| = z * sqrt(p(1-p)/n).
    z = 1.959963984540054
    p_hat = k / n
    for bound in wilson_interval(k, n):
        assert abs(p_hat - bound) == pytest.approx(z * math.sqrt(bound * (1 - bound) / n), rel=1e-9)


def test_wilson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(
    ("acc", "n", "noise"),
    [
        (0.55, 100, True),  # [0.452, 0.644] contains 0.5
        (0.60, 100, False),  # [0.502, 0.691] just excludes it
        (0.60, 50, True),  # same accuracy, fewer items: not distinguishable from chance
        (0.553, 500, False),  # the pick-shorter baseline on hh-rlhf (55.3% of 500) is a real effect
        (0.45, 100, True),  # symmetric below chance
        (0.30, 100, False),  # reliably worse than chance is also not noise
    ],
)
def test_is_within_noise(acc: float, n: int, noise: bool) -> None:
    assert is_within_noise(acc, n) is noise


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("probs", "outcomes", "n_bins", "expected"),
    [
        # Bins: [0,.1) {0.05: y=0} gap .05; [.1,.2) {0.15, 0.15: y=1,0} gap .35; [.9,1] {0.95, 1.0: y=1,1}
        # gap .025. ECE = 1/5*.05 + 2/5*.35 + 2/5*.025 = 0.16.
        ([0.05, 0.15, 0.15, 0.95, 1.0], [0, 1, 0, 1, 1], 10, 0.16),
        # Perfect calibration: 25% predicted, 1 of 4 happened.
        ([0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0], 10, 0.0),
        # Default outcomes (chosen always better), 5 bins: gaps 0.4 (p=.6) and 0.2 (p=.8) -> 0.3.
        ([0.6, 0.8], None, 5, 0.3),
        # One bin: mean prob .3 vs rate .5.
        ([0.2, 0.4], [1, 0], 1, 0.2),
    ],
)
def test_expected_calibration_error_hand_computed(probs, outcomes, n_bins: int, expected: float) -> None:
    assert expected_calibration_error(probs, outcomes, n_bins) == pytest.approx(expected)


def _ece_reference(probs: list[float], outcomes: list[int], n_bins: int) -> float:
    """Slow reference: loop over bins and items."""
    total = 0.0
    for i in range(n_bins):
        lower, upper = i / n_bins, (i + 1) / n_bins
        members = [(p, y) for p, y in zip(probs, outcomes)
                   if lower <= p < upper or (i == n_bins - 1 and p == 1.0)]
        if members:
            mean_p = sum(p for p, _ in members) / len(members)
            rate = sum(y for _, y in members) / len(members)
            total += len(members) / len(probs) * abs(rate - mean_p)
    return total


@pytest.mark.parametrize(("seed", "n_bins"), [(0, 10), (1, 15), (2, 3)])
def test_ece_matches_slow_reference(seed: int, n_bins: int) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.random(500).round(3).tolist()  # rounding puts some values exactly on bin edges
    outcomes = (rng.random(500) < np.asarray(probs) ** 2).astype(int).tolist()
    assert expected_calibration_error(probs, outcomes, n_bins) == pytest.approx(_ece_reference(probs, outcomes, n_bins))


def test_reliability_bins_edges_and_empty_bins() -> None:
    bins = reliability_bins([0.0, 0.3, 0.999, 1.0], [0, 1, 1, 0], n_bins=10)
    assert len(bins) == 10
    assert bins[0] == ReliabilityBin(lower=0.0, upper=0.1, count=1, mean_prob=0.0, outcome_rate=0.0)
    assert bins[3].count == 1  # 0.3 opens [0.3, 0.4)
    assert bins[9].count == 2 and bins[9].outcome_rate == 0.5  # 1.0 joins the last bin
    assert bins[5] == ReliabilityBin(lower=0.5, upper=0.6, count=0, mean_prob=None, outcome_rate=None)
    assert sum(b.count for b in bins) == 4


def test_reliability_png_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.beta(2, 1, 300)
    outcomes = (rng.random(300) < probs).astype(int)
    target = tmp_path / "plots" / "reliability.png"  # parent folder does not exist yet
    written = plot_reliability_diagram(reliability_bins(probs, outcomes), target, title="synthetic judge")
    assert written == target
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000  # a real drawing, not an empty canvas
    # Mostly-empty bins must not break the drawing.
    sparse = plot_reliability_diagram(reliability_bins([0.9, 0.95], [1, 1]), tmp_path / "sparse.png", "sparse")
    assert sparse.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------
# Shorter-answer baseline
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("ok", "a long answer")], 1.0),  # chosen is shorter
        ([("a long answer", "ok")], 0.0),  # chosen is longer
        ([("abc", "xyz")], 0.5),  # equal length: coin flip
        ([("a", "bb"), ("cc", "d"), ("ee", "ff"), ("g", "hhh")], 2.5 / 4),
    ],
)
def test_shorter_answer_baseline(pairs: list[tuple[str, str]], expected: float) -> None:
    assert shorter_answer_baseline([_example(c, r) for c, r in pairs]) == pytest.approx(expected)


def test_shorter_answer_baseline_on_real_hh_rows() -> None:
    examples = load_preferences(HH_SAMPLE)
    reference = sum(1.0 if len(e.chosen) < len(e.rejected) else 0.5 if len(e.chosen) == len(e.rejected) else 0.0
                    for e in examples) / len(examples)
    assert shorter_answer_baseline(examples) == pytest.approx(reference)
    with pytest.raises(ValueError, match="no examples"):
        shorter_answer_baseline([])


# --------------------------------------------------------------------------------------------
# Length-controlled win rate
# --------------------------------------------------------------------------------------------

def _synthetic(intercept: float, slope: float, n: int, seed: int, mean_diff: float = 0.0):
    rng = np.random.default_rng(seed)
    diffs = rng.normal(mean_diff, 400.0, n)
    x = np.tanh(diffs / diffs.std())
    probs = 1.0 / (1.0 + np.exp(-(intercept + slope * x)))
    return diffs, probs, rng


@pytest.mark.parametrize(
    ("intercept", "slope"),
    [
        (0.4, 1.5),  # better policy, longer answers also help
        (-1.0, 0.0),  # worse policy, no length effect
        (0.0, -2.0),  # even policy, judge prefers shorter answers
    ],
)
def test_lc_win_rate_recovers_intercept_from_soft_labels(intercept: float, slope: float) -> None:
    diffs, probs, _ = _synthetic(intercept, slope, 5_000, seed=0)
    result = length_controlled_win_rate(probs, diffs)
    assert result.converged
    assert result.intercept == pytest.approx(intercept, abs=2e-3)
    assert result.slope == pytest.approx(slope, abs=2e-3)
    assert result.win_rate == pytest.approx(1 / (1 + math.exp(-intercept)), abs=1e-3)


def test_lc_win_rate_recovers_intercept_from_hard_labels() -> None:
    diffs, probs, rng = _synthetic(0.4, 1.5, 20_000, seed=1)
    wins = (rng.random(probs.size) < probs).astype(float)
    result = length_controlled_win_rate(wins, diffs)
    assert result.intercept == pytest.approx(0.4, abs=0.06)
    assert result.slope == pytest.approx(1.5, abs=0.1)


def test_lc_win_rate_removes_a_pure_length_advantage() -> None:
    # An even policy (intercept 0) whose answers are usually longer, judged by a length-loving
    # judge: the raw win rate looks good, the length-controlled one is back at 50%.
    diffs, probs, _ = _synthetic(0.0, 2.0, 5_000, seed=2, mean_diff=300.0)
    result = length_controlled_win_rate(probs, diffs)
    assert result.raw_win_rate > 0.65
    assert result.win_rate == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("wins", "diffs", "expected_rate"),
    [
        ([0.7] * 10, [0.0] * 10, 0.7),  # no length variation: the slope is undefined, rate = mean
        ([0.0] * 10 + [1.0] * 10, list(np.arange(-10, 10) + 0.5), 0.5),  # length separates hard labels perfectly
        ([1.0] * 5, [1, 2, 3, 4, 5], 1.0),  # always wins: the limit, not an error
    ],
)
def test_lc_win_rate_degenerate_inputs(wins: list[float], diffs: list[float], expected_rate: float) -> None:
    result = length_controlled_win_rate(wins, diffs)
    assert result.win_rate == pytest.approx(expected_rate, abs=1e-6)
    assert math.isfinite(result.slope)


def test_lc_win_rate_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match="length_diffs has 2 entries but win_probs has 3"):
        length_controlled_win_rate([0.5, 0.5, 0.5], [1.0, 2.0])


def test_fit_logistic_reaches_a_stationary_point() -> None:
    # Reference check from the definition: at the optimum the penalized gradient vanishes.
    rng = np.random.default_rng(3)
    features = np.column_stack([np.ones(300), rng.normal(size=300), rng.normal(size=300)])  # (N, 3)
    targets = rng.random(300)
    beta, converged = fit_logistic(features, targets, l2=[0.0, SLOPE_L2, SLOPE_L2])
    p = 1 / (1 + np.exp(-features @ beta))
    gradient = features.T @ (p - targets) + np.array([0.0, SLOPE_L2, SLOPE_L2]) * beta
    assert converged
    assert np.max(np.abs(gradient)) < 1e-8
