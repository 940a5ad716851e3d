"""Agreement and calibration metrics for judging a judge against human labels (pure numpy).

What a report on a human-preference set needs, side by side (see data/README.md):
- `accuracy` with its Wilson 95% interval (`wilson_interval`), and `is_within_noise` to flag
  when the result cannot be told apart from a coin flip at that sample size;
- `shorter_answer_baseline`: the accuracy of always picking the shorter response, a bar a
  judge must clear (about 55% on hh-rlhf harmless-base) before its accuracy means anything;
- calibration of the soft preference P(chosen better): `reliability_bins`,
  `expected_calibration_error` (Guo et al. 2017, binary form) and `plot_reliability_diagram`;
- `length_controlled_win_rate`: AlpacaEval 2.0's idea (Dubois et al. 2024) in its simplest
  form, a logistic regression of the win on the normalized length difference, read at zero
  difference, so a policy cannot raise its win rate just by writing longer answers.

Conventions: a probability of exactly 0.5 is a tie and earns half credit everywhere, so a
judge that always abstains scores 0.5 rather than 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

Z_95 = 1.959963984540054
"""Two-sided 95% standard-normal quantile."""


class HasResponses(Protocol):
    """Anything with a human-preferred `chosen` and a `rejected` response (e.g. `PreferenceExample`)."""

    @property
    def chosen(self) -> str: ...

    @property
    def rejected(self) -> str: ...


def _as_probs(probs: ArrayLike, name: str = "probs") -> np.ndarray:
    array = np.asarray(probs, dtype=float).reshape(-1)  # (N,)
    if array.size == 0:
        raise ValueError(f"{name} is empty; there is nothing to score")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array > 1):
        raise ValueError(f"{name} must be finite probabilities in [0, 1]")
    return array


def _as_outcomes(outcomes: ArrayLike | None, size: int) -> np.ndarray:
    if outcomes is None:
        return np.ones(size)
    array = np.asarray(outcomes, dtype=float).reshape(-1)  # (N,)
    if array.shape != (size,):
        raise ValueError(f"outcomes has {array.size} entries but probs has {size}; pass one outcome per probability")
    if not np.all((array == 0) | (array == 1)):
        raise ValueError("outcomes must be 0 or 1 (1: the side the probability is about really was better)")
    return array


def correctness(probs: ArrayLike, outcomes: ArrayLike | None = None) -> np.ndarray:
    """Per-comparison credit: 1 if the favoured side was the better one, 0 if not, 0.5 for p == 0.5."""
    p = _as_probs(probs)
    y = _as_outcomes(outcomes, p.size)
    return np.where(p == 0.5, 0.5, ((p > 0.5) == (y == 1)).astype(float))  # (N,)


def accuracy(probs: ArrayLike, outcomes: ArrayLike | None = None) -> float:
    """Share of comparisons where the judge favours the response humans preferred.

    `probs` are P(side X is better) and `outcomes` are 1 where X really was better, 0 where
    the other side was. Leaving `outcomes` out means "X is always the chosen response", the
    orientation `PreferenceExample` guarantees, so `accuracy(p_chosen)` is the common call.
    """
    return float(correctness(probs, outcomes).mean())


def wilson_interval(k: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion of `k` successes in `n` trials.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps close to
    its nominal coverage at the small n and extreme accuracies judge evaluations produce.
    `k` may be fractional (ties count 0.5). With n == 0 nothing is known: (0, 1).
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 0, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p_hat = k / n
    z2_n = z * z / n
    center = (p_hat + z2_n / 2) / (1 + z2_n)
    half_width = z * math.sqrt(p_hat * (1 - p_hat) / n + z2_n / (4 * n)) / (1 + z2_n)
    return max(0.0, center - half_width), min(1.0, center + half_width)


def is_within_noise(acc: float, n: int, z: float = Z_95) -> bool:
    """True when chance (0.5) lies inside the Wilson interval of accuracy `acc` over `n` items."""
    low, high = wilson_interval(acc * n, n, z)
    return low <= 0.5 <= high


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin of a reliability diagram; `mean_prob`/`outcome_rate` are None when empty."""

    lower: float
    upper: float
    count: int
    mean_prob: float | None
    outcome_rate: float | None


