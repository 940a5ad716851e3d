"""Dataset cards (`README.md` in the output directory) for labeled and best-of-n datasets.

A card is what makes a synthetic dataset reusable months later: the exact configuration,
how many rows each filter removed, what the judge's labels look like (a preference
dataset whose labels all sit near 0.5 teaches little) and how position-consistent the judge
was on this data. The YAML header follows the Hugging Face Hub card format so the folder
can be pushed as is.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[tuple[str, int, float]]:
    """(bin label, count, fraction) for half-open bins [e_k, e_k+1), the last one closed."""
    counts, _ = np.histogram(np.asarray(values, dtype=float), bins=np.asarray(edges, dtype=float))
    total = max(int(counts.sum()), 1)
    return [(f"[{lo:.2f}, {hi:.2f}{']' if k == len(counts) - 1 else ')'}", int(c), int(c) / total)
            for k, (lo, hi, c) in enumerate(zip(edges[:-1], edges[1:], counts))]


def describe(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min": None, "median": None, "max": None}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "min": float(array.min()), "median": float(np.median(array)),
            "max": float(array.max())}


def render_card(*, title: str, tags: Sequence[str], summary: str, config: Mapping[str, object],
                sections: Sequence[tuple[str, str]], columns: Mapping[str, str], data_file: str | None = None,
                command: str | None = None) -> str:
    """Assemble the card: Hub YAML header, summary, config, job-specific sections, column docs.

    `data_file` (an export next to the card) becomes the Hub's default config, so
    `load_dataset(<folder>)` reads it; without exports the header lists only tags.
    """
    header = ["---", "tags:", *[f"- {tag}" for tag in tags]]
    if data_file:
        header += ["configs:", "- config_name: default", f"  data_files: {data_file}"]
    header += ["---", ""]
    parts = ["\n".join(header), f"# {title}\n", summary.strip() + "\n",
             f"Generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.\n"]
    if command:
        parts.append(f"## Command\n\n```\n{command}\n```\n")
    parts.append("## Configuration\n\n```json\n" + json.dumps(dict(config), indent=2, default=str, ensure_ascii=False) + "\n```\n")
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}\n")
    parts.append("## Columns\n\n" + markdown_table(["column", "meaning"], list(columns.items())) + "\n")
    return "\n".join(parts)
