"""`ProgressStore`: the SQLite file that makes a labeling job resumable and loss-free.

A job is cut into fixed batches of prompts, and each batch goes through named stages
(`generate`, then one or more judging stages). Every stage of every batch is committed in
one transaction together with a row in `stages` that marks it complete, so after a crash
(even SIGKILL) a stage is either fully in the file or not at all, and a restarted job
redoes exactly the stages that are missing. The final dataset is always rebuilt from this
file, never from in-memory state, which is why an interrupted-then-resumed job writes the
same rows as an uninterrupted one.

WAL journaling with `synchronous=NORMAL` survives a killed process (the WAL is replayed on
open); only an OS crash or power loss can lose the last committed transactions, and those
stages are then simply redone.

The store also keeps the job's identity (a hash of every setting that determines what is
generated and judged): resuming with different settings would silently mix two datasets,
so `check_identity` refuses it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rlaif.judge.cache import cache_key

STORE_FILE = "progress.sqlite"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    prompt_index INTEGER NOT NULL, sample INTEGER NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (prompt_index, sample));
CREATE TABLE IF NOT EXISTS records (
    batch INTEGER NOT NULL, stage TEXT NOT NULL, item INTEGER NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (batch, stage, item));
CREATE TABLE IF NOT EXISTS stages (
    batch INTEGER NOT NULL, stage TEXT NOT NULL, seconds REAL NOT NULL, count INTEGER NOT NULL,
    fresh INTEGER NOT NULL, finished REAL NOT NULL, PRIMARY KEY (batch, stage));
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, last_seen REAL NOT NULL);
"""


class ResumeConflict(ValueError):
    """The output directory holds a job with different settings (or something that is not a job)."""


class ProgressStore:
    """Per-job SQLite store: identity, generated responses, judgment records, stage markers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._conn.commit()
        self._session: int | None = None

    # ------------------------------------------------------------------ identity
    def check_identity(self, identity: Mapping[str, object]) -> bool:
        """Record `identity` on a fresh store; on an existing one, raise `ResumeConflict` if it differs.

        Returns True when the store already held this job (a resume), False when it was new.
        """
        digest = cache_key(identity)
        stored = dict(self._conn.execute("SELECT key, value FROM meta WHERE key IN ('identity', 'identity_hash')").fetchall())
        if not stored:
            with self._conn:
                self._conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                    ("identity", json.dumps(identity, sort_keys=True, default=str)), ("identity_hash", digest),
                    ("schema_version", SCHEMA_VERSION), ("created", repr(time.time()))])
            return False
        if stored.get("identity_hash") == digest:
            return True
        previous = json.loads(stored.get("identity", "{}"))
        changed = [f"{key}: {_short(previous.get(key))} -> {_short(identity.get(key))}"
                   for key in sorted(set(previous) | set(identity)) if previous.get(key) != identity.get(key)]
        raise ResumeConflict(
            f"{self.path.parent} holds a job with different settings ({'; '.join(changed) or 'unknown change'}). "
            "Re-run the original command to resume it, pass --overwrite to discard it and start over, "
            "or choose another --out directory.")

    def set_meta(self, key: str, value: str) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ------------------------------------------------------------------ sessions (wall time across restarts)
    def start_session(self) -> None:
        now = time.time()
        with self._conn:
            cursor = self._conn.execute("INSERT INTO sessions (started, last_seen) VALUES (?, ?)", (now, now))
        self._session = cursor.lastrowid

    def touch_session(self) -> None:
        if self._session is not None:
            with self._conn:
                self._conn.execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (time.time(), self._session))

    def session_stats(self) -> tuple[int, float]:
        """(number of sessions that worked on this job, their summed wall seconds)."""
        count, seconds = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(last_seen - started), 0) FROM sessions").fetchone()
        return int(count), float(seconds)

    # ------------------------------------------------------------------ stages
    def stage_done(self, batch: int, stage: str) -> bool:
        return self._conn.execute("SELECT 1 FROM stages WHERE batch = ? AND stage = ?", (batch, stage)).fetchone() is not None

    def save_responses(self, batch: int, responses: Mapping[int, Sequence[str]], seconds: float, *, fresh: bool = True) -> None:
        """Commit one batch's samples and its `generate` marker in a single transaction."""
        rows = [(prompt_index, sample, text) for prompt_index, texts in responses.items() for sample, text in enumerate(texts)]
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO responses (prompt_index, sample, text) VALUES (?, ?, ?)", rows)
            self._mark(batch, "generate", seconds, len(rows), len(rows) if fresh else 0)

    def load_responses(self, prompt_indices: Iterable[int]) -> dict[int, list[str]]:
        indices = list(prompt_indices)
        found: dict[int, list[str]] = {i: [] for i in indices}
        for start in range(0, len(indices), 500):
            chunk = indices[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for prompt_index, _, text in self._conn.execute(
                    f"SELECT prompt_index, sample, text FROM responses WHERE prompt_index IN ({marks}) "
                    "ORDER BY prompt_index, sample", chunk):
                found[prompt_index].append(text)
        return found

    def save_records(self, batch: int, stage: str, values: Sequence[str], seconds: float, fresh: int) -> None:
        """Commit one judging stage's records (JSON text, in item order) and its marker atomically."""
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO records (batch, stage, item, value) VALUES (?, ?, ?, ?)",
                                   [(batch, stage, item, value) for item, value in enumerate(values)])
            self._mark(batch, stage, seconds, len(values), fresh)

    def load_records(self, batch: int, stage: str) -> list[str]:
        return [value for (value,) in self._conn.execute(
            "SELECT value FROM records WHERE batch = ? AND stage = ? ORDER BY item", (batch, stage))]

    def _mark(self, batch: int, stage: str, seconds: float, count: int, fresh: int) -> None:
        self._conn.execute("INSERT OR REPLACE INTO stages (batch, stage, seconds, count, fresh, finished) VALUES (?, ?, ?, ?, ?, ?)",
                           (batch, stage, seconds, count, fresh, time.time()))
        if self._session is not None:
            self._conn.execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (time.time(), self._session))

    def stage_totals(self) -> dict[str, dict[str, float]]:
        """Per stage name: batches done, items, fresh items (not from a cache), seconds spent."""
        totals: dict[str, dict[str, float]] = {}
        for stage, batches, count, fresh, seconds in self._conn.execute(
                "SELECT stage, COUNT(*), SUM(count), SUM(fresh), SUM(seconds) FROM stages GROUP BY stage"):
            totals[stage] = {"batches": batches, "items": count, "fresh": fresh, "seconds": seconds}
        return totals

    def close(self) -> None:
        self._conn.close()


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
