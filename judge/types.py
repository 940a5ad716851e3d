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
    rationale: str | None = None
    rubric_id: str
    rubric_version: str
    engine: str
    model: str
    mode: Literal["logprob", "cot"]
    cached: bool = False
    timings: Timings = Field(default_factory=Timings)
