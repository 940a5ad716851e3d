"""Fast tests for the labeling building blocks: pair planning, ranking, orientation, the bracket,
config validation, the progress store and the prompt/response source. No model is loaded."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from rlaif.judge.labeling.best_of_n import replay_tournament, tournament_rounds
from rlaif.judge.labeling.config import BestOfNConfig, LabelConfig
from rlaif.judge.labeling.job import chat_of, load_source, make_batches, open_job
from rlaif.judge.labeling.label import output_pairs, pairs_to_judge
from rlaif.judge.labeling.pairs import all_pairs, derive_seed, knockout_round, orient, random_pair, rank_by_wins
from rlaif.judge.labeling.store import ProgressStore, ResumeConflict
from rlaif.judge.types import OrderJudgment, PairwiseJudgment, Preference

DATA = Path(__file__).parent / "data"
MT_BENCH = DATA / "mt_bench_questions_sample.jsonl"


def judgment(prob_a: float, *, rationale_ab: str | None = None, rationale_ba: str | None = None) -> PairwiseJudgment:
    """A verdict as the pairwise judge builds it (both orders agreeing with prob_a)."""
    return PairwiseJudgment(
        prob_a=prob_a, preference=Preference.A if prob_a > 0.5 else Preference.B, consistent=True,
        margin=abs(prob_a - 0.5) * 2,
        per_order=[OrderJudgment(order="ab", prob_first=prob_a, prob_a=prob_a, label_mass=0.9, rationale=rationale_ab),
                   OrderJudgment(order="ba", prob_first=1 - prob_a, prob_a=prob_a, label_mass=0.9, rationale=rationale_ba)],
        rationale=rationale_ab, label_mass=0.9, rubric_id="helpfulness", rubric_version="1", engine="e", model="m", mode="logprob")


def config(tmp_path: Path, **overrides) -> LabelConfig:
    return LabelConfig(prompts=MT_BENCH, out=tmp_path / "out", **overrides)


# ---------------------------------------------------------------------------------- pairs
def test_derive_seed_is_stable_and_separates_inputs():
    assert derive_seed(0, "batch", 3) == derive_seed(0, "batch", 3)  # same across calls (and processes: sha256)
    assert derive_seed(0, "batch", 3) == 1623265751  # pinned (sha256("0:batch:3")[:4]): a change would silently change every dataset
    assert len({derive_seed(s, "batch", b) for s in range(3) for b in range(50)}) == 150
    assert 0 <= derive_seed(-5, "x") < 2**31


@pytest.mark.parametrize("n, expected", [
    (2, [(0, 1)]),                                   # a single pair
    (3, [(0, 1), (0, 2), (1, 2)]),                   # i < j, lexicographic
    (4, [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]),
])
def test_all_pairs(n, expected):
    assert all_pairs(n) == expected


def test_random_pair_depends_only_on_seed_and_prompt():
    draws = [random_pair(6, 7, p) for p in range(200)]
    assert draws == [random_pair(6, 7, p) for p in range(200)]  # deterministic per (seed, prompt)
    assert all(0 <= a < b < 6 for a, b in draws)
    assert len(set(draws)) == 15  # covers every pair of 6: not stuck on one
    assert draws != [random_pair(6, 8, p) for p in range(200)]  # the seed matters


@pytest.mark.parametrize("n, probs, expected", [
    # 0 beats 1 and 2, 1 beats 2: a clean order
    (3, {(0, 1): 0.9, (0, 2): 0.8, (1, 2): 0.7}, [0, 1, 2]),
    # reversed preferences: sample 2 is best
    (3, {(0, 1): 0.1, (0, 2): 0.2, (1, 2): 0.3}, [2, 1, 0]),
    # a cycle 0>1>2>0 with different confidences: soft wins break it (0: .6+.1, 1: .4+.9, 2: .1+.9)
    (3, {(0, 1): 0.6, (0, 2): 0.1, (1, 2): 0.9}, [1, 2, 0]),
    # missing pairs (identical texts) count 0.5; all equal -> index order
    (3, {}, [0, 1, 2]),
    # two samples
    (2, {(0, 1): 0.3}, [1, 0]),
])
def test_rank_by_wins(n, probs, expected):
    assert rank_by_wins(n, probs) == expected


def test_orient_puts_the_preferred_response_first_with_its_rationale():
    kept = orient(2, 5, judgment(0.8, rationale_ab="A is right", rationale_ba="B is right"))
    assert (kept.chosen, kept.rejected, kept.rationale) == (2, 5, "A is right")
    assert kept.prob == pytest.approx(0.8)
    flipped = orient(2, 5, judgment(0.3, rationale_ab="A is right", rationale_ba="B is right"))
    # sample 5 preferred: its rationale is the one from the order that showed sample 5 as response A
    assert (flipped.chosen, flipped.rejected, flipped.rationale) == (5, 2, "B is right")
    assert flipped.prob == pytest.approx(0.7)
    tie = orient(0, 1, judgment(0.5))
    assert (tie.chosen, tie.prob) == (0, 0.5)


@pytest.mark.parametrize("survivors, matches, bye", [
    ([0, 1, 2, 3], [(0, 1), (2, 3)], None),
    ([0, 1, 2], [(0, 1)], 2),       # odd one out waits a round
    ([4], [], 4),
])
def test_knockout_round(survivors, matches, bye):
    assert knockout_round(survivors) == (matches, bye)


def test_tournament_replay():
    texts = ["a", "b", "c", "d", "e"]
    # round 0: 0v1 -> 1, 2v3 -> 2, bye 4; round 1: 1v2 -> 2, bye 4; round 2: 2v4 -> 4
    judged = {(0, 1): judgment(0.2), (2, 3): judgment(0.9), (1, 2): judgment(0.4), (2, 4): judgment(0.3)}
    winner, wins = replay_tournament(5, texts, judged)
    assert winner == 4
    assert wins == [pytest.approx(0.7)]
    assert tournament_rounds(5) == 3 and tournament_rounds(2) == 1 and tournament_rounds(8) == 3
    # identical texts advance the first without a judgment
    assert replay_tournament(2, ["same", "same"], {}) == (0, [])


def test_pair_planning_skips_identical_texts(tmp_path):
    round_robin = config(tmp_path, n=3)
    assert pairs_to_judge(round_robin, 0, ["x", "y", "x"], None) == [(0, 1), (1, 2)]  # (0, 2) is identical
    everything = config(tmp_path, n=3, pairs="all")
    assert output_pairs(everything, 0, 3, {}, None) == [(0, 1), (0, 2), (1, 2)]
    by_score = config(tmp_path, n=3, ranking="score")
    assert output_pairs(by_score, 0, 3, {}, [0.2, 0.9, 0.1]) == [(1, 2)]  # best 1, worst 2
    assert pairs_to_judge(by_score, 0, ["x", "y", "z"], [0.5, 0.5, 0.5]) == [(0, 2)]  # ties: first best, last worst
    rand = config(tmp_path, n=4, pairs="random", seed=3)
    assert output_pairs(rand, 9, 4, {}, None) == [random_pair(4, 3, 9)]
    # best-worst by wins reads the round robin
    wins = output_pairs(round_robin, 0, 3, {(0, 1): judgment(0.9), (0, 2): judgment(0.9), (1, 2): judgment(0.2)}, None)
    assert wins == [(0, 1)]  # best 0, worst 1


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    ({"n": 2, "temperature": 0.0}, "need temperature > 0"),          # greedy sampling repeats itself
    ({"n": 1}, "greater than or equal to 2"),                        # a pair needs two samples
    ({"pairs": "all", "ranking": "score"}, "only applies to pairs=best-worst"),
    ({"responses_from": ("chosen",)}, "at least two distinct columns"),
    ({"responses_from": ("a", "a")}, "at least two distinct columns"),
    ({"policy": "nonsense:"}, "invalid engine spec"),
    ({"judge_url": "localhost:8000"}, "http:// or https://"),
    ({"min_margin": 1.5}, "less than or equal to 1"),
])
def test_label_config_rejects_with_a_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_identity_covers_generation_and_judging_but_not_filters(tmp_path):
    base = config(tmp_path).identity()
    assert config(tmp_path, min_margin=0.3, drop_inconsistent=True, format="standard", export=("jsonl",),
                  overwrite=True, progress=False, api_key="secret").identity() == base
    assert "secret" not in json.dumps(config(tmp_path, api_key="secret").identity())
    for changed in ({"n": 3}, {"seed": 1}, {"temperature": 0.7}, {"batch_size": 8}, {"rubric": "harmlessness"},
                    {"pairs": "all"}, {"max_new_tokens": 9}, {"mode": "cot"}):
        assert config(tmp_path, **changed).identity() != base, changed
    # relabeling fixes n to the number of columns
    assert config(tmp_path, responses_from=("x", "y", "z")).n == 3
    assert BestOfNConfig(prompts=MT_BENCH, out=tmp_path).identity()["job"] == "best-of-n"


# ---------------------------------------------------------------------------------- store
def test_store_commits_stages_atomically_and_checks_identity(tmp_path):
    store = ProgressStore(tmp_path / "p.sqlite")
    assert store.check_identity({"job": "label", "n": 2}) is False
    store.save_responses(0, {0: ["a", "b"], 1: ["c", "d"]}, 1.5)
    store.save_records(0, "pairs", ['{"x": 1}', '{"x": 2}'], 0.5, fresh=2)
    assert store.stage_done(0, "generate") and store.stage_done(0, "pairs") and not store.stage_done(1, "generate")
    assert store.load_responses(range(2)) == {0: ["a", "b"], 1: ["c", "d"]}
    assert store.load_records(0, "pairs") == ['{"x": 1}', '{"x": 2}']
    assert store.stage_totals()["pairs"] == {"batches": 1, "items": 2, "fresh": 2, "seconds": 0.5}
    store.close()
    reopened = ProgressStore(tmp_path / "p.sqlite")
    assert reopened.check_identity({"job": "label", "n": 2}) is True
    with pytest.raises(ResumeConflict, match=r"n: 2 -> 3.*--overwrite"):
        reopened.check_identity({"job": "label", "n": 3})
    reopened.close()


def test_store_rolls_back_a_failed_stage(tmp_path):
    store = ProgressStore(tmp_path / "p.sqlite")
    store.check_identity({"job": "t"})
    with pytest.raises(sqlite3.Error):
        # an unserializable value fails mid-transaction: neither records nor the marker may remain
        store.save_records(0, "pairs", ["ok", object()], 0.1, fresh=1)  # type: ignore[list-item]
    assert not store.stage_done(0, "pairs")
    assert store.load_records(0, "pairs") == []
    store.close()


def test_open_job_guards_the_output_directory(tmp_path):
    cfg = config(tmp_path)
    with open_job(cfg, {"job": "label", "v": 1}) as (store, resumed):
        assert resumed is False
        with pytest.raises(ResumeConflict, match="another labeling job is running"):
            with open_job(cfg, {"job": "label", "v": 1}):
                pass
    with open_job(cfg, {"job": "label", "v": 1}) as (_, resumed):
        assert resumed is True
    with pytest.raises(ResumeConflict, match="different settings"):
        with open_job(cfg, {"job": "label", "v": 2}):
            pass
    (cfg.out / "mine.txt").write_text("keep me")
    with open_job(cfg.model_copy(update={"overwrite": True}), {"job": "label", "v": 2}) as (_, resumed):
        assert resumed is False
    assert (cfg.out / "mine.txt").read_text() == "keep me"  # --overwrite only removes what a job wrote
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("x")
    with pytest.raises(ResumeConflict, match="not empty"):
        with open_job(cfg.model_copy(update={"out": foreign}), {"job": "label"}):
            pass


# ---------------------------------------------------------------------------------- source
def test_make_batches_are_fixed_slices():
    assert make_batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert make_batches(4, 16) == [range(0, 4)]


def test_load_source_joins_response_columns_by_id(tmp_path):
    rows = [
        {"id": "a", "prompt": "Say hi", "good": "Hi!", "bad": "No."},
        {"id": "b", "prompt": "Say bye", "good": "", "bad": "Bye."},           # empty response: left out
        {"id": "c", "prompt": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Count"}],
         "good": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1 2 3"}], "bad": "one"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = load_source(LabelConfig(prompts=path, out=tmp_path / "o", responses_from=("good", "bad")))
    assert [p.id for p in source.prompts] == ["a", "c"]
    assert source.responses == [["Hi!", "No."], ["1 2 3", "one"]]  # chat cell -> last assistant message
    assert source.missing_responses == 1
    assert chat_of(source.prompts[1]) == rows[2]["prompt"]  # chat prompts keep their turns for the policy
    assert chat_of(source.prompts[0]) == [{"role": "user", "content": "Say hi"}]
    again = load_source(LabelConfig(prompts=path, out=tmp_path / "o", responses_from=("good", "bad")))
    assert again.digest == source.digest
    plain = load_source(LabelConfig(prompts=MT_BENCH, out=tmp_path / "o", limit=3))
    assert len(plain.prompts) == 3 and plain.responses is None and plain.digest != source.digest


# ---------------------------------------------------------------------------------- CLI (no model needed)
@pytest.mark.parametrize("args, message", [
    (["label", "--pairs", "foo"], "--pairs: Input should be 'best-worst', 'all' or 'random'"),
    (["label", "--export", "xml"], "--export: unknown format(s) ['xml']"),
    (["label", "--n", "3", "--temperature", "0"], "need temperature > 0"),
    (["label", "--pairs", "random", "--ranking", "score"], "ranking=score only applies"),
    (["best-of-n", "--n", "1"], "--n: Input should be greater than or equal to 2"),
    (["best-of-n", "--selection", "vote"], "--selection: Input should be 'score' or 'tournament'"),
    (["label", "--judge-url", "127.0.0.1:8000"], "--judge-url: Value error"),
])
def test_cli_rejects_bad_flags_with_one_line(tmp_path, args, message):
    from typer.testing import CliRunner

    from rlaif.cli import build_app

    result = CliRunner().invoke(build_app(), [*args, "--prompts", str(MT_BENCH), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message.replace("--judge-url: Value error", "--judge-url:") in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_cli_refuses_to_resume_a_changed_job(tmp_path):
    from typer.testing import CliRunner

    from rlaif.cli import build_app

    source = load_source(config(tmp_path, limit=2))
    cfg = config(tmp_path, limit=2, n=4)
    out = cfg.out
    with open_job(cfg, cfg.identity(prompts_digest=source.digest, rubric="x")):
        pass  # an existing job with n=4
    result = CliRunner().invoke(build_app(), ["label", "--prompts", str(MT_BENCH), "--out", str(out), "--limit", "2",
                                              "--n", "2"])
    assert result.exit_code == 2
    assert "holds a job with different settings" in result.stderr and "n: 4 -> 2" in result.stderr
    assert "--overwrite" in result.stderr
