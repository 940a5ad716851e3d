"""HTTP request/response models shared by the server (`rlaif.service.app`) and the client (`rlaif.service.client`).

One module, one source of truth: the server validates requests and serializes responses with
these classes, the client builds requests and parses responses with the same ones, and the
OpenAPI schema at `/openapi.json` is generated from them.

Imports stay light on purpose (pydantic, the stdlib and `rlaif.judge.types`, which imports only
pydantic): a trainer on another machine installs `httpx` + `pydantic` and can call the judge
without torch. Judgments reuse `rlaif.judge.types.PairwiseJudgment` / `ScoreJudgment` as they are.

Conventions:
- requests forbid unknown fields (a typo such as `"rubirc"` is a 422, not silently ignored);
  responses ignore unknown fields, so an older client keeps working against a newer server;
- closed choices are `Literal`s, so they appear as enums in the schema;
- size limits (`max_items`, `max_chars`) are server settings, enforced by the serving layer
  with a 413 that names the limit; the schema only carries the fixed invariants.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from rlaif.judge.types import ChecklistJudgment, GroupJudgment, PairwiseJudgment, ScoreJudgment

JudgeMode = Literal["logprob", "cot"]
"""`logprob`: read the label distribution directly; `cot`: generate a rationale first (RLAIF §2.1)."""

RewardMode = Literal["score", "pairwise", "checklist", "reward_model"]
"""How `/v1/rewards` turns an item into a reward (see `RewardsRequest.mode`)."""

RewardScale = Literal["unit", "signed"]
"""`unit`: judge rewards in [0, 1]; `signed`: 2r - 1 in [-1, 1] (d-RLAIF's range)."""

ChecklistMode = Literal["explicit", "implicit"]
"""`explicit`: one yes/no question per criterion, weighted mean of P(yes); `implicit`: the whole checklist in one score prompt."""

GroupMethod = Literal["listwise", "round_robin"]
"""`listwise`: the group in one prompt, averaged over seeded orders; `round_robin`: all pairs + Bradley-Terry."""

MAX_CRITERIA = 64
"""Most criteria one item may carry (each is one engine question in explicit mode)."""

MAX_GROUP = 64
"""Most responses one group may hold."""


def _valid_unicode(text: str) -> str:
    # JSON may carry "\ud800" escapes that decode to unpaired surrogates; they cannot be
    # tokenized or re-encoded as UTF-8, so they are rejected here as a 422 instead of failing later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text contains an unpaired surrogate at position {exc.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""Any valid Unicode string; may be empty (a policy can emit an empty response)."""

PromptText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
"""A non-empty prompt: judging an answer to nothing is meaningless."""

RubricRef = Annotated[str, Field(min_length=1, max_length=200,
                                 description="Id of a rubric this service serves (GET /v1/rubrics); unset = the service default.")]


class ApiModel(BaseModel):
    """Shared base of every request and response body. Requests reject unknown fields."""

    model_config = ConfigDict(extra="forbid")


class ApiResponse(ApiModel):
    """Base of response bodies: unknown fields are ignored so old clients survive new fields."""

    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------- items
ReferenceAnswer = Annotated[Text | None, Field(description=(
    "A reference answer for reference-guided rubrics (`correctness`, `correctness-pairwise`; checklist and group "
    "rubrics show it when given). A rubric that never shows a reference refuses it (422)."))]


class PairwiseRequestItem(ApiModel):
    """One comparison: which of two responses better answers `prompt`."""

    prompt: PromptText
    response_a: Text
    response_b: Text
    reference: ReferenceAnswer = None


class ScoreRequestItem(ApiModel):
    """One response to grade on its own."""

    prompt: PromptText
    response: Text
    reference: ReferenceAnswer = None


class CriterionRequest(ApiModel):
    """One checklist criterion: a yes/no statement a good response satisfies, and its weight."""

    text: PromptText = Field(description="What a good response does, phrased so that yes is good.")
    weight: float = Field(1.0, gt=0, le=1000, description="Relative importance (score = sum w*P(yes) / sum w).")


Criteria = Annotated[list[CriterionRequest], Field(min_length=1, max_length=MAX_CRITERIA)]


class ChecklistRequestItem(ApiModel):
    """One response graded against its prompt's own checklist."""

    prompt: PromptText
    response: Text
    criteria: Criteria
    reference: ReferenceAnswer = None


class GroupRequestItem(ApiModel):
    """All the responses to one prompt (a GRPO / RLOO group), judged relative to each other."""

    prompt: PromptText
    responses: list[Text] = Field(min_length=2, max_length=MAX_GROUP, description="The group, in your order.")
    reference: ReferenceAnswer = None


class RewardRequestItem(ApiModel):
    """One policy sample to reward. `reference` is needed by `mode="pairwise"` only, `criteria` by `mode="checklist"`."""

    prompt: PromptText
    response: Text
    reference: Text | None = Field(None, description="Baseline response the sample is compared against (pairwise mode).")
    reference_answer: ReferenceAnswer = None
    criteria: Criteria | None = Field(None, description="The prompt's checklist (mode='checklist').")


# ------------------------------------------------------------------------------- judging
class PairwiseRequest(ApiModel):
    """POST /v1/judge/pairwise."""

    items: list[PairwiseRequestItem] = Field(min_length=1, description="Comparisons to judge (at most the server's max_items).")
    rubric: RubricRef | None = None
    mode: JudgeMode = "logprob"


class PairwiseResponse(ApiResponse):
    judgments: list[PairwiseJudgment] = Field(description="One judgment per item, in request order.")


class ScoreRequest(ApiModel):
    """POST /v1/judge/score."""

    items: list[ScoreRequestItem] = Field(min_length=1, description="Responses to score (at most the server's max_items).")
    rubric: RubricRef | None = None
    mode: JudgeMode = "logprob"


class ScoreResponse(ApiResponse):
    judgments: list[ScoreJudgment] = Field(description="One judgment per item, in request order.")


class ChecklistRequest(ApiModel):
    """POST /v1/judge/checklist."""

    items: list[ChecklistRequestItem] = Field(min_length=1, description="Responses with their checklists (at most max_items).")
    rubric: RubricRef | None = Field(None, description="Unset: `checklist` (explicit) or `checklist-implicit` (implicit).")
    checklist_mode: ChecklistMode = "explicit"


class ChecklistResponse(ApiResponse):
    judgments: list[ChecklistJudgment] = Field(description="One judgment per item, in request order.")


# ------------------------------------------------------------------------------- rewards
class RewardsRequest(ApiModel):
    """POST /v1/rewards: the trainer-facing batch call."""

    items: list[RewardRequestItem] = Field(min_length=1, description="Samples to reward (at most the server's max_items).")
    mode: RewardMode = Field("score", description=(
        "`score`: the judge's rescaled direct score of each response (d-RLAIF); "
        "`pairwise`: P(response beats `reference`), both orders averaged; "
        "`reward_model`: the served distilled reward model's raw score (needs `rlaif serve --reward-model`)."))
    rubric: RubricRef | None = None
    judge_mode: JudgeMode = "logprob"
    checklist_mode: ChecklistMode = Field("explicit", description="mode='checklist' only.")
    scale: RewardScale = Field("unit", description="Judge modes only: `unit` = [0, 1], `signed` = [-1, 1].")


class RewardDetail(ApiResponse):
    """Why an item got its reward: the underlying judgment or reward-model score."""

    reward: float
    score: ScoreJudgment | None = None
    pairwise: PairwiseJudgment | None = None
    checklist: ChecklistJudgment | None = None
    reward_model_score: float | None = None


class RewardsResponse(ApiResponse):
    rewards: list[float] = Field(description="One reward per item, in request order.")
    details: list[RewardDetail]
    mode: RewardMode
    rubric_id: str | None = Field(None, description="Rubric used (judge modes).")
    model: str = Field(description="Judge model or reward-model directory that produced the rewards.")


class GroupRewardsRequest(ApiModel):
    """POST /v1/rewards/group: group-relative rewards for GRPO / RLOO (every response of a prompt judged together)."""

    groups: list[GroupRequestItem] = Field(min_length=1, description=(
        "Groups to judge; the total number of responses counts against the server's max_items."))
    method: GroupMethod = Field("listwise", description=(
        "`listwise`: the group in one prompt, scores averaged over `orders` seeded presentation orders; "
        "`round_robin`: every pair in both orders, Bradley-Terry fit on the soft labels."))
    orders: int = Field(4, ge=1, le=32, description="listwise: presentation orders averaged (cost grows linearly).")
    seed: int = Field(0, ge=0, description="Seed of the presentation orders (part of the cache key).")
    rubric: RubricRef | None = Field(None, description="Unset: `group-listwise` (listwise) or the service's pairwise default.")
    scale: RewardScale = "unit"


class GroupRewardsResponse(ApiResponse):
    rewards: list[list[float]] = Field(description="Per group, one reward per response, in request order.")
    judgments: list[GroupJudgment] = Field(description="Per group: scores, per-order spread or win matrix.")
    method: GroupMethod
    rubric_id: str
    model: str


class GetRewardRequest(ApiModel):
    """POST /get_reward: OpenRLHF's remote reward-model protocol (`--remote_rm_url`).

    `query[i]` is the prompt followed by the generated response (as OpenRLHF decodes it);
    `prompts[i]` is the prompt alone, so the response is `query[i]` minus that prefix.
    Extra fields that some OpenRLHF versions add are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    query: list[Text] = Field(min_length=1, description="prompt + response strings.")
    prompts: list[Text] = Field(description="The prompt of each query; must be its prefix (see docs/service.md).")
    labels: list[JsonValue] | None = Field(None, description="Accepted for compatibility and ignored by the judge.")


class GetRewardResponse(ApiResponse):
    rewards: list[float] = Field(description="Judge: rescaled score in [0, 1]. Reward model: its raw score.")
    scores: list[float] = Field(description="In [0, 1] for OpenRLHF's dynamic filtering: the judge score, or sigmoid(reward-model score).")
    extra_logs: dict[str, list[float]] = Field(description="Per-sample values OpenRLHF logs (averaged) next to the reward.")


# ------------------------------------------------------------------------------- rubrics
class CoTInfo(ApiResponse):
    instruction: str
    label_request: str
    max_new_tokens: int
    temperature: float
    samples: int


class RubricInfo(ApiResponse):
    """A rubric this service serves."""

    id: str
    version: str
    kind: Literal["pairwise", "score", "checklist", "group"]
    description: str
    labels: list[str]
    modes: list[JudgeMode] = Field(description="Judge modes the rubric supports.")
    default: bool = Field(description="The default rubric of its kind on this service.")


class RubricDetail(RubricInfo):
    """A rubric's full text, so callers can see exactly what the judge is asked."""

    system: str | None
    template: str
    answer_instruction: str
    label_values: list[float] | None
    principles: list[str] | None
    principles_per_comparison: int | None
    cot: CoTInfo | None
    clamp: tuple[float, float] | None


class RubricList(ApiResponse):
    rubrics: list[RubricInfo]


# -------------------------------------------------------------------------------- status
class HealthResponse(ApiResponse):
    status: Literal["ok"] = "ok"


class ReadyResponse(ApiResponse):
    ready: bool
    status: Literal["loading", "ready", "failed", "stopping"]
    engine: str | None = Field(None, description="Engine identity once loaded.")
    model: str | None = None
    reward_model: str | None = Field(None, description="Served reward-model directory, when configured.")
    message: str | None = Field(None, description="Why the service is not ready (load failure).")


class ErrorDetail(ApiResponse):
    loc: str = Field(description="Where in the request, e.g. `items.3.prompt`.")
    message: str
    type: str


class ErrorResponse(ApiResponse):
    """The one error body every non-2xx response carries."""

    status: int = Field(description="The HTTP status, repeated for logs that drop it.")
    code: str = Field(description="Stable machine-readable code: bad_request, unauthorized, rubric_not_found, "
                                  "payload_too_large, invalid_request, queue_full, engine_failed, not_ready, timeout, ...")
    message: str = Field(description="What went wrong and how to fix it.")
    details: list[ErrorDetail] | None = Field(None, description="Per-field problems (validation errors).")
