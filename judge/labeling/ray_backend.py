"""Ray Data backend of `rlaif label` and `rlaif best-of-n` (`--ray`): the same job, its stages on actor pools.

`run_label(config, ray=RayOptions(...))` / `run_best_of_n(config, ray=...)` (the CLI's `--ray`)
run exactly the job the local path runs, with the same config, progress store and outputs;
only the loop over batches moves to a Ray cluster. This file holds that loop. (Over 500 lines on
purpose: a fifth of it is this map, and the rest is one driver loop with the actors and shard
format it feeds, which are read and changed together.)

How a job maps onto Ray Data:

- **Shards.** The driver reads the prompts with the job's own loader (so ids, column paths and
  the prompts digest are the local job's) and cuts them into the job's fixed batches of
  `--batch-size` prompts. Each batch not yet finished becomes one row of a Ray dataset
  (`ray.data.from_items`): a *shard*, carrying its prompts and whatever the progress store
  already holds for it (samples, finished judging stages).
- **Stages.** Two `map_batches` stages on actor pools, each actor holding its engine for its
  lifetime: `generate` (the policy; skipped for `--responses-from`) and `judge` (the in-process
  judge, or a client of `--judge-url` replicas). Each stage has its own pool size (fixed or
  autoscaling), CPUs and GPUs per actor (`StageResources`). Ray Data streams shards through
  both pools at once, so generation of shard k+1 overlaps judging of shard k.
- **Same code, same results.** An actor runs the local job's own per-batch functions
  (`rlaif.judge.labeling.job.ensure_responses` and the job's `judge_batch`) against a
  `ShardStore`, an in-memory stand-in for the progress store that records every stage the
  functions commit. Batch i still samples with the seed derived from (seed, i), so a shard's
  samples and judgments are the local job's, row for row.
- **Persistence and resume.** The driver alone owns `progress.sqlite`: as each shard comes out of
  the judge stage it replays the shard's recorded stages into the store, one transaction per
  stage with its completion marker, exactly as the local loop commits them. **The unit of
  resume is the shard (one `--batch-size` batch).** A killed driver loses only the shards that
  were in flight; the next run (local or Ray, the backend is not part of the job's identity)
  skips every finished shard and sends a partly finished one with its stored stages, which the
  actors do not redo. The dataset, card and summary are then written from the store by the
  job's own code.
- **Errors.** An actor never lets an exception escape into Ray (Ray Data would re-raise it as a
  remote traceback): it returns the shard as a failure row. Before that, when a batched engine
  or judge call failed, it re-runs the shard's items one at a time to find the one that fails
  alone. The driver stops at the first failure row and raises `WorkerFailed` naming the shard,
  the stage, the prompt id and (for judging) the samples compared, after committing every shard
  that finished before it.

Connecting (`rlaif.judge.ray_cluster.ray_session`): `RayOptions.address` None uses Ray's own rule
(`RAY_ADDRESS`, else a new local cluster that is shut down when the job ends); a process that
already called `ray.init` is used as it is. Workers must be able to import `rlaif` (install it on
every node). Run it:

    rlaif label --prompts p.jsonl --out runs/pref --n 4 --ray --ray-actors generate=2,judge=1 --ray-gpus 1
    run_label(LabelConfig(prompts=..., out=...), ray=RayOptions(judge=StageResources(actors=(1, 4))))

See docs/scaling.md.

The judgment cache: actors use the job's cache file (`--cache-path`, default
`<out>/judgments.sqlite`, SQLite WAL, safe for several processes on one machine). On a cluster of
more than one node a default cache path is not used (it would be a different file on each
node, inside a folder only the driver has); pass `--cache-path` to a node-local path to keep one
cache per node. The progress store makes the job resumable either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlaif.judge.labeling.job import SessionCounters, Source, ensure_responses
from rlaif.judge.ray_cluster import ray_session
from rlaif.judge.types import PairwiseItem, ScoreItem

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.judge.data import PromptRecord
    from rlaif.judge.engines.base import Engine, GenerationParams
    from rlaif.judge.labeling.backends import JudgeBackend
    from rlaif.judge.labeling.config import _JobConfig
    from rlaif.judge.labeling.store import ProgressStore
    from rlaif.judge.types import ChatPrompt

logger = logging.getLogger(__name__)

Stage = Literal["generate", "judge"]
STAGES: tuple[Stage, ...] = ("generate", "judge")
SHARDS_IN_FLIGHT_PER_ACTOR = 2
_MAX_SOLO_RETRIES = 256
"""At most this many items are re-run one by one to find the one that fails (bigger shards: named as a whole)."""


# ---------------------------------------------------------------------------------- options
class StageResources(BaseModel):
    """Ray resources of one stage's actor pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int | tuple[int, int] = Field(1, description="Actors in the pool: a fixed size, or (min, max) for a pool "
                                                         "that Ray Data grows with the backlog. Each holds one engine.")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per actor (also its torch/OpenMP thread count).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per actor (fractions share a GPU between actors).")

    @field_validator("actors")
    @classmethod
    def _actors(cls, actors: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (actors, actors) if isinstance(actors, int) else actors
        if low < 1 or high < low:
            raise ValueError(f"actors must be >= 1, or (min, max) with 1 <= min <= max; got {actors!r}")
        return actors

    def compute(self):
        """The pool for `map_batches`. Two shards queued per actor: the next one is ready when the current one
        ends, and a killed driver loses at most 2 x actors shards of this stage."""
        import ray.data

        if isinstance(self.actors, int):
            return ray.data.ActorPoolStrategy(size=self.actors, max_tasks_in_flight_per_actor=SHARDS_IN_FLIGHT_PER_ACTOR)
        return ray.data.ActorPoolStrategy(min_size=self.actors[0], max_size=self.actors[1],
                                          max_tasks_in_flight_per_actor=SHARDS_IN_FLIGHT_PER_ACTOR)


class RayOptions(BaseModel):
    """Where and with what resources a labeling job runs on Ray. Not part of the job's identity:
    a job started locally can be resumed on Ray and the other way round."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    address: str | None = Field(None, description="Ray cluster address (`auto`, `ray://host:10001`, `host:6379`); "
                                                  "None = Ray's default (RAY_ADDRESS, else a new local cluster).")
    generate: StageResources = Field(default_factory=StageResources, description="Actor pool of the generate stage.")
    judge: StageResources = Field(default_factory=StageResources, description="Actor pool of the judge stage.")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra `ray.init` arguments, used only when "
                                                                          "this process starts or joins Ray itself.")
    engine_factory: Callable[[str], Any] | None = Field(None, exclude=True, description=(
        "Builds an engine from a spec inside each actor (default `rlaif.judge.engines.build_engine`). Must be "
        "picklable; the Ray counterpart of passing `policy_engine=` / `judge_engine=` to the local job."))

    def describe(self) -> dict[str, object]:
        """What the summary records about the backend."""
        return {"backend": "ray", "address": self.address,
                **{stage: getattr(self, stage).model_dump(mode="json") for stage in STAGES}}


def parse_stage_values(text: str, *, flag: str, kind: Literal["actors", "float"]) -> dict[str, object]:
    """Parse `--ray-actors` / `--ray-gpus` / `--ray-cpus`: one value for both stages, or per stage.

    `4` -> both stages; `generate=4,judge=2`; actors also take `MIN-MAX` (an autoscaling pool),
    e.g. `judge=1-4`.
    """
    def value(part: str) -> object:
        try:
            if kind == "float":
                return float(part)
            low, sep, high = part.partition("-")
            return (int(low), int(high)) if sep else int(part)
        except ValueError:
            example = "4, 1-4 or generate=4,judge=1-4" if kind == "actors" else "1, 0.5 or generate=1,judge=0.5"
            raise ValueError(f"{flag}: cannot read {part!r}; use e.g. {example}") from None

    text = text.strip()
    if "=" not in text:
        return {stage: value(text) for stage in STAGES}
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, _, raw = part.partition("=")
        if stage.strip() not in STAGES:
            raise ValueError(f"{flag}: unknown stage {stage.strip()!r} in {text!r}; the stages are generate and judge")
        values[stage.strip()] = value(raw.strip())
    return values


def ray_options(address: str | None = None, *, actors: str | None = None, cpus: str | None = None,
                gpus: str | None = None) -> RayOptions:
    """`RayOptions` from the CLI's `--ray-address`, `--ray-actors`, `--ray-cpus` and `--ray-gpus` strings."""
    per_stage: dict[str, dict[str, object]] = {stage: {} for stage in STAGES}
    for flag, text, field, kind in (("--ray-actors", actors, "actors", "actors"), ("--ray-cpus", cpus, "num_cpus", "float"),
                                    ("--ray-gpus", gpus, "num_gpus", "float")):
        if text:
            for stage, parsed in parse_stage_values(text, flag=flag, kind=kind).items():  # type: ignore[arg-type]
                per_stage[stage][field] = parsed
    return RayOptions(address=address, **{stage: StageResources(**values) for stage, values in per_stage.items()})


class WorkerFailed(RuntimeError):
    """A shard failed inside a Ray actor; the message names the shard, the stage and the item."""


# ---------------------------------------------------------------------------------- the shard store
@dataclass
class _Commit:
    """One committed stage (or meta value), as the local job would have written it to the progress store."""

    kind: Literal["responses", "records", "meta"]
    batch: int = 0
    stage: str = ""
    values: list[str] | None = None
    responses: dict[str, list[str]] | None = None  # JSON object keys are strings
    seconds: float = 0.0
    fresh: int | bool = 0
    key: str = ""
    value: str = ""


class ShardStore:
    """The `ProgressStore` methods the per-batch job functions call, in memory, for one shard.

    Starts from what the real store already holds for the shard (so finished stages are skipped
    exactly as in a local resume) and records every commit, which the driver replays into the real
    store in the same order.
    """

    def __init__(self, *, responses: Mapping[int, list[str]], records: Mapping[str, list[str]],
                 meta: Mapping[str, str], commits: Sequence[_Commit] = ()) -> None:
        self._responses = {int(k): list(v) for k, v in responses.items()}
        self._records = {stage: list(values) for stage, values in records.items()}
        self._done = set(self._records) | ({"generate"} if self._responses else set())
        self._meta = dict(meta)
        self.commits = list(commits)

    # --- the ProgressStore surface used by ensure_responses / judge_batch
    def stage_done(self, batch: int, stage: str) -> bool:
        return stage in self._done

    def load_responses(self, prompt_indices) -> dict[int, list[str]]:
        return {i: list(self._responses.get(i, [])) for i in prompt_indices}

    def save_responses(self, batch: int, responses: Mapping[int, Sequence[str]], seconds: float, *, fresh: bool = True) -> None:
        self._responses.update({int(i): list(texts) for i, texts in responses.items()})
        self._done.add("generate")
        self.commits.append(_Commit("responses", batch=batch, responses={str(i): list(t) for i, t in responses.items()},
                                    seconds=seconds, fresh=fresh))

    def save_records(self, batch: int, stage: str, values: Sequence[str], seconds: float, fresh: int) -> None:
        self._records[stage] = list(values)
        self._done.add(stage)
        self.commits.append(_Commit("records", batch=batch, stage=stage, values=list(values), seconds=seconds, fresh=fresh))

    def load_records(self, batch: int, stage: str) -> list[str]:
        return list(self._records.get(stage, []))

    def get_meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self._meta[key] = value
        self.commits.append(_Commit("meta", key=key, value=value))

    # --- transport
    def state(self) -> dict[str, object]:
        return {"responses": {str(i): t for i, t in self._responses.items()}, "records": self._records,
                "meta": self._meta, "commits": [asdict(c) for c in self.commits]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ShardStore:
        return cls(responses={int(k): v for k, v in state["responses"].items()}, records=state["records"],
                   meta=state["meta"], commits=[_Commit(**c) for c in state["commits"]])


def replay(store: ProgressStore, commits: Sequence[Mapping[str, Any]]) -> None:
    """Write a shard's recorded commits into the real progress store, one transaction each, in order."""
    for raw in commits:
        commit = _Commit(**raw)
        if commit.kind == "meta":
            if store.get_meta(commit.key) is None:
                store.set_meta(commit.key, commit.value)
        elif commit.kind == "responses":
            assert commit.responses is not None
            store.save_responses(commit.batch, {int(i): t for i, t in commit.responses.items()}, commit.seconds,
                                 fresh=bool(commit.fresh))
        else:
            assert commit.values is not None
            store.save_records(commit.batch, commit.stage, commit.values, commit.seconds, int(commit.fresh))


# ---------------------------------------------------------------------------------- naming the failing item
class ItemFailed(Exception):
    """A batched call failed and re-running its items one by one found the one that fails alone."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: {_one_line(cause)}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__


def _locate(call: Callable[[list], object], items: Sequence, describe: Callable[[int], str], error: BaseException) -> NoReturn:
    """After `call(items)` raised `error`: run each item alone; raise `ItemFailed` for the first that fails alone."""
    if len(items) > 1 and len(items) <= _MAX_SOLO_RETRIES:
        for k, item in enumerate(items):
            try:
                call([item])
            except Exception as solo:  # noqa: BLE001 - any failure of the item alone names it
                raise ItemFailed(describe(k), solo) from solo
        raise ItemFailed(f"a batch of {len(items)} items (each of them succeeds alone)", error) from error
    raise ItemFailed(describe(0) if len(items) == 1 else f"a batch of {len(items)} items", error) from error


class _LocatingEngine:
    """The policy engine of one shard; a failed `generate` is narrowed down to the prompt that fails."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[str]) -> None:
        self._engine = engine
        self._prompt_ids = list(prompt_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        try:
            return self._engine.generate(prompts, params)
        except Exception as exc:  # noqa: BLE001
            ids = self._prompt_ids
            _locate(lambda one: self._engine.generate(one, params), list(prompts),
                    lambda k: f"generating for prompt {ids[k]!r}" if len(prompts) == len(ids) else "generating", exc)


class _LocatingJudge:
    """The judge of one shard; a failed batched judge call is narrowed down to the comparison that fails."""

    def __init__(self, judge: JudgeBackend, prompts: Mapping[int, PromptRecord], responses: Mapping[int, list[str]]) -> None:
        self._judge = judge
        self._by_text = {record.text: (i, record.id) for i, record in prompts.items()}
        self._responses = responses

    def _sample(self, prompt_index: int, text: str) -> str:
        samples = self._responses.get(prompt_index, [])
        return str(samples.index(text)) if text in samples else "?"

    def _describe(self, item: PairwiseItem | ScoreItem) -> str:
        index, prompt_id = self._by_text.get(item.prompt, (-1, "?"))
        if isinstance(item, PairwiseItem):
            return (f"judging prompt {prompt_id!r}, sample {self._sample(index, item.response_a)} vs "
                    f"sample {self._sample(index, item.response_b)}")
        return f"scoring prompt {prompt_id!r}, sample {self._sample(index, item.response)}"

    def pairwise(self, items):
        try:
            return self._judge.pairwise(items)
        except Exception as exc:  # noqa: BLE001
            _locate(self._judge.pairwise, list(items), lambda k: self._describe(items[k]), exc)

    def score(self, items):
        try:
            return self._judge.score(items)
        except Exception as exc:  # noqa: BLE001
            _locate(self._judge.score, list(items), lambda k: self._describe(items[k]), exc)


# ---------------------------------------------------------------------------------- actors
JudgeBatch = Callable[..., None]
"""A job's `judge_batch(store, judge, config, source, batch, indices, responses, counters)`."""


@dataclass(frozen=True)
class _JobSpec:
    """Everything an actor needs to rebuild the job's models and run its per-batch functions (picklable)."""

    config: _JobConfig
    models_kwargs: dict[str, Any]
    judge_batch: JudgeBatch
    engine_factory: Callable[[str], Any] | None


def _payload_shard(payload: Mapping[str, Any]) -> tuple[int, range, Source]:
    """(batch index, its prompt indices, a `Source` holding only this shard) from a shard's payload."""
    from rlaif.judge.data import PromptRecord

    records = {int(i): PromptRecord.model_validate(p) for i, p in payload["prompts"].items()}
    responses = payload.get("source_responses")
    # Indexed by the job's global prompt index, like the local job's list, holding only this shard.
    source = Source(prompts=records, responses={int(k): v for k, v in responses.items()} if responses else None)  # type: ignore[arg-type]
    start, stop = payload["indices"]
    return int(payload["batch"]), range(start, stop), source


class _StageActor:
    """One actor of a stage's pool: holds its engine (built on first use) and runs shards through the job's code."""

    stage: Stage = "generate"

    def __init__(self, spec: _JobSpec) -> None:
        self.spec = spec
        self._engines: dict[str, Engine] = {}
        self._models = None

    def _engine(self, spec: str) -> Engine:
        if spec not in self._engines:
            factory = self.spec.engine_factory
            if factory is None:
                from rlaif.judge.engines import build_engine

                factory = build_engine
            self._engines[spec] = factory(spec)
        return self._engines[spec]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = [self._run_one(payload) for payload in batch["payload"]]
        return {"shard": batch["shard"], "payload": np.array(out, dtype=object)}

    def _run_one(self, text: str) -> str:
        payload = json.loads(text)
        if payload.get("error"):
            return text  # failed in an earlier stage: pass the failure on to the driver
        try:
            counters = SessionCounters()
            self.run(payload, counters)
            for name in ("samples", "judgments", "generate_seconds", "judge_seconds"):
                payload["counters"][name] += getattr(counters, name)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the driver as this shard's error
            first, last = payload["indices"][0], payload["indices"][1] - 1
            where = f"shard {payload['batch']} (prompts {first}-{last}), stage {self.stage!r}"
            detail = str(exc) if isinstance(exc, ItemFailed) else _one_line(exc)
            payload["error"] = f"{where}: {detail}"
            payload["traceback"] = traceback.format_exc(limit=20)
        return json.dumps(payload, ensure_ascii=False)

    def run(self, payload: dict[str, Any], counters: SessionCounters) -> None:
        raise NotImplementedError


class _GenerateActor(_StageActor):
    stage: Stage = "generate"

    def run(self, payload: dict[str, Any], counters: SessionCounters) -> None:
        from rlaif.judge.labeling.backends import Models

        batch, indices, source = _payload_shard(payload)
        store = ShardStore.from_state(payload["store"])
        config = self.spec.config
        policy = None
        if not store.stage_done(batch, "generate") and source.responses is None:
            policy = _LocatingEngine(self._engine(config.policy), [source.prompts[i].id for i in indices])
        models = Models(config, **self.spec.models_kwargs, policy_engine=policy)
        # A ShardStore has the ProgressStore methods the job's functions call (see its docstring).
        ensure_responses(store, models, config, source, batch, indices, counters)  # type: ignore[arg-type]
        payload["store"] = store.state()


class _JudgeActor(_StageActor):
    stage: Stage = "judge"

    def _judge_models(self):
        if self._models is None:
            from rlaif.judge.labeling.backends import Models

            config = self.spec.config
            engine = self._engine(config.engine) if config.judge_url is None else None
            self._models = Models(config, **self.spec.models_kwargs, judge_engine=engine)
        return self._models

    def run(self, payload: dict[str, Any], counters: SessionCounters) -> None:
        batch, indices, source = _payload_shard(payload)
        store = ShardStore.from_state(payload["store"])
        config = self.spec.config
        if not store.stage_done(batch, "generate"):  # --responses-from: no generate stage ran
            from rlaif.judge.labeling.backends import Models

            ensure_responses(store, Models(config, **self.spec.models_kwargs), config, source, batch, indices,  # type: ignore[arg-type]
                             counters)
        responses = store.load_responses(indices)
        judge = _LocatingJudge(self._judge_models().judge, source.prompts, responses)  # type: ignore[arg-type]
        self.spec.judge_batch(store, judge, config, source, batch, indices, responses, counters)
        payload["store"] = store.state()

    def __del__(self) -> None:
        if self._models is not None:
            self._models.close()


# ---------------------------------------------------------------------------------- driver
@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """The job shows one progress bar (shards done) on the driver; Ray Data's own bars and INFO lines would bury it."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start, context.verbose_stats_logs)
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False
    data_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start, context.verbose_stats_logs = saved
        data_logger.setLevel(level)


def _actor_config(config: _JobConfig, *, multi_node: bool) -> _JobConfig:
    """The config actors get: absolute paths (actors do not share the driver's working directory), and
    no default-path judgment cache on a multi-node cluster (see the module docstring)."""
    update: dict[str, object] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Path):
            update[name] = value.resolve()
    if multi_node and config.cache_path is None and not config.no_cache:
        logger.warning("Ray cluster with several nodes: actors judge without the default judgment cache "
                       "(<out>/judgments.sqlite is on the driver); pass --cache-path to a node-local path to keep one")
        update["no_cache"] = True
    return config.model_copy(update=update)


def _shard_payload(store: ProgressStore, source: Source, batch: int, indices: range, stages: Sequence[str]) -> dict:
    stored_responses = store.load_responses(indices) if store.stage_done(batch, "generate") else {}
    records = {stage: store.load_records(batch, stage) for stage in stages if store.stage_done(batch, stage)}
    policy_model = store.get_meta("policy_model")
    shard_store = ShardStore(responses=stored_responses, records=records,
                             meta={"policy_model": policy_model} if policy_model else {})
    payload: dict[str, Any] = {
        "batch": batch, "indices": [indices.start, indices.stop],
        "prompts": {str(i): source.prompts[i].model_dump(mode="json") for i in indices},
        "store": shard_store.state(),
        "counters": {"samples": 0, "judgments": 0, "generate_seconds": 0.0, "judge_seconds": 0.0}}
    if source.responses is not None:
        payload["source_responses"] = {str(i): source.responses[i] for i in indices}
    return payload


def run_on_ray(options: RayOptions, *, config: _JobConfig, source: Source, store: ProgressStore,
               batches: Sequence[range], done: Sequence[bool], counters: SessionCounters, bar,
               judge_batch: JudgeBatch, models_kwargs: Mapping[str, Any]) -> None:
    """Run the unfinished batches of a job on Ray and commit each one to `store` as it finishes.

    Raises `WorkerFailed` (after committing every shard that finished) when a shard failed.
    """
    todo = [batch for batch, finished in enumerate(done) if not finished]
    if not todo:
        return
    with ray_session(options.address, options.init_kwargs), _quiet_ray_data():
        import ray
        import ray.data

        multi_node = sum(1 for node in ray.nodes() if node.get("Alive")) > 1
        spec = _JobSpec(config=_actor_config(config, multi_node=multi_node), models_kwargs=dict(models_kwargs),
                        judge_batch=judge_batch, engine_factory=options.engine_factory)
        stages = [s for s in store.stage_totals() if s != "generate"]
        payloads = [json.dumps(_shard_payload(store, source, batch, batches[batch], stages), ensure_ascii=False)
                    for batch in todo]
        dataset: ray.data.Dataset = ray.data.from_items([{"shard": batch, "payload": p} for batch, p in zip(todo, payloads)],
                                      override_num_blocks=len(todo))
        del payloads
        pipeline: list[tuple[Stage, type[_StageActor]]] = [("generate", _GenerateActor)] if source.responses is None else []
        pipeline.append(("judge", _JudgeActor))
        for stage, actor in pipeline:
            resources: StageResources = getattr(options, stage)
            dataset = dataset.map_batches(actor, batch_size=1, compute=resources.compute(), num_cpus=resources.num_cpus,
                                          num_gpus=resources.num_gpus or None, fn_constructor_kwargs={"spec": spec},
                                          batch_format="numpy", zero_copy_batch=True)
        completed = sum(done)
        rows = iter(dataset.iter_rows())
        try:
            for row in rows:
                payload = json.loads(str(row["payload"]))
                if payload.get("error"):
                    logger.debug("worker traceback:\n%s", payload.get("traceback", ""))
                    raise WorkerFailed(f"{payload['error']}. {completed} of {len(batches)} shards are finished and stored; "
                                       "fix the cause and run the same command again to resume.")
                replay(store, payload["store"]["commits"])
                completed += 1
                for name, value in payload["counters"].items():
                    setattr(counters, name, getattr(counters, name) + value)
                size = payload["indices"][1] - payload["indices"][0]
                counters.prompts += size
                bar.update(size)
                rates = counters.rates()
                if rates["judgments_per_s"]:
                    bar.set_postfix(judgments_s=rates["judgments_per_s"], refresh=False)
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # stops the pipeline (and its actors) when the loop ends early


__all__ = ["RayOptions", "ShardStore", "StageResources", "WorkerFailed", "parse_stage_values", "ray_options", "replay",
           "run_on_ray"]
