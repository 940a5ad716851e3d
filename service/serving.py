"""`JudgeService`: what the HTTP routes do, without HTTP.

The service receives its engine (and optional reward model and cache) in the constructor, so
the same class runs behind FastAPI, in tests with a deterministic engine, or in a script. It
never imports FastAPI: it takes and returns `service.protocol` models and raises
`service.errors` exceptions, which `service.app` maps to HTTP.

Per request it:
1. resolves the rubric from the served catalog only (built-ins + files the operator listed;
   a request can never make the server read an arbitrary path) -> 404 / 422 on a bad one;
2. checks the operator's limits (`max_items`, `max_chars`) -> 413 naming the limit;
3. submits the items to the micro-batcher under the key `(kind, rubric id, mode)`, so
   concurrent requests, including `/v1/judge/score`, score-mode `/v1/rewards` and judge-backed
   `/get_reward` calls that use the same rubric, share engine batches;
4. turns judgments into the endpoint's response (rewards, OpenRLHF fields).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from judge.cache import JudgmentCache
from judge.engines.base import Engine
from judge.judges import PairwiseJudge, ScoreJudge
from judge.rubric import Rubric, RubricError, load_all_builtin, load_rubric
from judge.types import PairwiseItem, PairwiseJudgment, ScoreItem, ScoreJudgment
from service import errors
from service.batcher import MicroBatcher
from service.metrics import ServiceMetrics
from service.protocol import (CoTInfo, GetRewardRequest, GetRewardResponse, JudgeMode, PairwiseRequest,
                              PairwiseResponse, RewardDetail, RewardsRequest, RewardsResponse, RubricDetail,
                              RubricInfo, ScoreRequest, ScoreResponse)
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

REWARD_MODEL_KEY = ("reward_model", "", "")


@runtime_checkable
class RewardScorer(Protocol):
    """What the service needs from a distilled reward model (`policy_training.reward_model.RewardModel`)."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class RubricCatalog:
    """The rubrics a service instance serves, and its default rubric of each kind."""

    def __init__(self, rubrics: dict[str, Rubric], *, pairwise_default: str, score_default: str) -> None:
        self.rubrics = dict(rubrics)
        self.defaults = {"pairwise": pairwise_default, "score": score_default}
        for kind, rubric_id in self.defaults.items():
            rubric = self.rubrics.get(rubric_id)
            if rubric is None:
                raise RubricError(f"default {kind} rubric {rubric_id!r} is not among the served rubrics")
            if rubric.kind != kind:
                raise RubricError(f"{rubric.source}: rubric {rubric_id!r} is a {rubric.kind} rubric and cannot be the "
                                  f"default {kind} rubric")

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> RubricCatalog:
        """Built-in library + `extra_rubrics` files + the two defaults (ids or YAML paths)."""
        rubrics = load_all_builtin()
        for source in settings.rubric_files():
            rubric = load_rubric(source)
            rubrics[rubric.id] = rubric  # an operator's file may deliberately override a built-in id
        defaults = {}
        for kind, ref in (("pairwise", settings.pairwise_rubric), ("score", settings.score_rubric)):
            rubric = rubrics.get(ref) or load_rubric(ref)
            rubrics[rubric.id] = rubric
            defaults[kind] = rubric.id
        return cls(rubrics, pairwise_default=defaults["pairwise"], score_default=defaults["score"])

    def resolve(self, rubric_id: str | None, kind: str) -> Rubric:
        """The rubric a request names (or the default), checked to be of `kind`."""
        rubric = self.rubrics.get(rubric_id or self.defaults[kind])
        if rubric is None:
            raise errors.RubricNotFound(f"unknown rubric {rubric_id!r}; this service serves: {', '.join(sorted(self.rubrics))}")
        if rubric.kind != kind:
            same_kind = sorted(r.id for r in self.rubrics.values() if r.kind == kind)
            raise errors.InvalidRequest(f"rubric {rubric.id!r} is a {rubric.kind} rubric; this call needs a {kind} "
                                        f"rubric: {', '.join(same_kind)}")
        return rubric

    def info(self, rubric: Rubric) -> RubricInfo:
        return RubricInfo(id=rubric.id, version=rubric.version, kind=rubric.kind, description=rubric.description.strip(),
                          labels=list(rubric.labels), modes=["logprob", "cot"] if rubric.cot else ["logprob"],
                          default=self.defaults[rubric.kind] == rubric.id)

    def list(self) -> list[RubricInfo]:
        return [self.info(self.rubrics[rubric_id]) for rubric_id in sorted(self.rubrics)]

    def detail(self, rubric_id: str) -> RubricDetail:
        rubric = self.rubrics.get(rubric_id)
        if rubric is None:
            raise errors.RubricNotFound(f"unknown rubric {rubric_id!r}; this service serves: {', '.join(sorted(self.rubrics))}")
        cot = CoTInfo(**rubric.cot.model_dump()) if rubric.cot else None
        return RubricDetail(**self.info(rubric).model_dump(), system=rubric.system, template=rubric.template,
                            answer_instruction=rubric.answer_instruction, label_values=rubric.label_values,
                            principles=rubric.principles, principles_per_comparison=rubric.principles_per_comparison,
                            cot=cot, clamp=rubric.clamp)


