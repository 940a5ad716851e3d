"""`rlaif judge pairwise|score|rubrics` through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def rlaif(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlaif", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pairwise_and_score_print_json(tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    proc = rlaif("judge", "pairwise", "--prompt", "What is 2+2?", "--response-a", "4", "--response-b", "5",
                 "--cache-path", cache)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert 0 <= result["prob_a"] <= 1 and result["preference"] in {"A", "B", "TIE"}
    assert [o["order"] for o in result["per_order"]] == ["ab", "ba"] and result["cached"] is False
    again = json.loads(rlaif("judge", "pairwise", "--prompt", "What is 2+2?", "--response-a", "4", "--response-b", "5",
                             "--cache-path", cache).stdout)
    assert again["cached"] is True and again["prob_a"] == result["prob_a"]

    proc = rlaif("judge", "score", "--prompt", "What is 2+2?", "--response", "4", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    score = json.loads(proc.stdout)
    assert 0 <= score["score"] <= 1 and set(score["distribution"]) == {str(i) for i in range(1, 11)}


def test_rubric_listing_and_clean_errors(tmp_path):
    listing = json.loads(rlaif("judge", "rubrics").stdout)
    assert {"helpfulness", "score-1-10"} <= {r["id"] for r in listing}

    unknown = rlaif("judge", "pairwise", "--prompt", "p", "--response-a", "a", "--response-b", "b", "--rubric", "nope")
    assert unknown.returncode == 2 and "unknown rubric 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nversion: '1'\nkind: pairwise\ntemplate: '{{ prompt }}'\nanswer_instruction: A?\nlabels: [A]\n")
    invalid = rlaif("judge", "pairwise", "--prompt", "p", "--response-a", "a", "--response-b", "b", "--rubric", str(bad))
    assert invalid.returncode == 2 and str(bad) in invalid.stderr and "labels" in invalid.stderr

    spec = rlaif("judge", "score", "--prompt", "p", "--response", "r", "--engine", "bogus:thing")
    assert spec.returncode == 2 and "invalid engine spec" in spec.stderr

    mode = rlaif("judge", "pairwise", "--prompt", "p", "--response-a", "a", "--response-b", "b", "--mode", "cot")
    assert mode.returncode == 2 and "mode=cot" in mode.stderr
