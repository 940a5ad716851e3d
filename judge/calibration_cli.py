"""`rlaif calibrate`: fit a judge calibration (position-bias offset + temperatures) on human labels.

    rlaif calibrate --data human.jsonl --engine default --rubric helpfulness --out calib.json [--holdout 0.5]

Judges every human-labeled pair of `--data` (any format `rlaif eval` reads, e.g. the file
`rlaif review export` writes) in both orders with the uncalibrated judge, fits the model of
`rlaif.judge.calibration`, and writes the calibration file. Prints one JSON summary on stdout (the
fitted numbers, k-fold cross-validated metrics before/after and, with `--holdout`, metrics on the
held-out pairs); warnings go to stderr. Use the file with `--calibration calib.json` on
`rlaif judge pairwise`, `rlaif eval`, `rlaif label`, `rlaif serve` and in PPO configs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlaif.judge.cli import CachePathOpt, EngineOpt, ModeOpt, NoCacheOpt, RubricOpt, SeedOpt, UserError, print_json, user_errors


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        data: Annotated[Path, typer.Option("--data", help="Human preference file (PandaLM, LLMBar, hh-rlhf, prompt/chosen/rejected jsonl, `rlaif review export` output).")],
        out: Annotated[Path, typer.Option("--out", help="Calibration file to write (JSON).")],
        rubric: RubricOpt = None,
        engine: EngineOpt = "default",
        mode: ModeOpt = "logprob",
        limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N usable pairs.")] = None,
        holdout: Annotated[float, typer.Option("--holdout", help="Fraction of pairs (seeded) kept out of the fit and reported before/after; rlaif eval on the same file then scores only those.")] = 0.0,
        l2: Annotated[float, typer.Option("--l2", help="Ridge strength towards the uncalibrated judge.")] = 1.0,
        folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds.")] = 5,
        tie_margin: Annotated[float, typer.Option("--tie-margin", help="|P(A)-0.5| below this is a tie.")] = 0.05,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per judge call.")] = 16,
        no_cache: NoCacheOpt = False,
        cache_path: CachePathOpt = None,
        seed: SeedOpt = 0,
    ) -> None:
        """Fit a judge calibration on human labels: position-bias offset and temperatures (Platt scaling)."""
        with user_errors():
            import numpy as np
            from tqdm import tqdm

            from rlaif.judge.calibration import example_hash, fit_calibration
            from rlaif.judge.cli import open_cache
            from rlaif.judge.data import load_preferences_with_stats
            from rlaif.judge.engines import build_engine
            from rlaif.judge.evaluation import presentation_order
            from rlaif.judge.judges import PairwiseJudge
            from rlaif.judge.rubric import load_rubric
            from rlaif.judge.types import PairwiseItem

            if not data.is_file():
                raise UserError(f"{data}: no such file")
            if not 0.0 <= holdout < 1.0:
                raise UserError(f"--holdout must be in [0, 1), got {holdout}")
            loaded_rubric = load_rubric(rubric or "helpfulness")
            if loaded_rubric.kind != "pairwise":
                raise UserError(f"--rubric {loaded_rubric.id}: a {loaded_rubric.kind} rubric; calibration applies to pairwise rubrics")
            examples = load_preferences_with_stats(data, limit=limit).examples
            if not examples:
                raise UserError(f"{data}: no usable labeled pairs")
            judge = PairwiseJudge(build_engine(engine), loaded_rubric, mode=mode, tie_margin=tie_margin,  # type: ignore[arg-type]
                                  cache=open_cache(no_cache, cache_path), seed=seed)
            chosen_is_a = [presentation_order(e, seed) for e in examples]
            items = [PairwiseItem(prompt=e.prompt, response_a=e.chosen if a else e.rejected,
                                  response_b=e.rejected if a else e.chosen) for e, a in zip(examples, chosen_is_a)]
            judgments = []
            with tqdm(total=len(items), desc="judging pairs", unit="pair", file=sys.stderr) as bar:
                for start in range(0, len(items), batch_size):
                    judgments.extend(judge.judge(items[start:start + batch_size]))
                    bar.update(min(batch_size, len(items) - start))
            outcomes = [1.0 if a else 0.0 for a in chosen_is_a]
            held = set(np.random.default_rng(seed).permutation(len(items))[:round(holdout * len(items))].tolist())
            fit_idx = [i for i in range(len(items)) if i not in held]
            held_idx = sorted(held)
            calibration = fit_calibration(
                [judgments[i] for i in fit_idx], [outcomes[i] for i in fit_idx],
                rubric_fingerprint=loaded_rubric.fingerprint, l2=l2, folds=folds, seed=seed, tie_margin=tie_margin,
                fitted_on=[example_hash(examples[i].prompt, examples[i].chosen, examples[i].rejected) for i in fit_idx],
                data=str(data), holdout=([judgments[i] for i in held_idx], [outcomes[i] for i in held_idx]) if held_idx else None)
            calibration.save(out)
            assert calibration.fit is not None
            for warning in calibration.fit.warnings:
                typer.echo(f"WARNING: {warning}", err=True)
            params = calibration.params
            print_json({"calibration": calibration.id, "out": str(out), "engine": calibration.engine,
                        "rubric_id": calibration.rubric_id, "pairs_fit": len(fit_idx), "pairs_held_out": len(held_idx),
                        "position_bias": params.position_bias, "temperature": params.temperature,
                        "params": params.model_dump(),
                        **{name: getattr(calibration.fit, name).model_dump() if getattr(calibration.fit, name) else None
                           for name in ("cv_before", "cv_after", "holdout_before", "holdout_after")},
                        "warnings": calibration.fit.warnings})