class JudgeService:
    """Judging, rewards and the OpenRLHF protocol over a micro-batched engine. See the module docstring."""

    def __init__(self, engine: Engine, catalog: RubricCatalog, settings: ServiceSettings, *,
                 cache: JudgmentCache | None = None, reward_model: RewardScorer | None = None,
                 reward_model_name: str | None = None, metrics: ServiceMetrics | None = None) -> None:
        self.engine = engine
        self.catalog = catalog
        self.settings = settings
        self.cache = cache
        self.reward_model = reward_model
        self.reward_model_name = reward_model_name or ("reward_model" if reward_model is not None else None)
        self.metrics = metrics
        self._judges: dict[Hashable, PairwiseJudge | ScoreJudge] = {}
        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(
            self._run_batch, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue, retry_after=settings.retry_after,
            on_batch=self._observe_batch if metrics else None,
            on_queue_depth=metrics.queue_depth.set if metrics else None)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, timeout: float | None = None) -> None:
        await self.batcher.stop(timeout)

    # ------------------------------------------------------------------ endpoints
    async def pairwise(self, request: PairwiseRequest) -> PairwiseResponse:
        self._check_limits(len(request.items), (
            (f"items.{i}.{name}", getattr(item, name)) for i, item in enumerate(request.items)
            for name in ("prompt", "response_a", "response_b")))
        key = self._judge_key("pairwise", request.rubric, request.mode)
        items = [PairwiseItem(prompt=it.prompt, response_a=it.response_a, response_b=it.response_b) for it in request.items]
        return PairwiseResponse(judgments=await self._submit(key, items))

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        self._check_limits(len(request.items), (
            (f"items.{i}.{name}", getattr(item, name)) for i, item in enumerate(request.items)
            for name in ("prompt", "response")))
        key = self._judge_key("score", request.rubric, request.mode)
        items = [ScoreItem(prompt=it.prompt, response=it.response) for it in request.items]
        return ScoreResponse(judgments=await self._submit(key, items))

    async def rewards(self, request: RewardsRequest) -> RewardsResponse:
        self._check_limits(len(request.items), (
            (f"items.{i}.{name}", value) for i, item in enumerate(request.items)
            for name, value in (("prompt", item.prompt), ("response", item.response), ("reference", item.reference or ""))))
        prompts = [item.prompt for item in request.items]
        responses = [item.response for item in request.items]
        signed = request.scale == "signed"
        if request.mode == "reward_model":
            raw = await self._reward_model_scores(prompts, responses)
            return RewardsResponse(rewards=raw, details=[RewardDetail(reward=r, reward_model_score=r) for r in raw],
                                   mode="reward_model", rubric_id=None, model=self.reward_model_name or "")
        if request.mode == "score":
            key = self._judge_key("score", request.rubric, request.judge_mode)
            scored: list[ScoreJudgment] = await self._submit(key, [ScoreItem(prompt=p, response=r) for p, r in zip(prompts, responses)])
            values = [_rescale(j.score, signed) for j in scored]
            details = [RewardDetail(reward=v, score=j) for v, j in zip(values, scored)]
        else:
            missing = [i for i, item in enumerate(request.items) if item.reference is None]
            if missing:
                raise errors.InvalidRequest(f"mode=pairwise compares each response with its `reference`, which is "
                                            f"missing at items {_few(missing)}")
            key = self._judge_key("pairwise", request.rubric, request.judge_mode)
            pairs = [PairwiseItem(prompt=item.prompt, response_a=item.response, response_b=item.reference or "")
                     for item in request.items]
            compared: list[PairwiseJudgment] = await self._submit(key, pairs)
            values = [_rescale(j.prob_a, signed) for j in compared]
            details = [RewardDetail(reward=v, pairwise=j) for v, j in zip(values, compared)]
        return RewardsResponse(rewards=values, details=details, mode=request.mode, rubric_id=key[1],
                               model=self.engine.model_name)

    async def get_reward(self, request: GetRewardRequest) -> GetRewardResponse:
        """OpenRLHF's `--remote_rm_url` call: split queries into prompt + response and reward them."""
        queries, prompts = request.query, request.prompts
        if len(prompts) != len(queries):
            raise errors.InvalidRequest(f"`prompts` has {len(prompts)} entries but `query` has {len(queries)}; "
                                        "send one prompt per query")
        self._check_limits(len(queries), [*((f"query.{i}", q) for i, q in enumerate(queries)),
                                          *((f"prompts.{i}", p) for i, p in enumerate(prompts))])
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise errors.InvalidRequest(f"prompts must not be empty (empty at indices {_few(empty)})")
        responses: list[str] = []
        mismatched: list[int] = []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            if query.startswith(prompt):
                responses.append(query[len(prompt):])
            else:
                mismatched.append(i)
                responses.append(query)  # only used under prefix_mismatch="whole_query"
        if mismatched and self.settings.prefix_mismatch == "error":
            raise errors.InvalidRequest(
                f"prompts[i] must be a prefix of query[i] (the response is the rest of the query); not a prefix at "
                f"indices {_few(mismatched)}. Send the exact prompt text, or start the service with "
                "RLAIF_PREFIX_MISMATCH=whole_query to judge the whole query instead")
        if mismatched:
            logger.warning("/get_reward: prompt is not a prefix of the query at %d of %d items; judging whole queries",
                           len(mismatched), len(queries))
        if self.reward_model is not None:
            raw = await self._reward_model_scores(prompts, responses)
            return GetRewardResponse(rewards=raw, scores=[_sigmoid(r) for r in raw],
                                     extra_logs={"reward_model_score": raw})
        key = self._judge_key("score", None, "logprob")
        scored: list[ScoreJudgment] = await self._submit(key, [ScoreItem(prompt=p, response=r) for p, r in zip(prompts, responses)])
        values = [j.score for j in scored]
        flagged = set(mismatched)
        return GetRewardResponse(rewards=values, scores=values, extra_logs={
            "judge_expected_score": [j.expected_score for j in scored],
            "prefix_mismatch": [1.0 if i in flagged else 0.0 for i in range(len(queries))]})

    # ------------------------------------------------------------------ helpers
    def _check_limits(self, count: int, texts: Iterable[tuple[str, str]]) -> None:
        limit = self.settings.max_items
        if count > limit:
            raise errors.PayloadTooLarge(f"{count} items in one request, but this service accepts at most "
                                         f"max_items={limit}; split the request")
        max_chars = self.settings.max_chars
        for where, text in texts:
            if len(text) > max_chars:
                raise errors.PayloadTooLarge(f"{where} has {len(text)} characters, but this service accepts at most "
                                             f"max_chars={max_chars} per text")

    def _judge_key(self, kind: str, rubric_id: str | None, mode: JudgeMode) -> tuple[str, str, str]:
        """Resolve the rubric, build (once) the judge for (kind, rubric, mode); 4xx on a bad combination."""
        rubric = self.catalog.resolve(rubric_id, kind)
        key = (kind, rubric.id, mode)
        if key not in self._judges:
            if mode == "cot" and rubric.cot is None:
                raise errors.InvalidRequest(f"rubric {rubric.id!r} has no chain-of-thought section, so mode='cot' is "
                                            "unavailable; use mode='logprob' or a rubric whose modes include 'cot'")
            if kind == "pairwise":
                self._judges[key] = PairwiseJudge(self.engine, rubric, mode=mode, tie_margin=self.settings.tie_margin,
                                                  cache=self.cache)
            else:
                self._judges[key] = ScoreJudge(self.engine, rubric, mode=mode, cache=self.cache)
        return key

    async def _submit(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        return await self.batcher.submit(key, items, timeout=self.settings.request_timeout)

    async def _reward_model_scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.reward_model is None:
            raise errors.InvalidRequest("this service serves no reward model; start it with `rlaif serve --reward-model DIR` "
                                        "or use mode='score' / 'pairwise'")
        items = list(zip(prompts, responses))
        return [float(value) for value in await self._submit(REWARD_MODEL_KEY, items)]

    def _run_batch(self, key: Hashable, items: list[Any]) -> Sequence[Any]:
        """Runs in the batcher's worker thread: one engine (or reward-model) call for the whole batch."""
        if key == REWARD_MODEL_KEY:
            assert self.reward_model is not None
            prompts = [prompt for prompt, _ in items]
            responses = [response for _, response in items]
            scores = [float(value) for value in self.reward_model.score(prompts, responses)]
            bad = [i for i, value in enumerate(scores) if not math.isfinite(value)]
            if bad:
                raise ValueError(f"the reward model returned non-finite scores at batch positions {_few(bad)}")
            return scores
        return self._judges[key].judge(items)

    def _observe_batch(self, key: Hashable, items: int, requests: int, seconds: float, failed: bool) -> None:
        assert self.metrics is not None
        kind = key[0] if isinstance(key, tuple) else str(key)
        self.metrics.observe_batch(kind, items, requests, seconds, failed)


def load_components(settings: ServiceSettings, engine: Engine | None = None) -> tuple[Engine, RewardScorer | None, str | None]:
    """Blocking: build the engine (unless given) and, when configured, load the reward model.

    Called from a thread by the app's lifespan so the HTTP server is up (and /healthz answers)
    while a large model loads. Both imports are lazy: torch loads only here.
    """
    if engine is None:
        from judge.engines import build_engine

        engine = build_engine(settings.engine)
    if settings.reward_model is None:
        return engine, None, None
    from policy_training.reward_model import RewardModel  # only imported when a reward model is served

    path = Path(settings.reward_model)
    reward_model = RewardModel.load(path, device=settings.reward_model_device, inference=True)
    return engine, reward_model, str(path)


def open_cache(settings: ServiceSettings) -> JudgmentCache | None:
    if not settings.cache:
        return None
    from judge.models import cache_root

    return JudgmentCache(settings.cache_path or cache_root() / "judgments.sqlite")


def _rescale(value: float, signed: bool) -> float:
    return 2.0 * value - 1.0 if signed else value


def _sigmoid(value: float) -> float:
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)


def _few(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}] ({len(indices)} in all)"
