"""The labeling jobs' progress bar moves inside a batch (per sample and per judgment), with rate and ETA.

The first user report: `rlaif label` sat at `0/8` for 18 minutes because one batch held all 8 prompts
and the bar moved only when a batch was done. `JobProgress` (rlaif.judge.labeling.job) now moves per
finished share of sampling (`HFEngine.generate(progress=...)`) and per chunk of judgments, and lands
exactly on the prompt count when the batch is committed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from tqdm import tqdm

from rlaif.judge.labeling.config import BestOfNConfig, LabelConfig
from rlaif.judge.labeling.job import JUDGE_CHUNK, JobProgress, SessionCounters, expected_judgments, judge_in_chunks

MT_BENCH = Path(__file__).parent / "data" / "mt_bench_questions_sample.jsonl"


def _bar(total: int) -> tqdm:
    return tqdm(total=total, file=io.StringIO(), mininterval=0)


def test_bar_moves_within_a_batch_and_lands_on_the_prompt_count():
    bar, counters = _bar(8), SessionCounters()
    progress = JobProgress(bar, counters, max_new_tokens=64)
    progress.start_batch(8, samples=32, judgments=48)
    positions = [bar.n]
    for _ in range(32):
        progress.sampled(1.0)
        positions.append(bar.n)
    for _ in range(6):
        progress.judged(8)
        positions.append(bar.n)
    assert positions == sorted(positions), "the bar never moves back"
    assert 0 < positions[16] < positions[32] < positions[-1] < 8, "it moves during sampling and judging, short of done"
    progress.update(8)
    assert bar.n == 8


def test_the_split_between_stages_follows_measured_costs():
    counters = SessionCounters(samples=10, generate_seconds=90.0, judgments=10, judge_seconds=10.0)
    bar = _bar(4)
    progress = JobProgress(bar, counters, max_new_tokens=256)
    progress.start_batch(4, samples=8, judgments=8)
    progress.sampled(8)
    assert bar.n == pytest.approx(4 * 0.9)  # sampling took 9x as long per item here


@pytest.mark.parametrize(("config", "expected"), [
    (dict(n=4), 6),                                    # best-worst by round robin: n(n-1)/2
    (dict(n=4, ranking="score"), 5),                   # n scores + the best-worst pair
    (dict(n=4, pairs="all"), 6),
    (dict(n=4, pairs="random"), 1),
])
def test_expected_judgments_label(tmp_path, config, expected):
    assert expected_judgments(LabelConfig(prompts=MT_BENCH, out=tmp_path, **config)) == expected


@pytest.mark.parametrize(("selection", "expected"), [("score", 8), ("tournament", 7)])
def test_expected_judgments_best_of_n(tmp_path, selection, expected):
    assert expected_judgments(BestOfNConfig(prompts=MT_BENCH, out=tmp_path, n=8, selection=selection)) == expected


def test_judging_in_chunks_keeps_order_and_reports_each_chunk():
    bar, counters = _bar(1), SessionCounters()
    counters.progress = JobProgress(bar, counters, max_new_tokens=64)
    counters.progress.start_batch(1, samples=0, judgments=20)
    calls: list[int] = []

    def judge(items):
        calls.append(len(items))
        return [item * 10 for item in items]

    assert judge_in_chunks(judge, list(range(20)), counters) == [i * 10 for i in range(20)]
    assert calls == [JUDGE_CHUNK, JUDGE_CHUNK, 20 - 2 * JUDGE_CHUNK]
    assert 0 < bar.n < 1


def test_a_label_run_shows_intermediate_positions(tmp_path, capsys):
    """A real `run_label` (deterministic test engine as policy and judge, slow enough that tqdm redraws):
    with one batch holding every prompt, the bar still shows positions between 0 and the total."""
    from rlaif.judge.labeling.label import run_label
    from tests.fake_engines import DeterministicEngine

    engine = DeterministicEngine(delay_s=0.3)
    config = LabelConfig(prompts=MT_BENCH, out=tmp_path / "out", n=4, limit=4, batch_size=4, export=())
    run_label(config, policy_engine=engine, judge_engine=engine)
    err = capsys.readouterr().err.replace("\r", "\n")
    positions = [float(x) for x in re.findall(r"\| (\d+\.\d)/4 prompts", err)]
    assert positions[-1] == 4.0
    assert any(0.0 < p < 4.0 for p in positions), err[-2000:]
    assert re.search(r"(prompt/s|s/prompt)", err), "rate shown"
