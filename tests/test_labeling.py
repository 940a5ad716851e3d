"""`run_label` on the real embedded model: columns and features, orientation of every pair
against an independent judge call, the ranking strategies, relabeling, filters on resume,
exports and the dataset card.

Tiny settings (few prompts, n <= 3, ~10 new tokens) keep each test short; the judge is the
weak 135M model, so the tests pin mechanics, never label quality.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlaif.judge.judges import PairwiseJudge
from rlaif.judge.labeling.config import LabelConfig
from rlaif.judge.labeling.label import label_features, run_label
from rlaif.judge.labeling.pairs import rank_by_wins, random_pair
from rlaif.judge.labeling.store import ProgressStore, ResumeConflict
from rlaif.judge.types import PairwiseItem

DATA = Path(__file__).parent / "data"
MT_BENCH = DATA / "mt_bench_questions_sample.jsonl"
LLMBAR = DATA / "llmbar_natural_sample.json"
TINY = dict(max_new_tokens=10, batch_size=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stored(out: Path) -> tuple[dict[int, list[str]], dict[str, dict[tuple[int, int], dict]]]:
    """Samples per prompt index and pair judgments per prompt id, read back from the progress store."""
    store = ProgressStore(out / "progress.sqlite")
    responses = store.load_responses(range(100))
    pairs: dict[int, dict[tuple[int, int], dict]] = {}
    batch = 0
    while store.stage_done(batch, "pairs"):
        for value in store.load_records(batch, "pairs"):
            record = json.loads(value)
            pairs.setdefault(record["prompt"], {})[(record["a"], record["b"])] = record["judgment"]
        batch += 1
    store.close()
    return {k: v for k, v in responses.items() if v}, pairs


def assert_rows_match_independent_judge(engine, rows: list[dict], text_of) -> None:
    """Every row's judge_prob equals a fresh (uncached, unbatched-by-us) judgment of (chosen, rejected)."""
    judge = PairwiseJudge(engine, "helpfulness")
    items = [PairwiseItem(prompt=text_of(row["prompt"]), response_a=text_of(row["chosen"]), response_b=text_of(row["rejected"]))
             for row in rows]
    for row, reference in zip(rows, judge.judge(items)):
        assert row["judge_prob"] == pytest.approx(reference.prob_a, abs=1e-4), "chosen must be the judge's preferred response"
        assert row["consistent"] == reference.consistent


def chat_text(value) -> str:
    return value[-1]["content"] if isinstance(value, list) else value


@pytest.mark.slow
def test_label_best_worst_end_to_end(tmp_path, default_engine):
    import datasets

    config = LabelConfig(prompts=MT_BENCH, out=tmp_path / "run", limit=3, n=3, **TINY)
    summary = run_label(config, policy_engine=default_engine, judge_engine=default_engine)

    dataset = datasets.load_from_disk(str(tmp_path / "run" / "dataset"))
    assert dataset.features == label_features("conversational")
    rows = dataset.to_list()
    assert summary["rows"] == len(rows) == 3 - summary["dropped"].get("identical_responses", 0)
    assert summary["comparisons_judged"] <= 9 and summary["resumed"] is False
    responses, judged = stored(tmp_path / "run")
    assert all(len(texts) == 3 for texts in responses.values()) and len(responses) == 3
    for index, row in enumerate(rows):
        texts = responses[index]
        # the pair is the soft-wins best and worst of the round robin
        ranking = rank_by_wins(3, {pair: j["prob_a"] for pair, j in judged[index].items()})
        assert {row["chosen_index"], row["rejected_index"]} == {ranking[0], ranking[-1]}
        assert row["chosen"] == [{"role": "assistant", "content": texts[row["chosen_index"]]}]
        assert row["rejected"] == [{"role": "assistant", "content": texts[row["rejected_index"]]}]
        assert row["prompt"][0]["role"] == "user" and row["prompt_id"] in {"81", "82", "83"}
        assert 0.5 <= row["judge_prob"] <= 1.0
        assert row["margin"] == pytest.approx(2 * row["judge_prob"] - 1)
        assert row["policy_model"] == row["judge_model"] == "SmolLM2-135M-Instruct"
        assert row["rubric_id"] == "helpfulness" and row["rationale"] is None
    assert_rows_match_independent_judge(default_engine, rows, chat_text)

    # exports hold the same rows
    from_jsonl = [json.loads(line) for line in (tmp_path / "run" / "data.jsonl").read_text().splitlines()]
    assert from_jsonl == [{**r, "judge_prob": pytest.approx(r["judge_prob"]), "margin": pytest.approx(r["margin"])} for r in rows]
    assert datasets.Dataset.from_parquet(str(tmp_path / "run" / "data.parquet")).to_list() == rows

    card = (tmp_path / "run" / "README.md").read_text()
    for heading in ("## Configuration", "## Counts", "## Filters", "## Label distribution", "## Position consistency", "## Time"):
        assert heading in card
    assert f"| rows written | {len(rows)} |" in card and "Mean position consistency" in card
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rows"] == len(rows)

    # Filters are not part of the job identity: a re-run re-filters the stored judgments
    # without generating or judging anything.
    strict = config.model_copy(update={"min_margin": 1.0, "drop_inconsistent": True})
    again = run_label(strict)  # no engines passed: they would load lazily, and must not be needed
    assert again["resumed"] is True and again["batches_resumed"] == 2
    assert again["timing"]["samples_per_s"] is None and again["timing"]["judgments_per_s"] is None
    assert again["rows"] == 0 and sum(again["dropped"].values()) == 3
    # ... and says that the filters threw the soft signal away (the defaults keep every pair, ties included)
    assert any(re.search(r"removed (\d+) of \1 judged pairs \(100%\)", w) and "soft judge_prob" in w
               for w in again["warnings"])
    assert not any("judged pairs" in w for w in summary["warnings"])
    assert datasets.load_from_disk(str(tmp_path / "run" / "dataset")).features == label_features("conversational")

    with pytest.raises(ResumeConflict, match="n: 3 -> 2"):
        run_label(config.model_copy(update={"n": 2}))


