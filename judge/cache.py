"""SQLite judgment cache shared by the service, labeling jobs and training.

One row per judgment, keyed by a stable hash of everything that determines the verdict:
engine identity (model + precision), rubric id + version + content fingerprint, the item's
text, the judging mode and decoding settings. A hit skips the engine entirely, which is what
makes long labeling jobs cheap to resume and repeated rewards free. WAL journaling lets
several processes read while one writes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path


def cache_key(payload: Mapping[str, object]) -> str:
    """Stable sha256 of a JSON-serializable payload (sorted keys, no whitespace)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgmentCache:
    """A key -> JSON text store. Thread-safe; one connection guarded by a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)")
        self._conn.commit()
        self.hits = 0
        self.misses = 0

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # stay under SQLite's variable limit
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for key, value in self._conn.execute(f"SELECT key, value FROM judgments WHERE key IN ({marks})", chunk):
                    found[key] = value
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def put_many(self, kind: str, rows: Mapping[str, str]) -> None:
        now = time.time()
        with self._lock:
            self._conn.executemany("INSERT OR REPLACE INTO judgments (key, kind, value, created) VALUES (?, ?, ?, ?)",
                                   [(key, kind, value, now) for key, value in rows.items()])
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
