"""`run_best_of_n`: rejection sampling into an SFT dataset (LLaMA-2, Touvron et al. 2023, §3.2.3).

Per prompt: sample N responses from the policy, let the judge pick the best, keep only that
one. Two ways to pick:

- `score` (default): a direct score per sample (`ScoreJudge`, d-RLAIF); the highest expected
  score wins (ties: lower sample index). N judge calls per prompt, all in one batch.
- `tournament`: a single-elimination bracket of position-debiased pairwise judgments
  (samples 0v1, 2v3, ...; an odd one out gets a bye). N-1 comparisons in ceil(log2 N)
  rounds; each round is one judge call for the whole batch and one persisted stage
  (`round-0`, `round-1`, ...), so a resumed job replays finished rounds from the store.
  A pairwise judge compares like with like, which suits rubrics that are hard to grade on
  an absolute scale; the winner's `judge_score` is its mean P(win) over its matches.

The output has TRL's prompt-completion columns (`prompt`, `completion`) and a conversational
`messages` column (prompt turns + the kept response), so it feeds `SFTTrainer` either way.
Resumability and determinism are the same as `rlaif label` (see `rlaif.judge.labeling.job`).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import TYPE_CHECKING

from rlaif.judge.labeling.backends import JudgeBackend, Models
from rlaif.judge.labeling.card import describe, histogram, markdown_table, render_card
from rlaif.judge.labeling.config import BestOfNConfig
from rlaif.judge.labeling.job import (CARD_FILE, EXPORT_FILES, SUMMARY_FILE, SessionCounters, Source, chat_of,
                                judge_in_chunks, load_source, make_batches, open_job, rubric_identity, run_batches, time_stats,
                                write_outputs, write_text)
from rlaif.judge.labeling.pairs import knockout_round
from rlaif.judge.labeling.store import ProgressStore
from rlaif.judge.types import PairwiseItem, PairwiseJudgment, ScoreItem, ScoreJudgment, low_label_mass_warning

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Features

    from rlaif.judge.engines.base import Engine
    from rlaif.judge.labeling.ray_backend import RayOptions

SCORE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

COLUMNS: dict[str, str] = {
    "prompt_id": "Id of the prompt in the source.",
    "prompt": "The prompt as text (chat prompts flattened with role names).",
    "completion": "The kept response: the judge's favourite of the N samples.",
    "messages": "The prompt's chat turns plus the kept response as the assistant turn (TRL conversational format).",
    "judge_score": "score selection: the winner's expected score in [0, 1]; tournament: its mean P(win) over its "
                   "matches (null if every match was between identical texts).",
    "selection": "score or tournament.",
    "sample_index": "Index of the kept response among the N samples.",
    "n_candidates": "Number of samples the winner was picked from.",
    "rubric_id": "Id of the judge rubric.",
    "judge_model": "Model of the judge.",
    "policy_model": "Model that sampled the responses.",
}


def best_of_n_features() -> Features:
    from datasets import Features, List, Value

    return Features({
        "prompt_id": Value("string"), "prompt": Value("string"), "completion": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "judge_score": Value("float64"), "selection": Value("string"), "sample_index": Value("int32"),
        "n_candidates": Value("int32"), "rubric_id": Value("string"), "judge_model": Value("string"),
        "policy_model": Value("string"),
    })


def tournament_rounds(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


# ---------------------------------------------------------------------------------- selection stages
def _score_stage(store: ProgressStore, judge: JudgeBackend, source: Source, batch: int, indices: range,
                 responses: dict[int, list[str]], counters: SessionCounters) -> None:
    if store.stage_done(batch, "scores"):
        return
    keys = [(i, s) for i in indices for s in range(len(responses[i]))]
    started = time.perf_counter()
    judgments = judge_in_chunks(judge.score, [ScoreItem(prompt=source.prompts[i].text, response=responses[i][s])
                                              for i, s in keys], counters)
    seconds = time.perf_counter() - started
    fresh = sum(not j.cached for j in judgments)
    store.save_records(batch, "scores", [json.dumps({"prompt": i, "sample": s, "judgment": j.model_dump(mode="json")})
                                         for (i, s), j in zip(keys, judgments)], seconds, fresh)
    counters.judgments += fresh
    counters.judge_seconds += seconds


def _play_round(matches: list[tuple[int, int]], texts: list[str], judged: dict[tuple[int, int], PairwiseJudgment]) -> list[int]:
    """Winners of one round's matches. Identical texts need no judge: the first advances."""
    winners = []
    for a, b in matches:
        if texts[a] == texts[b]:
            winners.append(a)
        else:
            winners.append(a if judged[(a, b)].prob_a >= 0.5 else b)
    return winners


