"""`GroupJudge`: judge all N responses to one prompt together, for group-relative RL (GRPO, RLOO).

GRPO and RLOO only use rewards relative to the other samples of the same prompt, so the judge
may compare the group's responses with each other instead of grading each alone (ART's RULER
does this listwise). Two methods, both on the debiased soft-label core:

- **listwise** (rubric kind `group`, default `group-listwise`): the whole group in one prompt,
  then one score question per response ("... rate the response numbered below ... Response number: 3",
  ending with the index so the N questions share all text before it), read as a label
  distribution; the expected score rescaled to [0, 1] is that response's score in that
  presentation order. Repeated over `orders` seeded presentation orders: rotations of one seeded
  random permutation, so each response is seen at evenly spread positions (with `orders = N`,
  at every position once). Scores are the mean over orders; `order_spread` (the per-response
  std over orders) shows how much position moved them. The orders are drawn over the group
  sorted by text and seeded by its content, so **the result does not depend on the order in
  which the group was passed in** (identical texts get the mean of their scores).
  Cost: per order, the group's text once plus N short questions that share it as a prefix (one
  radix-tree branch each); `orders` orders cost about `orders` times that.
- **round_robin** (a pairwise rubric, default `helpfulness`): every unordered pair judged by
  `PairwiseJudge` in both orders (N(N-1) engine prompts, position-debiased soft labels), then a
  Bradley-Terry fit on the soft labels: log-strengths s maximizing
  sum_{i<j} p_ij log sigmoid(s_i - s_j) + (1 - p_ij) log sigmoid(s_j - s_i). `scores[i]` is
  mean_{j != i} sigmoid(s_i - s_j), the fitted win rate against the group, in [0, 1]. Pairs are
  cached one by one, so a response re-judged in another group reuses its verdicts.

When each is cheaper: a listwise order shows every response once (≈ the tokens of N independent
score calls); round robin shows every response 2(N-1) times. Listwise with k orders costs
≈ k x the independent calls, round robin ≈ (N-1) x; so listwise is cheaper whenever k < N-1
(for N = 8: up to 6 orders), and round robin only pays off for small groups (N <= 3) or when the
pairwise verdicts are already cached. benchmarks/group_judging.py measures it.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np

from rlaif.judge.cache import JudgmentCache, cache_key
from rlaif.judge.engines.base import LABEL_SEMANTICS, Engine, label_distribution
from rlaif.judge.judges import PairwiseJudge, judge_through_cache
from rlaif.judge.rubric import Rubric, RubricError, load_rubric
from rlaif.judge.types import ChatPrompt, GroupItem, GroupJudgment, PairwiseItem, Timings

GroupMethod = Literal["listwise", "round_robin"]
DEFAULT_GROUP_RUBRICS: dict[str, str] = {"listwise": "group-listwise", "round_robin": "helpfulness"}
MAX_GROUP_SIZE = 64
MAX_ORDERS = 32


def canonical_order(responses: Sequence[str]) -> list[int]:
    """Input indices sorted by text (ties by index): the same list of texts for any permutation of the group."""
    return sorted(range(len(responses)), key=lambda i: (responses[i], i))


def presentation_orders(item: GroupItem, orders: int, seed: int) -> list[list[int]]:
    """`orders` presentation orders of the group, each a list of input indices (position -> response).

    Rotations of one random permutation of the text-sorted group, seeded by (seed, prompt,
    reference, sorted texts): invariant to the input order, and every response is shown at
    positions spread evenly over the group."""
    canon = canonical_order(item.responses)
    n = len(canon)
    digest = hashlib.sha256(repr((seed, item.prompt, item.reference, [item.responses[i] for i in canon])).encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    base = rng.sample(range(n), n)  # canonical positions in presentation order
    out = []
    for k in range(orders):
        shift = (k * n) // orders
        out.append([canon[base[(p + shift) % n]] for p in range(n)])
    return out


def bradley_terry(win: np.ndarray, *, l2: float = 1e-6, iterations: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Log-strengths (mean 0) of a Bradley-Terry model fit to soft pairwise outcomes by Newton's method.

    `win[i, j]` = P(i beats j) for i != j (the diagonal is ignored; `win[j, i]` should be
    `1 - win[i, j]`). Maximizes sum_{i != j} win_ij log sigmoid(s_i - s_j) - l2/2 |s|^2; the tiny
    `l2` keeps the fit finite when a response wins (or loses) every comparison outright. (N,)"""
    n = win.shape[0]
    off = ~np.eye(n, dtype=bool)
    p = np.where(off, win, 0.0)
    s = np.zeros(n)
    for _ in range(iterations):
        diff = s[:, None] - s[None, :]
        sig = 1.0 / (1.0 + np.exp(-diff))  # (N, N) sigmoid(s_i - s_j)
        # Each unordered pair enters twice (i beats j, j beats i), so the gradient is 2 sum_j (p_ij - sig_ij).
        grad = 2.0 * np.where(off, p - sig, 0.0).sum(axis=1) - l2 * s
        curvature = np.where(off, sig * (1.0 - sig), 0.0)  # (N, N)
        hessian = 2.0 * curvature - np.diag(2.0 * curvature.sum(axis=1) + l2)
        # The likelihood ignores a common shift of s; -1 1^T pins that direction (the gradient has none of it).
        step = np.linalg.solve(hessian - np.ones((n, n)), -grad)
        step = step * min(1.0, 5.0 / max(float(np.abs(step).max()), 1e-12))  # damped: no wild first steps
        s = s + step
        if float(np.abs(step).max()) < tol:
            break
    return s - s.mean()


