"""`rlaif label` and `rlaif best-of-n`: AI-labeled datasets from the command line.

Both commands print a JSON summary on stdout (progress bar and logs on stderr), exit 2 with
a one-line message on user errors (bad source, changed settings on resume, ...), and can be
re-run with the same arguments to resume after an interruption. Heavy imports happen inside
the commands so `rlaif --help` stays instant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from rlaif.judge.cli import NoCacheOpt, UserError, print_json, user_errors

_ConfigT = TypeVar("_ConfigT")

PromptsOpt = Annotated[Path, typer.Option("--prompts", help="Prompt source: jsonl/json/parquet/csv file or a datasets save_to_disk folder.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder (dataset/, data.jsonl, data.parquet, README.md, progress store).")]
ColumnOpt = Annotated[Optional[str], typer.Option("--prompt-column", help="Prompt field or path, e.g. 'question' or 'turns[0]' (default: turns[0] / instruction / prompt).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N prompts.")]
PolicyOpt = Annotated[str, typer.Option("--policy", help="Engine spec of the policy that samples responses.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="Engine spec of the in-process judge.")]
JudgeUrlOpt = Annotated[Optional[str], typer.Option("--judge-url", help="Use a running judge service (rlaif serve) instead of an in-process judge.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="RLAIF_API_KEY", help="Bearer key for --judge-url (or RLAIF_API_KEY).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="Judge mode: logprob or cot.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Policy sampling temperature (> 0 when --n > 1).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Policy nucleus sampling.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Length cap of each sampled response.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Base seed; batch i samples with a seed derived from (seed, i).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per batch (the unit generated, judged and persisted together).")]
ExportOpt = Annotated[str, typer.Option("--export", help="Comma-separated flat exports: jsonl, parquet, or 'none'.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Discard an existing job in --out and start over.")]
CachePathOpt = Annotated[Optional[Path], typer.Option("--cache-path", help="Judgment cache file of the in-process judge (default: <out>/judgments.sqlite).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")]
RayOpt = Annotated[bool, typer.Option("--ray", help="Run the job on Ray (Ray Data actor pools); same outputs and resume as without. See docs/scaling.md.")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join with --ray: auto, host:6379 or ray://host:10001 (default: RAY_ADDRESS, else a new local cluster).")]
RayActorsOpt = Annotated[Optional[str], typer.Option("--ray-actors", help="Actors per stage with --ray: N, MIN-MAX (autoscaling) or per stage, e.g. generate=4,judge=1-4 (default 1).")]
RayCpusOpt = Annotated[Optional[str], typer.Option("--ray-cpus", help="CPUs per actor with --ray: C or generate=C,judge=C (default 1).")]
RayGpusOpt = Annotated[Optional[str], typer.Option("--ray-gpus", help="GPUs per actor with --ray: G or generate=G,judge=G (default 0).")]


def _exports(value: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    if parts == ("none",):
        return ()
    unknown = [p for p in parts if p not in ("jsonl", "parquet")]
    if unknown:
        raise UserError(f"--export: unknown format(s) {unknown}; use jsonl, parquet, 'jsonl,parquet' or none")
    return parts


def register(app: typer.Typer) -> None:
    @app.command("label")
    def label(
        prompts: PromptsOpt,
        out: OutOpt,
        prompt_column: ColumnOpt = None,
        limit: LimitOpt = None,
        policy: PolicyOpt = "default",
        n: Annotated[int, typer.Option("--n", help="Responses sampled per prompt.")] = 4,
        pairs: Annotated[str, typer.Option("--pairs", help="best-worst | all | random.")] = "best-worst",
        ranking: Annotated[str, typer.Option("--ranking", help="How best-worst ranks samples: wins (pairwise round robin), score (score judge) or checklist (each prompt's own criteria, --criteria-column).")] = "wins",
        rubric: Annotated[Optional[str], typer.Option("--rubric", help="Pairwise rubric id or YAML file (default: helpfulness).")] = None,
        score_rubric: Annotated[str, typer.Option("--score-rubric", help="Score rubric for --ranking score.")] = "score-1-10",
        criteria_column: Annotated[str, typer.Option("--criteria-column", help="--ranking checklist: source column with each prompt's checklist (a list of texts or {text, weight} objects).")] = "criteria",
        checklist_mode: Annotated[str, typer.Option("--checklist-mode", help="--ranking checklist: explicit (one yes/no question per criterion) or implicit (whole checklist in one prompt).")] = "explicit",
        checklist_rubric: Annotated[Optional[str], typer.Option("--checklist-rubric", help="--ranking checklist: rubric id or YAML file (default: checklist / checklist-implicit).")] = None,
        mode: ModeOpt = "logprob",
        tie_margin: Annotated[float, typer.Option("--tie-margin", help="|P - 0.5| below this is a tie (in-process judge).")] = 0.05,
        engine: EngineOpt = "default",
        judge_url: JudgeUrlOpt = None,
        api_key: ApiKeyOpt = None,
        responses_from: Annotated[Optional[str], typer.Option("--responses-from", help="Relabel existing responses: comma-separated source columns, e.g. 'chosen,rejected' (no sampling).")] = None,
        answer_column: Annotated[Optional[str], typer.Option("--answer-column", help="Source column with each prompt's reference answer, for reference-guided rubrics (e.g. --rubric correctness-pairwise).")] = None,
        temperature: TemperatureOpt = 0.8,
        top_p: TopPOpt = 1.0,
        max_new_tokens: MaxTokensOpt = 256,
        seed: SeedOpt = 0,
        batch_size: BatchOpt = 16,
        min_margin: Annotated[float, typer.Option("--min-margin", help="Drop pairs whose margin |2P - 1| is below this.")] = 0.0,
        drop_inconsistent: Annotated[bool, typer.Option("--drop-inconsistent", help="Drop pairs whose two presentation orders disagree.")] = False,
        fmt: Annotated[str, typer.Option("--format", help="conversational (chat messages) or standard (plain strings).")] = "conversational",
        calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration file (rlaif calibrate) for the in-process pairwise judge.")] = None,
        export: ExportOpt = "jsonl,parquet",
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        overwrite: OverwriteOpt = False,
        progress: ProgressOpt = True,
        ray: RayOpt = False,
        ray_address: RayAddressOpt = None,
        ray_actors: RayActorsOpt = None,
        ray_cpus: RayCpusOpt = None,
        ray_gpus: RayGpusOpt = None,
    ) -> None:
        """Sample N responses per prompt, judge pairs, write a TRL preference dataset (prompt/chosen/rejected)."""
        with user_errors():
            from rlaif.judge.labeling.config import LabelConfig
            from rlaif.judge.labeling.job import preflight_job
            from rlaif.judge.labeling.label import command_line, run_label

            config = _config(LabelConfig,
                prompts=prompts, out=out, prompt_column=prompt_column, limit=limit, policy=policy, n=n, pairs=pairs,  # type: ignore[arg-type]
                ranking=ranking, rubric=rubric, score_rubric=score_rubric, mode=mode, tie_margin=tie_margin,  # type: ignore[arg-type]
                criteria_column=criteria_column, checklist_mode=checklist_mode, checklist_rubric=checklist_rubric,  # type: ignore[arg-type]
                engine=engine, judge_url=judge_url, api_key=api_key,
                responses_from=tuple(responses_from.split(",")) if responses_from else None, answer_column=answer_column,
                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                min_margin=min_margin, drop_inconsistent=drop_inconsistent, format=fmt, export=_exports(export),  # type: ignore[arg-type]
                calibration=calibration, no_cache=no_cache, cache_path=cache_path, overwrite=overwrite, progress=progress)
            preflight_job(config)
            backend = _ray_backend(ray, ray_address, ray_actors, ray_cpus, ray_gpus)
            with _service_errors(), _worker_errors():
                _print_summary(run_label(config, command=command_line(), ray=backend))

    @app.command("best-of-n")
    def best_of_n(
        prompts: PromptsOpt,
        out: OutOpt,
        prompt_column: ColumnOpt = None,
        limit: LimitOpt = None,
        policy: PolicyOpt = "default",
        n: Annotated[int, typer.Option("--n", help="Responses sampled per prompt.")] = 8,
        selection: Annotated[str, typer.Option("--selection", help="score (direct score per sample) or tournament (pairwise knockout).")] = "score",
        rubric: Annotated[Optional[str], typer.Option("--rubric", help="Rubric id or YAML file (default: score-1-10 for score, helpfulness for tournament).")] = None,
        mode: ModeOpt = "logprob",
        engine: EngineOpt = "default",
        judge_url: JudgeUrlOpt = None,
        api_key: ApiKeyOpt = None,
        temperature: TemperatureOpt = 0.8,
        top_p: TopPOpt = 1.0,
        max_new_tokens: MaxTokensOpt = 256,
        seed: SeedOpt = 0,
        batch_size: BatchOpt = 16,
        min_score: Annotated[Optional[float], typer.Option("--min-score", help="Drop prompts whose winner scores below this (0-1).")] = None,
        export: ExportOpt = "jsonl,parquet",
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        overwrite: OverwriteOpt = False,
        progress: ProgressOpt = True,
        ray: RayOpt = False,
        ray_address: RayAddressOpt = None,
        ray_actors: RayActorsOpt = None,
        ray_cpus: RayCpusOpt = None,
        ray_gpus: RayGpusOpt = None,
    ) -> None:
        """Rejection sampling: sample N responses per prompt, keep the judge's best as an SFT dataset."""
        with user_errors():
            from rlaif.judge.labeling.best_of_n import run_best_of_n
            from rlaif.judge.labeling.config import BestOfNConfig
            from rlaif.judge.labeling.job import preflight_job
            from rlaif.judge.labeling.label import command_line

            config = _config(BestOfNConfig,
                prompts=prompts, out=out, prompt_column=prompt_column, limit=limit, policy=policy, n=n,
                selection=selection, rubric=rubric, mode=mode, engine=engine, judge_url=judge_url, api_key=api_key,  # type: ignore[arg-type]
                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                min_score=min_score, export=_exports(export), no_cache=no_cache, cache_path=cache_path,  # type: ignore[arg-type]
                overwrite=overwrite, progress=progress)
            preflight_job(config)
            backend = _ray_backend(ray, ray_address, ray_actors, ray_cpus, ray_gpus)
            with _service_errors(), _worker_errors():
                _print_summary(run_best_of_n(config, command=command_line(), ray=backend))


