"""`run_best_of_n` on the real embedded model: score selection picks the argmax of the stored
scores, the tournament winner replays from the stored rounds, the SFT columns are TRL's, and an
interrupted tournament resumes to the dataset of an uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from rlaif.judge.labeling.backends import LocalJudge
from rlaif.judge.labeling.best_of_n import best_of_n_features, replay_tournament, run_best_of_n, tournament_rounds
from rlaif.judge.labeling.config import BestOfNConfig
from rlaif.judge.labeling.store import ProgressStore
from rlaif.judge.types import PairwiseItem, PairwiseJudgment

DATA = Path(__file__).parent / "data"
MT_BENCH = DATA / "mt_bench_questions_sample.jsonl"
TINY = dict(max_new_tokens=10, batch_size=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def records(out: Path, stage: str, batches: int) -> list[dict]:
    store = ProgressStore(out / "progress.sqlite")
    found = [json.loads(v) for b in range(batches) for v in store.load_records(b, stage)]
    store.close()
    return found


@pytest.mark.slow
def test_best_of_n_score_selection(tmp_path, default_engine):
    import datasets

    config = BestOfNConfig(prompts=MT_BENCH, out=tmp_path / "bon", limit=3, n=3, **TINY)
    summary = run_best_of_n(config, policy_engine=default_engine, judge_engine=default_engine)
    dataset = datasets.load_from_disk(str(tmp_path / "bon" / "dataset"))
    assert dataset.features == best_of_n_features()
    rows = dataset.to_list()
    assert summary["rows"] == len(rows) == 3

    store = ProgressStore(tmp_path / "bon" / "progress.sqlite")
    samples = store.load_responses(range(3))
    store.close()
    scores: dict[int, list[float]] = {}
    for record in records(tmp_path / "bon", "scores", 2):
        scores.setdefault(record["prompt"], []).append(record["judgment"]["score"])
    prompts = [json.loads(line) for line in MT_BENCH.read_text().splitlines()[:3]]
    for index, row in enumerate(rows):
        best = max(range(3), key=lambda s: (scores[index][s], -s))
        assert row["sample_index"] == best and row["completion"] == samples[index][best]
        assert row["judge_score"] == pytest.approx(scores[index][best]) and 0.0 <= row["judge_score"] <= 1.0
        assert row["prompt"] == prompts[index]["turns"][0]
        assert row["messages"] == [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        assert row["n_candidates"] == 3 and row["selection"] == "score" and row["rubric_id"] == "score-1-10"
        assert row["policy_model"] == row["judge_model"] == "SmolLM2-135M-Instruct"
    card = (tmp_path / "bon" / "README.md").read_text()
    assert "Best-of-3" in card and "## Judge scores" in card and "| rows written | 3 |" in card

    # --min-score is applied at write time: re-running re-filters without any model
    strict = run_best_of_n(config.model_copy(update={"min_score": 1.0}))
    assert strict["rows"] == 0 and strict["dropped"] == {"below_min_score": 3} and strict["resumed"] is True


class FailingJudge:
    """The real judge, interrupted: the call after `fail_after` calls raises, like a crash mid-job."""

    def __init__(self, judge: LocalJudge, fail_after: int) -> None:
        self.judge, self.calls, self.fail_after = judge, 0, fail_after

    def pairwise(self, items: Sequence[PairwiseItem]) -> list[PairwiseJudgment]:
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.judge.pairwise(items)

    def score(self, items):  # pragma: no cover - the tournament never scores
        raise AssertionError("tournament must not call score")


@pytest.mark.slow
def test_tournament_resumes_to_the_uninterrupted_result(tmp_path, default_engine):
    import datasets

    common = dict(prompts=MT_BENCH, limit=3, n=3, selection="tournament", **TINY)  # n=3: a bye in round 0
    interrupted = BestOfNConfig(out=tmp_path / "interrupted", **common)
    local = LocalJudge(default_engine, pairwise_rubric="helpfulness", score_rubric=None, mode="logprob")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_best_of_n(interrupted, policy_engine=default_engine, judge=FailingJudge(local, fail_after=1))
    assert not (tmp_path / "interrupted" / "dataset").exists()
    resumed = run_best_of_n(interrupted, policy_engine=default_engine, judge_engine=default_engine)
    run_best_of_n(BestOfNConfig(out=tmp_path / "reference", **common),  # an uninterrupted run of the same job
                  policy_engine=default_engine, judge_engine=default_engine)
    assert resumed["resumed"] is True and resumed["timing"]["sessions"] == 2
    rows = datasets.load_from_disk(str(tmp_path / "interrupted" / "dataset")).to_list()
    assert rows == datasets.load_from_disk(str(tmp_path / "reference" / "dataset")).to_list()

    # the winner is what the stored bracket says, and it beat each opponent it met
    store = ProgressStore(tmp_path / "reference" / "progress.sqlite")
    samples = store.load_responses(range(3))
    store.close()
    judged: dict[int, dict[tuple[int, int], PairwiseJudgment]] = {i: {} for i in range(3)}
    for round_index in range(tournament_rounds(3)):
        for record in records(tmp_path / "reference", f"round-{round_index}", 2):
            judged[record["prompt"]][(record["a"], record["b"])] = PairwiseJudgment.model_validate(record["judgment"])
    for index, row in enumerate(rows):
        winner, wins = replay_tournament(3, samples[index], judged[index])
        assert row["sample_index"] == winner and row["completion"] == samples[index][winner]
        assert all(p >= 0.5 for p in wins)
        assert row["judge_score"] == (pytest.approx(sum(wins) / len(wins)) if wins else None)
        assert row["selection"] == "tournament" and row["rubric_id"] == "helpfulness"