def reliability_bins(probs: ArrayLike, outcomes: ArrayLike | None = None, n_bins: int = 10) -> list[ReliabilityBin]:
    """Group predictions into `n_bins` equal-width bins of P(chosen better) and compare.

    Bin i holds probabilities in [i/n_bins, (i+1)/n_bins); the last bin also holds 1.0. A
    calibrated judge has `outcome_rate` close to `mean_prob` in every bin. With the default
    outcomes (chosen always better) the diagram asks "when the judge says 30%, how often
    is it wrong?"; pass P(A better) with outcomes for a randomized A/B order to get the
    usual two-sided picture.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _as_probs(probs)
    y = _as_outcomes(outcomes, p.size)
    index = np.minimum(np.floor(p * n_bins).astype(int), n_bins - 1)  # (N,) bin of each prediction
    bins = []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        bins.append(ReliabilityBin(
            lower=i / n_bins,
            upper=(i + 1) / n_bins,
            count=count,
            mean_prob=float(p[members].mean()) if count else None,
            outcome_rate=float(y[members].mean()) if count else None,
        ))
    return bins


def _ece_from_bins(bins: Sequence[ReliabilityBin]) -> float:
    total = sum(b.count for b in bins)
    if total == 0:
        raise ValueError("all bins are empty")
    return float(sum(b.count / total * abs(b.outcome_rate - b.mean_prob) for b in bins if b.count))


def expected_calibration_error(probs: ArrayLike, outcomes: ArrayLike | None = None, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean gap |outcome rate - mean probability| over the bins.

    `probs` are P(chosen better) (or P(X better) with `outcomes` saying whether X was); see
    `reliability_bins` for the binning. 0 is perfect calibration.
    """
    return _ece_from_bins(reliability_bins(probs, outcomes, n_bins))


def shorter_answer_baseline(examples: Sequence[HasResponses]) -> float:
    """Accuracy of always picking the shorter response (by characters); equal lengths score 0.5.

    Human raters and LLM judges both have length preferences, so this trivial rule can beat
    chance (it does on hh-rlhf harmless-base, where refusals are short and preferred); a
    judge's accuracy is only informative next to it.
    """
    if not examples:
        raise ValueError("no examples; the baseline needs at least one comparison")
    chosen = np.array([len(e.chosen) for e in examples])  # (N,)
    rejected = np.array([len(e.rejected) for e in examples])  # (N,)
    return float(np.where(chosen == rejected, 0.5, (chosen < rejected).astype(float)).mean())


@dataclass(frozen=True)
class LengthControlledWinRate:
    """A logistic fit P(win) = sigmoid(intercept + slope * tanh(length_diff / length_scale))."""

    win_rate: float
    """Predicted win rate at zero length difference: sigmoid(intercept)."""
    raw_win_rate: float
    """Plain mean of the win probabilities, for comparison."""
    intercept: float
    slope: float
    """How strongly the win depends on being longer; > 0 means longer answers win more."""
    length_scale: float
    """Standard deviation of the length differences used to normalize them (0: all equal)."""
    n: int
    converged: bool
    """False when Newton stopped at `max_iter` before its steps became negligible."""


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    # tanh form: no overflow warnings for large |z|, unlike 1 / (1 + exp(-z)).
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))


def fit_logistic(features: np.ndarray, targets: np.ndarray, l2: ArrayLike = 0.0, max_iter: int = 100,
                 tol: float = 1e-10, prior: ArrayLike | None = None) -> tuple[np.ndarray, bool]:
    """Logistic regression by Newton's method (IRLS) with step halving; returns (coefficients, converged).

    `features` is (N, D) and should include an intercept column; `targets` are in [0, 1], so
    soft labels (judge probabilities) are fitted by cross-entropy just like hard ones. `l2`
    (scalar or one value per column) adds 0.5 * l2 * beta**2 to the loss. The Newton system
    is solved by least squares so a degenerate column (e.g. all length differences zero) gets
    a zero coefficient instead of a singular-matrix error. With `prior`, the penalty pulls towards
    it instead of zero (0.5 * l2 * (beta - prior)**2) and the fit starts there.
    """
    penalty = np.broadcast_to(np.asarray(l2, dtype=float), (features.shape[1],))  # (D,)
    center = np.zeros(features.shape[1]) if prior is None else np.asarray(prior, dtype=np.float64)  # (D,)

    def loss_of(beta: np.ndarray) -> float:
        z = features @ beta  # (N,)
        return float(np.sum(np.logaddexp(0.0, z) - targets * z) + 0.5 * np.sum(penalty * (beta - center) ** 2))

    beta = center.copy()  # (D,)
    loss = loss_of(beta)
    for _ in range(max_iter):
        p = _sigmoid(features @ beta)  # (N,)
        gradient = features.T @ (p - targets) + penalty * (beta - center)  # (D,)
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + np.diag(penalty)  # (D, D)
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]  # (D,)
        scale = 1.0
        while True:
            candidate = beta - scale * step
            candidate_loss = loss_of(candidate)
            if candidate_loss <= loss + 1e-12 or scale < 1e-6:
                break
            scale /= 2
        beta, loss = candidate, candidate_loss
        if np.max(np.abs(scale * step)) < tol:
            return beta, True
    return beta, False


