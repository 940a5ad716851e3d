"""The run folder of `rlaif loop`: where each artifact lives, stage markers, the lock and the run's identity.

    <out>/
      loop_config.yaml       the validated config of the first start (the run's identity, hashed)
      progress.json          the stage running now (or the last one), rewritten at every stage start
      judgments.sqlite       the judgment cache every stage shares (label, win rate, judge rewards)
      report.md, report.png  the per-round report, redrawn after every round
      rounds.jsonl           one line of measurements + guard verdicts per finished round
      round-<r>/
        labels/              `rlaif label` output: dataset/, data.jsonl, README.md, progress.store
        rm_data/             (reward_model.data: all) this and earlier rounds' pairs, concatenated
        rm/                  `rlaif train-rm` output
        rl/                  `rlaif ppo` output: metrics.jsonl, training_curves.png, checkpoint-N/
        eval/                `rlaif winrate` output (samples.jsonl, summary.json) + round.json
        label.done, reward_model.done, rl.done, eval.done   stage markers (JSON)

A marker is written (temp file + rename, so it is whole or absent) only after its stage's artifact
is complete; a stage without a marker is redone on the next run, resuming inside where the stage
itself can (labeling's progress store, PPO's checkpoints).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STAGES = ("label", "reward_model", "rl", "eval")
"""The stages of one round, in order."""
STAGE_DIRS = {"label": "labels", "reward_model": "rm", "rl": "rl", "eval": "eval"}
CONFIG_FILE = "loop_config.yaml"
PROGRESS_FILE = "progress.json"
CACHE_FILE = "judgments.sqlite"
ROUNDS_FILE = "rounds.jsonl"


class RunLayout:
    """Paths and markers of one run folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r}"

    def stage_dir(self, r: int, stage: str) -> Path:
        return self.round_dir(r) / STAGE_DIRS[stage]

    def marker(self, r: int, stage: str) -> Path:
        return self.round_dir(r) / f"{stage}.done"

    def done(self, r: int, stage: str) -> dict[str, Any] | None:
        """The marker's payload when the stage is complete, else None."""
        path = self.marker(r, stage)
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, r: int, stage: str, payload: dict[str, Any]) -> None:
        write_atomic(self.marker(r, stage), json.dumps({"round": r, "stage": stage, "finished": time.time(),
                                                        **payload}, indent=2, default=str) + "\n")

    def set_progress(self, r: int, stage: str) -> None:
        write_atomic(self.root / PROGRESS_FILE, json.dumps({"round": r, "stage": stage, "started": time.time(),
                                                            "pid": os.getpid()}) + "\n")

    @property
    def cache(self) -> Path:
        return self.root / CACHE_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One loop per folder: a `flock` the kernel drops when the process dies (no stale lock after SIGKILL)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"{self.root} is in use by another `rlaif loop` process") from None
            yield


def write_atomic(path: Path, text: str) -> None:
    """Whole or absent: write a temp file, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
