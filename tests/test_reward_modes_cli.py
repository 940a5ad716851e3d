"""`rlaif judge score|pairwise --reference`, `rlaif judge checklist` and `rlaif judge group` through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def rlaif(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlaif", *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_reference_checklist_and_group_commands_print_json(tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    score = rlaif("judge", "score", "--prompt", "What is 6 * 7?", "--response", "42", "--rubric", "correctness",
                  "--reference", "42", "--cache-path", cache)
    assert score.returncode == 0, score.stderr
    assert json.loads(score.stdout)["rubric_id"] == "correctness"

    checklist = rlaif("judge", "checklist", "--prompt", "What is 6 * 7?", "--response", "42", "--criterion",
                      "2:States that the answer is 42", "--criterion", "Is one word", "--cache-path", cache)
    assert checklist.returncode == 0, checklist.stderr
    result = json.loads(checklist.stdout)
    assert [c["weight"] for c in result["criteria"]] == [2.0, 1.0]
    probs = [c["prob_yes"] for c in result["criteria"]]
    assert result["score"] == pytest.approx((2 * probs[0] + probs[1]) / 3)

    group = rlaif("judge", "group", "--prompt", "What is 6 * 7?", "--response", "42", "--response", "41",
                  "--response", "It is 42.", "--orders", "3", "--cache-path", cache)
    assert group.returncode == 0, group.stderr
    judged = json.loads(group.stdout)
    assert len(judged["scores"]) == 3 and len(judged["per_order"]) == 3 and judged["method"] == "listwise"


@pytest.mark.parametrize(("args", "fragment"), [
    (("judge", "score", "--prompt", "p", "--response", "r", "--reference", "x"), "does not use a reference answer"),
    (("judge", "score", "--prompt", "p", "--response", "r", "--rubric", "correctness"), "the item has none"),
    (("judge", "checklist", "--prompt", "p", "--response", "r", "--criterion", "0:x"), "weight must be > 0"),
    (("judge", "checklist", "--prompt", "p", "--response", "r", "--criterion", "x", "--rubric", "helpfulness"),
     "needs a checklist rubric"),
    (("judge", "group", "--prompt", "p", "--response", "a"), "at least two --response"),
    (("judge", "group", "--prompt", "p", "--response", "a", "--response", "b", "--orders", "0"), "orders must be"),
    (("judge", "group", "--prompt", "p", "--response", "a", "--response", "b", "--method", "round_robin",
      "--rubric", "score-1-10"), "needs a pairwise rubric"),
])
def test_mistakes_fail_before_any_model_loads(tmp_path, args, fragment):
    proc = rlaif(*args, env={"RLAIF_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "plain").exists(), "the error must come before the model is loaded"
