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


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PairwiseItem(_Frozen):
    """One comparison: which of two responses better answers `prompt`."""

    prompt: str
    response_a: str
    response_b: str


class ScoreItem(_Frozen):
    """One response to grade on its own (d-RLAIF direct scoring)."""

    prompt: str
    response: str


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
