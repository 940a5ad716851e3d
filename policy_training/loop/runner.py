"""`run_loop(config)`: walk rounds x stages, skip what is marked done, run the rest, judge the guards.

Unit of resume: the stage. A stage with a done marker is never redone; the first stage without
one is run again from its own resume point (labeling: its progress store, batch by batch; PPO:
its latest checkpoint; RM training and the win rate: from scratch, deterministic, with the
judgment cache making re-judging free). So SIGKILL anywhere, then the same command, ends with
the artifacts an uninterrupted run writes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from rlaif.policy_training.loop.config import LoopConfig
from rlaif.policy_training.loop.guards import GuardResult, Measurements, check_guards
from rlaif.policy_training.loop.layout import CONFIG_FILE, ROUNDS_FILE, STAGES, RunLayout, write_atomic
from rlaif.policy_training.loop.report import write_report
from rlaif.policy_training.loop.stages import STAGE_FUNCTIONS, JudgeHandle, LoopContext, LoopError, prune_checkpoints

logger = logging.getLogger(__name__)


class LoopStopped(Exception):
    """A guard with `action: stop` fired; the report is written."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def check_identity(layout: RunLayout, config: LoopConfig) -> bool:
    """Record the config on first start; afterwards refuse a config whose identity changed. Returns resumed?"""
    import yaml

    saved_path = layout.root / CONFIG_FILE
    identity = config.identity()
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        before = {k: v for k, v in saved.items() if k not in config.UNHASHED}
        if before != identity:
            changed = sorted(_diff(before, identity))
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise LoopError(f"{layout.root} was started with a different config (changed: {shown}); restore those "
                            f"settings or use another out folder (only rounds, guards, progress and "
                            f"prune_checkpoints may change between runs)")
        write_atomic(saved_path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return True
    write_atomic(saved_path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return False


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def run_loop(config: LoopConfig) -> dict[str, Any]:
    """Run (or resume) the loop; returns the summary (also in `<out>/summary.json`).

    Raises `LoopStopped` when a stop guard fires, `LoopError` for problems the user must fix."""
    from rlaif.policy_training.config import resolve_device
    from tqdm.auto import tqdm

    layout = RunLayout(config.out)
    started = time.perf_counter()
    with layout.locked():
        resumed = check_identity(layout, config)
        ctx = LoopContext(config, layout, JudgeHandle(config, layout.cache), resolve_device(config.device))
        total = config.rounds * len(STAGES)
        initial = sum(layout.done(r, s) is not None for r in range(1, config.rounds + 1) for s in STAGES)
        bar = tqdm(total=total, initial=initial, desc="loop", unit="stage", disable=not config.progress,
                   dynamic_ncols=True, file=sys.stderr)
        rounds: list[tuple[Measurements, list[GuardResult]]] = []
        stopped_by: str | None = None
        try:
            for r in range(1, config.rounds + 1):
                for stage in STAGES:
                    if layout.done(r, stage) is None:
                        bar.set_postfix_str(f"round {r}/{config.rounds}: {stage}")
                        layout.set_progress(r, stage)
                        stage_started = time.perf_counter()
                        payload = STAGE_FUNCTIONS[stage](ctx, r)
                        payload["seconds"] = time.perf_counter() - stage_started
                        layout.mark_done(r, stage, payload)
                        bar.update(1)
                    if stage == "rl" and config.prune_checkpoints:
                        prune_checkpoints(ctx, r)
                measurements = Measurements.model_validate(ctx.marker(r, "eval")["measurements"])
                results = check_guards(measurements, config.guards)
                rounds.append((measurements, results))
                for g in results:
                    if g.fired:
                        bar.write(f"{'STOP' if g.action == 'stop' else 'WARNING'}: guard {g.guard}: {g.message}",
                                  file=sys.stderr)
                _write_rounds(layout, rounds)
                report = write_report(layout.root, rounds, _report_context(config), None)
                stop = [g for g in results if g.fired and g.action == "stop"]
                if stop:
                    stopped_by = "; ".join(f"{g.guard}: {g.message}" for g in stop)
                    break
        finally:
            bar.close()
            ctx.judge.close()
        report = write_report(layout.root, rounds, _report_context(config), stopped_by)
        summary = {"out": str(layout.root), "resumed": resumed, "rounds_requested": config.rounds,
                   "rounds_done": len(rounds), "stopped_by": stopped_by, "report": report,
                   "seconds_this_session": time.perf_counter() - started,
                   "rounds": [{**m.model_dump(mode="json"), "guards": [g.model_dump(mode="json") for g in results]}
                              for m, results in rounds]}
        write_atomic(layout.root / "summary.json", json.dumps(summary, indent=2) + "\n")
    if stopped_by:
        raise LoopStopped(f"stopped after round {len(rounds)} by guard {stopped_by}", summary)
    return summary


def _write_rounds(layout: RunLayout, rounds: list[tuple[Measurements, list[GuardResult]]]) -> None:
    lines = [json.dumps({**m.model_dump(mode="json"), "guards": [g.model_dump(mode="json") for g in results]})
             for m, results in rounds]
    write_atomic(layout.root / ROUNDS_FILE, "".join(line + "\n" for line in lines))


def _report_context(config: LoopConfig) -> dict[str, Any]:
    return {"judge": config.judge.url or config.judge.engine_spec, "rubric": config.judge.rubric,
            "policy": config.policy.model, "reward_source": config.reward.source,
            "calibration": str(config.judge.calibration) if config.judge.calibration else None,
            "max_kl": config.guards.kl.max_kl, "min_agreement": config.guards.rm_agreement.min_agreement}


def preflight(config: LoopConfig) -> None:
    """Checks that need no model: prompt files exist, the sets are disjoint, rubric and engine specs are valid."""
    from rlaif.judge.data import load_prompts
    from rlaif.judge.labeling.job import preflight_job
    from rlaif.policy_training.loop.config import engine_spec_of

    p = config.prompts
    for name, path in (("prompts.train", p.train), ("prompts.heldout", p.heldout)):
        if not path.exists():
            raise LoopError(f"{name}: {path} does not exist")
    train = load_prompts(str(p.train), p.prompt_column, p.train_limit)
    heldout = load_prompts(str(p.heldout), p.prompt_column, p.heldout_limit)
    if not train or not heldout:
        raise LoopError(f"{'prompts.train' if not train else 'prompts.heldout'} holds no prompts")
    shared = {r.text for r in train} & {r.text for r in heldout}
    if shared:
        example = next(iter(shared))[:60]
        raise LoopError(f"prompts.train and prompts.heldout share {len(shared)} prompt(s) (e.g. {example!r}); "
                        "the win rate must be measured on prompts the policy never trained on")
    preflight_job(config.label_config(1, engine_spec_of(config.policy.model), cache_path=config.out / "x.sqlite"))
    if config.reward.source != "rm" and config.judge.url is None:
        from rlaif.judge.judges import check_judge_setup

        rl = config.rl_config(config.out / "rm", config.out / "rl", 1).reward
        check_judge_setup(rl.reward_mode, rl.rubric or ("helpfulness" if rl.reward_mode == "pairwise" else "score-1-10"),
                          rl.judge_mode)