def expected_win_rates(strengths: np.ndarray) -> np.ndarray:
    """mean_{j != i} sigmoid(s_i - s_j): each response's fitted win rate against the rest of its group. (N,)"""
    n = strengths.shape[0]
    sig = 1.0 / (1.0 + np.exp(-(strengths[:, None] - strengths[None, :])))
    return (sig.sum(axis=1) - 0.5) / (n - 1)  # the diagonal contributes sigmoid(0) = 0.5


def check_group_setup(rubric: Rubric | str | None, method: str, orders: int = 1) -> Rubric:
    """The rubric (default per method), checked for `method` and `orders`; needs no engine, so commands call it first."""
    if method not in DEFAULT_GROUP_RUBRICS:
        raise ValueError(f"group method must be 'listwise' or 'round_robin', got {method!r}")
    if not 1 <= orders <= MAX_ORDERS:
        raise ValueError(f"orders must be between 1 and {MAX_ORDERS}, got {orders}")
    loaded = rubric if isinstance(rubric, Rubric) else load_rubric(rubric or DEFAULT_GROUP_RUBRICS[method])
    wanted = "group" if method == "listwise" else "pairwise"
    if loaded.kind != wanted:
        raise RubricError(f"{loaded.source}: group method {method} needs a {wanted} rubric "
                          f"({DEFAULT_GROUP_RUBRICS[method]} is the default); '{loaded.id}' is a {loaded.kind} rubric")
    return loaded


