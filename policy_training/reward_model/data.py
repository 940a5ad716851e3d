"""Labeled preference pairs for reward-model training: reading, splitting by prompt, length buckets.

Input: a labeled dataset from `rlaif label` (a `datasets` folder written by `save_to_disk`,
or a .jsonl/.json/.parquet file) with `prompt`, `chosen`, `rejected` strings and, when the
labels are soft, `judge_prob` = the judge's debiased P(chosen better). The held-out split is
by prompt, so several pairs of one prompt never straddle train and eval.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.judge.reward_format import Prompt, as_messages, prompt_key, response_content

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class LabeledPair:
    """One AI-labeled comparison. `target` = P(chosen better) (1.0 for hard labels).

    `prompt` is text, or chat messages when the labels were written in TRL's conversational
    format (the default of `rlaif label`); responses are always reduced to their text.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    target: float


@dataclass
class LabeledData:
    train: list[LabeledPair]
    eval: list[LabeledPair]
    soft_labels: bool
    source: str
    eval_source: str = "split"


Columns = dict[str, list[Any]]


def _columns_of_records(records: list[dict[str, Any]]) -> Columns:
    names = list(dict.fromkeys(key for record in records for key in record))
    return {name: [record.get(name) for record in records] for name in names}


def _read_table(path: Path) -> tuple[Columns, Columns | None]:
    """(train columns, held-out columns or None) from a `datasets` folder or a data file.

    JSON files are read directly (no `datasets` build cache for a one-off read); `save_to_disk`
    folders and Parquet go through `datasets`.
    """
    if path.is_dir():
        import datasets

        saved = ("dataset_info.json", "dataset_dict.json", "state.json")
        if not any((path / name).is_file() for name in saved) and (path / "dataset").is_dir():
            path = path / "dataset"  # an `rlaif label --out DIR` folder: the dataset lives in DIR/dataset
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path}: a DatasetDict needs a 'train' split (found {list(loaded)})")
            held_out = next((loaded[s] for s in ("test", "validation", "eval") if s in loaded), None)
            return loaded["train"].to_dict(), held_out.to_dict() if held_out is not None else None
        return loaded.to_dict(), None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labeled dataset (give a `rlaif label` output folder or a .jsonl/.parquet file)")
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        from rlaif.judge.data import read_json_records

        return _columns_of_records(read_json_records(path)), None
    if name.endswith(".parquet"):
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_dict(), None
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .parquet, or a save_to_disk folder")


def _to_pairs(table: Columns, where: str, use_soft: bool, limit: int | None) -> tuple[list[LabeledPair], bool]:
    missing = [c for c in REQUIRED_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; labeled data needs {list(REQUIRED_COLUMNS)} "
                         f"(+ optional judge_prob), found {list(table)}")
    n = len(table["prompt"]) if limit is None else min(limit, len(table["prompt"]))
    soft = use_soft and "judge_prob" in table
    probs = table["judge_prob"][:n] if soft else [1.0] * n
    pairs = []
    for row, (prompt, chosen, rejected, prob) in enumerate(zip(table["prompt"][:n], table["chosen"][:n],
                                                               table["rejected"][:n], probs)):
        try:
            if not isinstance(prompt, str):
                prompt = as_messages(prompt)
            chosen, rejected = response_content(chosen), response_content(rejected)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} row {row}: prompt/chosen/rejected must be strings or chat messages "
                             f"({type(exc).__name__}: {exc})") from None
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"{where} row {row}: judge_prob must be a probability in [0, 1], got {prob!r}")
        pairs.append(LabeledPair(prompt, chosen, rejected, float(prob)))
    return pairs, soft


def split_by_prompt(pairs: Sequence[LabeledPair], fraction: float, seed: int) -> tuple[list[LabeledPair], list[LabeledPair]]:
    """Hold out a `fraction` of the distinct prompts (all their pairs) for evaluation.

    Splitting by prompt rather than by pair keeps the held-out agreement honest when the
    labeler produced several pairs per prompt.
    """
    keys = [prompt_key(p.prompt) for p in pairs]
    prompts = list(dict.fromkeys(keys))
    n_eval = int(round(len(prompts) * fraction))
    if fraction > 0 and n_eval == 0 and len(prompts) > 1:
        n_eval = 1
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[:n_eval])
    return ([p for p, k in zip(pairs, keys) if k not in held_out], [p for p, k in zip(pairs, keys) if k in held_out])


def load_labeled_pairs(path: str | Path, *, soft: bool = True, limit: int | None = None,
                       eval_split: float = 0.1, seed: int = 0) -> LabeledData:
    """Read labeled pairs and split off the held-out set (a DatasetDict's test split is used as is)."""
    path = Path(path)
    train_table, eval_table = _read_table(path)
    train, has_soft = _to_pairs(train_table, str(path), soft, limit)
    if not train:
        raise ValueError(f"{path}: no labeled pairs")
    if eval_table is not None:
        held_out, _ = _to_pairs(eval_table, f"{path} (eval split)", soft, None)
        return LabeledData(train, held_out, has_soft, str(path), eval_source="dataset split")
    train, held_out = split_by_prompt(train, eval_split, seed)
    if not train:
        raise ValueError(f"{path}: eval_split={eval_split} left no training pairs")
    return LabeledData(train, held_out, has_soft, str(path), eval_source=f"{eval_split:.0%} of prompts")


# ============================================================================ batching


def bucketed_batches(lengths: Sequence[int], batch_size: int, bucket_batches: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, cut into buckets of `bucket_batches` batches, sort each bucket by length, batch, shuffle batches.

    Rows in a batch then have nearly equal length (little padding), while the order of the
    data still changes every epoch.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        bucket = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
    rng.shuffle(batches)
    return batches