def replay_tournament(n: int, texts: list[str], judged: dict[tuple[int, int], PairwiseJudgment]) -> tuple[int, list[float]]:
    """(winner, the winner's P(win) in each judged match) from a complete set of round results."""
    survivors = list(range(n))
    while len(survivors) > 1:
        matches, bye = knockout_round(survivors)
        survivors = _play_round(matches, texts, judged) + ([bye] if bye is not None else [])
    winner = survivors[0]
    wins = [j.prob_a if a == winner else 1.0 - j.prob_a for (a, b), j in judged.items() if winner in (a, b)]
    return winner, wins


def _tournament_stages(store: ProgressStore, judge: JudgeBackend, source: Source, batch: int, indices: range,
                       responses: dict[int, list[str]], n: int, counters: SessionCounters) -> None:
    survivors = {i: list(range(n)) for i in indices}
    for round_index in range(tournament_rounds(n)):
        stage = f"round-{round_index}"
        plan = []
        byes: dict[int, int | None] = {}
        for i in indices:
            matches, byes[i] = knockout_round(survivors[i])
            plan += [(i, a, b) for a, b in matches if responses[i][a] != responses[i][b]]
        if not store.stage_done(batch, stage):
            started = time.perf_counter()
            items = [PairwiseItem(prompt=source.prompts[i].text, response_a=responses[i][a], response_b=responses[i][b])
                     for i, a, b in plan]
            judgments = judge_in_chunks(judge.pairwise, items, counters)
            seconds = time.perf_counter() - started
            fresh = sum(not j.cached for j in judgments)
            store.save_records(batch, stage, [json.dumps({"prompt": i, "a": a, "b": b, "judgment": j.model_dump(mode="json")})
                                              for (i, a, b), j in zip(plan, judgments)], seconds, fresh)
            counters.judgments += fresh
            counters.judge_seconds += seconds
        judged: dict[int, dict[tuple[int, int], PairwiseJudgment]] = {i: {} for i in indices}
        for value in store.load_records(batch, stage):
            record = json.loads(value)
            judged[record["prompt"]][(record["a"], record["b"])] = PairwiseJudgment.model_validate(record["judgment"])
        for i in indices:
            matches, bye = knockout_round(survivors[i])
            survivors[i] = _play_round(matches, responses[i], judged[i]) + ([bye] if bye is not None else [])


def judge_batch(store: ProgressStore, judge: JudgeBackend, config: BestOfNConfig, source: Source, batch: int,
                indices: range, responses: dict[int, list[str]], counters: SessionCounters) -> None:
    """The selection stages of one batch, after `generate`: `scores`, or the tournament's rounds.

    Shared by the local loop and the Ray backend's judge actors (`rlaif.judge.labeling.ray_backend`)."""
    if config.selection == "score":
        _score_stage(store, judge, source, batch, indices, responses, counters)
    else:
        _tournament_stages(store, judge, source, batch, indices, responses, config.n, counters)


def _last_stage(config: BestOfNConfig) -> str:
    return "scores" if config.selection == "score" else f"round-{tournament_rounds(config.n) - 1}"


