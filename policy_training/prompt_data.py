"""The trainer's prompts: reading a prompt file, and the seeded order in which steps draw from it.

`load_prompts` reads .jsonl / .json (a `prompt`, `instruction` or `turns` column) or .txt
(one prompt per line); the judge-backed reward sources read reference responses from the
same file with the same row-to-prompt rule. `PromptSampler` walks one seeded shuffle of the
prompts, reshuffled after each pass; under data parallelism every process walks the same
shuffle and takes its own disjoint slice of each step's `batch_size * world_size` prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PROMPT_COLUMNS = ("prompt", "instruction", "turns")


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Read prompts from .jsonl / .json (a `prompt`, `instruction` or `turns` column) or .txt (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ValueError(f"{path} must hold a JSON list of objects or strings")
        prompts = [_row_prompt(row, column, path, i) for i, row in enumerate(rows)]
    else:
        raise ValueError(f"unsupported prompt file {path}: use .jsonl, .json or .txt")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _row_prompt(row: Any, column: str | None, path: Path, index: int) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{path} row {index}: expected an object or a string, got {type(row).__name__}")
    columns = (column,) if column else PROMPT_COLUMNS
    for name in columns:
        if name in row:
            value = row[name]
            if isinstance(value, str):
                return value
            if isinstance(value, list) and value:
                first = value[0] if name == "turns" else [m for m in value if m.get("role") == "user"][-1]
                return first if isinstance(first, str) else str(first.get("content", ""))
            raise ValueError(f"{path} row {index}: column {name!r} holds {type(value).__name__}, expected text")
    raise ValueError(f"{path} row {index}: no prompt column (looked for {', '.join(columns)}); "
                     f"set prompt_column to the column holding the prompt")


class PromptSampler:
    """This process's `batch_size` prompts per step, from one seeded shuffle shared by all processes."""

    def __init__(self, prompts: Sequence[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pointer = 0

    def next_batch(self) -> list[str]:
        """All processes walk the same seeded shuffle (reshuffled after each pass over the file)
        and take disjoint slices of `batch_size * world_size` consecutive entries."""
        wanted = self.batch_size * self.world_size
        picked: list[int] = []
        while len(picked) < wanted:
            if self.pointer >= len(self.order):
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
                self.pointer = 0
            take = min(wanted - len(picked), len(self.order) - self.pointer)
            picked.extend(self.order[self.pointer:self.pointer + take])
            self.pointer += take
        mine = picked[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return [self.prompts[i] for i in mine]


# ----------------------------------------------------------------------------- per-prompt reward metadata


def load_prompt_rows(path: str | Path, column: str | None = None) -> dict[str, dict[str, Any]]:
    """prompt text -> its whole row, from a .jsonl/.json prompt file (a .txt file has no columns: `{}`).

    Keys are the prompts exactly as `load_prompts` extracts them, so reward sources that look up a
    prompt's reference answer, checklist or verifier columns find the row the trainer drew it from.
    A prompt that appears twice keeps its first row."""
    path = Path(path)
    if path.suffix == ".txt":
        return {}
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    prompts = load_prompts(path, column)
    table: dict[str, dict[str, Any]] = {}
    for row, prompt in zip(rows, prompts):
        table.setdefault(prompt, row if isinstance(row, dict) else {})
    return table


def column_table(rows: dict[str, dict[str, Any]], column: str, path: str | Path, *, what: str) -> dict[str, Any]:
    """prompt -> `row[column]` for every row; a row without the column is an error naming it and the column."""
    if not rows:
        raise ValueError(f"{path}: {what} are read from the column {column!r} of a .jsonl/.json prompt file")
    missing = [prompt for prompt, row in rows.items() if row.get(column) is None]
    if missing:
        raise ValueError(f"{path}: {len(missing)} prompt(s) have no {column!r} column for {what}, e.g. "
                         f"{missing[0][:80]!r}")
    return {prompt: row[column] for prompt, row in rows.items()}
