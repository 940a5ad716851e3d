"""Which samples to compare and how to read the verdicts: pure functions, no model involved.

- `all_pairs(n)`: every unordered pair (i < j), sample i shown as response A.
- `random_pair(n, seed, prompt_index)`: one pair drawn from a generator seeded by
  (seed, prompt index) only, so the draw does not depend on batching or on resuming.
- `rank_by_wins(n, prob_a)`: soft Copeland ranking from a round robin, the default way
  `--pairs best-worst` picks its pair. Sample i's score is the sum over opponents j of the
  debiased P(i beats j); soft wins rarely tie and use the judge's confidence, not just the
  sign. Chosen over a score judge as the default because it needs only the pairwise judge
  whose labels end up in the dataset (one rubric, both orders per pair, so position bias
  cancels), and the best-vs-worst label itself comes out of the same round robin for free.
  The price is n(n-1)/2 comparisons per prompt (6 for n=4, 28 for n=8); `--ranking score`
  costs n score calls plus one comparison instead.
- `knockout_round(...)`: one round of a single-elimination bracket (best-of-n tournament).
- `orient(...)`: turn a judgment of (a, b) into (chosen, rejected, P(chosen better)).

Identical texts are never sent to the judge: their debiased preference is exactly 0.5 by
symmetry (both orders show the same prompt), so they count as a tie.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rlaif.judge.types import PairwiseJudgment


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from a base seed and labels (batch index, prompt index, ...), stable across runs."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def all_pairs(n: int) -> list[tuple[int, int]]:
    """Every unordered pair of n samples as (i, j) with i < j."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def random_pair(n: int, seed: int, prompt_index: int) -> tuple[int, int]:
    """One pair (i < j) of n samples, drawn with a generator seeded by (seed, prompt index)."""
    assert n >= 2, f"need at least two samples to pair, got {n}"
    i, j = random.Random(derive_seed(seed, "pair", prompt_index)).sample(range(n), 2)
    return (i, j) if i < j else (j, i)


def rank_by_wins(n: int, prob_a: Mapping[tuple[int, int], float]) -> list[int]:
    """Sample indices from best to worst by soft round-robin wins.

    `prob_a[(i, j)]` (i < j) is the debiased P(sample i beats sample j); a missing pair counts
    as 0.5 (identical texts). Ties in soft wins keep index order, so the ranking is stable.
    """
    wins = [0.0] * n
    for i, j in all_pairs(n):
        p = prob_a.get((i, j), 0.5)
        wins[i] += p
        wins[j] += 1.0 - p
    return sorted(range(n), key=lambda i: (-wins[i], i))


@dataclass(frozen=True)
class Oriented:
    """A judged pair seen from the preferred side."""

    chosen: int
    rejected: int
    prob: float
    """Debiased P(chosen is better), >= 0.5."""
    rationale: str | None
    """The rationale of the presentation order that showed `chosen` as response A (CoT mode)."""


def orient(a: int, b: int, judgment: PairwiseJudgment) -> Oriented:
    """Put the judge's preferred sample first. An exact 0.5 keeps a (the lower index) as chosen."""
    by_order = {o.order: o.rationale for o in judgment.per_order}
    if judgment.prob_a >= 0.5:
        return Oriented(a, b, judgment.prob_a, by_order.get("ab", judgment.rationale))
    return Oriented(b, a, 1.0 - judgment.prob_a, by_order.get("ba"))


def knockout_round(survivors: Sequence[int]) -> tuple[list[tuple[int, int]], int | None]:
    """Pair adjacent survivors for one bracket round; an odd one out gets a bye (returned apart)."""
    matches = [(survivors[k], survivors[k + 1]) for k in range(0, len(survivors) - 1, 2)]
    bye = survivors[-1] if len(survivors) % 2 else None
    return matches, bye
