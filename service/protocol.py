"""Re-export of `rlaif.judge.api.protocol`, the service's wire models, under the name it has always had.

The wire contract (request/response models and the httpx client) lives one layer down, in
`rlaif.judge.api`, because the labeling jobs in `rlaif.judge.labeling` call a judge service
too and the layers only import downward (README "Layout"). Import from either place.
"""

from rlaif.judge.api.protocol import (  # noqa: F401 - re-exported names
    ApiModel as ApiModel,
    ApiResponse as ApiResponse,
    ChecklistMode as ChecklistMode,
    ChecklistRequest as ChecklistRequest,
    ChecklistRequestItem as ChecklistRequestItem,
    ChecklistResponse as ChecklistResponse,
    CoTInfo as CoTInfo,
    CriterionRequest as CriterionRequest,
    ErrorDetail as ErrorDetail,
    ErrorResponse as ErrorResponse,
    GetRewardRequest as GetRewardRequest,
    GetRewardResponse as GetRewardResponse,
    GroupMethod as GroupMethod,
    GroupRequestItem as GroupRequestItem,
    GroupRewardsRequest as GroupRewardsRequest,
    GroupRewardsResponse as GroupRewardsResponse,
    HealthResponse as HealthResponse,
    JudgeMode as JudgeMode,
    PairwiseRequest as PairwiseRequest,
    PairwiseRequestItem as PairwiseRequestItem,
    PairwiseResponse as PairwiseResponse,
    PromptText as PromptText,
    ReadyResponse as ReadyResponse,
    RewardDetail as RewardDetail,
    RewardMode as RewardMode,
    RewardRequestItem as RewardRequestItem,
    RewardScale as RewardScale,
    RewardsRequest as RewardsRequest,
    RewardsResponse as RewardsResponse,
    RubricDetail as RubricDetail,
    RubricInfo as RubricInfo,
    RubricList as RubricList,
    RubricRef as RubricRef,
    ScoreRequest as ScoreRequest,
    ScoreRequestItem as ScoreRequestItem,
    ScoreResponse as ScoreResponse,
    Text as Text,
)
