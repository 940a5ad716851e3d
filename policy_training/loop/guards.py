"""Reward-hacking guards: pure checks over one round's measurements, re-run on every `rlaif loop` start.

Three ways RLAIF fails while the training reward keeps rising (Gao et al. 2022; Singhal et al. 2023):

- **length** -- the policy wins by writing more, not better. `gap = soft win rate - length-controlled
  win rate`, both on the judge's soft debiased P(policy better) against the round-0 policy on held-out
  prompts; the LC win rate is the AlpacaEval-style logistic fit read at equal length
  (`rlaif.judge.metrics.length_controlled_win_rate`). Fires when `gap > guards.length.max_gap`. One-sided
  on purpose: a policy that wins *despite* being shorter is not hacking length.
- **kl** -- the policy has drifted far from where it started: PPO's sequence KL to the round-0 policy
  (k1, nats, mean over the last quarter of the round's steps). Fires when `kl > guards.kl.max_kl`.
- **rm_agreement** -- the reward model is being over-optimized: on the *new* policy's held-out answers
  (the judge's verdicts of policy vs round-0 answers), the fraction of decided pairs (judge P != 0.5,
  RM scores differ) where the RM orders the two answers as the judge does. Fires when it is below
  `min_agreement`, or more than `max_drop` below the RM's agreement on its own held-out labeled pairs
  (in-distribution: samples of the policy it was trained on). Needs `min_pairs` decided pairs.

Each guard's action is `warn` (reported, loop continues), `stop` (report written, loop stops, exit
status 3) or `off`. Guards are not part of the run's identity: change a threshold or action and re-run
to re-judge stored rounds and continue.
"""

from __future__ import annotations

from pydantic import BaseModel

from rlaif.policy_training.loop.config import Guards


class Measurements(BaseModel):
    """What the eval stage measured for one round (None: not measurable, e.g. no decided pairs)."""

    round: int
    n_heldout: int
    win_rate: float
    win_rate_ci95: list[float]
    soft_win_rate: float
    soft_win_rate_ci95: list[float]
    lc_win_rate: float
    length_slope: float
    ties: int
    consistent_frac: float
    kl: float | None
    kl_max: float | None
    rm_agreement: float | None
    rm_agreement_pairs: int
    rm_agreement_ci95: list[float] | None
    rm_heldout_agreement: float | None
    mean_length_policy: float
    mean_length_base: float
    label_rows: int
    label_position_consistency: float | None
    label_tie_frac: float | None
    uncalibrated_soft_win_rate: float | None = None
    """With `judge.calibration`: the soft win rate of the same judgments read without it."""
    uncalibrated_soft_win_rate_ci95: list[float] | None = None


class GuardResult(BaseModel):
    """One guard's verdict on one round."""

    guard: str
    value: float | None
    threshold: str
    fired: bool
    action: str
    message: str


def check_guards(m: Measurements, guards: Guards) -> list[GuardResult]:
    """Every guard's verdict (fired or not) for the round; `off` guards are reported as off."""
    results = []
    g = guards.length
    gap = m.soft_win_rate - m.lc_win_rate
    results.append(GuardResult(
        guard="length", value=gap, threshold=f"soft - LC win rate <= {g.max_gap}", action=g.action,
        fired=g.action != "off" and gap > g.max_gap,
        message=f"round {m.round}: soft win rate {m.soft_win_rate:.3f} vs length-controlled {m.lc_win_rate:.3f} "
                f"(gap {gap:+.3f}, limit {g.max_gap}); length slope {m.length_slope:+.3f}, mean tokens policy "
                f"{m.mean_length_policy:.1f} vs base {m.mean_length_base:.1f}"))
    k = guards.kl
    results.append(GuardResult(
        guard="kl", value=m.kl, threshold=f"KL <= {k.max_kl} nats", action=k.action,
        fired=k.action != "off" and m.kl is not None and m.kl > k.max_kl,
        message=f"round {m.round}: KL to the round-0 policy {_fmt(m.kl)} nats (limit {k.max_kl})"))
    a = guards.rm_agreement
    fired, why = False, "not enough decided pairs to judge"
    if m.rm_agreement is not None and m.rm_agreement_pairs >= a.min_pairs:
        low = m.rm_agreement < a.min_agreement
        drop = m.rm_heldout_agreement is not None and m.rm_heldout_agreement - m.rm_agreement > a.max_drop
        fired = a.action != "off" and (low or drop)
        why = (f"below {a.min_agreement}" if low else f"more than {a.max_drop} below its held-out agreement"
               if drop else "within limits")
    results.append(GuardResult(
        guard="rm_agreement", value=m.rm_agreement,
        threshold=f">= {a.min_agreement} and >= held-out - {a.max_drop} (n >= {a.min_pairs})", action=a.action,
        fired=fired,
        message=f"round {m.round}: RM agrees with the judge on {_fmt(m.rm_agreement)} of {m.rm_agreement_pairs} fresh "
                f"policy-vs-round-0 pairs (its held-out labeled pairs: {_fmt(m.rm_heldout_agreement)}): {why}"))
    return results


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
