"""Judge-backed reward sources: the LLM judge in-process or over HTTP, one or several rubrics.

- `LocalJudgeReward`  runs `rlaif.judge.judges.ScoreJudge` / `PairwiseJudge` on an engine in this
                      process (`engine: default`, `hf:...`, `openai:...`).
- `HTTPJudgeReward`   calls a running `rlaif serve` through `rlaif.service.client.JudgeClient`
                      (`POST /v1/rewards`), so the judge can live on another machine.

Both implement the `RewardSource` protocol (`rewards(prompts, responses)`) and build from a
`PPOConfig` with `from_config(config)` (what `rlaif ppo` uses).

Reward modes (RLAIF, Lee et al. 2023):
- `score` (d-RLAIF, §3.2): reward = the judge's expected score rescaled to [0, 1], or to
  [-1, 1] with `scale="signed"` (2r - 1, the range the paper used);
- `pairwise` (§2.1 + §3.1): reward = P(response beats a reference), both presentation
  orders averaged. The reference is the frozen initial policy's greedy answer to the same
  prompt (the trainer supplies it through `set_reference_generator`, generated once per
  prompt) or a column of the prompt file (`reference_column`). Against the initial policy
  the reward starts near 0.5 and rises only when the policy beats where it started;
- `checklist` (Rubrics as Rewards): reward = the weighted mean of P(yes) over the prompt's own
  criteria (`rlaif.judge.checklist`), read from the prompt file's `criteria_column`.

Reference answers (`answer_column` of the prompt file, or `answers=` per call) go to the judge
with every item, for reference-guided rubrics (`correctness`, `correctness-pairwise`); a
rubric that never shows a reference refuses them rather than ignoring them.

Several rubrics combine as a weighted sum (LLaMA-2 combined a helpfulness and a safety
reward the same way): `rubric: "helpfulness:0.7,harmlessness:0.3"`. Each component is
scaled first, then weighted, so with weights summing to 1 the total keeps the component
range. Per-rubric values of the last batch are in `last_components` (the trainer logs them
as `reward/<rubric>`).

When a reward cannot be had, the affected samples get `None` and the trainer applies
`on_missing_reward` (`fail` stops, `skip` drops them). Never 0: a made-up 0 is a real
reward that PPO would happily optimize against. Which failures count:
- HTTP: connection failures, timeouts, 429/5xx after the client's retries -> None for the
  samples of that request only (requests are chunked, so one bad chunk costs one chunk);
  a 4xx (unknown rubric, bad request, auth) raises, because skipping would hide a
  configuration error on every step;
- local: an `EngineError` (e.g. an `openai:` engine's server is down) -> None for that
  rubric's batch; any other exception is a bug and propagates.

Timing: `last_metrics` holds the last call's `judge_latency_s` (wall time of judging),
`judge_reference_s` (time spent obtaining reference responses), `judge_missing`, and
backend details (`judge_engine_s` and `judge_cached_frac` locally; `judge_request_max_s`
and `judge_failed_requests` over HTTP). The trainer copies these into metrics.jsonl next to
its own `reward_latency_s`.

    source = LocalJudgeReward(build_engine("default"), mode="score")
    source.rewards(["Name a color."], ["Blue."])                    # -> [0.71]
    source = HTTPJudgeReward("http://127.0.0.1:8000", rubrics="helpfulness:0.7,harmlessness:0.3",
                             mode="pairwise")
    source.rewards(["Name a color."], ["Blue."], references=["No."])
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlaif.policy_training.prompt_data import load_prompts
from rlaif.policy_training.rewards import _check_batch
from rlaif.policy_training.rubric_weights import (
    Reward,
    RubricSpec,
    RubricWeight,
    parse_rubric_weights,
    weighted_sum,
)

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.judge.cache import JudgmentCache
    from rlaif.judge.types import Criterion
    from rlaif.judge.engines.base import Engine
    from rlaif.policy_training.config import PPOConfig
    from rlaif.judge.api.client import JudgeClient

logger = logging.getLogger(__name__)

RewardMode = Literal["score", "pairwise", "checklist"]
RewardScale = Literal["unit", "signed"]
JudgeMode = Literal["logprob", "cot"]
ReferenceGenerator = Callable[[list[str]], list[str]]
"""prompts -> one reference response per prompt (the trainer's `PPOTrainer.reference_responses`)."""

DEFAULT_RUBRICS: dict[str, str] = {"score": "score-1-10", "pairwise": "helpfulness"}
"""The judges' own defaults, used by the in-process judge when no rubric is configured."""


# ----------------------------------------------------------------------------- rubric weights


def rescale(value: float, scale: RewardScale) -> float:
    """[0, 1] -> [0, 1] (`unit`) or [-1, 1] (`signed`, 2r - 1)."""
    return 2.0 * value - 1.0 if scale == "signed" else value


def load_reference_table(path: str | Path, reference_column: str, prompt_column: str | None = None) -> dict[str, str]:
    """prompt text -> reference response, from the prompt file the trainer reads.

    Prompts are extracted exactly as the trainer extracts them (`prompt_data.load_prompts`),
    so the keys match the prompts the reward source will be called with.
    """
    import json

    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        raise ValueError(f"reference_column needs a .jsonl or .json prompt file with columns; {path} has none")
    prompts = load_prompts(path, prompt_column)  # (rows,) one prompt per row, in row order
    table: dict[str, str] = {}
    for index, (row, prompt) in enumerate(zip(rows, prompts)):
        if not isinstance(row, dict) or not isinstance(row.get(reference_column), str):
            raise ValueError(f"{path} row {index}: no text column {reference_column!r} to use as the reference response")
        if prompt in table and table[prompt] != row[reference_column]:
            logger.warning("%s row %d repeats a prompt with a different reference; keeping the first", path, index)
            continue
        table.setdefault(prompt, row[reference_column])
    return table


def config_answers(config: PPOConfig) -> dict[str, str] | None:
    """prompt -> reference answer from the prompt file's `reward.answer_column`, if configured."""
    from rlaif.policy_training.prompt_data import column_table, load_prompt_rows

    column = config.reward.answer_column
    if column is None:
        return None
    if config.policy.prompts is None:
        raise ValueError("answer_column needs `prompts`: the reference answers are read from the prompt file")
    rows = load_prompt_rows(config.policy.prompts, config.policy.prompt_column)
    table = column_table(rows, column, config.policy.prompts, what="reference answers")
    bad = [p for p, v in table.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{config.policy.prompts}: column {column!r} must hold text (the reference answer), e.g. for "
                         f"{bad[0][:80]!r}")
    return table


def config_checklists(config: PPOConfig) -> dict[str, tuple[Criterion, ...]]:
    """prompt -> its checklist from the prompt file's `reward.criteria_column` (default `criteria`)."""
    from rlaif.judge.checklist import parse_criteria
    from rlaif.policy_training.prompt_data import column_table, load_prompt_rows

    if config.policy.prompts is None:
        raise ValueError("reward_mode checklist needs `prompts`: each prompt's criteria are read from the prompt file")
    column = config.reward.criteria_column or "criteria"
    rows = load_prompt_rows(config.policy.prompts, config.policy.prompt_column)
    table = column_table(rows, column, config.policy.prompts, what="checklists")
    return {prompt: parse_criteria(value, f"{config.policy.prompts}: prompt {prompt[:60]!r}")
            for prompt, value in table.items()}


def _config_references(config: PPOConfig) -> dict[str, str] | None:
    """`reward.reference_column` of the prompt file as a reference table, if configured."""
    column = config.reward.reference_column
    if column is None:
        return None
    if config.policy.prompts is None:
        raise ValueError("reference_column needs `prompts`: the references are read from the prompt file")
    return load_reference_table(config.policy.prompts, column, config.policy.prompt_column)


# ----------------------------------------------------------------------------- shared plumbing


class _JudgeReward:
    """Rubric terms, references, weighted combination and metrics; subclasses judge one rubric.

    Optional hooks the trainer uses (see `PPOTrainer`):
    - `needs_reference` is True when pairwise rewards need references that neither a
      reference table nor a caller provides; the trainer then calls
      `set_reference_generator(fn)` with its generator of the initial policy's responses;
    - `last_components` / `last_metrics` describe the last call and are logged.
    """

    def __init__(self, rubrics: RubricSpec, *, mode: RewardMode, scale: RewardScale, judge_mode: JudgeMode,
                 references: Mapping[str, str] | None, name: str | None, answers: Mapping[str, str] | None = None,
                 checklists: Mapping[str, Sequence[Criterion]] | None = None,
                 checklist_mode: Literal["explicit", "implicit"] = "explicit") -> None:
        if mode not in ("score", "pairwise", "checklist"):
            raise ValueError(f"mode must be 'score', 'pairwise' or 'checklist', got {mode!r}")
        if checklists is not None and mode != "checklist":
            raise ValueError("checklists only apply to mode='checklist'")
        if scale not in ("unit", "signed"):
            raise ValueError(f"scale must be 'unit' or 'signed', got {scale!r}")
        if references is not None and mode != "pairwise":
            raise ValueError("references only apply to mode='pairwise'")
        self.terms = parse_rubric_weights(rubrics)
        self.mode: RewardMode = mode
        self.scale: RewardScale = scale
        self.judge_mode: JudgeMode = judge_mode
        self.reference_table = dict(references) if references is not None else None
        self.answer_table = dict(answers) if answers is not None else None
        self.checklist_table = {p: tuple(c) for p, c in checklists.items()} if checklists is not None else None
        self.checklist_mode: Literal["explicit", "implicit"] = checklist_mode
        self._reference_generator: ReferenceGenerator | None = None
        # This call's reference answers and checklists (one per response), set by `rewards` for `_judge_terms`.
        self._answers: list[str | None] | None = None
        self._checklists: list[Sequence[Criterion]] | None = None
        self.name = name or f"{type(self).__name__}({mode})"
        self.last_components: dict[str, list[Reward]] = {}
        self.last_metrics: dict[str, float] = {}

    # -- references
    @property
    def needs_reference(self) -> bool:
        return self.mode == "pairwise" and self.reference_table is None and self._reference_generator is None

    def set_reference_generator(self, generate: ReferenceGenerator) -> None:
        """Where pairwise references come from when the call gives none (the trainer's initial policy)."""
        self._reference_generator = generate

    def _references(self, prompts: list[str], given: Sequence[str] | None) -> list[str] | None:
        if self.mode != "pairwise":
            if given is not None:
                raise ValueError("references were given, but mode='score' judges each response alone")
            return None
        if given is not None:
            if len(given) != len(prompts):
                raise ValueError(f"{len(given)} references for {len(prompts)} responses; give one per response")
            return list(given)
        if self.reference_table is not None:
            missing = [p for p in prompts if p not in self.reference_table]
            if missing:
                raise KeyError(f"no reference response for {len(missing)} prompt(s), e.g. {missing[0][:80]!r}; "
                               f"the reference table covers the prompt file it was read from")
            return [self.reference_table[p] for p in prompts]
        if self._reference_generator is not None:
            refs = list(self._reference_generator(prompts))
            if len(refs) != len(prompts):
                raise ValueError(f"the reference generator returned {len(refs)} responses for {len(prompts)} prompts")
            return refs
        raise ValueError("mode='pairwise' compares each response with a reference response, and none is available: "
                         "pass references=[...], build the source with a reference table (reference_column), or let "
                         "PPOTrainer supply its initial policy's responses (it calls set_reference_generator)")

    def _lookup(self, prompts: list[str], given: Sequence[Any] | None, table: Mapping[str, Any] | None,
                what: str) -> list[Any] | None:
        """Per-prompt values: given per call (one per response), else from the prompt-file table, else None."""
        if given is not None:
            if len(given) != len(prompts):
                raise ValueError(f"{len(given)} {what} for {len(prompts)} responses; give one per response")
            return list(given)
        if table is None:
            return None
        missing = [p for p in prompts if p not in table]
        if missing:
            raise KeyError(f"no {what} for {len(missing)} prompt(s), e.g. {missing[0][:80]!r}; the table covers the "
                           "prompt file it was read from")
        return [table[p] for p in prompts]

    # -- the call
    def rewards(self, prompts: list[str], responses: list[str], *,
                references: Sequence[str] | None = None, answers: Sequence[str | None] | None = None,
                criteria: Sequence[Sequence[Criterion]] | None = None) -> list[float | None]:
        """One reward per (prompt, response): the weighted sum of the rubric terms, None where missing.

        `references`: baseline responses (pairwise mode); `answers`: reference answers (reference-guided
        rubrics); `criteria`: one checklist per response (checklist mode). Unset = from the tables."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        prompts, responses = list(prompts), list(responses)
        started = time.perf_counter()
        refs = self._references(prompts, references)
        reference_s = time.perf_counter() - started
        self._answers = self._lookup(prompts, answers, self.answer_table, "reference answers")
        self._checklists = self._lookup(prompts, criteria, self.checklist_table, "checklists")
        if self.mode == "checklist" and self._checklists is None:
            raise ValueError("mode='checklist' grades each response against its prompt's criteria, and none are "
                             "available: pass criteria=[...] or build the source with checklists (criteria_column)")
        judged = time.perf_counter()
        components, metrics = self._judge_terms(prompts, responses, refs)
        latency = time.perf_counter() - judged
        checked = {t.name: _check_batch(f"{self.name}/{t.name}", prompts, responses, components[t.name])
                   for t in self.terms}
        total = weighted_sum([checked[t.name] for t in self.terms], [t.weight for t in self.terms])
        self.last_components = checked
        self.last_metrics = {"judge_latency_s": latency, "judge_reference_s": reference_s,
                             "judge_missing": float(sum(v is None for v in total)), **metrics}
        return total

    def _judge_terms(self, prompts: list[str], responses: list[str],
                     references: list[str] | None) -> tuple[dict[str, list[Reward]], dict[str, float]]:
        """Per-term rewards (already rescaled) and backend metrics."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- in-process judge


class LocalJudgeReward(_JudgeReward):
    """The judge in this process: `ScoreJudge` (mode="score") or `PairwiseJudge` (mode="pairwise").

    The engine is shared by every rubric term; each term is one batched judge call (both
    presentation orders of every pair in one engine call), so the engine's shared-prefix
    KV reuse covers the whole batch. A `JudgmentCache` makes repeated items free, e.g. the
    same (prompt, response) in a resumed run.
    """

    def __init__(self, engine: Engine, *, rubrics: RubricSpec = None,
                 mode: RewardMode = "score", scale: RewardScale = "unit", judge_mode: JudgeMode = "logprob",
                 references: Mapping[str, str] | None = None, cache: JudgmentCache | None = None,
                 tie_margin: float = 0.05, name: str | None = None,
                 calibrations: Sequence[str | Path] | None = None, answers: Mapping[str, str] | None = None,
                 checklists: Mapping[str, Sequence[Criterion]] | None = None,
                 checklist_mode: Literal["explicit", "implicit"] = "explicit") -> None:
        from rlaif.judge.calibration import load_calibrations
        from rlaif.judge.checklist import ChecklistJudge
        from rlaif.judge.judges import PairwiseJudge, ScoreJudge

        super().__init__(rubrics, mode=mode, scale=scale, judge_mode=judge_mode, references=references, name=name,
                         answers=answers, checklists=checklists, checklist_mode=checklist_mode)
        self.engine = engine
        # Built now, so a wrong rubric (unknown id, score rubric in pairwise mode) fails before training starts.
        self.judges: dict[str, PairwiseJudge | ScoreJudge | ChecklistJudge] = {}
        calibrated = load_calibrations(calibrations or [])  # rubric id -> calibration
        if calibrated and mode != "pairwise":
            raise ValueError("calibration applies to pairwise judgments; set reward_mode: pairwise or remove it")
        for term in self.terms:
            if mode == "checklist":
                if judge_mode != "logprob":
                    raise ValueError("mode='checklist' reads yes/no label log-probs; judge_mode must be 'logprob'")
                self.judges[term.name] = ChecklistJudge(engine, term.rubric, checklist_mode=checklist_mode, cache=cache)
                continue
            rubric = term.rubric or DEFAULT_RUBRICS[mode]
            if mode == "score":
                self.judges[term.name] = ScoreJudge(engine, rubric, mode=judge_mode, cache=cache)
            else:
                judge = PairwiseJudge(engine, rubric, mode=judge_mode, cache=cache, tie_margin=tie_margin)
                if judge.rubric.id in calibrated:
                    judge = PairwiseJudge(engine, judge.rubric, mode=judge_mode, cache=cache, tie_margin=tie_margin,
                                          calibration=calibrated.pop(judge.rubric.id))
                self.judges[term.name] = judge
        if calibrated:
            raise ValueError(f"calibration(s) for rubric(s) {sorted(calibrated)}, which this reward does not use")

    @classmethod
    def from_config(cls, config: PPOConfig) -> LocalJudgeReward:
        """`engine`, `rubric`, `reward_mode`, `reward_scale`, `judge_mode`, `reference_column` of a PPO config."""
        from rlaif.judge.engines import build_engine

        r = config.reward
        if r.engine is None:
            raise ValueError("LocalJudgeReward needs `engine` (e.g. default, hf:<model>, openai:<url>#<model>)")
        if r.reward_mode == "group":
            raise ValueError("reward_mode group is GroupJudgeReward's (rlaif.policy_training.group_rewards)")
        return cls(build_engine(r.engine), rubrics=r.rubric, mode=r.reward_mode, scale=r.reward_scale,
                   judge_mode=r.judge_mode, references=_config_references(config), calibrations=r.calibration,
                   answers=config_answers(config),
                   checklists=config_checklists(config) if r.reward_mode == "checklist" else None,
                   checklist_mode=r.checklist_mode)

    def _judge_terms(self, prompts: list[str], responses: list[str],
                     references: list[str] | None) -> tuple[dict[str, list[Reward]], dict[str, float]]:
        from rlaif.judge.engines.base import EngineError
        from rlaif.judge.types import ChecklistItem, PairwiseItem, ScoreItem

        answers = self._answers or [None] * len(prompts)
        items: list[Any]
        if self.mode == "score":
            items = [ScoreItem(prompt=p, response=r, reference=a) for p, r, a in zip(prompts, responses, answers)]
        elif self.mode == "checklist":
            assert self._checklists is not None
            items = [ChecklistItem(prompt=p, response=r, criteria=tuple(c), reference=a)
                     for p, r, c, a in zip(prompts, responses, self._checklists, answers)]
        else:
            assert references is not None
            items = [PairwiseItem(prompt=p, response_a=r, response_b=ref, reference=a)
                     for p, r, ref, a in zip(prompts, responses, references, answers)]
        components: dict[str, list[Reward]] = {}
        engine_s = 0.0
        cached = 0
        for name, judge in self.judges.items():
            try:
                judgments = judge.judge(items)
            except EngineError as exc:
                logger.warning("judge engine failed for rubric %s on %d samples: %s; their rewards are missing",
                               name, len(items), exc)
                components[name] = [None] * len(items)
                continue
            values = [j.prob_a if self.mode == "pairwise" else j.score for j in judgments]  # type: ignore[union-attr]
            components[name] = [rescale(v, self.scale) for v in values]
            fresh = [j for j in judgments if not j.cached]
            engine_s += fresh[0].timings.engine_seconds if fresh else 0.0  # timings are per batch, shared by items
            cached += len(judgments) - len(fresh)
        n_judged = len(items) * len(self.judges)
        return components, {"judge_engine_s": engine_s, "judge_cached_frac": cached / n_judged if n_judged else 0.0}


# ----------------------------------------------------------------------------- HTTP judge service


class HTTPJudgeReward(_JudgeReward):
    """The judge service over HTTP (`POST /v1/rewards`), batched, concurrent, with timeouts and retries.

    Each call is split into requests of at most `max_items` samples per rubric term; up to
    `concurrency` requests are in flight at once, so the service's micro-batcher can merge
    them into large engine batches. Retries (429/503/connection errors, with backoff and
    Retry-After) are the client's (`rlaif.service.client.RetryPolicy`); what still fails leaves
    that request's samples at None (see the module docstring for which statuses raise).
    A ready-made `client` (e.g. with a custom transport) replaces timeout, retries, backoff and api_key.
    """

    def __init__(self, url: str, *, rubrics: RubricSpec = None,
                 mode: RewardMode = "score", scale: RewardScale = "unit", judge_mode: JudgeMode = "logprob",
                 references: Mapping[str, str] | None = None, timeout: float = 300.0, retries: int = 4,
                 backoff: float = 0.5, concurrency: int = 4, max_items: int = 256, api_key: str | None = None,
                 client: JudgeClient | None = None, name: str | None = None, answers: Mapping[str, str] | None = None,
                 checklists: Mapping[str, Sequence[Criterion]] | None = None,
                 checklist_mode: Literal["explicit", "implicit"] = "explicit") -> None:
        from rlaif.judge.api.client import JudgeClient, RetryPolicy

        super().__init__(rubrics, mode=mode, scale=scale, judge_mode=judge_mode, references=references, name=name,
                         answers=answers, checklists=checklists, checklist_mode=checklist_mode)
        if concurrency < 1 or max_items < 1:
            raise ValueError("concurrency and max_items must be >= 1")
        self.url = url
        self.concurrency = concurrency
        self.max_items = max_items
        self.client = client or JudgeClient(url, api_key=api_key, timeout=timeout,
                                            retry=RetryPolicy(retries=retries, backoff=backoff), max_items=max_items)

    @classmethod
    def from_config(cls, config: PPOConfig) -> HTTPJudgeReward:
        """`judge_url`, `rubric`, `reward_mode`, `reward_scale`, `judge_mode`, `reference_column`,
        `judge_timeout`, `judge_retries`, `judge_concurrency`, `judge_api_key_env` of a PPO config."""
        r = config.reward
        if r.judge_url is None:
            raise ValueError("HTTPJudgeReward needs `judge_url` (a running `rlaif serve`, e.g. http://127.0.0.1:8000)")
        if r.reward_mode == "group":
            raise ValueError("reward_mode group is GroupJudgeReward's (rlaif.policy_training.group_rewards)")
        return cls(r.judge_url, rubrics=r.rubric, mode=r.reward_mode, scale=r.reward_scale, judge_mode=r.judge_mode,
                   references=_config_references(config), timeout=r.judge_timeout, retries=r.judge_retries,
                   concurrency=r.judge_concurrency, api_key=os.environ.get(r.judge_api_key_env) or None,
                   answers=config_answers(config),
                   checklists=config_checklists(config) if r.reward_mode == "checklist" else None,
                   checklist_mode=r.checklist_mode)

    def close(self) -> None:
        self.client.close()

    def _judge_terms(self, prompts: list[str], responses: list[str],
                     references: list[str] | None) -> tuple[dict[str, list[Reward]], dict[str, float]]:
        spans = [(start, min(start + self.max_items, len(prompts))) for start in range(0, len(prompts), self.max_items)]
        jobs = [(term, span) for term in self.terms for span in spans]
        components: dict[str, list[Reward]] = {t.name: [None] * len(prompts) for t in self.terms}

        def request(job: tuple[RubricWeight, tuple[int, int]]) -> tuple[list[float] | None, float]:
            term, (lo, hi) = job
            started = time.perf_counter()
            values = self._request(term, prompts[lo:hi], responses[lo:hi],
                                   references[lo:hi] if references is not None else None,
                                   self._answers[lo:hi] if self._answers is not None else None,
                                   self._checklists[lo:hi] if self._checklists is not None else None)
            return values, time.perf_counter() - started

        if len(jobs) == 1:
            results = [request(jobs[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)), thread_name_prefix="judge-http") as pool:
                results = list(pool.map(request, jobs))
        failed = 0
        for (term, (lo, hi)), (values, _) in zip(jobs, results):
            if values is None:
                failed += 1
            else:
                components[term.name][lo:hi] = values
        return components, {"judge_request_max_s": max(seconds for _, seconds in results),
                            "judge_requests": float(len(jobs)), "judge_failed_requests": float(failed)}

    def _request(self, term: RubricWeight, prompts: list[str], responses: list[str], references: list[str] | None,
                 answers: list[str | None] | None = None,
                 checklists: list[Sequence[Criterion]] | None = None) -> list[float] | None:
        """One /v1/rewards request; None when the service could not be had (see the module docstring)."""
        from rlaif.judge.api.client import JudgeServiceError

        criteria = [[c.model_dump() for c in checklist] for checklist in checklists] if checklists is not None else None
        try:
            response = self.client.rewards(prompts, responses, references=references, mode=self.mode,
                                           rubric=term.rubric, judge_mode=self.judge_mode, scale=self.scale,
                                           reference_answers=answers, criteria=criteria,
                                           checklist_mode=self.checklist_mode)
        except JudgeServiceError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                raise  # the request itself is wrong (rubric, auth, size): skipping would hide it on every step
            logger.warning("judge service %s failed for rubric %s on %d samples: %s; their rewards are missing",
                           self.url, term.name, len(prompts), exc)
            return None
        if len(response.rewards) != len(prompts):
            logger.warning("judge service returned %d rewards for %d samples; treating them as missing",
                           len(response.rewards), len(prompts))
            return None
        return list(response.rewards)
