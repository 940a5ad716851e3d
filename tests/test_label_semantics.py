"""The one label semantics every engine implements: P(the reply is exactly the label).

Pure tests on hand-built next-token distributions (`exact_label_scores` is what the OpenAI and
vLLM engines compute from top-k lists; `HFEngine` computes the same over the full vocabulary and
is checked against a stock model in test_hf_engine.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlaif.judge.engines.base import (EngineError, TopCandidate, boundary_logprob, ends_label, exact_label_scores,
                                label_distribution)

SCORES = [str(i) for i in range(1, 11)]


@pytest.mark.parametrize("label, following, labels, special, expected", [
    ("1", "0", SCORES, False, False),        # "10": another label
    ("1", "1", SCORES, False, False),        # "11": a longer number, not the label "1"
    ("1", ".", SCORES, False, True),         # "1." is the answer 1
    ("1", " out", SCORES, False, True),      # "1 out of 10"
    ("1", "/", SCORES, False, True),         # "1/10"
    ("1", "", SCORES, False, True),          # end of turn as servers render it
    ("1", "<|im_end|>", SCORES, True, True),  # special token
    ("A", "pple", ["A", "B"], False, False),  # "Apple" is not "A"
    ("A", "\n\nBecause", ["A", "B"], False, True),
    ("A", "\ufffd", ["A", "B"], False, False),  # a partial UTF-8 byte may be a letter: not counted
    ("A", "+", ["A", "A+"], False, False),   # spells the other label "A+"
    ("A", "++", ["A", "A+"], False, False),  # continues past "A+": still not "A"
    ("A", " ", ["A", "A+"], False, True),
])
def test_ends_label(label, following, labels, special, expected):
    assert ends_label(label, following, labels, special=special) is expected


def _fetcher(table: dict[str, list[tuple[str, float]]]):
    def fetch(prefix: str) -> list[TopCandidate]:
        return [TopCandidate(text=t, logprob=math.log(p), special=t == "") for t, p in table[prefix]]
    return fetch


def _score_table(p_first_one: float, p_zero_after_one: float) -> dict[str, list[tuple[str, float]]]:
    """First token "1" or "9"; after "1", "0" (-> "10") or the end of the reply."""
    table = {"": [("1", p_first_one), ("9", 1 - p_first_one)],
             "1": [("0", p_zero_after_one), ("", 1 - p_zero_after_one)] if 0 < p_zero_after_one < 1
             else [("0", 1.0)] if p_zero_after_one >= 1 else [("", 1.0)],
             "10": [("", 1.0)], "9": [("", 0.9), (".", 0.1)]}
    return table


def test_certain_ten_is_the_top_score():
    """The issue's case: P("0" | "1") ~ 1. The old definition gave "1" and "10" equal mass (score 5.5)."""
    scores = exact_label_scores(SCORES, _fetcher(_score_table(0.99, 0.999)))
    dist = label_distribution(scores[None, :])
    expected = float(dist.probs[0] @ np.arange(1, 11))
    assert dist.probs[0, 9] > 0.98 and dist.probs[0, 0] < 0.01
    assert expected > 9.9


@pytest.mark.parametrize("p_first_one", [0.3, 0.7, 0.99])
def test_score_is_monotone_in_the_probability_of_ten(p_first_one):
    """Shifting mass from "1" to "10" (P("0" | "1") up) must raise the expected score, strictly."""
    expected = []
    for r in np.linspace(0.01, 0.99, 15):
        dist = label_distribution(exact_label_scores(SCORES, _fetcher(_score_table(p_first_one, float(r))))[None, :])
        expected.append(float(dist.probs[0] @ np.arange(1, 11)))
        assert math.isclose(dist.probs[0, 0], p_first_one * (1 - r) / dist.mass[0], rel_tol=1e-9)
    assert all(b > a for a, b in zip(expected, expected[1:])), expected


def test_label_mass_counts_only_exact_replies():
    scores = exact_label_scores(["A", "B"], _fetcher({
        "": [("A", 0.5), ("B", 0.2), ("**", 0.3)],          # 30% open with markdown: no label
        "A": [("", 0.8), ("pple", 0.2)],                      # 20% of "A..." is "Apple"
        "B": [(".", 1.0)]}))
    dist = label_distribution(scores[None, :])
    assert math.isclose(dist.mass[0], 0.5 * 0.8 + 0.2)
    assert math.isclose(dist.probs[0, 0], 0.4 / 0.6)


def test_labels_reached_through_several_tokens_add_up():
    """" A" and "A" both start the reply with the label; "1" + "0" and a single "10" token both spell "10"."""
    scores = exact_label_scores(SCORES[:1] + ["10"], _fetcher({
        "": [("1", 0.4), ("10", 0.3), (" 1", 0.1)], "1": [("0", 0.5), ("", 0.5)], "10": [("", 1.0)]}))
    assert math.isclose(math.exp(scores[0]), (0.4 + 0.1) * 0.5)
    assert math.isclose(math.exp(scores[1]), (0.4 + 0.1) * 0.5 + 0.3)


def test_missing_label_gets_a_floor_below_everything_shown():
    scores = exact_label_scores(["A", "B"], _fetcher({"": [("A", 0.9), ("The", 0.05)], "A": [("", 1.0)]}))
    assert scores[1] < math.log(0.05)


def test_boundary_mass_is_a_lower_bound_from_what_is_shown():
    shown = [TopCandidate(text="", logprob=math.log(0.6), special=True), TopCandidate(text="0", logprob=math.log(0.3))]
    assert math.isclose(boundary_logprob("1", shown, SCORES), math.log(0.6))


def test_server_that_cannot_continue():
    first = {"": [("A", 0.7), ("B", 0.2)]}
    scores = exact_label_scores(["A", "B"], _fetcher(first), can_continue=False)
    np.testing.assert_allclose(np.exp(scores), [0.7, 0.2])  # P(end) = 1: the documented blind spot
    with pytest.raises(EngineError, match="prefix of another label"):
        exact_label_scores(SCORES, _fetcher(_score_table(0.9, 0.5)), can_continue=False)


def test_label_distribution_edge_cases():
    dist = label_distribution(np.array([[-math.inf, -math.inf], [math.log(0.2), math.log(0.2)]]))
    np.testing.assert_allclose(dist.probs, [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(dist.mass, [0.0, 0.4])


def test_duplicate_labels_are_refused():
    with pytest.raises(EngineError, match="distinct"):
        exact_label_scores(["A", " A"], _fetcher({"": [("A", 1.0)]}))