SLOPE_L2 = 0.01
"""Ridge on the length slope only, small enough to be negligible at real sample sizes.

Without it, hard labels that a length threshold separates perfectly send the slope to
infinity and leave the intercept (the reported win rate) wherever the saturated fit stops.
The intercept is not penalized: shrinking it would pull every win rate towards 50%.
"""


def length_controlled_win_rate(win_probs: ArrayLike, length_diffs: ArrayLike, max_iter: int = 100) -> LengthControlledWinRate:
    """Win rate with the length effect regressed out (AlpacaEval 2.0 length control, simplified).

    `win_probs` are P(policy's response beats the reference) per prompt (hard 0/1 or judge
    probabilities); `length_diffs` are len(policy response) - len(reference). The difference
    is normalized as tanh(d / std(d)), AlpacaEval's choice: scale-free, and bounded so one
    enormous answer cannot dominate the fit. It is not centred, because "zero" must keep
    meaning "equally long": the reported win rate is the fitted one at d = 0.
    """
    y = _as_probs(win_probs, "win_probs")
    d = np.asarray(length_diffs, dtype=float).reshape(-1)  # (N,)
    if d.shape != y.shape:
        raise ValueError(f"length_diffs has {d.size} entries but win_probs has {y.size}; pass one per comparison")
    if not np.all(np.isfinite(d)):
        raise ValueError("length_diffs must be finite")
    scale = float(d.std())
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)  # (N,)
    features = np.column_stack([np.ones_like(x), x])  # (N, 2)
    beta, converged = fit_logistic(features, y, l2=[0.0, SLOPE_L2], max_iter=max_iter)
    return LengthControlledWinRate(
        win_rate=float(_sigmoid(beta[0])),
        raw_win_rate=float(y.mean()),
        intercept=float(beta[0]),
        slope=float(beta[1]),
        length_scale=scale,
        n=int(y.size),
        converged=converged,
    )


def plot_reliability_diagram(bins: Sequence[ReliabilityBin], path: str | Path, title: str = "Reliability diagram",
                             xlabel: str = "predicted P(chosen better)") -> Path:
    """Write a reliability diagram (with per-bin Wilson intervals and counts) as a PNG.

    Draws on a bare `matplotlib.figure.Figure`, which renders with Agg, instead of pyplot:
    nothing touches the global backend or pyplot's figure registry, so this is safe to call
    from servers, threads and tests without a display.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    filled = [b for b in bins if b.count]
    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    ax, ax_counts = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    if filled:
        centers = np.array([(b.lower + b.upper) / 2 for b in filled])
        widths = np.array([b.upper - b.lower for b in filled])
        rates = np.array([b.outcome_rate for b in filled])
        intervals = np.array([wilson_interval(b.outcome_rate * b.count, b.count) for b in filled])  # (B, 2)
        errors = np.abs(intervals.T - rates)  # (2, B): distances below and above the rate
        ax.bar(centers, rates, width=widths * 0.9, alpha=0.6, color="tab:blue", label="observed rate")
        ax.errorbar(centers, rates, yerr=errors, fmt="none", ecolor="black", capsize=3, linewidth=1)
        ax.plot([b.mean_prob for b in filled], rates, "o", color="tab:red", markersize=4, label="mean predicted")
        ax_counts.bar(centers, [b.count for b in filled], width=widths * 0.9, color="tab:grey")
        title = f"{title}\nECE {_ece_from_bins(bins):.3f}, n={sum(b.count for b in filled)}"
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="outcome rate")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper left", fontsize="small")
    ax_counts.set(xlabel=xlabel, ylabel="count")
    fig.savefig(path, format="png", dpi=100)
    return path
