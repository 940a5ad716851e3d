"""Plumbing shared by `rlaif label` and `rlaif best-of-n`: output directory, prompt source,
fixed batches, the persisted generation stage, progress bar and dataset writing.

Determinism contract (what makes kill-and-resume produce the same dataset):
- prompts are cut into fixed slices of `batch_size` (batch i = prompts[i*B:(i+1)*B]);
- batch i samples with seed `derive_seed(seed, "batch", i)`, so a batch's samples depend
  only on its own prompts and index, never on what ran before it in this process;
- every stage of a batch is committed atomically (`ProgressStore`), and a half-done stage is
  redone whole, with the same inputs;
- the dataset is built from the store alone, after all batches are done.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rlaif.judge.labeling.config import _JobConfig
from rlaif.judge.labeling.pairs import derive_seed
from rlaif.judge.labeling.store import STORE_FILE, ProgressStore, ResumeConflict

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset, Features

    from rlaif.judge.data import PromptRecord
    from rlaif.judge.labeling.backends import Models
    from rlaif.judge.types import Criterion
    from rlaif.judge.labeling.ray_backend import RayOptions
    from rlaif.judge.types import ChatPrompt

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

DATASET_DIR = "dataset"
CARD_FILE = "README.md"
SUMMARY_FILE = "summary.json"
CACHE_FILE = "judgments.sqlite"
LOCK_FILE = ".lock"
EXPORT_FILES = {"jsonl": "data.jsonl", "parquet": "data.parquet"}
_OWNED = {STORE_FILE, CACHE_FILE, DATASET_DIR, CARD_FILE, SUMMARY_FILE, LOCK_FILE, *EXPORT_FILES.values()}
_SQLITE_SIDECARS = ("", "-wal", "-shm", "-journal")


# ---------------------------------------------------------------------------------- source
@dataclass
class Source:
    """The job's prompts (and, for relabeling, their existing responses), in a fixed order."""

    prompts: list[PromptRecord]
    responses: list[list[str]] | None = None
    missing_responses: int = 0
    digest: str = ""
    references: list[str | None] | None = None
    """Per prompt, its reference answer (`answer_column`), for reference-guided rubrics; None = no column."""
    criteria: list[tuple[Criterion, ...]] | None = None
    """Per prompt, its checklist (`criteria_column`), for `ranking=checklist`; None = not read."""

    def reference(self, index: int) -> str | None:
        return self.references[index] if self.references is not None else None

    def criteria_of(self, index: int) -> tuple[Criterion, ...]:
        assert self.criteria is not None, "this job read no checklists (ranking != checklist)"
        return self.criteria[index]


def load_source(config: _JobConfig) -> Source:
    """Load prompts with `rlaif.judge.data.load_prompts`; with `responses_from`, join the response columns by id.

    Each response column is read with the same loader (`column=<name>`), which keeps one
    reader for every format; rows are joined on the record id. A prompt missing any of its
    responses is left out and counted. A chat-formatted response cell yields its last
    assistant message.
    """
    from rlaif.judge.data import get_field, load_prompts, load_prompts_with_rows, parse_field_path

    with_rows = load_prompts_with_rows(config.prompts, column=config.prompt_column, limit=config.limit)
    prompts = [record for record, _ in with_rows]
    rows = {record.id: row for record, row in with_rows}
    if not prompts:
        raise ValueError(f"{config.prompts}: no usable prompts (all empty, or limit=0)")
    responses: list[list[str]] | None = None
    missing = 0
    columns = getattr(config, "responses_from", None)
    if columns:
        by_column = [{record.id: _response_text(record) for record in load_prompts(config.prompts, column=column)}
                     for column in columns]
        kept, responses = [], []
        for record in prompts:
            texts = [table.get(record.id) for table in by_column]
            if any(text is None for text in texts):
                missing += 1
                continue
            kept.append(record)
            responses.append(texts)  # type: ignore[arg-type]
        if not kept:
            raise ValueError(f"{config.prompts}: no prompt has a non-empty value in every column of {list(columns)}")
        prompts = kept
    references: list[str | None] | None = None
    answer_column = getattr(config, "answer_column", None)
    if answer_column:
        answers = {record.id: record.text for record in load_prompts(config.prompts, column=answer_column)}
        references = [answers.get(record.id) for record in prompts]
        absent = [record.id for record, ref in zip(prompts, references) if ref is None]
        if absent:
            raise ValueError(f"{config.prompts}: {len(absent)} prompt(s) have no {answer_column!r} reference answer, "
                             f"e.g. {absent[0]!r}")
    criteria: list[tuple[Criterion, ...]] | None = None
    if getattr(config, "ranking", None) == "checklist":
        from rlaif.judge.checklist import parse_criteria

        column: str = config.criteria_column  # type: ignore[attr-defined]
        steps = parse_field_path(column)
        criteria = []
        for record in prompts:
            where = f"{config.prompts}: prompt {record.id!r}"
            try:
                cell = get_field(rows[record.id], steps)
            except LookupError:  # the path does not exist in this row
                cell = None
            if cell is None:
                raise ValueError(f"{where} has no {column!r} checklist (--criteria-column); every prompt needs one "
                                 "for --ranking checklist")
            criteria.append(parse_criteria(cell, where))
    payload: list[object] = [[p.id, p.text, p.messages] for p in prompts] + [responses]
    if references is not None:  # only then, so jobs without reference answers keep their digest
        payload.append({"references": references})
    if criteria is not None:
        payload.append({"criteria": [[c.model_dump() for c in item] for item in criteria]})
    digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()
    return Source(prompts=prompts, responses=responses, missing_responses=missing, digest=digest, references=references,
                  criteria=criteria)