@pytest.mark.slow
def test_label_all_random_and_score_ranking(tmp_path, default_engine):
    import datasets

    common = dict(prompts=MT_BENCH, limit=2, n=3, **TINY)
    run = {}
    for name, extra in {"all": {"pairs": "all"}, "random": {"pairs": "random", "seed": 0},
                        "score": {"ranking": "score"}}.items():
        run[name] = run_label(LabelConfig(out=tmp_path / name, **common, **extra),
                              policy_engine=default_engine, judge_engine=default_engine)
    # same seed and batches -> the three jobs sampled exactly the same responses
    samples = {name: stored(tmp_path / name)[0] for name in run}
    assert samples["all"] == samples["random"] == samples["score"]
    responses = samples["all"]

    everything = datasets.load_from_disk(str(tmp_path / "all" / "dataset")).to_list()
    identical = sum(texts[a] == texts[b] for texts in responses.values() for a, b in [(0, 1), (0, 2), (1, 2)])
    assert len(everything) == 6 - identical == run["all"]["rows"]
    assert {(r["prompt_id"], min(r["chosen_index"], r["rejected_index"]), max(r["chosen_index"], r["rejected_index"]))
            for r in everything} <= {(pid, a, b) for pid in ("81", "82") for a, b in [(0, 1), (0, 2), (1, 2)]}

    randomly = datasets.load_from_disk(str(tmp_path / "random" / "dataset")).to_list()
    for row, index in zip(randomly, range(2)):
        assert tuple(sorted((row["chosen_index"], row["rejected_index"]))) == random_pair(3, 0, index)

    store = ProgressStore(tmp_path / "score" / "progress.sqlite")
    scores: dict[int, list[float]] = {}
    for value in store.load_records(0, "scores"):
        record = json.loads(value)
        scores.setdefault(record["prompt"], []).append(record["judgment"]["score"])
    store.close()
    by_score = datasets.load_from_disk(str(tmp_path / "score" / "dataset")).to_list()
    for index, row in enumerate(by_score):
        order = sorted(range(3), key=lambda s: (-scores[index][s], s))
        assert {row["chosen_index"], row["rejected_index"]} == {order[0], order[-1]}
    assert_rows_match_independent_judge(default_engine, everything + by_score, chat_text)


@pytest.mark.slow
def test_label_relabels_existing_responses(tmp_path, default_engine):
    import datasets

    config = LabelConfig(prompts=LLMBAR, out=tmp_path / "relabel", prompt_column="input", limit=3,
                         responses_from=("output_1", "output_2"), format="standard", progress=False)
    summary = run_label(config, judge_engine=default_engine)
    dataset = datasets.load_from_disk(str(tmp_path / "relabel" / "dataset"))
    assert dataset.features == label_features("standard")
    rows = dataset.to_list()
    source = json.loads(LLMBAR.read_text())[:3]
    assert summary["rows"] == 3 and summary["samples_per_prompt"] == 2
    for row, original in zip(rows, source):
        assert row["prompt"] == original["input"]
        assert {row["chosen"], row["rejected"]} == {original["output_1"], original["output_2"]}
        assert row["chosen"] == original[f"output_{row['chosen_index'] + 1}"]
        assert row["policy_model"] is None  # nothing was sampled
    assert_rows_match_independent_judge(default_engine, rows, chat_text)


