"""`GroupJudgeReward`: group-relative judge rewards for GRPO / RLOO (`reward_mode: group`).

The trainer samples `group_size` responses per prompt and passes them contiguously (prompt 0's
group, then prompt 1's, ...). This source cuts the batch into those groups and judges each group
at once (`rlaif.judge.group.GroupJudge`: listwise over seeded orders, or round robin + Bradley-
Terry), in-process (`engine`) or over HTTP (`POST /v1/rewards/group`, `judge_url`). GRPO and
RLOO only use rewards relative to the group, which is exactly what such a judge gives.

Failures follow the judge sources' policy (`rlaif.policy_training.judge_rewards`): an engine error
or an unreachable service leaves that call's samples at None (the trainer applies
`on_missing_reward`); a 4xx (bad rubric, group too large) raises. `last_metrics`:
`judge_latency_s`, `group_order_spread` (listwise: mean per-response std over orders, how much
position still moves a score) and `group_label_mass`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from rlaif.policy_training.judge_rewards import config_answers, rescale

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.judge.api.client import JudgeClient
    from rlaif.judge.cache import JudgmentCache
    from rlaif.judge.engines.base import Engine
    from rlaif.judge.types import GroupJudgment
    from rlaif.policy_training.config import PPOConfig

logger = logging.getLogger(__name__)

GroupMethod = Literal["listwise", "round_robin"]


def split_groups(prompts: Sequence[str], group_size: int) -> list[tuple[int, int]]:
    """(start, end) of each group: `group_size` consecutive responses to one prompt; anything else is an error."""
    if group_size < 2:
        raise ValueError(f"group rewards compare the responses of one prompt, so group_size must be >= 2, got {group_size}")
    if len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} responses do not form groups of {group_size}; the trainer passes group_size "
                         "responses per prompt, one group after another")
    spans = [(start, start + group_size) for start in range(0, len(prompts), group_size)]
    for start, end in spans:
        if any(p != prompts[start] for p in prompts[start:end]):
            raise ValueError(f"responses {start}..{end - 1} should answer one prompt (a group) but their prompts differ; "
                             "pass each prompt's group_size responses next to each other")
    return spans


class GroupJudgeReward:
    """Judge each prompt's group of responses together (see the module docstring)."""

    def __init__(self, group_size: int, *, engine: Engine | None = None, url: str | None = None,
                 client: JudgeClient | None = None, rubric: str | None = None, method: GroupMethod = "listwise",
                 orders: int = 4, seed: int = 0, scale: Literal["unit", "signed"] = "unit",
                 answers: Mapping[str, str] | None = None, cache: JudgmentCache | None = None,
                 timeout: float = 300.0, retries: int = 4, api_key: str | None = None, name: str | None = None) -> None:
        if (engine is None) == (url is None and client is None):
            raise ValueError("GroupJudgeReward needs either an engine (in-process judge) or a judge service url")
        if group_size < 2:
            raise ValueError(f"group rewards need group_size >= 2, got {group_size}")
        self.group_size = group_size
        self.method: GroupMethod = method
        self.orders, self.seed, self.scale, self.rubric = orders, seed, scale, rubric
        self.answer_table = dict(answers) if answers is not None else None
        self.name = name or f"group({method})"
        self.judge = None
        self.client = None
        if engine is not None:
            from rlaif.judge.group import GroupJudge

            self.judge = GroupJudge(engine, rubric, method=method, orders=orders, cache=cache, seed=seed)
        else:
            from rlaif.judge.api.client import JudgeClient, RetryPolicy

            assert url is not None or client is not None
            self.client = client or JudgeClient(url or "", api_key=api_key, timeout=timeout,
                                                retry=RetryPolicy(retries=retries))
        self.url = url
        self.last_metrics: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: PPOConfig, *, rubric: str | None = None, engine: Engine | None = None) -> GroupJudgeReward:
        """`engine` or `judge_url`, `group_method`, `group_orders`, `answer_column`, `ppo.group_size`, `ppo.seed`."""
        r = config.reward
        common = dict(rubric=rubric if rubric is not None else r.rubric, method=r.group_method, orders=r.group_orders,
                      seed=config.ppo.seed, scale=r.reward_scale, answers=config_answers(config))
        if r.judge_url is not None:
            return cls(config.ppo.group_size, url=r.judge_url, timeout=r.judge_timeout, retries=r.judge_retries,
                       api_key=os.environ.get(r.judge_api_key_env) or None, **common)  # type: ignore[arg-type]
        if engine is None:
            if r.engine is None:
                raise ValueError("reward_mode group needs a judge: engine (in-process) or judge_url (a service)")
            from rlaif.judge.engines import build_engine

            engine = build_engine(r.engine)
        return cls(config.ppo.group_size, engine=engine, **common)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def rewards(self, prompts: list[str], responses: list[str], *,
                answers: Sequence[str | None] | None = None) -> list[float | None]:
        """One reward per response, relative to the other responses of its group."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        spans = split_groups(prompts, self.group_size)
        if answers is None and self.answer_table is not None:
            missing = [p for p in prompts if p not in self.answer_table]
            if missing:
                raise KeyError(f"no reference answer for prompt {missing[0][:80]!r}")
            answers = [self.answer_table[p] for p in prompts]
        started = time.perf_counter()
        judged = self._judge([(prompts[a], responses[a:b], answers[a] if answers is not None else None) for a, b in spans])
        latency = time.perf_counter() - started
        out: list[float | None] = [None] * len(responses)
        if judged is not None:
            for (a, _), judgment in zip(spans, judged):
                out[a:a + len(judgment.scores)] = [rescale(v, self.scale) for v in judgment.scores]
        spreads = [s for j in judged or [] for s in (j.order_spread or [])]
        self.last_metrics = {"judge_latency_s": latency, "judge_missing": float(sum(v is None for v in out)),
                             "group_label_mass": (sum(j.label_mass for j in judged) / len(judged)) if judged else float("nan")}
        if spreads:
            self.last_metrics["group_order_spread"] = sum(spreads) / len(spreads)
        return out

    def _judge(self, groups: list[tuple[str, list[str], str | None]]) -> list[GroupJudgment] | None:
        """Every group in one judge call; None when the engine or service failed (rewards then missing)."""
        if self.judge is not None:
            from rlaif.judge.engines.base import EngineError
            from rlaif.judge.types import GroupItem

            try:
                return self.judge.judge([GroupItem(prompt=p, responses=tuple(rs), reference=ref) for p, rs, ref in groups])
            except EngineError as exc:
                logger.warning("group judge failed on %d groups: %s; their rewards are missing", len(groups), exc)
                return None
        from rlaif.judge.api.client import JudgeServiceError

        assert self.client is not None
        try:
            response = self.client.group_rewards(
                [{"prompt": p, "responses": rs, **({"reference": ref} if ref is not None else {})} for p, rs, ref in groups],
                method=self.method, orders=self.orders, seed=self.seed, rubric=self.rubric)
        except JudgeServiceError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                raise
            logger.warning("judge service %s failed on %d groups: %s; their rewards are missing", self.url, len(groups), exc)
            return None
        return list(response.judgments)
