"""`rlaif label --ranking checklist`: each prompt's own criteria rank its N responses (best-worst),
on the real embedded model, locally and through a real `rlaif serve` on 127.0.0.1.

Responses come from the prompt file (`responses_from`), so no sampling is needed and the expected
ranking can be recomputed with an independent `ChecklistJudge` call on the same texts. The 135M
judge is weak: the tests pin the mechanics (which pair is chosen, what is stored, identity, errors),
never label quality.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlaif.judge.checklist import ChecklistJudge, parse_criteria
from rlaif.judge.labeling.config import LabelConfig
from rlaif.judge.labeling.job import load_source
from rlaif.judge.labeling.label import run_label
from rlaif.judge.types import ChecklistItem
from tests.test_labeling import assert_rows_match_independent_judge, chat_text

ROWS = [
    {"question": "What is 12 * 11?",
     "criteria": [{"text": "The response states that the answer is 132.", "weight": 3},
                  "The response is at most two sentences long."],
     "r1": "12 * 11 = 132.", "r2": "It is 121.", "r3": "Let me think: 12 times 11 is 132, because 12 * 10 = 120 plus 12."},
    {"question": "Name a primary color.",
     "criteria": ["The response names red, blue or yellow.", {"text": "The response is one word.", "weight": 0.5}],
     "r1": "Blue.", "r2": "Green is a nice color.", "r3": "Red"},
]
COLUMNS = ("r1", "r2", "r3")


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(tmp_path: Path, name: str, prompts: Path, **extra) -> LabelConfig:
    return LabelConfig(prompts=prompts, out=tmp_path / name, prompt_column="question", responses_from=COLUMNS,
                       ranking="checklist", progress=False, **extra)


def expected_scores(engine, mode: str = "explicit") -> list[list[float]]:
    judge = ChecklistJudge(engine, checklist_mode=mode)  # type: ignore[arg-type]
    items = [ChecklistItem(prompt=row["question"], response=row[c], criteria=parse_criteria(row["criteria"], "test"))
             for row in ROWS for c in COLUMNS]
    scores = [j.score for j in judge.judge(items)]
    return [scores[i * 3:(i + 1) * 3] for i in range(len(ROWS))]


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_checklist_ranking_picks_best_and_worst_by_each_prompts_criteria(tmp_path, default_engine, mode):
    import datasets

    prompts = write_prompts(tmp_path / "prompts.jsonl", ROWS)
    summary = run_label(config(tmp_path, mode, prompts, checklist_mode=mode), judge_engine=default_engine)
    rows = datasets.load_from_disk(str(tmp_path / mode / "dataset")).to_list()
    assert summary["rows"] == len(rows) == 2
    for row, scores in zip(rows, expected_scores(default_engine, mode)):
        order = sorted(range(3), key=lambda s: (-scores[s], s))
        assert {row["chosen_index"], row["rejected_index"]} == {order[0], order[-1]}
        assert scores[order[0]] > scores[order[-1]]  # the criteria separate the responses at all
    assert_rows_match_independent_judge(default_engine, rows, chat_text)  # the label is still the pairwise judge's


def test_criteria_enter_the_job_identity_and_are_parsed_as_documented(tmp_path):
    prompts = write_prompts(tmp_path / "a.jsonl", ROWS)
    reweighted = [dict(ROWS[0], criteria=[{"text": "The response states that the answer is 132.", "weight": 1},
                                          "The response is at most two sentences long."]), ROWS[1]]
    other = write_prompts(tmp_path / "b.jsonl", reweighted)
    first, second = load_source(config(tmp_path, "x", prompts)), load_source(config(tmp_path, "y", other))
    assert first.criteria_of(0)[0].weight == 3 and first.criteria_of(0)[1].weight == 1.0  # a bare text weighs 1
    assert first.criteria_of(1)[1].weight == 0.5
    assert first.digest != second.digest  # one weight changed -> another job, never a stale resume
    plain = LabelConfig(prompts=prompts, out=tmp_path / "z", prompt_column="question", responses_from=COLUMNS)
    assert "criteria_column" not in plain.identity()  # jobs without checklists keep their identity
    assert load_source(plain).criteria is None


@pytest.mark.parametrize("rows, fragment", [
    ([{k: v for k, v in ROWS[0].items() if k != "criteria"}], "has no 'criteria' checklist"),
    ([dict(ROWS[0], criteria=[{"text": "x", "weight": -1}])], "criterion 0: weight"),
    ([dict(ROWS[0], criteria=[])], "non-empty list"),
    ([dict(ROWS[0], criteria="not json")], "criteria must be a list"),
])
def test_bad_checklists_name_the_prompt_and_the_problem(tmp_path, rows, fragment):
    prompts = write_prompts(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=fragment):
        load_source(config(tmp_path, "bad", prompts))


def test_checklist_ranking_needs_best_worst(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError, match="ranking=checklist only applies to pairs=best-worst"):
        config(tmp_path, "all", prompts, pairs="all")


@pytest.mark.parametrize("args, fragment", [
    (["--checklist-rubric", "helpfulness"], "explicit checklist mode needs a checklist rubric"),
    (["--checklist-mode", "implicit", "--checklist-rubric", "checklist"], "implicit checklist mode needs a score rubric"),
    (["--criteria-column", "rubric_items"], "has no 'rubric_items' checklist"),
])
def test_cli_mistakes_are_one_line_errors(tmp_path, args, fragment):
    prompts = write_prompts(tmp_path / "p.jsonl", ROWS)
    result = subprocess.run([sys.executable, "-m", "rlaif", "label", "--prompts", str(prompts), "--out",
                             str(tmp_path / "out"), "--prompt-column", "question", "--responses-from", "r1,r2,r3",
                             "--ranking", "checklist", "--no-progress", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert fragment in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_checklist_ranking_through_the_service_matches_in_process(tmp_path, default_engine):
    import datasets

    from rlaif.service.app import create_app
    from rlaif.service.settings import ServiceSettings
    from tests.fake_engines import ServerThread

    prompts = write_prompts(tmp_path / "prompts.jsonl", ROWS)
    local = run_label(config(tmp_path, "local", prompts), judge_engine=default_engine)
    with ServerThread(create_app(ServiceSettings(cache=False), engine=default_engine)) as server:
        remote = run_label(config(tmp_path, "remote", prompts, judge_url=server.url))
    assert remote["rows"] == local["rows"] == 2
    got = datasets.load_from_disk(str(tmp_path / "remote" / "dataset")).to_list()
    want = datasets.load_from_disk(str(tmp_path / "local" / "dataset")).to_list()
    for a, b in zip(got, want):
        assert (a["chosen_index"], a["rejected_index"]) == (b["chosen_index"], b["rejected_index"])
        assert a["judge_prob"] == pytest.approx(b["judge_prob"], abs=1e-4)