def _response_text(record: PromptRecord) -> str:
    if record.messages:
        assistant = [m["content"] for m in record.messages if m["role"] == "assistant"]
        if assistant:
            return assistant[-1]
    return record.text


def chat_of(record: PromptRecord) -> ChatPrompt:
    """The conversation the policy continues: the source's messages, or one user turn."""
    return [dict(m) for m in record.messages] if record.messages else [{"role": "user", "content": record.text}]


def rubric_identity(rubric: str, judge_url: str | None) -> str:
    """A rubric as it enters the job identity: id@version:fingerprint locally (a file edit changes
    it), the bare id for a service (the server owns its rubrics)."""
    if judge_url is not None:
        return rubric
    from rlaif.judge.rubric import load_rubric

    loaded = load_rubric(rubric)
    return f"{loaded.id}@{loaded.version}:{loaded.fingerprint}"


def preflight_job(config: _JobConfig) -> None:
    """Every check a labeling job can make before it loads a model: the rubrics it will judge with (kind and
    mode; a service's rubrics are the service's to check), the judge and policy engine specs (syntax,
    options, that the model exists or the hub is reachable) and the prompt source (it exists).
    `rlaif label` / `rlaif best-of-n` call it first, so a mistake costs seconds, not a model load or a
    sampling stage."""
    from rlaif.judge.engines import validate_engine_spec
    from rlaif.judge.judges import check_judge_setup

    if not config.prompts.exists():
        raise FileNotFoundError(f"--prompts {config.prompts}: no such prompt file or dataset directory")
    if config.judge_url is None:
        selection = getattr(config, "selection", None)
        if selection is not None:  # best-of-n
            check_judge_setup("score" if selection == "score" else "pairwise", config.selection_rubric,  # type: ignore[attr-defined]
                              config.mode)
        else:
            check_judge_setup("pairwise", config.pairwise_rubric, config.mode)  # type: ignore[attr-defined]
            if getattr(config, "ranking", None) == "score":
                check_judge_setup("score", config.score_rubric, config.mode)  # type: ignore[attr-defined]
            if getattr(config, "ranking", None) == "checklist":
                from rlaif.judge.checklist import check_checklist_setup

                check_checklist_setup(config.ranking_rubric, config.checklist_mode)  # type: ignore[attr-defined]
        validate_engine_spec(config.engine)
    if getattr(config, "responses_from", None) is None and (config.policy != config.engine or config.judge_url):
        validate_engine_spec(config.policy)


def make_batches(n_prompts: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, n_prompts)) for start in range(0, n_prompts, batch_size)]


# ---------------------------------------------------------------------------------- output dir
@contextlib.contextmanager
def open_job(config: _JobConfig, identity: dict[str, object]) -> Iterator[tuple[ProgressStore, bool]]:
    """Lock `config.out`, honour --overwrite, open the progress store and check the job identity.

    Yields (store, resumed). The lock is an `flock`, which the kernel drops when the process
    dies, so a SIGKILLed job never leaves a stale lock behind.
    """
    out = config.out
    if out.exists() and not out.is_dir():
        raise ResumeConflict(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ResumeConflict(f"another labeling job is running in {out}; wait for it or choose another --out") from None
    try:
        if config.overwrite:
            _remove_outputs(out, remove_cache=config.cache_path is None)
        elif not (out / STORE_FILE).exists():
            foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWNED)
            if foreign:
                raise ResumeConflict(f"{out} is not empty ({', '.join(foreign[:5])}) and holds no labeling job; choose a "
                                     "new --out directory, or pass --overwrite to write into it anyway (only the files "
                                     "this command writes are replaced; nothing else there is touched)")
        store = ProgressStore(out / STORE_FILE)
        try:
            resumed = store.check_identity(identity)
            store.start_session()
            yield store, resumed
        finally:
            store.close()
    finally:
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()


