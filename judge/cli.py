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
    from judge.engines.base import EngineError
    from judge.models import ModelNotFound
    from judge.rubric import RubricError, RubricNotFound

    try:
        yield
    except (UserError, RubricError, RubricNotFound, EngineError, ModelNotFound, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


def open_cache(no_cache: bool, cache_path: Path | None):
    if no_cache:
        return None
    from judge.cache import JudgmentCache
    from judge.models import cache_root

    return JudgmentCache(cache_path or cache_root() / "judgments.sqlite")


def print_json(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
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
            from judge.engines import build_engine
            from judge.judges import PairwiseJudge
            from judge.types import PairwiseItem

            from judge.rubric import load_rubric

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
            from judge.engines import build_engine
            from judge.judges import ScoreJudge
            from judge.types import ScoreItem

            from judge.rubric import load_rubric

            loaded = load_rubric(rubric or "score-1-10")
            judge = ScoreJudge(build_engine(engine), loaded, mode=mode,  # type: ignore[arg-type]
                               cache=open_cache(no_cache, cache_path), seed=seed)
            result = judge.judge([ScoreItem(prompt=prompt, response=response)])[0]
            print_json(result.model_dump(mode="json"))

    @judge_app.command("rubrics")
    def rubrics() -> None:
        """List the built-in rubrics."""
        with user_errors():
            from judge.rubric import load_all_builtin

            print_json([{"id": r.id, "version": r.version, "kind": r.kind, "description": r.description.strip(),
                         "modes": ["logprob", "cot"] if r.cot else ["logprob"]} for r in load_all_builtin().values()])
