"""`rlaif judge pairwise|score` and `rlaif eval`: the judge from the command line.

Every command prints JSON on stdout (logs and progress go to stderr) so it composes with
`jq` and scripts. User errors (unknown rubric, bad engine spec, missing file) exit with
status 2 and a one-line message instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

RubricOpt = Annotated[Optional[str], typer.Option("--rubric", help="Built-in rubric id or a rubric YAML file.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="Engine spec: default | hf:<id-or-path> | openai:<url>#<model> | vllm:<model>.")]
ModeOpt = Annotated[str, typer.Option("--mode", help="logprob (label log-probs) or cot (rationale, then label).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the SQLite judgment cache.")]
CachePathOpt = Annotated[Optional[Path], typer.Option("--cache-path", help="Judgment cache file (default: $RLAIF_CACHE_DIR/judgments.sqlite).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for principle sampling and sampled rationales.")]


class UserError(Exception):
    """An error caused by the command line or inputs; printed without a traceback."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the judge's typed errors into a clean message and exit code 2."""
    from rlaif.judge.engines.base import EngineError
    from rlaif.judge.models import ModelNotFound
    from rlaif.judge.rubric import RubricError, RubricNotFound

    try:
        yield
    except (UserError, RubricError, RubricNotFound, EngineError, ModelNotFound, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


def open_cache(no_cache: bool, cache_path: Path | None):
    if no_cache:
        return None
    from rlaif.judge.cache import JudgmentCache
    from rlaif.judge.models import cache_root

    return JudgmentCache(cache_path or cache_root() / "judgments.sqlite")


def print_json(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    register_eval(app)
    judge_app = typer.Typer(help="Judge one item and print the judgment as JSON.", no_args_is_help=True)
    app.add_typer(judge_app, name="judge")

    @judge_app.command("pairwise")
    def pairwise(
        prompt: Annotated[str, typer.Option("--prompt", help="The user prompt both responses answer.")],
        response_a: Annotated[str, typer.Option("--response-a", help="First response.")],
        response_b: Annotated[str, typer.Option("--response-b", help="Second response.")],
        rubric: RubricOpt = None,
        engine: EngineOpt = "default",
        mode: ModeOpt = "logprob",
        tie_margin: Annotated[float, typer.Option("--tie-margin", help="|P(A)-0.5| below this is a tie.")] = 0.05,
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        seed: SeedOpt = 0,
    ) -> None:
        """Position-debiased pairwise preference: P(response A is better), both orders averaged."""
        with user_errors():
            from rlaif.judge.engines import build_engine
            from rlaif.judge.judges import PairwiseJudge
            from rlaif.judge.types import PairwiseItem

            from rlaif.judge.rubric import load_rubric

            loaded = load_rubric(rubric or "helpfulness")  # fail on a bad rubric before loading a model
            judge = PairwiseJudge(build_engine(engine), loaded, mode=mode, tie_margin=tie_margin,  # type: ignore[arg-type]
                                  cache=open_cache(no_cache, cache_path), seed=seed)
            result = judge.judge([PairwiseItem(prompt=prompt, response_a=response_a, response_b=response_b)])[0]
            print_json(result.model_dump(mode="json"))

    @judge_app.command("score")
    def score(
        prompt: Annotated[str, typer.Option("--prompt", help="The user prompt.")],
        response: Annotated[str, typer.Option("--response", help="The response to grade.")],
        rubric: RubricOpt = None,
        engine: EngineOpt = "default",
        mode: ModeOpt = "logprob",
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        seed: SeedOpt = 0,
    ) -> None:
        """Direct score (d-RLAIF): expected score under the label distribution, rescaled to [0, 1]."""
        with user_errors():
            from rlaif.judge.engines import build_engine
            from rlaif.judge.judges import ScoreJudge
            from rlaif.judge.types import ScoreItem

            from rlaif.judge.rubric import load_rubric

            loaded = load_rubric(rubric or "score-1-10")
            judge = ScoreJudge(build_engine(engine), loaded, mode=mode,  # type: ignore[arg-type]
                               cache=open_cache(no_cache, cache_path), seed=seed)
            result = judge.judge([ScoreItem(prompt=prompt, response=response)])[0]
            print_json(result.model_dump(mode="json"))

    @judge_app.command("rubrics")
    def rubrics() -> None:
        """List the built-in rubrics."""
        with user_errors():
            from rlaif.judge.rubric import load_all_builtin

            print_json([{"id": r.id, "version": r.version, "kind": r.kind, "description": r.description.strip(),
                         "modes": ["logprob", "cot"] if r.cot else ["logprob"]} for r in load_all_builtin().values()])


def register_eval(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        data: Annotated[Path, typer.Option("--data", help="Human preference file: PandaLM, LLMBar, hh-rlhf or prompt/chosen/rejected jsonl.")],
        limit: Annotated[Optional[int], typer.Option("--limit", help="Judge only the first N usable pairs.")] = None,
        rubric: RubricOpt = None,
        engine: EngineOpt = "default",
        mode: ModeOpt = "logprob",
        out: Annotated[Optional[Path], typer.Option("--out", help="Folder for report.json, judgments.jsonl and reliability.png.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per judge call.")] = 16,
        tie_margin: Annotated[float, typer.Option("--tie-margin")] = 0.05,
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        seed: SeedOpt = 0,
    ) -> None:
        """Agreement of the judge with human labels. Prints the report as one JSON line, then a last JSON
        line with the debiased accuracy (`rlaif eval ... | tail -n1`). Warnings go to stderr."""
        with user_errors():
            from tqdm import tqdm

            from rlaif.judge.data import load_preferences_with_stats
            from rlaif.judge.engines import build_engine
            from rlaif.judge.evaluation import evaluate
            from rlaif.judge.judges import PairwiseJudge
            from rlaif.judge.rubric import load_rubric

            if not data.is_file():
                raise UserError(f"{data}: no such file")
            loaded_rubric = load_rubric(rubric or "helpfulness")
            total = len(load_preferences_with_stats(data, limit=limit).examples)
            judge = PairwiseJudge(build_engine(engine), loaded_rubric, mode=mode, tie_margin=tie_margin,  # type: ignore[arg-type]
                                  cache=open_cache(no_cache, cache_path), seed=seed)
            out_dir = out or Path("runs") / "eval" / data.stem
            with tqdm(total=total, desc="judging pairs", unit="pair", file=sys.stderr) as bar:
                report, _ = evaluate(judge, data, limit=limit, out_dir=out_dir, batch_size=batch_size, seed=seed,
                                     progress=bar.update)
            for warning in report.warnings:
                typer.echo(f"WARNING: {warning}", err=True)
            sys.stdout.write(report.model_dump_json() + "\n")
            sys.stdout.write(json.dumps({"accuracy": report.accuracy, "accuracy_ci95": list(report.accuracy_ci95),
                                         "n": report.n}) + "\n")