def _remove_outputs(out: Path, *, remove_cache: bool) -> None:
    """Delete what a previous job wrote in `out` (only files this package names)."""
    for name in (STORE_FILE, CACHE_FILE) if remove_cache else (STORE_FILE,):
        for suffix in _SQLITE_SIDECARS:
            (out / f"{name}{suffix}").unlink(missing_ok=True)
    for name in (CARD_FILE, SUMMARY_FILE, *EXPORT_FILES.values()):
        (out / name).unlink(missing_ok=True)
    if (out / DATASET_DIR).is_dir():
        shutil.rmtree(out / DATASET_DIR)
    _remove_partial_writes(out)


def _remove_partial_writes(out: Path) -> None:
    """Temporary outputs of an interrupted write (`dataset.tmp-<pid>`, `data.jsonl.tmp`, ...)."""
    for stale in [*out.glob(f"{DATASET_DIR}.tmp-*"), *out.glob(f"{DATASET_DIR}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for name in (CARD_FILE, SUMMARY_FILE, *EXPORT_FILES.values()):
        (out / f"{name}.tmp").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- running
@dataclass
class SessionCounters:
    """What this process did (as opposed to what was loaded from the store)."""

    started: float = field(default_factory=time.perf_counter)
    prompts: int = 0
    samples: int = 0
    judgments: int = 0
    generate_seconds: float = 0.0
    judge_seconds: float = 0.0
    progress: JobProgress | None = field(default=None, repr=False, compare=False)
    """The job's progress bar, told about each sample and judgment as it finishes (None: no bar)."""

    def rates(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.started
        return {"session_seconds": round(wall, 3),
                "prompts_per_s": round(self.prompts / wall, 4) if self.prompts and wall > 0 else None,
                "samples_per_s": round(self.samples / self.generate_seconds, 4) if self.generate_seconds else None,
                "judgments_per_s": round(self.judgments / self.judge_seconds, 4) if self.judge_seconds else None}


def ensure_responses(store: ProgressStore, models: Models, config: _JobConfig, source: Source, batch: int,
                     indices: range, counters: SessionCounters) -> dict[int, list[str]]:
    """The batch's samples: from the store, from the source columns, or generated and persisted now."""
    if counters.progress is not None and (store.stage_done(batch, "generate") or source.responses is not None):
        counters.progress.start_batch(len(indices), samples=0, judgments=len(indices) * expected_judgments(config))
    if store.stage_done(batch, "generate"):
        return store.load_responses(indices)
    if source.responses is not None:
        responses = {i: source.responses[i] for i in indices}
        store.save_responses(batch, responses, 0.0, fresh=False)
        return responses
    from rlaif.judge.engines.base import GenerationParams

    n: int = config.n  # type: ignore[attr-defined]
    params = GenerationParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                              n=n, seed=derive_seed(config.seed, "batch", batch))
    policy = models.policy
    if counters.progress is not None:
        counters.progress.start_batch(len(indices), samples=n * len(indices),
                                      judgments=len(indices) * expected_judgments(config))
    chats = [chat_of(source.prompts[i]) for i in indices]
    started = time.perf_counter()
    if counters.progress is not None and "progress" in inspect.signature(policy.generate).parameters:
        texts = policy.generate(chats, params, progress=counters.progress.sampled)  # type: ignore[call-arg]
    else:  # engines without per-sequence progress: the bar moves when the call returns
        texts = policy.generate(chats, params)
    seconds = time.perf_counter() - started
    assert len(texts) == len(indices) and all(len(t) == n for t in texts), "engine returned the wrong number of samples"
    responses = dict(zip(indices, texts))
    if store.get_meta("policy_model") is None:
        store.set_meta("policy_model", policy.model_name)
    store.save_responses(batch, responses, seconds)
    counters.samples += n * len(indices)
    counters.generate_seconds += seconds
    return responses


def expected_judgments(config: _JobConfig) -> int:
    """Judge calls per prompt that the job's settings plan (identical samples may skip a few)."""
    n = int(getattr(config, "n", 2))
    selection = getattr(config, "selection", None)
    if selection == "score":
        return n
    if selection == "tournament":
        return n - 1
    pairs = getattr(config, "pairs", "best-worst")
    if pairs == "random":
        return 1
    if pairs == "best-worst" and getattr(config, "ranking", "wins") == "score":
        return n + 1
    return n * (n - 1) // 2


JUDGE_CHUNK = 8
"""Items per judge call inside a stage: small enough that the bar moves per few judgments, large enough
to fill an engine batch (8 pairwise items = 16 sequences, both orders). Fixed, so results never depend on
whether a bar is shown."""


def judge_in_chunks(call: Callable[[Sequence[T]], list[R]], items: Sequence[T], counters: SessionCounters,
                    chunk: int = JUDGE_CHUNK) -> list[R]:
    """`call(items)` in chunks of `chunk`, telling the progress bar after each."""
    results: list[R] = []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        results.extend(call(part))
        if counters.progress is not None:
            counters.progress.judged(len(part))
    return results


class JobProgress:
    """The job's tqdm bar on stderr, in prompts, moving *within* a batch as its samples and judgments finish.

    A batch of P prompts is worth P on the bar; inside it, a finished sample or judgment moves the bar by its
    estimated share of the batch's time (this session's measured seconds per sample and per judgment once
    known, else a guess from `max_new_tokens`), so rate and ETA are in prompts and the bar never waits for a
    whole batch. The job loop's `update(k)` at the end of a batch lands exactly on the prompt count."""

    def __init__(self, bar, counters: SessionCounters, *, max_new_tokens: int) -> None:
        self.bar = bar
        self.counters = counters
        self.max_new_tokens = max_new_tokens
        self.done = float(bar.n)
        self._plan = (0, 0, 0)  # prompts, samples, judgments of the current batch
        self._sampled = 0.0
        self._judged = 0

    def start_batch(self, prompts: int, *, samples: int, judgments: int) -> None:
        self._plan = (prompts, samples, judgments)
        self._sampled, self._judged = 0.0, 0
        self._show("sampling" if samples else "judging")

    def sampled(self, count: float) -> None:
        self._sampled += count
        self._show("sampling")

    def judged(self, count: int) -> None:
        self._judged += count
        self._show("judging")

    def update(self, count: float = 1) -> None:
        """The job loop's per-batch update: `count` prompts are now completely done."""
        self.done += count
        self._plan = (0, 0, 0)
        self._advance_to(self.done)

    def __getattr__(self, name: str):  # set_postfix, close, ...: the tqdm bar's
        return getattr(self.bar, name)

    def _unit_costs(self) -> tuple[float, float]:
        """Estimated seconds per sample and per judgment (only their ratio matters)."""
        c = self.counters
        sample = c.generate_seconds / c.samples if c.samples else None
        judgment = c.judge_seconds / c.judgments if c.judgments else None
        guess = max(1.0, self.max_new_tokens / 64)  # a 64-token sample costs about one judgment
        if sample is None and judgment is None:
            return guess, 1.0
        if sample is None:
            return judgment * guess, judgment  # type: ignore[operator]
        if judgment is None:
            return sample, sample / guess
        return sample, judgment

    def _show(self, stage: str) -> None:
        prompts, samples, judgments = self._plan
        if not prompts:
            return
        per_sample, per_judgment = self._unit_costs()
        total = samples * per_sample + judgments * per_judgment
        done = min(self._sampled, samples) * per_sample + min(self._judged, judgments) * per_judgment
        fraction = min(0.999, done / total) if total > 0 else 0.0
        if stage == "sampling":
            self.bar.set_postfix_str(f"sampling {self._sampled:.1f}/{samples}", refresh=False)
        else:
            self.bar.set_postfix_str(f"judging {self._judged}/{judgments}", refresh=False)
        self._advance_to(self.done + prompts * fraction)

    def _advance_to(self, position: float) -> None:
        if position > self.bar.n:
            self.bar.update(position - self.bar.n)
        else:
            self.bar.refresh()


@contextlib.contextmanager
def progress_bar(config: _JobConfig, total: int, initial: int, desc: str,
                 counters: SessionCounters | None = None) -> Iterator[JobProgress]:
    """A `JobProgress` over tqdm on stderr (rate and ETA count only this session's work). With `counters`, the
    bar also moves per finished sample and judgment of the running batch (see `JobProgress`)."""
    from tqdm import tqdm

    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} prompts [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    with tqdm(total=total, initial=initial, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True,
              disable=not config.progress, smoothing=0.1, bar_format=bar_format) as bar:
        progress = JobProgress(bar, counters or SessionCounters(), max_new_tokens=config.max_new_tokens)
        if counters is not None and config.progress:
            counters.progress = progress
        try:
            yield progress
        finally:
            if counters is not None:
                counters.progress = None


def run_batches(config: _JobConfig, *, store: ProgressStore, models: Models, source: Source, last_stage: str,
                desc: str, counters: SessionCounters, judge_batch: Callable[..., None],
                ray: RayOptions | None = None, models_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """The job loop `rlaif label` and `rlaif best-of-n` share: every unfinished batch sampled (or read back), judged
    and committed in order, under one progress bar; with `ray`, the same batches on a Ray cluster instead.

    `judge_batch(store, judge, config, source, batch, indices, responses, counters)` is the job's own judging step.
    Returns, per batch, whether it was already finished when this session started (the summary's
    `batches_resumed`)."""
    batches = make_batches(len(source.prompts), config.batch_size)
    done = [store.stage_done(b, last_stage) for b in range(len(batches))]
    initial = sum(len(indices) for indices, finished in zip(batches, done) if finished)
    with progress_bar(config, len(source.prompts), initial, desc, counters) as bar:
        if ray is not None:
            from rlaif.judge.labeling.ray_backend import run_on_ray

            run_on_ray(ray, config=config, source=source, store=store, batches=batches, done=done,
                       counters=counters, bar=bar, judge_batch=judge_batch, models_kwargs=models_kwargs or {})
            return [int(d) for d in done]
        for batch, indices in enumerate(batches):
            if done[batch]:
                continue
            responses = ensure_responses(store, models, config, source, batch, indices, counters)
            judge_batch(store, models.judge, config, source, batch, indices, responses, counters)
            counters.prompts += len(indices)
            bar.update(len(indices))
            rates = counters.rates()
            if rates["judgments_per_s"]:
                bar.set_postfix(judgments_s=rates["judgments_per_s"], refresh=False)
    return [int(d) for d in done]


# ---------------------------------------------------------------------------------- writing
def write_outputs(out: Path, rows: Sequence[dict], features: Features, exports: Sequence[str]) -> tuple[Dataset, dict[str, str]]:
    """Save the dataset (`save_to_disk`) and its flat exports, each swapped in atomically.

    Written to temporary names first and renamed, so a crash while writing leaves the
    previous complete output (or none), never a truncated one.
    """
    from datasets.utils import logging as datasets_logging

    # datasets' own "Saving the dataset" bars would interleave with the job's bar and JSON summary.
    bars_were_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        return _write_outputs(out, rows, features, exports)
    finally:
        if bars_were_on:
            datasets_logging.enable_progress_bar()


def _write_outputs(out: Path, rows: Sequence[dict], features: Features, exports: Sequence[str]) -> tuple[Dataset, dict[str, str]]:
    from datasets import Dataset

    # Column-wise construction: `from_list([])` loses the schema, and an empty dataset saved with
    # zero shards cannot be loaded back; one explicit shard keeps empty outputs loadable.
    _remove_partial_writes(out)  # a run killed while writing leaves these; the job lock makes this safe
    dataset = Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)
    tmp = out / f"{DATASET_DIR}.tmp-{os.getpid()}"
    dataset.save_to_disk(str(tmp), num_shards=None if rows else 1)
    target = out / DATASET_DIR
    if target.exists():
        old = out / f"{DATASET_DIR}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    paths = {"dataset": str(target)}
    for kind in exports:
        path = out / EXPORT_FILES[kind]
        partial = path.with_name(path.name + ".tmp")
        if kind == "jsonl":
            dataset.to_json(str(partial), lines=True, force_ascii=False)
        else:
            dataset.to_parquet(str(partial))
        os.replace(partial, path)
        paths[kind] = str(path)
    return dataset, paths


def write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def time_stats(store: ProgressStore) -> dict[str, float]:
    sessions, seconds = store.session_stats()
    totals = store.stage_totals()
    return {"sessions": sessions, "wall_seconds": round(seconds, 3),
            **{f"{stage}_seconds": round(values["seconds"], 3) for stage, values in totals.items()}}

