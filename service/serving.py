"""`JudgeService`: what the HTTP routes do, without HTTP.

The service receives its engine (and optional reward model and cache) in the constructor, so
the same class runs behind FastAPI, in tests with a deterministic engine, or in a script. It
never imports FastAPI: it takes and returns `rlaif.service.protocol` models and raises
`rlaif.service.errors` exceptions, which `rlaif.service.app` maps to HTTP.

Per request it:
1. resolves the rubric from the served catalog only (built-ins + files the operator listed;
   a request can never make the server read an arbitrary path) -> 404 / 422 on a bad one;
2. checks the operator's limits (`max_items`, `max_chars`) -> 413 naming the limit;
3. checks the token budget: every item's longest engine sequence (`judge.item_token_counts`,
   i.e. rendering and tokenizing, done on a worker thread, never on the event loop) must fit
   `max_item_tokens` (default: the engine's context length) -> 413 naming the item, its token
   count and the setting. The counts also weight the items in the micro-batcher, which caps each
   engine batch at `max_batch_tokens` (splitting large requests across batches);
4. submits the items to the micro-batcher under the key `(kind, rubric id, mode)`, so
   concurrent requests, including `/v1/judge/score`, score-mode `/v1/rewards` and judge-backed
   `/get_reward` calls that use the same rubric, share engine batches;
5. turns judgments into the endpoint's response (rewards, OpenRLHF fields; see
   `rlaif.service.openrlhf` for how an OpenRLHF query is split into prompt and response).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rlaif.judge.cache import JudgmentCache
from rlaif.judge.calibration import Calibration, CalibrationError, load_calibrations
from rlaif.judge.engines.base import Engine
from rlaif.judge.checklist import DEFAULT_CHECKLIST_RUBRICS, ChecklistJudge
from rlaif.judge.group import DEFAULT_GROUP_RUBRICS, GroupJudge
from rlaif.judge.judges import PairwiseJudge, ScoreJudge
from rlaif.judge.rubric import Rubric, RubricError, load_all_builtin, load_rubric
from rlaif.judge.types import (ChecklistItem, ChecklistJudgment, Criterion, GroupItem, GroupJudgment, PairwiseItem,
                               PairwiseJudgment, ScoreItem, ScoreJudgment)
from rlaif.service import errors
from rlaif.service.batcher import MicroBatcher
from rlaif.service.metrics import ServiceMetrics
from rlaif.service.openrlhf import RolloutSample, split_samples
from rlaif.service.protocol import (ChecklistMode, ChecklistRequest, ChecklistResponse, CoTInfo, CriterionRequest,
                              GetRewardRequest, GetRewardResponse, GroupRewardsRequest, GroupRewardsResponse,
                              JudgeMode, PairwiseRequest, PairwiseResponse, RewardDetail, RewardsRequest,
                              RewardsResponse, RubricDetail, RubricInfo, ScoreRequest, ScoreResponse)
from rlaif.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

REWARD_MODEL_KEY = ("reward_model", "", "")
AnyJudge = PairwiseJudge | ScoreJudge | ChecklistJudge | GroupJudge


@runtime_checkable
class RewardScorer(Protocol):
    """What the service needs from a distilled reward model (`rlaif.judge.reward_model.RewardModel`)."""

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

    def resolve(self, rubric_id: str | None, kind: str, default: str | None = None) -> Rubric:
        """The rubric a request names (or the default: `default`, else the served default of `kind`), checked to be of `kind`."""
        rubric = self.rubrics.get(rubric_id or default or self.defaults[kind])
        if rubric is None:
            raise self._not_found(rubric_id or "")
        if rubric.kind != kind:
            same_kind = sorted(r.id for r in self.rubrics.values() if r.kind == kind)
            raise errors.InvalidRequest(f"rubric {rubric.id!r} is a {rubric.kind} rubric; this call needs a {kind} "
                                        f"rubric: {', '.join(same_kind)}")
        return rubric

    def _not_found(self, rubric_id: str) -> errors.RubricNotFound:
        return errors.RubricNotFound(f"unknown rubric {_shown(rubric_id)}; this service serves: "
                                     f"{', '.join(sorted(self.rubrics))}")

    def info(self, rubric: Rubric) -> RubricInfo:
        return RubricInfo(id=rubric.id, version=rubric.version, kind=rubric.kind, description=rubric.description.strip(),
                          labels=list(rubric.labels), modes=["logprob", "cot"] if rubric.cot else ["logprob"],
                          default=self.defaults.get(rubric.kind) == rubric.id)

    def list(self) -> list[RubricInfo]:
        return [self.info(self.rubrics[rubric_id]) for rubric_id in sorted(self.rubrics)]

    def detail(self, rubric_id: str) -> RubricDetail:
        rubric = self.rubrics.get(rubric_id)
        if rubric is None:
            raise self._not_found(rubric_id)
        cot = CoTInfo(**rubric.cot.model_dump()) if rubric.cot else None
        return RubricDetail(**self.info(rubric).model_dump(), system=rubric.system, template=rubric.template,
                            answer_instruction=rubric.answer_instruction, label_values=rubric.label_values,
                            principles=rubric.principles, principles_per_comparison=rubric.principles_per_comparison,
                            cot=cot, clamp=rubric.clamp)


class JudgeService:
    """Judging, rewards and the OpenRLHF protocol over a micro-batched engine. See the module docstring."""

    def __init__(self, engine: Engine, catalog: RubricCatalog, settings: ServiceSettings, *,
                 cache: JudgmentCache | None = None, reward_model: RewardScorer | None = None,
                 reward_model_name: str | None = None, metrics: ServiceMetrics | None = None,
                 calibrations: dict[str, Calibration] | None = None) -> None:
        self.engine = engine
        self.calibrations = dict(calibrations or {})
        for rubric_id, calibration in self.calibrations.items():  # a calibration of another model is refused at startup
            rubric = catalog.resolve(rubric_id, "pairwise")
            calibration.check(engine_id=engine.engine_id, rubric_id=rubric.id, rubric_version=rubric.version,
                              rubric_fingerprint=rubric.fingerprint, mode=calibration.mode)
        self.catalog = catalog
        self.settings = settings
        self.cache = cache
        self.reward_model = reward_model
        self.reward_model_name = reward_model_name or ("reward_model" if reward_model is not None else None)
        self.metrics = metrics
        self._judges: dict[Hashable, AnyJudge] = {}
        self.context_length: int | None = getattr(engine, "context_length", None)
        self.max_item_tokens, self.max_batch_tokens = settings.token_budget(self.context_length)
        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(
            self._run_batch, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue, max_batch_tokens=self.max_batch_tokens, retry_after=settings.retry_after,
            on_batch=self._observe_batch if metrics else None,
            on_queue_depth=metrics.queue_depth.set if metrics else None)
        # Rendering + tokenizing for token budgets and splitting OpenRLHF queries: CPU work kept off the
        # event loop, one request at a time (the engine has its own thread).
        self._cpu: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlaif-prepare")
        await self.batcher.start()

    async def stop(self, timeout: float | None = None) -> None:
        await self.batcher.stop(timeout)
        if self._cpu is not None:
            self._cpu.shutdown(wait=False)
            self._cpu = None

    # ------------------------------------------------------------------ endpoints
    async def pairwise(self, request: PairwiseRequest) -> PairwiseResponse:
        self._check_limits(len(request.items), (
            (f"items.{i}.{name}", getattr(item, name) or "") for i, item in enumerate(request.items)
            for name in ("prompt", "response_a", "response_b", "reference")))
        key = self._judge_key("pairwise", request.rubric, request.mode)
        items = [PairwiseItem(prompt=it.prompt, response_a=it.response_a, response_b=it.response_b, reference=it.reference)
                 for it in request.items]
        return PairwiseResponse(judgments=await self._judge(key, items))

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        self._check_limits(len(request.items), (
            (f"items.{i}.{name}", getattr(item, name) or "") for i, item in enumerate(request.items)
            for name in ("prompt", "response", "reference")))
        key = self._judge_key("score", request.rubric, request.mode)
        items = [ScoreItem(prompt=it.prompt, response=it.response, reference=it.reference) for it in request.items]
        return ScoreResponse(judgments=await self._judge(key, items))

    async def checklist(self, request: ChecklistRequest) -> ChecklistResponse:
        """Per-item checklists (`rlaif.judge.checklist`): explicit yes/no per criterion, or implicit in one prompt."""
        self._check_limits(len(request.items), (
            (where, text) for i, item in enumerate(request.items)
            for where, text in _item_texts(f"items.{i}", item.prompt, item.response, item.reference, item.criteria)))
        key = self._checklist_key(request.rubric, request.checklist_mode)
        items = [ChecklistItem(prompt=it.prompt, response=it.response, criteria=_criteria(it.criteria),
                               reference=it.reference) for it in request.items]
        return ChecklistResponse(judgments=await self._judge(key, items))

    async def group_rewards(self, request: GroupRewardsRequest) -> GroupRewardsResponse:
        """Group-relative rewards (`rlaif.judge.group`): the total number of responses counts against max_items."""
        self._check_limits(sum(len(g.responses) for g in request.groups), (
            (where, text) for i, group in enumerate(request.groups)
            for where, text in [(f"groups.{i}.prompt", group.prompt), (f"groups.{i}.reference", group.reference or ""),
                                *((f"groups.{i}.responses.{j}", r) for j, r in enumerate(group.responses))]),
            what="responses")
        kind = "group" if request.method == "listwise" else "pairwise"
        rubric = self._resolve(request.rubric, kind, DEFAULT_GROUP_RUBRICS["listwise"] if kind == "group" else None)
        key = ("group", rubric.id, f"{request.method}:{request.orders}:{request.seed}")
        if key not in self._judges:
            self._judges[key] = self._build(lambda: GroupJudge(
                self.engine, rubric, method=request.method, orders=request.orders, cache=self.cache, seed=request.seed,
                tie_margin=self.settings.tie_margin))
        groups = [GroupItem(prompt=g.prompt, responses=tuple(g.responses), reference=g.reference) for g in request.groups]
        judged: list[GroupJudgment] = await self._judge(key, groups, where="groups")
        signed = request.scale == "signed"
        return GroupRewardsResponse(rewards=[[_rescale(v, signed) for v in j.scores] for j in judged], judgments=judged,
                                    method=request.method, rubric_id=rubric.id, model=self.engine.model_name)

    async def rewards(self, request: RewardsRequest) -> RewardsResponse:
        self._check_limits(len(request.items), (
            (where, text) for i, item in enumerate(request.items)
            for where, text in [(f"items.{i}.reference", item.reference or ""),
                                *_item_texts(f"items.{i}", item.prompt, item.response, item.reference_answer,
                                             item.criteria or [], reference_name="reference_answer")]))
        prompts = [item.prompt for item in request.items]
        answers = [item.reference_answer for item in request.items]
        if request.mode != "checklist" and any(item.criteria is not None for item in request.items):
            raise errors.InvalidRequest("`criteria` apply to mode='checklist' only; set mode='checklist' or drop them")
        responses = [item.response for item in request.items]
        signed = request.scale == "signed"
        if request.mode == "reward_model":
            raw = await self._reward_model_scores(prompts, responses)
            return RewardsResponse(rewards=raw, details=[RewardDetail(reward=r, reward_model_score=r) for r in raw],
                                   mode="reward_model", rubric_id=None, model=self.reward_model_name or "")
        if request.mode == "score":
            key = self._judge_key("score", request.rubric, request.judge_mode)
            scored: list[ScoreJudgment] = await self._judge(key, [ScoreItem(prompt=p, response=r, reference=a)
                                                                  for p, r, a in zip(prompts, responses, answers)])
            values = [_rescale(j.score, signed) for j in scored]
            details = [RewardDetail(reward=v, score=j) for v, j in zip(values, scored)]
        elif request.mode == "checklist":
            missing = [i for i, item in enumerate(request.items) if item.criteria is None]
            if missing:
                raise errors.InvalidRequest(f"mode=checklist grades each response against its `criteria`, which are "
                                            f"missing at items {_few(missing)}")
            key = self._checklist_key(request.rubric, request.checklist_mode)
            checked: list[ChecklistJudgment] = await self._judge(key, [
                ChecklistItem(prompt=item.prompt, response=item.response, criteria=_criteria(item.criteria or []),
                              reference=item.reference_answer) for item in request.items])
            values = [_rescale(j.score, signed) for j in checked]
            details = [RewardDetail(reward=v, checklist=j) for v, j in zip(values, checked)]
        else:
            missing = [i for i, item in enumerate(request.items) if item.reference is None]
            if missing:
                raise errors.InvalidRequest(f"mode=pairwise compares each response with its `reference`, which is "
                                            f"missing at items {_few(missing)}")
            key = self._judge_key("pairwise", request.rubric, request.judge_mode)
            pairs = [PairwiseItem(prompt=item.prompt, response_a=item.response, response_b=item.reference or "",
                                  reference=item.reference_answer) for item in request.items]
            compared: list[PairwiseJudgment] = await self._judge(key, pairs)
            values = [_rescale(j.prob_a, signed) for j in compared]
            details = [RewardDetail(reward=v, pairwise=j) for v, j in zip(values, compared)]
        return RewardsResponse(rewards=values, details=details, mode=request.mode, rubric_id=key[1],
                               model=self.engine.model_name)

    async def get_reward(self, request: GetRewardRequest) -> GetRewardResponse:
        """OpenRLHF's remote reward call: split each query into prompt + response (`rlaif.service.openrlhf`), reward them.

        A whole rollout (up to `get_reward_max_items` samples) is accepted in one request and
        judged in chunks of `max_items`, each entering the queue as room frees up, so OpenRLHF
        (which treats any error as fatal) gets rewards instead of a 413 or 429."""
        queries, prompts = request.query, request.prompts
        if len(prompts) != len(queries):
            raise errors.InvalidRequest(f"`prompts` has {len(prompts)} entries but `query` has {len(queries)}; "
                                        "send one prompt per query")
        self._check_limits(len(queries), [*((f"query.{i}", q) for i, q in enumerate(queries)),
                                          *((f"prompts.{i}", p) for i, p in enumerate(prompts))],
                           max_items=self.settings.get_reward_max_items, setting="get_reward_max_items")
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise errors.InvalidRequest(f"prompts must not be empty (empty at indices {_few(empty)})")
        policy = self.settings.prefix_mismatch
        samples: list[RolloutSample] = await self._in_thread(
            split_samples, queries, prompts, recover=policy == "recover", strip_template=self.settings.strip_chat_template)
        if policy == "error":
            mismatched = [i for i, sample in enumerate(samples) if sample.boundary != "prefix"]
            if mismatched:
                raise errors.InvalidRequest(
                    f"prompts[i] must be a prefix of query[i] (the response is the rest of the query); not a prefix "
                    f"at indices {_few(mismatched)}. Send the exact prompt text, or unset RLAIF_PREFIX_MISMATCH=error "
                    "to recover the response from the longest prompt suffix found in the query")
        flags = {"prefix_mismatch": [1.0 if s.boundary == "none" else 0.0 for s in samples],
                 "prefix_recovered": [1.0 if s.boundary == "recovered" else 0.0 for s in samples],
                 "template_stripped": [1.0 if s.template_stripped else 0.0 for s in samples]}
        if any(flags["prefix_mismatch"]) or any(flags["prefix_recovered"]):
            logger.info("/get_reward: %d of %d samples had no exact prompt prefix (%d recovered, %d judged whole)",
                        sum(s.boundary != "prefix" for s in samples), len(samples),
                        sum(flags["prefix_recovered"]), sum(flags["prefix_mismatch"]))
        judged_prompts = [s.prompt for s in samples]
        responses = [s.response for s in samples]
        if self.reward_model is not None:
            raw = await self._reward_model_scores(judged_prompts, responses, chunked=True)
            return GetRewardResponse(rewards=raw, scores=[_sigmoid(r) for r in raw],
                                     extra_logs={"reward_model_score": raw, **flags})
        key = self._judge_key("score", None, "logprob")
        items = [ScoreItem(prompt=p, response=r) for p, r in zip(judged_prompts, responses)]
        scored: list[ScoreJudgment] = await self._judge(key, items, where="query", chunked=True)
        values = [j.score for j in scored]
        return GetRewardResponse(rewards=values, scores=values, extra_logs={
            "judge_expected_score": [j.expected_score for j in scored],
            "label_mass": [j.label_mass for j in scored], **flags})

    # ------------------------------------------------------------------ helpers
    def _check_limits(self, count: int, texts: Iterable[tuple[str, str]], *, max_items: int | None = None,
                      setting: str = "max_items", what: str = "items") -> None:
        limit = max_items or self.settings.max_items
        if count > limit:
            raise errors.PayloadTooLarge(f"{count} {what} in one request, but this service accepts at most "
                                         f"{setting}={limit}; split the request")
        max_chars = self.settings.max_chars
        for where, text in texts:
            if len(text) > max_chars:
                raise errors.PayloadTooLarge(f"{where} has {len(text)} characters, but this service accepts at most "
                                             f"max_chars={max_chars} per text")

    def _resolve(self, rubric_id: str | None, kind: str, default: str | None = None) -> Rubric:
        if default is not None and default not in self.catalog.rubrics and not rubric_id:
            raise errors.InvalidRequest(f"this service does not serve the default {kind} rubric {default!r}; name a "
                                        "served rubric in `rubric`")
        return self.catalog.resolve(rubric_id, kind, default)

    @staticmethod
    def _build(make: Any) -> Any:
        """A judge built from a request's choices; a rubric that cannot serve them is a 422, not a 500."""
        try:
            return make()
        except (RubricError, ValueError) as exc:
            raise errors.InvalidRequest(str(exc)) from None

    def _checklist_key(self, rubric_id: str | None, checklist_mode: ChecklistMode) -> tuple[str, str, str]:
        kind = "checklist" if checklist_mode == "explicit" else "score"
        rubric = self._resolve(rubric_id, kind, DEFAULT_CHECKLIST_RUBRICS[checklist_mode])
        key = ("checklist", rubric.id, checklist_mode)
        if key not in self._judges:
            self._judges[key] = self._build(lambda: ChecklistJudge(self.engine, rubric, checklist_mode=checklist_mode,
                                                                   cache=self.cache))
        return key

    def _judge_key(self, kind: str, rubric_id: str | None, mode: JudgeMode) -> tuple[str, str, str]:
        """Resolve the rubric, build (once) the judge for (kind, rubric, mode); 4xx on a bad combination."""
        rubric = self.catalog.resolve(rubric_id, kind)
        if kind == "score" and rubric.uses_criteria:
            raise errors.InvalidRequest(f"rubric {rubric.id!r} grades a checklist; use POST /v1/judge/checklist "
                                        "(checklist_mode='implicit') or /v1/rewards with mode='checklist'")
        key = (kind, rubric.id, mode)
        if key not in self._judges:
            if mode == "cot" and rubric.cot is None:
                raise errors.InvalidRequest(f"rubric {rubric.id!r} has no chain-of-thought section, so mode='cot' is "
                                            "unavailable; use mode='logprob' or a rubric whose modes include 'cot'")
            if kind == "pairwise":
                calibration = self.calibrations.get(rubric.id)
                self._judges[key] = PairwiseJudge(self.engine, rubric, mode=mode, tie_margin=self.settings.tie_margin,
                                                  cache=self.cache,
                                                  calibration=calibration if calibration and calibration.mode == mode else None)
            else:
                self._judges[key] = ScoreJudge(self.engine, rubric, mode=mode, cache=self.cache)
        return key

    async def _in_thread(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run CPU-heavy request preparation on the service's worker thread, off the event loop."""
        assert self._cpu is not None, "JudgeService.start() was not called"
        return await asyncio.get_running_loop().run_in_executor(self._cpu, lambda: fn(*args, **kwargs))

    async def _judge(self, key: tuple[str, str, str], items: Sequence[Any], *, where: str = "items",
                     chunked: bool = False) -> list[Any]:
        """Check the token budget, then judge `items` through the micro-batcher (413 for an item over budget).

        `chunked` (OpenRLHF rollouts larger than the queue): submit `max_items` at a time, each chunk
        waiting for queue room instead of failing with 429."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        judge = self._judges[key]
        try:
            judge.check_items(items)  # type: ignore[arg-type]
        except (RubricError, ValueError) as exc:  # a reference the rubric never shows, or one it needs and lacks
            raise errors.InvalidRequest(str(exc)) from None
        counts: list[int] = await self._in_thread(judge.item_token_counts, items)
        self._check_tokens(counts, key, where)
        if isinstance(judge, (ChecklistJudge, GroupJudge)):
            costs = [count * judge.sequences_per_item(item) for count, item in zip(counts, items)]
        else:
            per_item = _sequences_per_item(judge)
            costs = [count * per_item for count in counts]
        if not chunked:
            return await self._submit(key, items, costs, deadline)
        return await self._submit_chunks(key, items, costs, deadline)

    def _check_tokens(self, counts: list[int], key: tuple[str, str, str], where: str) -> None:
        over = [i for i, count in enumerate(counts) if count > self.max_item_tokens]
        if not over:
            return
        worst = max(over, key=lambda i: counts[i])
        source = (f"RLAIF_MAX_ITEM_TOKENS; the engine's context length is {self.context_length}"
                  if self.context_length else "RLAIF_MAX_ITEM_TOKENS")
        raise errors.PayloadTooLarge(
            f"{where}.{worst} needs {counts[worst]} tokens once rendered with rubric {key[1]!r} (its longest engine "
            f"sequence), but this service accepts at most max_item_tokens={self.max_item_tokens} ({source}); "
            f"over the limit: {where} {_few(over)}. Shorten the texts")

    async def _submit(self, key: Hashable, items: Sequence[Any], costs: Sequence[float] | None, deadline: float, *,
                      wait_for_room: bool = False) -> list[Any]:
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        return await self.batcher.submit(key, items, costs=costs, timeout=remaining, wait_for_room=wait_for_room)

    async def _submit_chunks(self, key: Hashable, items: Sequence[Any], costs: Sequence[float] | None,
                             deadline: float) -> list[Any]:
        """Submit `max_items` items at a time, each chunk waiting for queue room; results in order."""
        size = self.settings.max_items
        tasks = [asyncio.ensure_future(self._submit(key, items[start:start + size],
                                                    costs[start:start + size] if costs is not None else None,
                                                    deadline, wait_for_room=True))
                 for start in range(0, len(items), size)]
        try:
            parts = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one chunk failed (or the client left): the others stop waiting
                task.cancel()
        return [result for part in parts for result in part]

    async def _reward_model_scores(self, prompts: list[str], responses: list[str], *,
                                   chunked: bool = False) -> list[float]:
        if self.reward_model is None:
            raise errors.InvalidRequest("this service serves no reward model; start it with `rlaif serve --reward-model DIR` "
                                        "or use mode='score' / 'pairwise'")
        items = list(zip(prompts, responses))
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        if chunked:
            scores = await self._submit_chunks(REWARD_MODEL_KEY, items, None, deadline)
        else:
            scores = await self._submit(REWARD_MODEL_KEY, items, None, deadline)
        return [float(value) for value in scores]

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
        from rlaif.judge.engines import build_engine

        engine = build_engine(settings.engine)
    if settings.reward_model is None:
        return engine, None, None
    from rlaif.judge.reward_model import RewardModel  # only imported when a reward model is served

    path = Path(settings.reward_model)
    reward_model = RewardModel.load(path, device=settings.reward_model_device, inference=True)
    return engine, reward_model, str(path)


def load_served_calibrations(settings: ServiceSettings, catalog: RubricCatalog) -> dict[str, Calibration]:
    """rubric id -> calibration from `settings.calibrations`; each must name a served pairwise rubric."""
    calibrations = load_calibrations(settings.calibration_files())
    for rubric_id in calibrations:
        rubric = catalog.rubrics.get(rubric_id)
        if rubric is None or rubric.kind != "pairwise":
            raise CalibrationError(f"calibration for rubric {rubric_id!r}, which this service does not serve as a "
                                   "pairwise rubric; add it with --rubric or RLAIF_EXTRA_RUBRICS")
    return calibrations


def open_cache(settings: ServiceSettings) -> JudgmentCache | None:
    if not settings.cache:
        return None
    from rlaif.judge.models import cache_root

    return JudgmentCache(settings.cache_path or cache_root() / "judgments.sqlite")


def _rescale(value: float, signed: bool) -> float:
    return 2.0 * value - 1.0 if signed else value


def _sigmoid(value: float) -> float:
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)


def _criteria(criteria: Sequence[CriterionRequest]) -> tuple[Criterion, ...]:
    return tuple(Criterion(text=c.text, weight=c.weight) for c in criteria)


def _item_texts(where: str, prompt: str, response: str, reference: str | None, criteria: Sequence[CriterionRequest],
                *, reference_name: str = "reference") -> list[tuple[str, str]]:
    """(location, text) of every user text of an item, for the max_chars check (criteria and reference included)."""
    return [(f"{where}.prompt", prompt), (f"{where}.response", response), (f"{where}.{reference_name}", reference or ""),
            *((f"{where}.criteria.{j}.text", c.text) for j, c in enumerate(criteria))]


def _sequences_per_item(judge: PairwiseJudge | ScoreJudge) -> int:
    """Engine sequences one item becomes (both orders x principles for pairwise), so a batch's token
    cost counts all of them, not only the longest."""
    principles = judge.rubric.principles or [None]
    per_order = min(judge.rubric.principles_per_comparison or len(principles), len(principles))
    samples = judge.cot_samples if judge.mode == "cot" else 1
    return (2 * per_order if judge.kind == "pairwise" else 1) * samples


def _shown(text: str, limit: int = 80) -> str:
    """`text` quoted for an error message, cut to `limit` characters (a request must not make us echo 100 KB)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _few(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}] ({len(indices)} in all)"
