"""Re-export of `rlaif.judge.api.client`, the service's wire client, under the name it has always had.

The wire contract (request/response models and the httpx client) lives one layer down, in
`rlaif.judge.api`, because the labeling jobs in `rlaif.judge.labeling` call a judge service
too and the layers only import downward (README "Layout"). Import from either place.
"""

from rlaif.judge.api.client import (  # noqa: F401 - re-exported names
    AsyncJudgeClient as AsyncJudgeClient,
    DEFAULT_URL as DEFAULT_URL,
    ItemT as ItemT,
    JudgeClient as JudgeClient,
    JudgeConnectionError as JudgeConnectionError,
    JudgeServiceError as JudgeServiceError,
    RETRY_STATUSES as RETRY_STATUSES,
    RETRY_TRANSPORT_ERRORS as RETRY_TRANSPORT_ERRORS,
    ResponseT as ResponseT,
    RetryPolicy as RetryPolicy,
    parse_retry_after as parse_retry_after,
)