class GroupJudge:
    """Relative scores for groups of responses to one prompt (see the module docstring)."""

    def __init__(self, engine: Engine, rubric: Rubric | str | None = None, *, method: GroupMethod = "listwise",
                 orders: int = 4, cache: JudgmentCache | None = None, seed: int = 0, tie_margin: float = 0.05) -> None:
        loaded = check_group_setup(rubric, method, orders)
        self.engine = engine
        self.method: GroupMethod = method
        self.orders = orders
        self.cache = cache
        self.seed = seed
        self.rubric = loaded
        self.pairwise = PairwiseJudge(engine, loaded, cache=cache, seed=seed, tie_margin=tie_margin) \
            if method == "round_robin" else None
        self.values = np.asarray(loaded.label_values, dtype=np.float64) if method == "listwise" else None

    # ------------------------------------------------------------------ checks and keys
    def check_items(self, items: Sequence[GroupItem]) -> None:
        for item in items:
            if len(item.responses) > MAX_GROUP_SIZE:
                raise ValueError(f"a group holds at most {MAX_GROUP_SIZE} responses, got {len(item.responses)}")
            self.rubric.check_item_fields(reference=item.reference)

    def item_key(self, item: GroupItem) -> str:
        """Cache key of a listwise group judgment: engine, rubric, orders, seed and the group as given."""
        return cache_key({"engine": self.engine.engine_id, "labels": LABEL_SEMANTICS, "rubric": self.rubric.id,
                          "version": self.rubric.version, "fingerprint": self.rubric.fingerprint, "method": self.method,
                          "orders": self.orders, "seed": self.seed, "item": item.model_dump(exclude_none=True)})

    def sequences_per_item(self, item: GroupItem) -> int:
        """Engine sequences one group becomes (a batch's token cost counts all of them)."""
        n = len(item.responses)
        return n * self.orders if self.method == "listwise" else n * (n - 1)

    # ------------------------------------------------------------------ layout
    def _listwise_prompts(self, item: GroupItem) -> tuple[list[ChatPrompt], list[list[int]]]:
        """Per order, one prompt per position (the question about the response shown there); and the orders."""
        special = tuple(getattr(self.engine, "special_tokens", ()) or ())
        orders = presentation_orders(item, self.orders, self.seed)
        prompts = []
        for order in orders:
            shown = [item.responses[i] for i in order]
            for position in range(len(order)):
                prompts.append(self.rubric.render(prompt=item.prompt, responses=shown, reference=item.reference,
                                                  index=position + 1, special_tokens=special))
        return prompts, orders

    def _pairs(self, item: GroupItem) -> list[tuple[int, int]]:
        """Unordered pairs (a, b) of distinct texts, a's text sorting first (input-order invariant)."""
        canon = canonical_order(item.responses)
        rank = {index: r for r, index in enumerate(canon)}
        pairs = []
        for x in range(len(canon)):
            for y in range(x + 1, len(canon)):
                a, b = canon[x], canon[y]
                if item.responses[a] != item.responses[b]:
                    pairs.append((a, b) if rank[a] < rank[b] else (b, a))
        return pairs

    def _pair_items(self, item: GroupItem) -> list[PairwiseItem]:
        return [PairwiseItem(prompt=item.prompt, response_a=item.responses[a], response_b=item.responses[b],
                             reference=item.reference) for a, b in self._pairs(item)]

    def item_token_counts(self, items: Sequence[GroupItem]) -> list[int]:
        """Most tokens any engine sequence of each group needs (what a token budget checks before judging)."""
        if not items:
            return []
        self.check_items(items)
        if self.pairwise is not None:
            out = []
            for item in items:
                pairs = self._pair_items(item)
                out.append(max(self.pairwise.item_token_counts(pairs)) if pairs else 0)
            return out
        extra = max(len(label) for label in self.rubric.labels) + 2
        return [max(self.engine.prompt_token_counts(self._listwise_prompts(item)[0])) + extra for item in items]

    # ------------------------------------------------------------------ judging
    def judge(self, items: Sequence[GroupItem]) -> list[GroupJudgment]:
        """Judge many groups; output order matches input order, scores in each group's input order."""
        if not items:
            return []
        self.check_items(items)
        started = time.perf_counter()
        if self.method == "round_robin":
            return self._round_robin(items, started)
        keys = [self.item_key(item) for item in items]
        return judge_through_cache(items, keys, self.cache, "group", GroupJudgment, self._listwise, started)

    def _common(self) -> dict[str, object]:
        return {"rubric_id": self.rubric.id, "rubric_version": self.rubric.version, "engine": self.engine.engine_id,
                "model": self.engine.model_name, "seed": self.seed}

    def _listwise(self, items: Sequence[GroupItem], timings: Timings) -> list[GroupJudgment]:
        assert self.values is not None
        layouts = [self._listwise_prompts(item) for item in items]
        prompts = [p for item_prompts, _ in layouts for p in item_prompts]
        engine_started = time.perf_counter()
        dist = label_distribution(self.engine.label_logprobs(prompts, self.rubric.labels))  # one call for every group
        timings.engine_seconds += time.perf_counter() - engine_started
        low, high = float(self.values.min()), float(self.values.max())
        rescaled = (dist.probs @ self.values - low) / (high - low)  # (P,)
        results, row = [], 0
        for item, (item_prompts, orders) in zip(items, layouts):
            n = len(item.responses)
            per_order = np.zeros((len(orders), n))
            for k, order in enumerate(orders):
                for position, index in enumerate(order):
                    per_order[k, index] = rescaled[row + k * n + position]
            mass = float(dist.mass[row:row + len(item_prompts)].mean())
            row += len(item_prompts)
            scores = _mean_over_duplicates(item.responses, per_order.mean(axis=0))
            results.append(GroupJudgment(
                scores=scores.tolist(), method="listwise", orders=len(orders), per_order=per_order.tolist(),
                order_spread=per_order.std(axis=0).tolist(), presentation=orders, label_mass=mass, **self._common()))
        return results

    def _round_robin(self, items: Sequence[GroupItem], started: float) -> list[GroupJudgment]:
        assert self.pairwise is not None
        plans = [self._pairs(item) for item in items]
        pair_items = [p for item in items for p in self._pair_items(item)]
        judged = self.pairwise.judge(pair_items)  # one engine call: every pair of every group, both orders
        timings = Timings(batch_size=len(items), total_seconds=time.perf_counter() - started,
                          engine_seconds=next((j.timings.engine_seconds for j in judged if not j.cached), 0.0))
        results, at = [], 0
        for item, pairs in zip(items, plans):
            n = len(item.responses)
            win = np.full((n, n), 0.5)  # identical texts (never judged) tie
            verdicts = judged[at:at + len(pairs)]
            at += len(pairs)
            for (a, b), verdict in zip(pairs, verdicts):
                win[a, b], win[b, a] = verdict.prob_a, 1.0 - verdict.prob_a
            strengths = bradley_terry(win)
            results.append(GroupJudgment(
                scores=expected_win_rates(strengths).tolist(), method="round_robin", orders=2 * len(pairs),
                win_matrix=win.tolist(), strengths=strengths.tolist(),
                label_mass=float(np.mean([v.label_mass for v in verdicts])) if verdicts else 1.0,
                cached=bool(verdicts) and all(v.cached for v in verdicts), timings=timings, **self._common()))
        return results


def _mean_over_duplicates(responses: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """Identical texts share the mean of their scores, so the result cannot depend on which copy sat where."""
    out = scores.copy()
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(responses):
        groups.setdefault(text, []).append(i)
    for indices in groups.values():
        if len(indices) > 1:
            out[indices] = scores[indices].mean()
    return out
