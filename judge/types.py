"""Typed data shared by every judge: inputs, verdicts and timings.

These pydantic models are the judge's public contract. The service returns them as
JSON, the labeling job writes them to datasets, and the trainer turns them into
rewards, so field names here are part of the HTTP API as well.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ChatMessage = dict[str, str]
"""One chat turn, `{"role": "system"|"user"|"assistant", "content": str}` (HF and OpenAI shape)."""

ChatPrompt = list[ChatMessage]
"""A whole conversation handed to an engine; the engine applies its own chat template."""


LOW_LABEL_MASS = 0.5
"""Below this label mass a judgment mostly reflects what the judge would say *if* it had to pick a
label, not what it actually says (e.g. a model that opens with "<think>" or "**A**"); summaries warn."""


def low_label_mass_warning(mean_mass: float | None) -> str | None:
    """The warning summaries print when the judge's mean label mass is below `LOW_LABEL_MASS`."""
    if mean_mass is None or mean_mass >= LOW_LABEL_MASS:
        return None
    return (f"mean label mass is {mean_mass:.2f} (< {LOW_LABEL_MASS}): the judge rarely answers with exactly one of the "
            "rubric's labels (a reasoning preamble, markdown around the label, or prose), so its normalized "
            "probabilities rest on little of its probability; check the rubric's answer instruction or use a judge "
            "that follows it")


class Preference(str, enum.Enum):
    """Which response a pairwise judgment prefers. A tie is a first-class outcome, not NaN."""

    A = "A"
    B = "B"
    TIE = "TIE"


def order_verdict(prob_a_ab: float, prob_a_ba: float, prob_a: float, tie_margin: float) -> tuple[bool, Preference]:
    """(consistent, preference) of a pair judged in both orders: the one TIE rule every verdict uses.

    `prob_a_ab` / `prob_a_ba` are P(response_a better) from each presentation order, `prob_a` the
    debiased (or calibrated) probability. Consistent = both orders prefer the same response; the
    preference is TIE when they disagree or `prob_a` is within `tie_margin` of 0.5."""
    consistent = (prob_a_ab > 0.5) == (prob_a_ba > 0.5)
    if not consistent or abs(prob_a - 0.5) < tie_margin:
        return consistent, Preference.TIE
    return consistent, Preference.A if prob_a > 0.5 else Preference.B


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


REFERENCE_DESCRIPTION = ("A reference answer (user text, delimited like a response) that reference-guided rubrics "
                         "(`correctness`, `correctness-pairwise`) grade against; None = no reference.")


class PairwiseItem(_Frozen):
    """One comparison: which of two responses better answers `prompt`."""

    prompt: str
    response_a: str
    response_b: str
    reference: str | None = Field(None, description=REFERENCE_DESCRIPTION)


class ScoreItem(_Frozen):
    """One response to grade on its own (d-RLAIF direct scoring)."""

    prompt: str
    response: str
    reference: str | None = Field(None, description=REFERENCE_DESCRIPTION)


class Criterion(_Frozen):
    """One checklist item of a per-prompt rubric (Rubrics as Rewards): a yes/no property of a good response.

    Phrase every criterion so that "yes" is good ("The response avoids jargon", not "uses jargon"):
    weights are positive, and the checklist score is the weighted mean of P(yes)."""

    text: str = Field(min_length=1, description="What a good response does, as a yes/no statement (user text).")
    weight: float = Field(1.0, gt=0, le=1000, description="Relative importance; the score is sum w*P(yes) / sum w.")


class ChecklistItem(_Frozen):
    """One response graded against its prompt's own checklist (and optionally a reference answer)."""

    prompt: str
    response: str
    criteria: tuple[Criterion, ...] = Field(min_length=1, description="The prompt's checklist.")
    reference: str | None = Field(None, description=REFERENCE_DESCRIPTION)


class GroupItem(_Frozen):
    """All the responses to one prompt, judged relative to each other (GRPO / RLOO groups)."""

    prompt: str
    responses: tuple[str, ...] = Field(min_length=2, description="The group: at least two responses to `prompt`.")
    reference: str | None = Field(None, description=REFERENCE_DESCRIPTION)


class Timings(BaseModel):
    """Where the time went for the batch this judgment was part of."""

    engine_seconds: float = Field(0.0, description="Time spent inside engine calls for the whole batch.")
    total_seconds: float = Field(0.0, description="Wall time of the whole judge call (batch).")
    batch_size: int = Field(1, description="Number of items judged together in that call.")


class OrderJudgment(BaseModel):
    """The judge's verdict for one presentation order of a pair."""

    order: Literal["ab", "ba"] = Field(description="'ab': response_a shown first; 'ba': swapped.")
    prob_first: float = Field(description="P(the response shown first is better).")
    prob_a: float = Field(description="The same verdict expressed as P(response_a is better).")
    label_mass: float = Field(description=(
        "P(the judge's reply is exactly one of the labels) before normalizing over them, averaged over "
        "principles / CoT samples. Low values mean the verdict rests on little probability."))
    rationale: str | None = Field(None, description="CoT rationale(s) produced before the label (CoT mode).")
    raw_prob_first: float | None = Field(None, description=(
        "With a calibration: `prob_first` as the uncalibrated judge gave it (None when uncalibrated)."))


