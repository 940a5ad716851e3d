"""Where labeling jobs get their models: the policy engine and a judge (in-process or HTTP).

`JudgeBackend` is the small seam both jobs program against, so the same job code runs with
the judge in this process (`LocalJudge`: `PairwiseJudge`/`ScoreJudge` over an engine, with
the SQLite judgment cache) or behind `rlaif serve` (`ServiceJudge`: `rlaif.judge.api.client.JudgeClient`,
whose server keeps its own cache and micro-batches requests).

Models load lazily (`Models`): a finished job re-run to re-filter or re-export never loads a
model, and when the policy and judge specs are equal one engine instance serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from rlaif.judge.types import ChecklistItem, ChecklistJudgment, PairwiseItem, PairwiseJudgment, ScoreItem, ScoreJudgment

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.judge.cache import JudgmentCache
    from rlaif.judge.calibration import Calibration
    from rlaif.judge.engines.base import Engine
    from rlaif.judge.labeling.config import _JobConfig


class JudgeBackend(Protocol):
    """What a labeling job needs from a judge."""

    def pairwise(self, items: Sequence[PairwiseItem]) -> list[PairwiseJudgment]:
        """Position-debiased judgments, one per item, in order."""
        ...

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreJudgment]:
        """Direct scores, one per item, in order."""
        ...

    def checklist(self, items: Sequence[ChecklistItem]) -> list[ChecklistJudgment]:
        """Checklist grades (each item against its own criteria), one per item, in order."""
        ...


class LocalJudge:
    """The judge in this process. Judges are built on first use so an unused rubric never loads."""

    def __init__(self, engine: Engine, *, pairwise_rubric: str | None, score_rubric: str | None, mode: str,
                 tie_margin: float = 0.05, cache: JudgmentCache | None = None, seed: int = 0,
                 calibration: Calibration | None = None, checklist_rubric: str | None = None,
                 checklist_mode: str = "explicit") -> None:
        self.engine = engine
        self._checklist_rubric = checklist_rubric
        self._checklist_mode = checklist_mode
        self._checklist = None
        self._calibration = calibration
        self._pairwise_rubric = pairwise_rubric
        self._score_rubric = score_rubric
        self._mode = mode
        self._tie_margin = tie_margin
        self._cache = cache
        self._seed = seed
        self._pairwise = None
        self._score = None

    def pairwise(self, items: Sequence[PairwiseItem]) -> list[PairwiseJudgment]:
        if self._pairwise is None:
            from rlaif.judge.judges import PairwiseJudge

            assert self._pairwise_rubric is not None, "this job has no pairwise rubric"
            self._pairwise = PairwiseJudge(self.engine, self._pairwise_rubric, mode=self._mode,  # type: ignore[arg-type]
                                           tie_margin=self._tie_margin, cache=self._cache, seed=self._seed,
                                           calibration=self._calibration)
        return self._pairwise.judge(items)

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreJudgment]:
        if self._score is None:
            from rlaif.judge.judges import ScoreJudge

            assert self._score_rubric is not None, "this job has no score rubric"
            self._score = ScoreJudge(self.engine, self._score_rubric, mode=self._mode,  # type: ignore[arg-type]
                                     cache=self._cache, seed=self._seed)
        return self._score.judge(items)

    def checklist(self, items: Sequence[ChecklistItem]) -> list[ChecklistJudgment]:
        if self._checklist is None:
            from rlaif.judge.checklist import ChecklistJudge

            assert self._checklist_rubric is not None, "this job has no checklist rubric"
            self._checklist = ChecklistJudge(self.engine, self._checklist_rubric,
                                             checklist_mode=self._checklist_mode,  # type: ignore[arg-type]
                                             cache=self._cache, seed=self._seed)
        return self._checklist.judge(items)


class ServiceJudge:
    """A remote judge (`rlaif serve`) through `rlaif.judge.api.client.JudgeClient`.

    The client splits big calls into requests of at most `max_items` items (kept under the
    server's limit) and retries 429/503 with backoff; the server's micro-batcher merges them.
    """

    def __init__(self, client, *, pairwise_rubric: str | None, score_rubric: str | None, mode: str,
                 checklist_rubric: str | None = None, checklist_mode: str = "explicit") -> None:
        self.client = client
        self._checklist_rubric = checklist_rubric
        self._checklist_mode = checklist_mode
        self._pairwise_rubric = pairwise_rubric
        self._score_rubric = score_rubric
        self._mode = mode

    def pairwise(self, items: Sequence[PairwiseItem]) -> list[PairwiseJudgment]:
        items = [item.model_dump() for item in items]
        return [_as(PairwiseJudgment, j) for j in self.client.pairwise(items, rubric=self._pairwise_rubric, mode=self._mode)]

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreJudgment]:
        items = [item.model_dump() for item in items]
        return [_as(ScoreJudgment, j) for j in self.client.score(items, rubric=self._score_rubric, mode=self._mode)]

    def checklist(self, items: Sequence[ChecklistItem]) -> list[ChecklistJudgment]:
        items = [item.model_dump() for item in items]
        return [_as(ChecklistJudgment, j) for j in self.client.checklist(items, rubric=self._checklist_rubric,
                                                                         checklist_mode=self._checklist_mode)]

    def close(self) -> None:
        self.client.close()


def _as(model: type, value: object):
    """The client returns `rlaif.judge.types` models; revalidate anything else (a different client version)."""
    if isinstance(value, model):
        return value
    return model.model_validate(value if isinstance(value, dict) else value.model_dump())  # type: ignore[attr-defined]


class Models:
    """Lazily built policy engine and judge for one job; shares one engine when the specs match."""

    def __init__(self, config: _JobConfig, *, pairwise_rubric: str | None, score_rubric: str | None,
                 tie_margin: float = 0.05, policy_engine: Engine | None = None, judge: JudgeBackend | None = None,
                 judge_engine: Engine | None = None, checklist_rubric: str | None = None,
                 checklist_mode: str = "explicit") -> None:
        self.config = config
        self._checklist = dict(checklist_rubric=checklist_rubric, checklist_mode=checklist_mode)
        self._pairwise_rubric = pairwise_rubric
        self._score_rubric = score_rubric
        self._tie_margin = tie_margin
        self._policy = policy_engine
        self._judge = judge
        self._judge_engine = judge_engine
        self._cache: JudgmentCache | None = None
        self._service: ServiceJudge | None = None

    @property
    def policy(self) -> Engine:
        if self._policy is None:
            if self._judge_engine is not None and self.config.policy == self.config.engine and self.config.judge_url is None:
                self._policy = self._judge_engine
            else:
                from rlaif.judge.engines import build_engine

                self._policy = build_engine(self.config.policy)
        return self._policy

    @property
    def judge(self) -> JudgeBackend:
        if self._judge is None:
            self._judge = self._build_judge()
        return self._judge

    def _build_judge(self) -> JudgeBackend:
        config = self.config
        if config.judge_url is not None:
            from rlaif.judge.api.client import JudgeClient  # optional path: only jobs that name a service import it

            client = JudgeClient(config.judge_url, api_key=config.api_key, timeout=config.timeout,
                                 max_items=config.request_batch_size)
            self._service = ServiceJudge(client, pairwise_rubric=self._pairwise_rubric, score_rubric=self._score_rubric,
                                         mode=config.mode, **self._checklist)
            return self._service
        if self._judge_engine is None:
            if self._policy is not None and config.policy == config.engine:
                self._judge_engine = self._policy
            else:
                from rlaif.judge.engines import build_engine

                self._judge_engine = build_engine(config.engine)
        if not config.no_cache:
            from rlaif.judge.cache import JudgmentCache

            self._cache = JudgmentCache(config.cache_path or config.out / "judgments.sqlite")
        calibration_path = getattr(config, "calibration", None)
        calibration = None
        if calibration_path is not None:
            from rlaif.judge.calibration import Calibration

            calibration = Calibration.load(calibration_path)
        return LocalJudge(self._judge_engine, pairwise_rubric=self._pairwise_rubric, score_rubric=self._score_rubric,
                          mode=config.mode, tie_margin=self._tie_margin, cache=self._cache, seed=config.seed,
                          calibration=calibration, **self._checklist)

    def policy_name(self) -> str:
        return self.policy.model_name

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._service is not None:
            self._service.close()
            self._service = None