# ---------------------------------------------------------------------------------- rows
def build_rows(store: ProgressStore, config: BestOfNConfig, source: Source, batches: list[range]) -> tuple[list[dict], dict]:
    policy_model = store.get_meta("policy_model")
    rows: list[dict] = []
    dropped: Counter[str] = Counter()
    all_pairwise: list[PairwiseJudgment] = []
    label_masses: list[float] = []
    winner_index: Counter[int] = Counter()
    for batch, indices in enumerate(batches):
        responses = store.load_responses(indices)
        if config.selection == "score":
            per_prompt: dict[int, list[ScoreJudgment]] = {i: [] for i in indices}
            for value in store.load_records(batch, "scores"):
                record = json.loads(value)
                per_prompt[record["prompt"]].append(ScoreJudgment.model_validate(record["judgment"]))
                label_masses.append(per_prompt[record["prompt"]][-1].label_mass)
        else:
            judged: dict[int, dict[tuple[int, int], PairwiseJudgment]] = {i: {} for i in indices}
            for round_index in range(tournament_rounds(config.n)):
                for value in store.load_records(batch, f"round-{round_index}"):
                    record = json.loads(value)
                    judgment = PairwiseJudgment.model_validate(record["judgment"])
                    judged[record["prompt"]][(record["a"], record["b"])] = judgment
                    all_pairwise.append(judgment)
                    label_masses.append(judgment.label_mass)
        for i in indices:
            texts = responses[i]
            if config.selection == "score":
                scores = [j.score for j in per_prompt[i]]
                winner = sorted(range(len(scores)), key=lambda s: (-scores[s], s))[0]
                score: float | None = scores[winner]
                reference = per_prompt[i][winner]
                rubric_id, judge_model = reference.rubric_id, reference.model
            else:
                winner, wins = replay_tournament(len(texts), texts, judged[i])
                score = sum(wins) / len(wins) if wins else None
                any_judgment = next(iter(judged[i].values()), None)
                rubric_id = any_judgment.rubric_id if any_judgment else config.selection_rubric
                judge_model = any_judgment.model if any_judgment else None
            if config.min_score is not None and (score is None or score < config.min_score):
                dropped["below_min_score"] += 1
                continue
            winner_index[winner] += 1
            record = source.prompts[i]
            rows.append({"prompt_id": record.id, "prompt": record.text, "completion": texts[winner],
                         "messages": [*chat_of(record), {"role": "assistant", "content": texts[winner]}],
                         "judge_score": score, "selection": config.selection, "sample_index": winner,
                         "n_candidates": len(texts), "rubric_id": rubric_id, "judge_model": judge_model,
                         "policy_model": policy_model})
    scores = [r["judge_score"] for r in rows if r["judge_score"] is not None]
    mean_mass = sum(label_masses) / len(label_masses) if label_masses else None
    mass_warning = low_label_mass_warning(mean_mass)
    stats = {
        "prompts": len(source.prompts), "samples_per_prompt": config.n, "rows": len(rows), "dropped": dict(dropped),
        "judge_score": describe(scores),
        "judge_score_histogram": [{"bin": label, "rows": count, "fraction": round(fraction, 4)}
                                  for label, count, fraction in histogram(scores, SCORE_EDGES)],
        "winner_sample_index": {str(k): v for k, v in sorted(winner_index.items())},
        "comparisons_judged": len(all_pairwise),
        "position_consistency": (sum(j.consistent for j in all_pairwise) / len(all_pairwise)) if all_pairwise else None,
        "mean_label_mass": mean_mass,
        "warnings": [mass_warning] if mass_warning else [],
        "mean_completion_chars": (sum(len(r["completion"]) for r in rows) / len(rows)) if rows else None,
    }
    return rows, stats


