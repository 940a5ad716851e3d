"""Human review of AI labels: what a reviewable pair is, where human answers are stored, how they are
compared with the judge, and how they are exported. `rlaif review` (`rlaif.service.review`) is the web
page over this module; nothing here knows about HTTP.

Sources (`load_review_source`):
- a `rlaif label` folder: the dataset rows, each joined to its full judgment (both orders, label mass,
  rationale) from the job's `progress.sqlite`;
- an `rlaif eval --out` folder: the evaluated file's pairs joined to `judgments.jsonl`;
- any human-preference file `rlaif eval` reads (PandaLM, LLMBar, hh-rlhf, TRL jsonl): pairs without
  judge verdicts, to collect (more) human labels.

Each pair is canonical: `response_1` is the judge's `chosen` (label folders) or the file's preferred
response, `response_2` the other; `judge_prob` = the judge's P(response_1 better). The page shows
them in a per-item seeded order (`left_is_1`), so the judge's favourite is not always on the left.

Human answers (`HumanLabelStore`) live in SQLite (WAL) beside the source (`<folder>/human_labels.sqlite`,
or `<file>.review.sqlite`): an append-only table, one row per answer with annotator and time, written
in its own transaction at once. An annotator's current answer to a pair is their latest row; two
people never overwrite each other, and a crash loses nothing that was acknowledged.

Active selection (`priority`): pairs where a person's answer says most about the judge come first:
orders that disagree (+3), probabilities near 0.5 (+2 x (1 - margin)), low label mass (+1 below 0.5),
a reward model that disagrees with the judge (+2, from an optional `rm_prob` column).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from rlaif.judge.types import LOW_LABEL_MASS, PairwiseJudgment

Answer = Literal["1", "2", "tie", "skip"]
ANSWERS: tuple[str, ...] = ("1", "2", "tie", "skip")
STORE_NAME = "human_labels.sqlite"


class ReviewItem(BaseModel):
    """One pair to review, in canonical orientation (see the module docstring)."""

    key: str = Field(description="Stable id: hash of prompt and both responses (independent of order and row).")
    index: int = Field(description="Row in the source.")
    source_id: str = Field(description="The source's own id of the row (prompt_id, '<stem>-<row>').")
    prompt: str
    prompt_messages: list[dict[str, str]] | None = None
    response_1: str
    response_2: str
    judge_prob: float | None = Field(None, description="Judge's debiased P(response_1 better); None without a judge.")
    prob_1_first: float | None = Field(None, description="P(response_1 better) from the order that showed it first.")
    prob_1_second: float | None = Field(None, description="P(response_1 better) from the order that showed it second.")
    consistent: bool | None = None
    label_mass: float | None = None
    rationale: str | None = None
    rubric_id: str | None = None
    judge_model: str | None = None
    calibration: str | None = None
    rm_prob: float | None = Field(None, description="A reward model's P(response_1 better), when the source has `rm_prob`.")
    file_label: Literal["1", "2"] | None = Field(None, description="Human-preference files: the file's own label.")

    @property
    def left_is_1(self) -> bool:
        """Display order, seeded by the key so it is the same on every load and for every annotator."""
        return int(self.key[:8], 16) % 2 == 0

    def priority(self) -> tuple[float, list[str]]:
        """(score, reasons): higher scores are reviewed first."""
        score, reasons = 0.0, []
        if self.consistent is False:
            score += 3.0
            reasons.append("the two presentation orders disagree")
        if self.judge_prob is not None:
            margin = abs(2 * self.judge_prob - 1)
            score += 2.0 * (1 - margin)
            if margin < 0.2:
                reasons.append(f"judge probability {self.judge_prob:.2f} is near 0.5")
        if self.label_mass is not None and self.label_mass < LOW_LABEL_MASS:
            score += 1.0
            reasons.append(f"low label mass {self.label_mass:.2f}")
        if self.rm_prob is not None and self.judge_prob is not None and (self.rm_prob > 0.5) != (self.judge_prob > 0.5):
            score += 2.0
            reasons.append("the reward model disagrees with the judge")
        return score, reasons


def item_key(prompt: str, first: str, second: str) -> str:
    ordered = sorted([first, second])
    return hashlib.sha256(json.dumps([prompt, *ordered], ensure_ascii=False).encode()).hexdigest()[:16]


def _text(value: Any) -> str:
    """A prompt/response cell as text: plain text, or chat messages (a response's last assistant message)."""
    from rlaif.judge.data import is_chat_messages, render_messages

    if is_chat_messages(value):
        if all(m["role"] == "assistant" for m in value):
            return value[-1]["content"]
        return render_messages(value)
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------- sources
@dataclass
class ReviewSource:
    """The pairs of one source and where their human answers are stored."""

    path: Path
    kind: Literal["label", "eval", "preferences"]
    items: list[ReviewItem]
    store_path: Path
    rows: list[dict] | None = None
    """Label folders: the dataset rows as read (for the human-corrected export)."""
    by_key: dict[str, ReviewItem] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_key = {item.key: item for item in self.items}

    @property
    def rubrics(self) -> list[str]:
        return sorted({i.rubric_id for i in self.items if i.rubric_id})


def load_review_source(path: str | Path) -> ReviewSource:
    """A label folder, an eval output folder or a human-preference file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / "progress.sqlite").is_file() and ((path / "data.jsonl").is_file() or (path / "dataset").is_dir()):
            return _label_source(path)
        if (path / "report.json").is_file() and (path / "judgments.jsonl").is_file():
            return _eval_source(path)
        raise ValueError(f"{path}: neither a `rlaif label` folder (progress.sqlite + data.jsonl or dataset/) nor an "
                         "`rlaif eval --out` folder (report.json + judgments.jsonl); give one of those or a "
                         "preference file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such folder or file")
    from rlaif.judge.data import load_preferences

    items = []
    for index, example in enumerate(load_preferences(path)):
        items.append(ReviewItem(key=item_key(example.prompt, example.chosen, example.rejected), index=index,
                                source_id=example.id, prompt=example.prompt, response_1=example.chosen,
                                response_2=example.rejected, file_label="1"))
    return ReviewSource(path=path, kind="preferences", items=_unique(items), store_path=path.with_name(path.name + ".review.sqlite"))


def _unique(items: list[ReviewItem]) -> list[ReviewItem]:
    seen: set[str] = set()
    kept = []
    for item in items:
        if item.key not in seen:
            seen.add(item.key)
            kept.append(item)
    return kept


def _label_rows(folder: Path) -> list[dict]:
    if (folder / "data.jsonl").is_file():
        return [json.loads(line) for line in (folder / "data.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    import datasets

    return list(datasets.load_from_disk(str(folder / "dataset")))


def _label_source(folder: Path) -> ReviewSource:
    rows = _label_rows(folder)
    # Full judgments from the job's store: (a, b, text_a, text_b) -> judgment of response_a=text_a vs text_b.
    judged: dict[tuple[int, int, str, str], PairwiseJudgment] = {}
    conn = sqlite3.connect(f"file:{folder / 'progress.sqlite'}?mode=ro", uri=True)
    try:
        texts: dict[tuple[int, int], str] = {(p, s): t for p, s, t in conn.execute("SELECT prompt_index, sample, text FROM responses")}
        for (value,) in conn.execute("SELECT value FROM records WHERE stage = 'pairs'"):
            record = json.loads(value)
            p, a, b = record["prompt"], record["a"], record["b"]
            if (p, a) in texts and (p, b) in texts:
                judged[(a, b, texts[(p, a)], texts[(p, b)])] = PairwiseJudgment.model_validate(record["judgment"])
    finally:
        conn.close()
    items = []
    for index, row in enumerate(rows):
        prompt, chosen, rejected = _text(row["prompt"]), _text(row["chosen"]), _text(row["rejected"])
        messages = row["prompt"] if isinstance(row["prompt"], list) else None
        ci, ri = int(row.get("chosen_index", 0)), int(row.get("rejected_index", 1))
        a, b = min(ci, ri), max(ci, ri)
        text_a, text_b = (chosen, rejected) if ci == a else (rejected, chosen)
        judgment = judged.get((a, b, text_a, text_b))
        fields: dict[str, Any] = {"judge_prob": row.get("judge_prob"), "consistent": row.get("consistent"),
                                  "rationale": row.get("rationale"), "rubric_id": row.get("rubric_id"),
                                  "judge_model": row.get("judge_model"), "rm_prob": row.get("rm_prob")}
        if judgment is not None:
            ab, ba = judgment.per_order
            chosen_is_a = ci == a
            fields.update(
                judge_prob=judgment.prob_a if chosen_is_a else 1 - judgment.prob_a,
                prob_1_first=ab.prob_a if chosen_is_a else 1 - ba.prob_a,
                prob_1_second=ba.prob_a if chosen_is_a else 1 - ab.prob_a,
                consistent=judgment.consistent, label_mass=judgment.label_mass, calibration=judgment.calibration,
                rationale=(ab.rationale if chosen_is_a else ba.rationale) or judgment.rationale)
        items.append(ReviewItem(key=item_key(prompt, chosen, rejected), index=index,
                                source_id=str(row.get("prompt_id", index)), prompt=prompt,
                                prompt_messages=messages if messages and len(messages) > 1 else None,
                                response_1=chosen, response_2=rejected, **fields))
    return ReviewSource(path=folder, kind="label", items=_unique(items), store_path=folder / STORE_NAME, rows=rows)


def _eval_source(folder: Path) -> ReviewSource:
    from rlaif.judge.data import load_preferences

    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    data = Path(report["data"])
    if not data.is_file() and (folder / data.name).is_file():
        data = folder / data.name
    examples = {e.id: e for e in load_preferences(data)}
    items = []
    for index, line in enumerate((folder / "judgments.jsonl").read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        example = examples.get(record["id"])
        if example is None:
            continue
        j = PairwiseJudgment.model_validate({k: v for k, v in record.items() if k not in ("id", "chosen_is_a")})
        ab, ba = j.per_order
        a = bool(record["chosen_is_a"])  # response_1 (the file's chosen) sat in slot A
        items.append(ReviewItem(
            key=item_key(example.prompt, example.chosen, example.rejected), index=index, source_id=example.id,
            prompt=example.prompt, response_1=example.chosen, response_2=example.rejected, file_label="1",
            judge_prob=j.prob_a if a else 1 - j.prob_a, prob_1_first=ab.prob_a if a else 1 - ba.prob_a,
            prob_1_second=ba.prob_a if a else 1 - ab.prob_a, consistent=j.consistent, label_mass=j.label_mass,
            rationale=j.rationale, rubric_id=j.rubric_id, judge_model=j.model, calibration=j.calibration))
    return ReviewSource(path=folder, kind="eval", items=_unique(items), store_path=folder / STORE_NAME)


# ---------------------------------------------------------------------------------- store
class HumanLabel(BaseModel):
    """One answer of one person to one pair."""

    id: int
    item: str
    answer: Answer
    note: str = ""
    annotator: str
    created: float
    shown_left: Literal["1", "2"] | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT NOT NULL, answer TEXT NOT NULL CHECK (answer IN ('1','2','tie','skip')),
    note TEXT NOT NULL DEFAULT '', annotator TEXT NOT NULL, created REAL NOT NULL, shown_left TEXT);
CREATE INDEX IF NOT EXISTS labels_item ON labels (item, annotator, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class HumanLabelStore:
    """Append-only SQLite store of human answers (WAL; every `add` is committed before it returns)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # an acknowledged answer survives a power cut too
        self._conn.executescript(_SCHEMA)
        self._conn.commit()

    def add(self, item: str, answer: str, annotator: str, *, note: str = "", shown_left: str | None = None) -> HumanLabel:
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
        now = time.time()
        with self._lock, self._conn:
            cursor = self._conn.execute(
                "INSERT INTO labels (item, answer, note, annotator, created, shown_left) VALUES (?, ?, ?, ?, ?, ?)",
                (item, answer, note, annotator, now, shown_left))
        return HumanLabel.model_validate({"id": int(cursor.lastrowid or 0), "item": item, "answer": answer, "note": note,
                                          "annotator": annotator, "created": now, "shown_left": shown_left})

    def history(self) -> list[HumanLabel]:
        with self._lock:
            rows = self._conn.execute("SELECT id, item, answer, note, annotator, created, shown_left FROM labels ORDER BY id").fetchall()
        return [HumanLabel(id=r[0], item=r[1], answer=r[2], note=r[3], annotator=r[4], created=r[5], shown_left=r[6]) for r in rows]

    def current(self, annotator: str | None = None) -> dict[str, dict[str, HumanLabel]]:
        """item -> annotator -> that annotator's latest answer (only `annotator`'s when given)."""
        latest: dict[str, dict[str, HumanLabel]] = {}
        for label in self.history():
            if annotator is None or label.annotator == annotator:
                latest.setdefault(label.item, {})[label.annotator] = label
        return latest

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def human_verdict(labels: Iterable[HumanLabel]) -> str | None:
    """Majority of the annotators' current answers ('1', '2', 'tie'), skips ignored; None = no answer or a split."""
    votes = Counter(label.answer for label in labels if label.answer != "skip")
    if not votes:
        return None
    (top, count), *rest = votes.most_common()
    if rest and rest[0][1] == count:
        return None
    return top


# ---------------------------------------------------------------------------------- agreement
class AgreementRow(BaseModel):
    group: str
    n: int
    agreement: float | None
    ci95: tuple[float, float] | None


class AgreementReport(BaseModel):
    """Human vs judge on the pairs with a decisive human verdict and a judge probability."""

    labeled: int = Field(description="Pairs with at least one non-skip answer.")
    human_ties: int
    compared: int = Field(description="Pairs with a decisive human verdict and a judge probability.")
    overall: AgreementRow | None = None
    by_rubric: list[AgreementRow] = Field(default_factory=list)
    by_consistency: list[AgreementRow] = Field(default_factory=list)
    position_bias: float | None = Field(None, description=(
        "Mean judge P(the response shown first is better) over both orders minus people's rate for the same "
        "slots (0.5 by construction): > 0 means the judge favours the first slot."))
    order_accuracy: tuple[float, float] | None = Field(None, description="Agreement of each single order: (shown first, shown second).")
    annotators: dict[str, int] = Field(default_factory=dict)


def _row(group: str, probs: list[float], outcomes: list[float]) -> AgreementRow:
    from rlaif.judge.metrics import accuracy, wilson_interval

    if not probs:
        return AgreementRow(group=group, n=0, agreement=None, ci95=None)
    acc = accuracy(probs, outcomes)
    return AgreementRow(group=group, n=len(probs), agreement=acc, ci95=wilson_interval(acc * len(probs), len(probs)))


def agreement(source: ReviewSource, store: HumanLabelStore) -> tuple[AgreementReport, tuple[np.ndarray, np.ndarray]]:
    """The agreement report and (P(left better) by the judge, people chose left) for the reliability diagram."""
    current = store.current()
    annotators: Counter[str] = Counter()
    labeled = ties = 0
    probs: list[float] = []
    outcomes: list[float] = []
    left_probs: list[float] = []
    left_outcomes: list[float] = []
    groups: dict[str, tuple[list[float], list[float]]] = {}
    consistency: dict[str, tuple[list[float], list[float]]] = {}
    first_slot: list[float] = []
    order_first: tuple[list[float], list[float]] = ([], [])
    order_second: tuple[list[float], list[float]] = ([], [])
    for item in source.items:
        answers = current.get(item.key, {})
        annotators.update(a for a, label in answers.items() if label.answer != "skip")
        verdict = human_verdict(answers.values())
        if any(label.answer != "skip" for label in answers.values()):
            labeled += 1
        if verdict == "tie":
            ties += 1
        if verdict not in ("1", "2") or item.judge_prob is None:
            continue
        y = 1.0 if verdict == "1" else 0.0
        probs.append(item.judge_prob)
        outcomes.append(y)
        left_probs.append(item.judge_prob if item.left_is_1 else 1 - item.judge_prob)
        left_outcomes.append(y if item.left_is_1 else 1 - y)
        for bucket, key in ((groups, item.rubric_id or "(unknown)"),
                            (consistency, "consistent" if item.consistent else "inconsistent")):
            bucket.setdefault(key, ([], []))[0].append(item.judge_prob)
            bucket[key][1].append(y)
        if item.prob_1_first is not None and item.prob_1_second is not None:
            # P(first slot better) in each order: response_1 first, then response_2 first.
            first_slot += [item.prob_1_first, 1 - item.prob_1_second]
            order_first[0].append(item.prob_1_first)
            order_first[1].append(y)
            order_second[0].append(item.prob_1_second)
            order_second[1].append(y)
    report = AgreementReport(
        labeled=labeled, human_ties=ties, compared=len(probs), overall=_row("all", probs, outcomes) if probs else None,
        by_rubric=[_row(k, *v) for k, v in sorted(groups.items())],
        by_consistency=[_row(k, *v) for k, v in sorted(consistency.items())],
        position_bias=float(np.mean(first_slot) - 0.5) if first_slot else None,
        order_accuracy=(_row("", *order_first).agreement or 0.0, _row("", *order_second).agreement or 0.0)
        if order_first[0] else None,
        annotators=dict(annotators))
    return report, (np.array(left_probs), np.array(left_outcomes))


# ---------------------------------------------------------------------------------- export
def export(source: ReviewSource, store: HumanLabelStore, out: str | Path, *, corrected: str | Path | None = None,
           annotator: str | None = None) -> dict[str, Any]:
    """Write the human labels as a preference file (prompt/chosen/rejected jsonl: what `rlaif eval`,
    `rlaif calibrate` and `rlaif train-rm` read) and, for label folders, the dataset with human-corrected
    labels. Human ties and split votes are left out of the preference file (accuracy against a tie is
    undefined) and counted. Returns a summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    current = store.current(annotator)
    verdicts = {key: human_verdict(answers.values()) for key, answers in current.items()}
    counts: Counter[str] = Counter()
    with out.open("w", encoding="utf-8") as handle:
        for item in source.items:
            answers = current.get(item.key, {})
            verdict = verdicts.get(item.key)
            if not answers or all(label.answer == "skip" for label in answers.values()):
                continue
            if verdict not in ("1", "2"):
                counts["tie" if verdict == "tie" else "split"] += 1
                continue
            counts["exported"] += 1
            chosen, rejected = (item.response_1, item.response_2) if verdict == "1" else (item.response_2, item.response_1)
            judge_prob = None if item.judge_prob is None else (item.judge_prob if verdict == "1" else 1 - item.judge_prob)
            if item.judge_prob is not None:
                counts["agree_with_judge" if (item.judge_prob > 0.5) == (verdict == "1") else "disagree_with_judge"] += 1
            handle.write(json.dumps({
                "prompt": item.prompt, "chosen": chosen, "rejected": rejected, "id": item.key, "source_id": item.source_id,
                "human_votes": dict(Counter(label.answer for label in answers.values())),
                "annotators": sorted(answers), "ai_judge_prob": judge_prob,
                "notes": [label.note for label in answers.values() if label.note]}, ensure_ascii=False) + "\n")
    summary: dict[str, Any] = {"out": str(out), "pairs": len(source.items), **{k: counts.get(k, 0) for k in (
        "exported", "tie", "split", "agree_with_judge", "disagree_with_judge")}}
    if source.rows is not None:
        target = Path(corrected) if corrected is not None else out.with_name(out.stem + ".corrected.jsonl")
        summary["corrected"] = str(target)
        summary["corrected_rows"] = _write_corrected(source, verdicts, target)
    return summary


def _write_corrected(source: ReviewSource, verdicts: dict[str, str | None], target: Path) -> dict[str, int]:
    """Every dataset row; where people gave a verdict it replaces the judge's (chosen/rejected, judge_prob)."""
    assert source.rows is not None
    counts: Counter[str] = Counter()
    by_index = {item.index: item for item in source.items}
    with target.open("w", encoding="utf-8") as handle:
        for index, row in enumerate(source.rows):
            item = by_index.get(index)
            verdict = verdicts.get(item.key) if item is not None else None
            fixed = dict(row, label_source="judge", human_label=None, ai_judge_prob=row.get("judge_prob"))
            if verdict in ("1", "2", "tie"):
                fixed.update(label_source="human", human_label=verdict, judge_prob=0.5 if verdict == "tie" else 1.0)
                if verdict == "2":  # people preferred the judge's `rejected`: swap, and the indices with it
                    fixed.update(chosen=row["rejected"], rejected=row["chosen"],
                                 chosen_index=row.get("rejected_index"), rejected_index=row.get("chosen_index"))
                counts["flipped" if verdict == "2" else "tie" if verdict == "tie" else "confirmed"] += 1
            else:
                counts["judge_only"] += 1
            handle.write(json.dumps(fixed, ensure_ascii=False) + "\n")
    return {k: counts.get(k, 0) for k in ("confirmed", "flipped", "tie", "judge_only")}


def ordered_queue(items: Sequence[ReviewItem]) -> list[ReviewItem]:
    """Items by descending priority (stable: source order breaks ties)."""
    return sorted(items, key=lambda item: (-item.priority()[0], item.index))


__all__ = ["ANSWERS", "AgreementReport", "HumanLabel", "HumanLabelStore", "ReviewItem", "ReviewSource", "agreement",
           "export", "human_verdict", "item_key", "load_review_source", "ordered_queue"]
