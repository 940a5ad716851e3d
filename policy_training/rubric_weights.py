"""Rubric terms of a judge reward: `"helpfulness:0.7,harmlessness:0.3"` parsed, and the weighted sum.

Pure functions with no project imports: the config validates `reward.rubric` with
`parse_rubric_weights`, and the judge-backed reward sources (`judge_rewards.py`) combine
their per-rubric rewards with `weighted_sum`. LLaMA-2 combined a helpfulness and a safety
reward model the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Reward = float | None
RubricSpec = str | Sequence[str] | Mapping[str, float] | None
"""`"helpfulness:0.7,harmlessness:0.3"`, `["helpfulness:0.7", ...]`, `{"helpfulness": 0.7, ...}` or None (default rubric)."""


@dataclass(frozen=True)
class RubricWeight:
    """One term of the reward: a rubric (None = the judge's default for the mode) and its weight."""

    rubric: str | None
    weight: float

    @property
    def name(self) -> str:
        """Label under which the component is reported (`reward/<name>` in the metrics)."""
        if self.rubric is None:
            return "judge"
        return Path(self.rubric).stem if self.rubric.endswith((".yaml", ".yml")) else self.rubric


def parse_rubric_weights(spec: RubricSpec) -> list[RubricWeight]:
    """`"helpfulness:0.7,harmlessness:0.3"` (or a list of such terms, or {id: weight}) -> terms.

    A term without `:weight` has weight 1, so a single rubric id is just itself. The weight is
    whatever follows the last `:` when that parses as a number, so rubric paths containing
    `:` still work. Raises ValueError naming the bad term and the accepted form.
    """
    if spec is None:
        return [RubricWeight(None, 1.0)]
    if isinstance(spec, Mapping):
        raw_terms = [f"{k}:{v}" for k, v in spec.items()]
    elif isinstance(spec, str):
        raw_terms = spec.split(",")
    else:
        raw_terms = [str(term) for term in spec]
    terms: list[RubricWeight] = []
    for raw in raw_terms:
        term = raw.strip()
        if not term:
            raise ValueError(f"empty rubric term in {spec!r}; use `id` or `id:weight`, comma-separated, "
                             f"e.g. helpfulness:0.7,harmlessness:0.3")
        rubric, weight = term, 1.0
        head, sep, tail = term.rpartition(":")
        if sep:
            try:
                weight = float(tail)
                rubric = head.strip()
            except ValueError:
                pass  # no number after the last ':' -> part of the rubric name or path
        if not rubric:
            raise ValueError(f"rubric term {term!r} has a weight but no rubric; use `id:weight`")
        if not math.isfinite(weight):
            raise ValueError(f"rubric term {term!r}: the weight must be a finite number")
        terms.append(RubricWeight(rubric, weight))
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"rubric(s) {duplicates} appear more than once in {spec!r}; give each rubric once with its total weight")
    if all(t.weight == 0 for t in terms):
        raise ValueError(f"all rubric weights in {spec!r} are 0, so every reward would be 0")
    return terms


def weighted_sum(components: Sequence[Sequence[Reward]], weights: Sequence[float]) -> list[Reward]:
    """sum_k weights[k] * components[k][i] per sample; None where any component is None.

    A partial sum would silently change what the reward measures for that sample (e.g. a
    harmlessness-only score), so a missing component makes the whole sample missing.
    """
    if len(components) != len(weights):
        raise ValueError(f"{len(components)} components but {len(weights)} weights")
    if not components:
        return []
    size = len(components[0])
    if any(len(c) != size for c in components):
        raise ValueError(f"components have different lengths: {[len(c) for c in components]}")
    total: list[Reward] = []
    for i in range(size):
        parts = [c[i] for c in components]
        total.append(None if any(p is None for p in parts)
                     else math.fsum(w * p for w, p in zip(weights, parts)))  # type: ignore[operator]
    return total