# ---------------------------------------------------------------------------------- job
def run_best_of_n(config: BestOfNConfig, *, policy_engine: Engine | None = None, judge_engine: Engine | None = None,
                  judge: JudgeBackend | None = None, command: str | None = None, ray: RayOptions | None = None) -> dict:
    """Run (or resume) a best-of-n job; returns the summary also written to `<out>/summary.json`.

    `ray`: run the batches on a Ray cluster (`rlaif.judge.labeling.ray_backend`); same store, same rows."""
    counters = SessionCounters()
    source = load_source(config)
    identity = config.identity(prompts_digest=source.digest, rubric=rubric_identity(config.selection_rubric, config.judge_url))
    score_rubric = config.selection_rubric if config.selection == "score" else None
    pairwise_rubric = config.selection_rubric if config.selection == "tournament" else None
    last = _last_stage(config)
    roles = dict(pairwise_rubric=pairwise_rubric, score_rubric=score_rubric)
    if ray is not None and any(x is not None for x in (policy_engine, judge_engine, judge)):
        raise ValueError("engines held by this process cannot move into Ray actors; with ray= pass "
                         "RayOptions(engine_factory=...) instead of policy_engine/judge_engine/judge")
    with open_job(config, identity) as (store, resumed):
        models = Models(config, **roles, policy_engine=policy_engine, judge=judge, judge_engine=judge_engine)
        try:
            done = run_batches(config, store=store, models=models, source=source, last_stage=last, desc="best-of-n",
                               counters=counters, judge_batch=judge_batch, ray=ray, models_kwargs=roles)
            batches = make_batches(len(source.prompts), config.batch_size)
            rows, stats = build_rows(store, config, source, batches)
            _, paths = write_outputs(config.out, rows, best_of_n_features(), config.export)
            store.touch_session()
            summary = {"job": "best-of-n", "out": str(config.out), "resumed": resumed, "batches_resumed": sum(done),
                       **stats, "timing": {**time_stats(store), **counters.rates()}, "files": paths,
                       **({"ray": ray.describe()} if ray is not None else {})}
            write_text(config.out / CARD_FILE, _card(config, summary, command))
            summary["files"]["card"] = str(config.out / CARD_FILE)
            write_text(config.out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
            return summary
        finally:
            models.close()


def _card(config: BestOfNConfig, summary: dict, command: str | None) -> str:
    counts = markdown_table(["", "count"], [
        ["prompts", summary["prompts"]], ["samples per prompt", summary["samples_per_prompt"]],
        ["pairwise comparisons judged (tournament)", summary["comparisons_judged"]], ["rows written", summary["rows"]]])
    filters = markdown_table(["dropped because", "rows"],
                             [[f"judge score below --min-score={config.min_score}", summary["dropped"].get("below_min_score", 0)]])
    distribution = "\n\n".join([
        markdown_table(["statistic", "value"], [[k, "n/a" if v is None else v] for k, v in summary["judge_score"].items()]),
        markdown_table(["judge_score", "rows", "fraction"], [[b["bin"], b["rows"], b["fraction"]] for b in summary["judge_score_histogram"]]),
        "Winning sample index: " + ", ".join(f"{k}: {v}" for k, v in summary["winner_sample_index"].items())
        + " (a strong skew towards one index in a tournament hints at position bias in the bracket)."])
    consistency = summary["position_consistency"]
    timing = summary["timing"]
    sections = [
        ("Counts", counts), ("Filters", filters), ("Judge scores", distribution),
        ("Position consistency", "Tournament comparisons consistent across both presentation orders: "
         + ("n/a (score selection judges each response alone)" if consistency is None else f"{consistency:.3f}")),
        ("Time", f"{timing['sessions']} session(s), {timing['wall_seconds']:.1f} s of wall time in total.\n\n"
         + markdown_table(["", "value"], [[k, v] for k, v in timing.items() if v is not None])),
    ]
    text = (f"Best-of-{config.n} rejection sampling: {config.n} samples per prompt from `{config.policy}`, the best kept "
            f"by `{config.judge_url or config.engine}` ({config.selection} selection, rubric `{config.selection_rubric}`, "
            f"{config.mode} mode). Columns follow TRL's prompt-completion and conversational formats.")
    data_file = next((EXPORT_FILES[k] for k in ("jsonl", "parquet") if k in config.export), None)
    return render_card(title="Best-of-N SFT dataset", tags=["rlaif", "synthetic", "sft", "rejection-sampling"], summary=text,
                       config=config.model_dump(mode="json", exclude={"api_key", "overwrite", "progress"}), sections=sections, columns=COLUMNS,
                       data_file=data_file, command=command)
