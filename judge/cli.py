"""`rlaif judge pairwise|score|checklist|group` and `rlaif eval`: the judge from the command line.

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
ReferenceOpt = Annotated[Optional[str], typer.Option("--reference", help="A reference answer for reference-guided rubrics (e.g. --rubric correctness).")]
CalibrationOpt = Annotated[Optional[Path], typer.Option("--calibration", help="Calibration file from `rlaif calibrate` (fit on this engine, rubric and mode).")]


class UserError(Exception):
    """An error caused by the command line or inputs; printed without a traceback."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the judge's typed errors into a clean message and exit code 2."""
    from rlaif.judge.calibration import CalibrationError
    from rlaif.judge.engines.base import EngineError
    from rlaif.judge.models import ModelNotFound
    from rlaif.judge.rubric import RubricError, RubricNotFound

    try:
        yield
    except (UserError, RubricError, RubricNotFound, EngineError, ModelNotFound, CalibrationError, ValueError,
            FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


EMBEDDED_JUDGE_NOTE = ("note: the embedded SmolLM2-135M is a test judge (near chance, mostly TIE); for real judgments "
                       "pass a capable model, e.g. --engine 'hf:Qwen/Qwen2.5-7B-Instruct?device=cuda' or "
                       "--engine 'openai:<url>/v1#<model>'")
"""One line shown wherever the embedded model judges (CLI stderr, the service banner)."""


def is_embedded_engine(spec: str) -> bool:
    return spec.strip().partition("?")[0] == "default"


def preflight(kind: str, rubric: str, mode: str, engine: str, *, tie_margin: float | None = None):
    """Every check a judge command can make before loading a model, in one place: the rubric (kind, mode),
    the tie margin, then the engine spec (syntax, options, that the model exists or the hub is reachable).
    Returns the loaded rubric; prints the embedded-model note when the engine is the embedded default."""
    from rlaif.judge.engines import validate_engine_spec
    from rlaif.judge.judges import check_judge_setup

    loaded = check_judge_setup(kind, rubric, mode)  # type: ignore[arg-type]
    if tie_margin is not None and not 0.0 <= tie_margin < 0.5:
        raise UserError(f"--tie-margin {tie_margin}: must be in [0, 0.5)")
    validate_engine_spec(engine)
    if is_embedded_engine(engine):
        typer.echo(EMBEDDED_JUDGE_NOTE, err=True)
    return loaded


def open_cache(no_cache: bool, cache_path: Path | None):
    if no_cache:
        return None
    from rlaif.judge.cache import JudgmentCache
    from rlaif.judge.models import cache_root

    return JudgmentCache(cache_path or cache_root() / "judgments.sqlite")


def load_calibration(path: Path | None):
    """The calibration file given with `--calibration`, or None."""
    if path is None:
        return None
    from rlaif.judge.calibration import Calibration

    return Calibration.load(path)


def parse_criteria_options(values: list[str]) -> tuple:
    """`--criterion TEXT` or `--criterion WEIGHT:TEXT` options -> `Criterion`s (a bad weight is a UserError)."""
    from rlaif.judge.types import Criterion

    if not values:
        raise UserError("give at least one --criterion")
    out = []
    for value in values:
        head, sep, rest = value.partition(":")
        weight = 1.0
        if sep:
            try:
                weight = float(head)
            except ValueError:
                rest = value  # a colon inside the text, no weight
        text = rest if sep and rest is not value else value
        if not text.strip():
            raise UserError(f"--criterion {value!r}: the criterion text is empty")
        if weight <= 0:
            raise UserError(f"--criterion {value!r}: the weight must be > 0 (phrase the criterion so that yes is good)")
        out.append(Criterion(text=text.strip(), weight=weight))
    return tuple(out)


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
        calibration: CalibrationOpt = None,
        reference: ReferenceOpt = None,
    ) -> None:
        """Position-debiased pairwise preference: P(response A is better), both orders averaged."""
        with user_errors():
            from rlaif.judge.engines import build_engine
            from rlaif.judge.judges import PairwiseJudge
            from rlaif.judge.types import PairwiseItem

            loaded = preflight("pairwise", rubric or "helpfulness", mode, engine, tie_margin=tie_margin)
            loaded.check_item_fields(reference=reference)  # before the model loads
            calibrated = load_calibration(calibration)
            judge = PairwiseJudge(build_engine(engine), loaded, mode=mode, tie_margin=tie_margin,  # type: ignore[arg-type]
                                  cache=open_cache(no_cache, cache_path), seed=seed, calibration=calibrated)
            result = judge.judge([PairwiseItem(prompt=prompt, response_a=response_a, response_b=response_b,
                                               reference=reference)])[0]
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
        reference: ReferenceOpt = None,
    ) -> None:
        """Direct score (d-RLAIF): expected score under the label distribution, rescaled to [0, 1]."""
        with user_errors():
            from rlaif.judge.engines import build_engine
            from rlaif.judge.judges import ScoreJudge
            from rlaif.judge.types import ScoreItem

            loaded = preflight("score", rubric or "score-1-10", mode, engine)
            loaded.check_item_fields(reference=reference)  # before the model loads
            judge = ScoreJudge(build_engine(engine), loaded, mode=mode,  # type: ignore[arg-type]
                               cache=open_cache(no_cache, cache_path), seed=seed)
            result = judge.judge([ScoreItem(prompt=prompt, response=response, reference=reference)])[0]
            print_json(result.model_dump(mode="json"))

    @judge_app.command("checklist")
    def checklist(
        prompt: Annotated[str, typer.Option("--prompt", help="The user prompt.")],
        response: Annotated[str, typer.Option("--response", help="The response to grade.")],
        criterion: Annotated[list[str], typer.Option("--criterion", help="A yes/no criterion a good response meets; "
                                                     "repeat for each. `TEXT` or `WEIGHT:TEXT` (e.g. 2:Gives the final number).")],
        checklist_mode: Annotated[str, typer.Option("--checklist-mode", help="explicit (one yes/no question per criterion) "
                                                    "or implicit (the whole checklist in one score prompt).")] = "explicit",
        rubric: RubricOpt = None,
        engine: EngineOpt = "default",
        reference: ReferenceOpt = None,
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
    ) -> None:
        """Per-item checklist (Rubrics as Rewards): weighted mean of P(yes) over the criteria, with the breakdown."""
        with user_errors():
            from rlaif.judge.checklist import ChecklistJudge, check_checklist_setup
            from rlaif.judge.engines import build_engine, validate_engine_spec
            from rlaif.judge.types import ChecklistItem

            criteria = parse_criteria_options(criterion)
            if checklist_mode not in ("explicit", "implicit"):
                raise UserError(f"--checklist-mode {checklist_mode!r}: use explicit or implicit")
            loaded = check_checklist_setup(rubric, checklist_mode)
            loaded.check_item_fields(reference=reference, criteria=criteria)
            validate_engine_spec(engine)
            judge = ChecklistJudge(build_engine(engine), loaded, checklist_mode=checklist_mode,  # type: ignore[arg-type]
                                   cache=open_cache(no_cache, cache_path))
            result = judge.judge([ChecklistItem(prompt=prompt, response=response, criteria=criteria, reference=reference)])[0]
            print_json(result.model_dump(mode="json"))

    @judge_app.command("group")
    def group(
        prompt: Annotated[str, typer.Option("--prompt", help="The user prompt all responses answer.")],
        response: Annotated[list[str], typer.Option("--response", help="One response of the group; repeat (>= 2).")],
        method: Annotated[str, typer.Option("--method", help="listwise (the group in one prompt, seeded orders "
                                            "averaged) or round_robin (all pairs, Bradley-Terry).")] = "listwise",
        orders: Annotated[int, typer.Option("--orders", help="listwise: presentation orders averaged.")] = 4,
        rubric: RubricOpt = None,
        engine: EngineOpt = "default",
        reference: ReferenceOpt = None,
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        seed: SeedOpt = 0,
    ) -> None:
        """Group-relative scores (for GRPO / RLOO): every response judged against the others, in [0, 1]."""
        with user_errors():
            from rlaif.judge.engines import build_engine, validate_engine_spec
            from rlaif.judge.group import GroupJudge, check_group_setup
            from rlaif.judge.types import GroupItem

            if len(response) < 2:
                raise UserError(f"a group needs at least two --response options, got {len(response)}")
            if method not in ("listwise", "round_robin"):
                raise UserError(f"--method {method!r}: use listwise or round_robin")
            loaded = check_group_setup(rubric, method, orders)
            loaded.check_item_fields(reference=reference)
            validate_engine_spec(engine)
            judge = GroupJudge(build_engine(engine), loaded, method=method, orders=orders,  # type: ignore[arg-type]
                               cache=open_cache(no_cache, cache_path), seed=seed)
            result = judge.judge([GroupItem(prompt=prompt, responses=tuple(response), reference=reference)])[0]
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
        batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per judge call (the progress bar moves after each).")] = 8,
        tie_margin: Annotated[float, typer.Option("--tie-margin", help="|P(A)-0.5| below this is a tie (counted in tie_rate).")] = 0.05,
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        seed: SeedOpt = 0,
        calibration: CalibrationOpt = None,
    ) -> None:
        """Agreement of the judge with human labels. Prints the report as one JSON line, then a last JSON
        line with the debiased accuracy (`rlaif eval ... | tail -n1`). Warnings go to stderr."""
        with user_errors():
            from tqdm import tqdm

            from rlaif.judge.data import load_preferences_with_stats
            from rlaif.judge.engines import build_engine
            from rlaif.judge.evaluation import evaluate
            from rlaif.judge.judges import PairwiseJudge

            if not data.is_file():
                raise UserError(f"--data {data}: no such file")
            loaded_rubric = preflight("pairwise", rubric or "helpfulness", mode, engine, tie_margin=tie_margin)
            total = len(load_preferences_with_stats(data, limit=limit).examples)
            calibrated = load_calibration(calibration)
            judge = PairwiseJudge(build_engine(engine), loaded_rubric, mode=mode, tie_margin=tie_margin,  # type: ignore[arg-type]
                                  cache=open_cache(no_cache, cache_path), seed=seed, calibration=calibrated)
            out_dir = out or Path("runs") / "eval" / data.stem
            with tqdm(total=total, desc="judging pairs", unit="pair", file=sys.stderr) as bar:
                report, _ = evaluate(judge, data, limit=limit, out_dir=out_dir, batch_size=batch_size, seed=seed,
                                     progress=bar.update)
            for warning in report.warnings:
                typer.echo(f"WARNING: {warning}", err=True)
            sys.stdout.write(report.model_dump_json() + "\n")
            sys.stdout.write(json.dumps({"accuracy": report.accuracy, "accuracy_ci95": list(report.accuracy_ci95),
                                         "n": report.n}) + "\n")
