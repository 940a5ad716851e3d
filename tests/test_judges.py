"""Judging mechanics: debiasing, ties, clamping, constitutions, CoT, scores and the cache.

The embedded 135M model is a weak judge (it answers "A" for nearly everything), so these
tests pin *mechanics* (invariants that hold for any model) on the real model, and use a small
scripted engine, implementing the engine protocol, only to force exact probabilities for
the tie/consistency/clamp rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from rlaif.judge.engines.base import GenerationParams, label_distribution, label_probs
from rlaif.judge.judges import PairwiseJudge, ScoreJudge
from rlaif.judge.rubric import RubricError, load_rubric, rubric_from_mapping
from rlaif.judge.types import ChatPrompt, PairwiseItem, Preference, ScoreItem

ITEMS = [
    PairwiseItem(prompt="What is the capital of France?", response_a="Paris.", response_b="I am not sure, maybe Lyon."),
    PairwiseItem(prompt="Write a haiku about rain.", response_a="Rain taps the window\nsoft drums on a sleepy town\npuddles hold the sky",
                 response_b="Rain is water falling from clouds."),
    PairwiseItem(prompt="How many legs does a spider have?", response_a="Six.", response_b="Spiders have eight legs."),
]


class ScriptedEngine:
    """Deterministic engine: P(first label) depends only on which response is shown first.

    `first_prob[text]` is the probability the engine gives to label[0] when `text` is the
    response shown first; the labels together get `mass` (what a real judge leaves on other
    replies). Generation echoes a fixed rationale and records its calls.
    """

    engine_id = "scripted"
    model_name = "scripted"
    context_length = 4096
    special_tokens = ("<|im_end|>",)

    def __init__(self, first_prob: dict[str, float], mass: float = 0.8):
        self.first_prob = first_prob
        self.mass = mass
        self.label_calls = 0
        self.generate_calls = 0

    def label_logprobs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        self.label_calls += 1
        rows = []
        for prompt in prompts:
            text = "\n".join(m["content"] for m in prompt)
            first = text.split("<response_a>\n", 1)[1].split("\n</response_a>", 1)[0]
            p = self.first_prob[first]
            rows.append([p * self.mass, (1 - p) * self.mass] + [0.0] * (len(labels) - 2))
        with np.errstate(divide="ignore"):
            return np.log(np.asarray(rows))

    def prompt_token_counts(self, prompts: Sequence[ChatPrompt]) -> list[int]:
        return [sum(len(m["content"]) for m in p) for p in prompts]

    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        self.generate_calls += 1
        return [["Because reasons."] * params.n for _ in prompts]


def _item(a: str, b: str) -> PairwiseItem:
    return PairwiseItem(prompt="q", response_a=a, response_b=b)


@pytest.mark.parametrize(
    ("probs", "expected_prob_a", "consistent", "preference"),
    [
        # A shown first -> 0.9 for A; B shown first -> 0.2 for B (so 0.8 for A): both prefer A.
        ({"a": 0.9, "b": 0.2}, 0.85, True, Preference.A),
        # Pure position bias: whatever is first wins with 0.9 -> orders disagree -> tie at 0.5.
        ({"a": 0.9, "b": 0.9}, 0.5, False, Preference.TIE),
        # Consistent but nearly indifferent: within the 0.05 tie margin -> tie.
        ({"a": 0.53, "b": 0.49}, 0.52, True, Preference.TIE),
        # Both orders prefer B.
        ({"a": 0.3, "b": 0.8}, 0.25, True, Preference.B),
    ],
)
def test_debiasing_and_tie_rules(probs, expected_prob_a, consistent, preference):
    judge = PairwiseJudge(ScriptedEngine(probs), "helpfulness", tie_margin=0.05)
    result = judge.judge([_item("a", "b")])[0]
    assert math.isclose(result.prob_a, expected_prob_a, abs_tol=1e-9)
    assert result.consistent is consistent
    assert result.preference is preference
    assert [o.order for o in result.per_order] == ["ab", "ba"]
    assert math.isclose(result.per_order[0].prob_first, probs["a"])
    assert math.isclose(result.per_order[1].prob_first, probs["b"])


def test_label_mass_is_reported_per_order_and_averaged():
    engine = ScriptedEngine({"a": 0.9, "b": 0.2}, mass=0.3)
    result = PairwiseJudge(engine, "helpfulness").judge([_item("a", "b")])[0]
    assert math.isclose(result.label_mass, 0.3) and all(math.isclose(o.label_mass, 0.3) for o in result.per_order)
    # Normalization over the labels is unaffected by the mass.
    assert math.isclose(result.per_order[0].prob_first, 0.9)


def test_item_token_counts_cover_the_longest_order():
    engine = ScriptedEngine({"short": 0.5, "a much longer response": 0.5})
    judge = PairwiseJudge(engine, "helpfulness")
    item = _item("short", "a much longer response")
    counts = judge.item_token_counts([item, _item("short", "short")])
    rendered = judge._prompts_for([item])
    assert counts[0] == max(engine.prompt_token_counts(rendered)) + 3  # + the label and its ending token
    assert counts[0] > counts[1]


def test_one_engine_call_for_a_whole_batch():
    engine = ScriptedEngine({"a": 0.9, "b": 0.2, "c": 0.6})
    judge = PairwiseJudge(engine, "constitution")
    judge.judge([_item("a", "b"), _item("b", "c"), _item("c", "a")])
    assert engine.label_calls == 1, "all items, both orders and all principles go to the engine together"


def test_clamp_limits_each_order():
    judge = PairwiseJudge(ScriptedEngine({"a": 0.99, "b": 0.01}), "helpfulness", clamp=(0.4, 0.6))
    result = judge.judge([_item("a", "b")])[0]
    assert math.isclose(result.per_order[0].prob_first, 0.6) and math.isclose(result.per_order[1].prob_first, 0.4)
    assert math.isclose(result.prob_a, 0.6)


def test_cot_two_step_with_self_consistency():
    rubric = load_rubric("helpfulness-cot")
    hot = rubric.model_copy(update={"cot": rubric.cot.model_copy(update={"temperature": 0.7, "samples": 3})})
    engine = ScriptedEngine({"a": 0.9, "b": 0.2})
    result = PairwiseJudge(engine, hot, mode="cot").judge([_item("a", "b")])[0]
    assert engine.generate_calls == 1 and engine.label_calls == 1
    assert result.rationale == "Because reasons." and result.mode == "cot"
    assert math.isclose(result.prob_a, 0.6)  # clamped to [0.4, 0.6] by the CoT rubric


def test_mode_and_kind_checks():
    engine = ScriptedEngine({})
    with pytest.raises(RubricError, match="no 'cot' section"):
        PairwiseJudge(engine, "helpfulness", mode="cot")
    with pytest.raises(RubricError, match="score rubric"):
        PairwiseJudge(engine, "score-1-10")
    with pytest.raises(RubricError, match="pairwise rubric"):
        ScoreJudge(engine, "helpfulness")


# ---------------------------------------------------------------- real embedded model


def test_real_model_invariants(default_engine):
    judge = PairwiseJudge(default_engine, "helpfulness")
    results = judge.judge(ITEMS)
    assert len(results) == len(ITEMS)
    for result in results:
        assert 0.0 <= result.prob_a <= 1.0
        assert math.isclose(result.margin, abs(result.prob_a - 0.5) * 2)
        assert math.isclose(result.prob_a, (result.per_order[0].prob_a + result.per_order[1].prob_a) / 2)
        assert math.isclose(result.per_order[1].prob_a, 1 - result.per_order[1].prob_first)
        assert result.engine == default_engine.engine_id and result.rubric_id == "helpfulness"
        assert result.timings.batch_size == len(ITEMS) and result.timings.engine_seconds > 0


def test_real_model_per_order_verdicts_come_from_their_own_prompts(default_engine):
    """Each order's probability is the engine's label distribution on *that* order's rendered prompt.

    Rendered here independently (with the engine's special tokens defused, as the judge must), so a
    judge that mixed up orders, rendered differently or read the wrong label would fail."""
    rubric = load_rubric("helpfulness")
    results = PairwiseJudge(default_engine, rubric).judge(ITEMS)
    specials = default_engine.special_tokens
    for item, result in zip(ITEMS, results):
        ab = rubric.render(prompt=item.prompt, response_a=item.response_a, response_b=item.response_b,
                           special_tokens=specials)
        ba = rubric.render(prompt=item.prompt, response_a=item.response_b, response_b=item.response_a,
                           special_tokens=specials)
        dist = label_distribution(default_engine.label_logprobs([ab, ba], rubric.labels))
        assert abs(result.per_order[0].prob_first - dist.probs[0, 0]) < 1e-4
        assert abs(result.per_order[1].prob_first - dist.probs[1, 0]) < 1e-4
        assert abs(result.label_mass - dist.mass.mean()) < 1e-4
    # Premise that makes the comparison meaningful: the two orders really differ for this model.
    assert any(abs(r.per_order[0].prob_first - r.per_order[1].prob_first) > 1e-3 for r in results)


def test_real_model_batch_equals_single(default_engine):
    judge = PairwiseJudge(default_engine, "helpfulness")
    batched = judge.judge(ITEMS)
    for item, expected in zip(ITEMS, batched):
        single = judge.judge([item])[0]
        assert abs(single.prob_a - expected.prob_a) < 1e-4


def test_real_model_cache_hits_skip_engine(default_engine, judgment_cache):
    class CountingEngine:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.engine_id, self.model_name = inner.engine_id, inner.model_name
            self.special_tokens = inner.special_tokens

        def label_logprobs(self, prompts, labels):
            self.calls += 1
            return self.inner.label_logprobs(prompts, labels)

        def generate(self, prompts, params):
            return self.inner.generate(prompts, params)

    engine = CountingEngine(default_engine)
    judge = PairwiseJudge(engine, "helpfulness", cache=judgment_cache)
    first = judge.judge(ITEMS[:2])
    assert engine.calls == 1 and not any(r.cached for r in first)
    again = judge.judge(ITEMS)  # two hits, one miss
    assert engine.calls == 2
    assert [r.cached for r in again] == [True, True, False]
    assert again[0].prob_a == first[0].prob_a
    # Another rubric version must not hit the old entries.
    other = rubric_from_mapping({**load_rubric("helpfulness").model_dump(exclude={"source"}), "version": "2"})
    PairwiseJudge(engine, other, cache=judgment_cache).judge(ITEMS[:1])
    assert engine.calls == 3


def test_real_model_constitution_averages_principles(default_engine):
    rubric = load_rubric("constitution")
    judge = PairwiseJudge(default_engine, rubric, seed=7)
    result = judge.judge(ITEMS[:1])[0]
    assert result.principles is not None and len(result.principles) == rubric.principles_per_comparison
    # Re-computing each principle alone and averaging reproduces the judgment.
    singles = []
    for principle in result.principles:
        one = rubric_from_mapping({**rubric.model_dump(exclude={"source"}), "principles": [principle],
                                   "principles_per_comparison": None})
        singles.append(PairwiseJudge(default_engine, one).judge(ITEMS[:1])[0].per_order[0].prob_first)
    assert abs(np.mean(singles) - result.per_order[0].prob_first) < 1e-4


def test_real_model_cot_mode_produces_rationale(default_engine):
    rubric = load_rubric("helpfulness-cot")
    short = rubric.model_copy(update={"cot": rubric.cot.model_copy(update={"max_new_tokens": 12})})
    result = PairwiseJudge(default_engine, short, mode="cot").judge(ITEMS[:1])[0]
    assert result.rationale and result.per_order[1].rationale
    # Step 2 read independently: the label distribution after the stored rationale, clamped.
    item = ITEMS[0]
    first = short.render_cot(prompt=item.prompt, response_a=item.response_a, response_b=item.response_b,
                             special_tokens=default_engine.special_tokens)
    follow_up = short.render_cot_label(first, result.per_order[0].rationale)
    unclamped = float(label_probs(default_engine, [follow_up], short.labels)[0, 0])
    assert abs(result.per_order[0].prob_first - float(np.clip(unclamped, *short.clamp))) < 1e-4


def test_real_model_score_judge(default_engine):
    judge = ScoreJudge(default_engine, "score-1-10")
    results = judge.judge([ScoreItem(prompt=i.prompt, response=i.response_a) for i in ITEMS])
    for result in results:
        assert math.isclose(sum(result.distribution.values()), 1.0, abs_tol=1e-6)
        expected = sum(float(k) * v for k, v in result.distribution.items())
        assert math.isclose(result.expected_score, expected, rel_tol=1e-9)
        assert math.isclose(result.score, (expected - 1) / 9)
        assert result.label == max(result.distribution, key=result.distribution.get)