def _print_summary(summary: dict) -> None:
    """The summary as JSON on stdout; its warnings also on stderr, where people look."""
    for warning in summary.get("warnings", []):
        typer.echo(f"WARNING: {warning}", err=True)
    print_json(summary)


def _config(model: type[_ConfigT], **values: object) -> _ConfigT:
    """Validate CLI values into a job config; report problems by flag name, without pydantic's noise."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"--{field.replace('_', '-')}: {message}" if field else message)
        raise UserError("; ".join(problems)) from None


@contextlib.contextmanager
def _service_errors() -> Iterator[None]:
    """Report a judge-service failure (down, 4xx, retries exhausted) as a user error, not a traceback.

    Recognized by the exception's module, so without --judge-url the service package is never imported.
    """
    try:
        yield
    except Exception as exc:
        if type(exc).__module__.split(".")[0] == "httpx" or type(exc).__module__.startswith(("rlaif.service", "rlaif.judge.api")):
            raise UserError(f"judge service: {exc}") from None
        raise


def _ray_backend(ray: bool, address: str | None, actors: str | None, cpus: str | None, gpus: str | None):
    """`RayOptions` for --ray (None without it); the Ray flags without --ray are a mistake worth naming."""
    if not ray:
        given = [flag for flag, value in (("--ray-address", address), ("--ray-actors", actors), ("--ray-cpus", cpus),
                                          ("--ray-gpus", gpus)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --ray")
        return None
    try:
        from rlaif.judge.labeling.ray_backend import ray_options
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(f"--ray needs Ray: pip install 'rlaif[ray]' ({exc})") from None
    return ray_options(address, actors=actors, cpus=cpus, gpus=gpus)


@contextlib.contextmanager
def _worker_errors() -> Iterator[None]:
    """A shard that failed in a Ray actor: its one-line message (shard, stage, item), exit status 1, no traceback."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ == "WorkerFailed" and type(exc).__module__.startswith("rlaif.judge.labeling.ray_backend"):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        raise