@pytest.mark.slow
def test_label_cot_mode_keeps_the_chosen_first_rationale(tmp_path, default_engine):
    import datasets
    import yaml

    # The built-in CoT rubric with an 8-token rationale, loaded from a user file, keeps this test short.
    rubric = yaml.safe_load((Path(__file__).parents[1] / "prompts" / "helpfulness-cot.yaml").read_text())
    rubric["cot"]["max_new_tokens"] = 8
    rubric_path = tmp_path / "short-cot.yaml"
    rubric_path.write_text(yaml.safe_dump(rubric))
    source = [{"prompt": "What is the capital of France?", "x": "Paris.", "y": "I think it is Lyon."},
              {"prompt": "How many legs does a spider have?", "x": "Six.", "y": "Spiders have eight legs."}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in source))
    config = LabelConfig(prompts=pairs, out=tmp_path / "cot", responses_from=("x", "y"), mode="cot",
                         rubric=str(rubric_path), progress=False)
    run_label(config, judge_engine=default_engine)
    rows = datasets.load_from_disk(str(tmp_path / "cot" / "dataset")).to_list()
    _, judged = stored(tmp_path / "cot")
    assert len(rows) == 2
    unclamped = cot_order_probs(default_engine, rubric_path, [(r["prompt"], r["x"], r["y"]) for r in source])
    for index, row in enumerate(rows):
        per_order = {o["order"]: o for o in judged[index][(0, 1)]["per_order"]}
        shown_first = "ab" if row["chosen_index"] == 0 else "ba"  # the order where chosen was "Response A"
        assert row["rationale"] == per_order[shown_first]["rationale"] and row["rationale"]
        assert row["rubric_id"] == "helpfulness-cot"
        # The clamp [0.4, 0.6] applies to each order's P(first), before the orders are averaged.
        (p_ab, rationale_ab), (p_ba, rationale_ba) = unclamped[index]
        assert per_order["ab"]["rationale"] == rationale_ab and per_order["ba"]["rationale"] == rationale_ba
        clamped_ab, clamped_ba = min(max(p_ab, 0.4), 0.6), min(max(p_ba, 0.4), 0.6)
        assert per_order["ab"]["prob_first"] == pytest.approx(clamped_ab, abs=1e-4)
        assert per_order["ba"]["prob_first"] == pytest.approx(clamped_ba, abs=1e-4)
        prob_x = (clamped_ab + 1.0 - clamped_ba) / 2  # P(x better), x = Response A in order "ab"
        assert row["judge_prob"] == pytest.approx(prob_x if row["chosen_index"] == 0 else 1.0 - prob_x, abs=1e-4)
    # At least one order fell outside [0.4, 0.6], so the clamp was exercised, not just allowed.
    assert any(not 0.4 <= p <= 0.6 for pair in unclamped for p, _ in pair), unclamped


def cot_order_probs(engine, rubric_path: Path, pairs: list[tuple[str, str, str]]) -> list[list[tuple[float, str]]]:
    """Per (prompt, x, y): for order ab (x shown first) and ba, the unclamped P(first response better)
    and the rationale, computed with direct engine calls (greedy rationale, then the label turn)."""
    from rlaif.judge.engines.base import GenerationParams, label_distribution
    from rlaif.judge.rubric import load_rubric

    rubric = load_rubric(str(rubric_path))
    special = tuple(engine.special_tokens)
    prompts = [rubric.render_cot(prompt=prompt, response_a=first, response_b=second, principle=None,
                                 special_tokens=special)
               for prompt, x, y in pairs for first, second in ((x, y), (y, x))]
    assert rubric.cot is not None and rubric.cot.temperature == 0.0 and rubric.labels == ["A", "B"]
    params = GenerationParams(max_new_tokens=rubric.cot.max_new_tokens, temperature=0.0, n=1, seed=0)
    rationales = [samples[0] for samples in engine.generate(prompts, params)]
    follow_ups = [rubric.render_cot_label(p, r) for p, r in zip(prompts, rationales)]
    p_first = label_distribution(engine.label_logprobs(follow_ups, rubric.labels)).probs[:, 0]
    per_prompt = list(zip(p_first.tolist(), rationales))
    return [per_prompt[2 * i:2 * i + 2] for i in range(len(pairs))]
