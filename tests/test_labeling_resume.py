"""Kill-and-resume: a real `rlaif label` process is SIGKILLed mid-job, restarted with the same
command, and must write exactly the dataset of an uninterrupted run (same seed) in another folder.

This is the loss-free contract of `rlaif.judge.labeling.store`: every stage of every batch is
committed atomically, a killed stage is redone whole, and the dataset is built from the store.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
PROMPTS = DATA / "self_instruct_user_oriented_sample.jsonl"
N_PROMPTS, BATCH = 4, 2
STAGES_TOTAL = (N_PROMPTS // BATCH) * 2  # generate + pairs per batch


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "rlaif", "label", "--prompts", str(PROMPTS), "--out", str(out),
            "--limit", str(N_PROMPTS), "--n", "2", "--max-new-tokens", "16", "--batch-size", str(BATCH),
            "--seed", "7", "--no-progress"]


def environment() -> dict[str, str]:
    # One thread keeps the run fast on a shared CPU; both runs use the same setting.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def stages_done(out: Path) -> int:
    path = out / "progress.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM stages").fetchone()[0])
    except sqlite3.OperationalError:  # the table is being created
        return 0


def run_to_completion(out: Path) -> dict:
    done = subprocess.run(command(out), env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_dataset(tmp_path):
    import datasets

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while stages_done(killed) < 1:
            assert process.poll() is None, f"job ended before it could be killed: {process.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, "no stage was persisted within 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    persisted = stages_done(killed)
    assert 1 <= persisted < STAGES_TOTAL, "the kill must land mid-job for this test to mean anything"
    assert not (killed / "summary.json").exists() and not (killed / "dataset").exists()

    resumed = run_to_completion(killed)
    reference = run_to_completion(tmp_path / "uninterrupted")

    assert resumed["resumed"] is True and reference["resumed"] is False
    assert resumed["timing"]["sessions"] == 2
    assert resumed["rows"] == reference["rows"] and resumed["dropped"] == reference["dropped"]
    rows = datasets.load_from_disk(str(killed / "dataset")).to_list()
    expected = datasets.load_from_disk(str(tmp_path / "uninterrupted" / "dataset")).to_list()
    assert rows == expected  # exact: same samples, same judgments, same floats
    assert (killed / "data.jsonl").read_bytes() == (tmp_path / "uninterrupted" / "data.jsonl").read_bytes()
    assert len(rows) == N_PROMPTS - resumed["dropped"].get("identical_responses", 0)