class PairwiseJudgment(BaseModel):
    """A position-debiased soft preference between `response_a` and `response_b`.

    `prob_a` is the average of the two presentation orders (RLAIF §2.1); `consistent`
    says whether both orders prefer the same response; `preference` is TIE when the
    orders disagree or the averaged probability is within the tie margin of 0.5.
    """

    prob_a: float = Field(description="Debiased P(response_a is better), averaged over both orders.")
    preference: Preference
    consistent: bool = Field(description="Both presentation orders prefer the same response.")
    margin: float = Field(description="|prob_a - 0.5| * 2, in [0, 1]: how decisive the judgment is.")
    label_mass: float = Field(description=(
        "Mean over both orders of P(reply is exactly a label) before normalization (see OrderJudgment)."))
    per_order: list[OrderJudgment]
    principles: list[str] | None = Field(None, description="Constitution principles used (constitution rubrics).")
    rationale: str | None = Field(None, description="Rationale of the first order (CoT mode).")
    rubric_id: str
    rubric_version: str
    engine: str
    model: str
    mode: Literal["logprob", "cot"]
    calibration: str | None = Field(None, description=(
        "Id of the calibration applied (`rlaif calibrate`); None = the judge's own probabilities."))
    raw_prob_a: float | None = Field(None, description="With a calibration: the uncalibrated `prob_a`.")
    raw_consistent: bool | None = Field(None, description="With a calibration: the uncalibrated `consistent`.")
    cached: bool = False
    timings: Timings = Field(default_factory=Timings)


class ScoreJudgment(BaseModel):
    """A direct score: a distribution over the rubric's score labels and its expectation.

    `score` rescales the expected score to [0, 1] (min label -> 0, max label -> 1), which is
    the d-RLAIF reward before any further centering.
    """

    score: float = Field(description="Expected score rescaled to [0, 1].")
    expected_score: float = Field(description="Sum of value * P(label) on the rubric's own scale.")
    label: str = Field(description="Most likely score label.")
    distribution: dict[str, float] = Field(description="P(label) for every score label, sums to 1.")
    label_mass: float = Field(description=(
        "P(the judge's reply is exactly one of the score labels) before normalizing over them."))
    rationale: str | None = None
    rubric_id: str
    rubric_version: str
    engine: str
    model: str
    mode: Literal["logprob", "cot"]
    cached: bool = False
    timings: Timings = Field(default_factory=Timings)


class CriterionJudgment(BaseModel):
    """The judge's yes/no verdict on one checklist criterion."""

    text: str
    weight: float
    prob_yes: float = Field(description="P(yes | the reply is yes or no), from the label log-probs.")
    label_mass: float = Field(description="P(the reply is exactly yes or no) before normalizing.")


class ChecklistJudgment(BaseModel):
    """A response graded against a per-item checklist.

    `explicit` mode asks one yes/no question per criterion: `score` = sum_i w_i P_i(yes) / sum_i w_i
    and `weighted_sum` = sum_i w_i P_i(yes), with the per-criterion breakdown in `criteria`.
    `implicit` mode shows the whole checklist in one score prompt: `score` is that prompt's rescaled
    expected score, `weighted_sum` = score * sum_i w_i, and `criteria` is None.
    """

    score: float = Field(description="In [0, 1]: weighted mean of P(yes) (explicit) or the rescaled score (implicit).")
    weighted_sum: float = Field(description="sum_i w_i P_i(yes) (explicit); score * sum_i w_i (implicit).")
    checklist_mode: Literal["explicit", "implicit"]
    criteria: list[CriterionJudgment] | None = Field(None, description="Explicit mode: one verdict per criterion, in order.")
    distribution: dict[str, float] | None = Field(None, description="Implicit mode: P(label) of the score labels.")
    label_mass: float = Field(description="Mean label mass over the item's engine prompts.")
    rubric_id: str
    rubric_version: str
    engine: str
    model: str
    mode: Literal["logprob", "cot"] = "logprob"
    cached: bool = False
    timings: Timings = Field(default_factory=Timings)


class GroupJudgment(BaseModel):
    """Relative scores of a group of responses to one prompt, in the group's input order.

    `listwise`: the whole group is shown in one prompt and every response gets a score label
    distribution there, in `orders` seeded random presentation orders; `scores` is the mean over
    orders of each response's rescaled expected score, `per_order` the scores of each order and
    `order_spread` their standard deviation per response (how much the position moved it).
    `round_robin`: every pair is judged in both orders with a pairwise rubric; `win_matrix[i][j]`
    = P(i beats j) and a Bradley-Terry fit gives `strengths`; `scores[i]` = mean over j != i of
    sigmoid(strength_i - strength_j), the expected win rate of i against the group, in [0, 1].
    """

    scores: list[float] = Field(description="One score in [0, 1] per response, input order.")
    method: Literal["listwise", "round_robin"]
    orders: int = Field(description="Listwise: presentation orders averaged; round robin: ordered pairs judged.")
    seed: int
    per_order: list[list[float]] | None = Field(None, description="Listwise: scores[k][i] of order k (input indexing).")
    order_spread: list[float] | None = Field(None, description="Listwise: std over orders of each response's score.")
    presentation: list[list[int]] | None = Field(None, description="Listwise: each order as a list of input indices.")
    win_matrix: list[list[float]] | None = Field(None, description="Round robin: P(i beats j), both orders averaged; 0.5 on the diagonal.")
    strengths: list[float] | None = Field(None, description="Round robin: Bradley-Terry log-strengths (mean 0).")
    label_mass: float = Field(description="Mean label mass over the group's engine prompts.")
    rubric_id: str
    rubric_version: str
    engine: str
    model: str
    mode: Literal["logprob", "cot"] = "logprob"
    cached: bool = False
    timings: Timings = Field(default_factory=Timings)
