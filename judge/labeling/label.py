"""`run_label`: prompts -> N policy samples -> judged pairs -> a TRL preference dataset.

This is RLAIF's labeling step (Lee et al. 2023, §2.1; Constitutional AI §4.1): the AI judge's
soft, position-debiased preference P(chosen better) replaces the human label. Per batch of
prompts:

1. `generate`: N samples per prompt from the policy (or the source's response columns);
2. `scores` (only `--pairs best-worst --ranking score`): one direct score per sample;
3. `pairs`: the pairwise judgments this strategy needs (see `rlaif.judge.labeling.pairs`),
   both presentation orders each.

Each stage is committed to the progress store as soon as it finishes; the dataset is then
built from the store: every judged pair is oriented so `chosen` is the judge's preferred
response and `judge_prob` = P(chosen better) >= 0.5, and the filters (identical responses,
`--drop-inconsistent`, `--min-margin`) are applied and counted for the card.

Usage:

    from rlaif.judge.labeling import LabelConfig, run_label
    summary = run_label(LabelConfig(prompts="data/prompts/mt_bench_questions.jsonl", out="runs/mt", n=4))
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

from rlaif.judge.labeling.backends import JudgeBackend, Models
from rlaif.judge.labeling.card import describe, histogram, markdown_table, render_card
from rlaif.judge.labeling.config import LabelConfig
from rlaif.judge.labeling.job import (CARD_FILE, EXPORT_FILES, SUMMARY_FILE, SessionCounters, Source,
                                judge_in_chunks, load_source, make_batches, open_job, rubric_identity, run_batches, time_stats,
                                write_outputs, write_text)
from rlaif.judge.labeling.pairs import all_pairs, orient, random_pair, rank_by_wins
from rlaif.judge.labeling.store import ProgressStore
from rlaif.judge.types import (ChecklistItem, ChecklistJudgment, PairwiseItem, PairwiseJudgment, Preference, ScoreItem,
                               ScoreJudgment, low_label_mass_warning)

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Features

    from rlaif.judge.engines.base import Engine
    from rlaif.judge.labeling.ray_backend import RayOptions

LAST_STAGE = "pairs"
PROB_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

COLUMNS: dict[str, str] = {
    "prompt_id": "Id of the prompt in the source (its own id field, else '<file stem>-<row>').",
    "prompt": "The prompt: chat messages (conversational format) or text (standard format).",
    "chosen": "The response the judge prefers: one assistant message, or text.",
    "rejected": "The other response.",
    "judge_prob": "Debiased P(chosen is better): the mean of both presentation orders, >= 0.5.",
    "consistent": "Both presentation orders preferred `chosen` (the judge was not swayed by position).",
    "margin": "|2 * judge_prob - 1| in [0, 1]: how decisive the judgment is. TRL's RewardTrainer reads a "
              "`margin` column as a Bradley-Terry margin; drop it if that is not wanted.",
    "rubric_id": "Id of the judge rubric.",
    "judge_model": "Model of the judge.",
    "rationale": "CoT mode: the judge's rationale from the order that showed `chosen` as response A; else null.",
    "policy_model": "Model that sampled the responses; null when relabeling existing responses.",
    "chosen_index": "Index of `chosen` among the prompt's samples (or --responses-from columns).",
    "rejected_index": "Index of `rejected` among the prompt's samples.",
}


def label_features(fmt: str) -> Features:
    """Declared features, so the schema survives empty datasets and `load_from_disk`."""
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    text = List(message) if fmt == "conversational" else Value("string")
    return Features({
        "prompt_id": Value("string"), "prompt": text, "chosen": text, "rejected": text,
        "judge_prob": Value("float64"), "consistent": Value("bool"), "margin": Value("float64"),
        "rubric_id": Value("string"), "judge_model": Value("string"), "rationale": Value("string"),
        "policy_model": Value("string"), "chosen_index": Value("int32"), "rejected_index": Value("int32"),
    })


# ---------------------------------------------------------------------------------- planning
def _best_worst_by_score(scores: list[float]) -> tuple[int, int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[0], order[-1]


def output_pairs(config: LabelConfig, prompt_index: int, n: int, judged: dict[tuple[int, int], PairwiseJudgment],
                 scores: list[float] | None) -> list[tuple[int, int]]:
    """The pairs that become dataset rows for one prompt, as (a, b) with a < b."""
    if config.pairs == "all":
        return all_pairs(n)
    if config.pairs == "random":
        return [random_pair(n, config.seed, prompt_index)]
    if config.ranking in ("score", "checklist"):
        assert scores is not None, f"ranking={config.ranking} needs the scores stage"
        best, worst = _best_worst_by_score(scores)
    else:
        ranking = rank_by_wins(n, {pair: j.prob_a for pair, j in judged.items()})
        best, worst = ranking[0], ranking[-1]
    return [(min(best, worst), max(best, worst))]


def pairs_to_judge(config: LabelConfig, prompt_index: int, texts: list[str], scores: list[float] | None) -> list[tuple[int, int]]:
    """The comparisons one prompt needs; identical texts are never judged (their verdict is 0.5)."""
    n = len(texts)
    if config.pairs == "best-worst" and config.ranking == "wins":
        candidates = all_pairs(n)  # the round robin; the best-worst label is one of these
    else:
        candidates = output_pairs(config, prompt_index, n, {}, scores)
    return [(a, b) for a, b in candidates if texts[a] != texts[b]]


# ---------------------------------------------------------------------------------- stages
def _score_stage(store: ProgressStore, judge: JudgeBackend, config: LabelConfig, source: Source, batch: int,
                 indices: range, responses: dict[int, list[str]], counters: SessionCounters) -> dict[int, list[float]]:
    """Score every sample of the batch (the score judge, or each prompt's checklist); stored as stage `scores`."""
    if not store.stage_done(batch, "scores"):
        keys = [(i, s) for i in indices for s in range(len(responses[i]))]
        started = time.perf_counter()
        if config.ranking == "checklist":
            checklist_items = [ChecklistItem(prompt=source.prompts[i].text, response=responses[i][s],
                                             criteria=source.criteria_of(i), reference=source.reference(i))
                               for i, s in keys]
            judgments: list[ChecklistJudgment] | list[ScoreJudgment] = judge_in_chunks(judge.checklist,
                                                                                         checklist_items, counters)
        else:
            items = [ScoreItem(prompt=source.prompts[i].text, response=responses[i][s], reference=source.reference(i))
                     for i, s in keys]
            judgments = judge_in_chunks(judge.score, items, counters)
        seconds = time.perf_counter() - started
        fresh = sum(not j.cached for j in judgments)
        store.save_records(batch, "scores", [json.dumps({"prompt": i, "sample": s, "judgment": j.model_dump(mode="json")})
                                             for (i, s), j in zip(keys, judgments)], seconds, fresh)
        counters.judgments += fresh
        counters.judge_seconds += seconds
    scores: dict[int, list[float]] = {i: [0.0] * len(responses[i]) for i in indices}
    for value in store.load_records(batch, "scores"):
        record = json.loads(value)
        scores[record["prompt"]][record["sample"]] = float(record["judgment"]["score"])
    return scores


def _pairs_stage(store: ProgressStore, judge: JudgeBackend, config: LabelConfig, source: Source, batch: int,
                 indices: range, responses: dict[int, list[str]], scores: dict[int, list[float]] | None,
                 counters: SessionCounters) -> None:
    if store.stage_done(batch, LAST_STAGE):
        return
    plan = [(i, a, b) for i in indices
            for a, b in pairs_to_judge(config, i, responses[i], scores[i] if scores is not None else None)]
    items = [PairwiseItem(prompt=source.prompts[i].text, response_a=responses[i][a], response_b=responses[i][b],
                          reference=source.reference(i)) for i, a, b in plan]
    started = time.perf_counter()
    judgments = judge_in_chunks(judge.pairwise, items, counters)
    seconds = time.perf_counter() - started
    fresh = sum(not j.cached for j in judgments)
    store.save_records(batch, LAST_STAGE, [json.dumps({"prompt": i, "a": a, "b": b, "judgment": j.model_dump(mode="json")})
                                           for (i, a, b), j in zip(plan, judgments)], seconds, fresh)
    counters.judgments += fresh
    counters.judge_seconds += seconds


def judge_batch(store: ProgressStore, judge: JudgeBackend, config: LabelConfig, source: Source, batch: int,
                indices: range, responses: dict[int, list[str]], counters: SessionCounters) -> None:
    """The judging stages of one batch, after `generate`: `scores` (ranking by score), then `pairs`.

    Shared by the local loop and the Ray backend's judge actors (`rlaif.judge.labeling.ray_backend`)."""
    scores = (_score_stage(store, judge, config, source, batch, indices, responses, counters)
              if config.pairs == "best-worst" and config.ranking in ("score", "checklist") else None)
    _pairs_stage(store, judge, config, source, batch, indices, responses, scores, counters)


# ---------------------------------------------------------------------------------- rows
def build_rows(store: ProgressStore, config: LabelConfig, source: Source, batches: list[range]) -> tuple[list[dict], dict]:
    """Dataset rows from the store, plus the statistics the card and summary report."""
    policy_model = store.get_meta("policy_model") if source.responses is None else None
    rows: list[dict] = []
    dropped: Counter[str] = Counter()
    all_judgments: list[PairwiseJudgment] = []
    candidates = 0
    for batch, indices in enumerate(batches):
        judged: dict[int, dict[tuple[int, int], PairwiseJudgment]] = {i: {} for i in indices}
        for value in store.load_records(batch, LAST_STAGE):
            record = json.loads(value)
            judgment = PairwiseJudgment.model_validate(record["judgment"])
            judged[record["prompt"]][(record["a"], record["b"])] = judgment
            all_judgments.append(judgment)
        scores: dict[int, list[float]] = {}
        for value in store.load_records(batch, "scores"):
            record = json.loads(value)
            scores.setdefault(record["prompt"], []).append(float(record["judgment"]["score"]))
        responses = store.load_responses(indices)
        for i in indices:
            texts = responses[i]
            for a, b in output_pairs(config, i, len(texts), judged[i], scores.get(i)):
                candidates += 1
                if texts[a] == texts[b]:
                    dropped["identical_responses"] += 1
                    continue
                judgment = judged[i][(a, b)]
                if config.drop_inconsistent and not judgment.consistent:
                    dropped["inconsistent"] += 1
                    continue
                if judgment.margin < config.min_margin:
                    dropped["below_min_margin"] += 1
                    continue
                rows.append(_row(config, source, i, texts, orient(a, b, judgment), judgment, policy_model))
    stats = _stats(config, source, rows, dropped, all_judgments, candidates)
    return rows, stats


def _row(config: LabelConfig, source: Source, prompt_index: int, texts: list[str], oriented, judgment: PairwiseJudgment,
         policy_model: str | None) -> dict:
    from rlaif.judge.labeling.job import chat_of

    record = source.prompts[prompt_index]
    chosen, rejected = texts[oriented.chosen], texts[oriented.rejected]
    if config.format == "conversational":
        prompt: object = chat_of(record)
        chosen_value: object = [{"role": "assistant", "content": chosen}]
        rejected_value: object = [{"role": "assistant", "content": rejected}]
    else:
        prompt, chosen_value, rejected_value = record.text, chosen, rejected
    return {"prompt_id": record.id, "prompt": prompt, "chosen": chosen_value, "rejected": rejected_value,
            "judge_prob": oriented.prob, "consistent": judgment.consistent, "margin": judgment.margin,
            "rubric_id": judgment.rubric_id, "judge_model": judgment.model, "rationale": oriented.rationale,
            "policy_model": policy_model, "chosen_index": oriented.chosen, "rejected_index": oriented.rejected}


def _stats(config: LabelConfig, source: Source, rows: list[dict], dropped: Counter[str],
           judgments: list[PairwiseJudgment], candidates: int) -> dict:
    probs = [row["judge_prob"] for row in rows]
    preference = Counter(j.preference.value for j in judgments)
    mean_mass = (sum(j.label_mass for j in judgments) / len(judgments)) if judgments else None
    mass_warning = low_label_mass_warning(mean_mass)
    warnings = [mass_warning] if mass_warning else []
    filter_warning = filters_drop_most_warning(config, dropped, candidates)
    if filter_warning:
        warnings.append(filter_warning)

    def length(value: object) -> int:
        return len(value[0]["content"]) if isinstance(value, list) else len(str(value))

    return {
        "prompts": len(source.prompts),
        "prompts_missing_responses": source.missing_responses,
        "samples_per_prompt": config.n,
        "comparisons_judged": len(judgments),
        "candidate_pairs": candidates,
        "rows": len(rows),
        "dropped": dict(dropped),
        "position_consistency": (sum(j.consistent for j in judgments) / len(judgments)) if judgments else None,
        "position_consistency_rows": (sum(r["consistent"] for r in rows) / len(rows)) if rows else None,
        "judge_preferences": {p.value: preference.get(p.value, 0) for p in Preference},
        "mean_label_mass": mean_mass,
        "warnings": warnings,
        "judge_prob": describe(probs),
        "judge_prob_histogram": [{"bin": label, "rows": count, "fraction": round(fraction, 4)}
                                 for label, count, fraction in histogram(probs, PROB_EDGES)],
        "mean_chosen_chars": (sum(length(r["chosen"]) for r in rows) / len(rows)) if rows else None,
        "mean_rejected_chars": (sum(length(r["rejected"]) for r in rows) / len(rows)) if rows else None,
        "chosen_longer_fraction": (sum(length(r["chosen"]) > length(r["rejected"]) for r in rows) / len(rows)) if rows else None,
    }


def filters_drop_most_warning(config: LabelConfig, dropped: Counter[str], candidates: int) -> str | None:
    """A warning when --drop-inconsistent / --min-margin removed most of the judged pairs.

    Why the defaults keep every pair (both filters off): a capable small judge's two presentation
    orders often disagree, so its *hard* verdict is a tie on most pairs (the 1.5B judge of the README:
    96% ties) while the soft debiased probability still carries the signal (69-77% debiased accuracy).
    `judge_prob` keeps that signal and the reward model trains on it; filtering by consistency or margin
    would throw nearly all of it away."""
    judged = candidates - dropped.get("identical_responses", 0)
    removed = dropped.get("inconsistent", 0) + dropped.get("below_min_margin", 0)
    if judged == 0 or removed <= judged / 2:
        return None
    used = [flag for flag, on in (("--drop-inconsistent", config.drop_inconsistent),
                                  (f"--min-margin {config.min_margin}", config.min_margin > 0)) if on]
    return (f"{' and '.join(used)} removed {removed} of {judged} judged pairs ({removed / judged:.0%}): this judge's "
            "orders mostly disagree or its margins are small, but its soft judge_prob still carries the preference; "
            "leave the filters off (the default) and train on the soft labels")


# ---------------------------------------------------------------------------------- job
def run_label(config: LabelConfig, *, policy_engine: Engine | None = None, judge_engine: Engine | None = None,
              judge: JudgeBackend | None = None, command: str | None = None, ray: RayOptions | None = None) -> dict:
    """Run (or resume) a labeling job; returns the summary also written to `<out>/summary.json`.

    `ray`: run the batches on a Ray cluster (`rlaif.judge.labeling.ray_backend`); same store, same rows.

    `policy_engine`/`judge_engine`/`judge` let a caller that already holds models (tests,
    notebooks) skip loading them again; by default they are built from the config's specs.
    """
    counters = SessionCounters()
    source = load_source(config)
    rubrics = {"rubric": rubric_identity(config.pairwise_rubric, config.judge_url)}
    if config.ranking == "score":
        rubrics["score_rubric"] = rubric_identity(config.score_rubric, config.judge_url)
    if config.ranking == "checklist":
        rubrics["checklist_rubric"] = rubric_identity(str(config.ranking_rubric), config.judge_url)
    if config.calibration is not None:  # a calibration changes every judgment: part of the job's identity
        from rlaif.judge.calibration import Calibration

        rubrics["calibration"] = Calibration.load(config.calibration).id
    identity = config.identity(prompts_digest=source.digest, **rubrics)
    roles = dict(pairwise_rubric=config.pairwise_rubric, score_rubric=config.score_rubric if config.ranking == "score" else None,
                 tie_margin=config.tie_margin)
    if config.ranking == "checklist":
        roles.update(checklist_rubric=config.ranking_rubric, checklist_mode=config.checklist_mode)
    if ray is not None and any(x is not None for x in (policy_engine, judge_engine, judge)):
        raise ValueError("engines held by this process cannot move into Ray actors; with ray= pass "
                         "RayOptions(engine_factory=...) instead of policy_engine/judge_engine/judge")
    with open_job(config, identity) as (store, resumed):
        models = Models(config, **roles, policy_engine=policy_engine, judge=judge, judge_engine=judge_engine)  # type: ignore[arg-type]
        try:
            done = run_batches(config, store=store, models=models, source=source, last_stage=LAST_STAGE, desc="label",
                               counters=counters, judge_batch=judge_batch, ray=ray, models_kwargs=roles)
            batches = make_batches(len(source.prompts), config.batch_size)
            rows, stats = build_rows(store, config, source, batches)
            _, paths = write_outputs(config.out, rows, label_features(config.format), config.export)
            store.touch_session()
            summary = {"job": "label", "out": str(config.out), "resumed": resumed, "batches_resumed": sum(done),
                       **stats, "timing": {**time_stats(store), **counters.rates()}, "files": paths,
                       **({"ray": ray.describe()} if ray is not None else {})}
            card = _card(config, summary, command)
            write_text(config.out / CARD_FILE, card)
            summary["files"]["card"] = str(config.out / CARD_FILE)
            write_text(config.out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
            return summary
        finally:
            models.close()


def _card(config: LabelConfig, summary: dict, command: str | None) -> str:
    dropped = summary["dropped"]
    filter_rows = [["identical responses (no preference signal)", dropped.get("identical_responses", 0)],
                   [f"inconsistent across orders (--drop-inconsistent={config.drop_inconsistent})", dropped.get("inconsistent", 0)],
                   [f"margin below --min-margin={config.min_margin}", dropped.get("below_min_margin", 0)]]
    counts = markdown_table(["", "count"], [
        ["prompts", summary["prompts"]], ["prompts skipped (missing response column)", summary["prompts_missing_responses"]],
        ["samples per prompt", summary["samples_per_prompt"]], ["comparisons judged (both orders each)", summary["comparisons_judged"]],
        ["candidate pairs", summary["candidate_pairs"]], ["rows written", summary["rows"]]])
    distribution = markdown_table(["judge_prob", "rows", "fraction"],
                                  [[b["bin"], b["rows"], b["fraction"]] for b in summary["judge_prob_histogram"]])
    judge_prob = summary["judge_prob"]
    prefs = summary["judge_preferences"]
    consistency = summary["position_consistency"]
    label_section = "\n\n".join(filter(None, [
        markdown_table(["statistic", "value"], [[k, "n/a" if v is None else v] for k, v in judge_prob.items()]),
        distribution,
        "All judged comparisons: " + ", ".join(f"{k}: {v}" for k, v in prefs.items())
        + " (TIE = orders disagree or |P - 0.5| < tie margin).",
        f"Mean response length, chosen vs rejected: {_fmt(summary['mean_chosen_chars'])} vs "
        f"{_fmt(summary['mean_rejected_chars'])} characters; chosen is longer in {_fmt(summary['chosen_longer_fraction'])} "
        "of rows (a value far above 0.5 hints at a length bias of the judge)."]))
    timing = summary["timing"]
    time_section = markdown_table(["", "value"], [[k, v] for k, v in timing.items() if v is not None])
    sections = [
        ("Counts", counts),
        ("Filters", markdown_table(["dropped because", "rows"], filter_rows)),
        ("Label distribution", label_section),
        ("Position consistency",
         f"Mean position consistency of the judge over all {summary['comparisons_judged']} comparisons: "
         f"{_fmt(consistency)}; over the rows written: {_fmt(summary['position_consistency_rows'])}. "
         "A comparison is consistent when both presentation orders prefer the same response. "
         f"Mean label mass (P(the judge's reply is exactly a label), before normalizing): "
         f"{_fmt(summary['mean_label_mass'])}." + "".join(f"\n\n**Warning:** {w}" for w in summary["warnings"])),
        ("Time", f"{timing['sessions']} session(s), {timing['wall_seconds']:.1f} s of wall time in total.\n\n" + time_section),
    ]
    source = "the `--responses-from` columns " + ", ".join(config.responses_from) if config.responses_from else \
        f"{config.n} samples per prompt from `{config.policy}`"
    text = (f"AI-labeled preference pairs (RLAIF): {source}, judged pairwise by `{config.judge_url or config.engine}` "
            f"with rubric `{config.pairwise_rubric}` in {config.mode} mode, both presentation orders averaged. "
            f"Pairs: `{config.pairs}`" + (f" (ranking: {config.ranking})" if config.pairs == "best-worst" else "") + ". "
            "Columns follow TRL's preference format (`prompt`, `chosen`, `rejected`); load with "
            "`datasets.load_from_disk('<dir>/dataset')`.")
    public = config.model_dump(mode="json", exclude={"api_key", "overwrite", "progress"})
    data_file = next((EXPORT_FILES[k] for k in ("jsonl", "parquet") if k in config.export), None)
    return render_card(title="AI-labeled preference dataset", tags=["rlaif", "synthetic", "dpo", "preference"],
                       summary=text, config=public, sections=sections, columns=COLUMNS, data_file=data_file,
                       command=command)


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def command_line() -> str:
    """The command as typed (for the card), with any --api-key value masked."""
    args = list(sys.argv)
    for k, arg in enumerate(args):
        if arg == "--api-key" and k + 1 < len(args):
            args[k + 1] = "***"
        elif arg.startswith("--api-key="):
            args[k] = "--api-key=***"
    return " ".join(shlex.quote(a) for a in ["rlaif", *args[1:]]) if args else ""


__all__ = ["COLUMNS", "build_rows", "command_line", "judge_batch", "label_features", "output_pairs", "pairs_to_judge",
           "run_label"]
