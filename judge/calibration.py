"""Judge calibration from human labels: a position-bias offset and temperatures fitted on the judge's
two per-order log-odds (and its label mass), applied to every pairwise judgment it makes afterwards.

Why: a judge's soft label is often miscalibrated in two known ways. It prefers one *slot* (position
bias, Zheng et al. 2023 "MT-Bench" §3.3; Wang et al. 2023 "LLMs are not fair evaluators"), so its two
presentation orders disagree and the pair becomes a TIE; and it is over- or under-confident
(Guo et al. 2017). Both are measured on a few hundred human labels and undone with Platt scaling
(Platt 1999), here in a form that respects the symmetry of pairwise judging.

The model (all log-odds are natural-log odds of "the response shown first is better"):

    z_o  = logit(prob_first of order o)                       o in {ab, ba}, what the judge said
    u_o  = slope * z_o + intercept                            per-order calibrated log-odds
         = slope * (z_o - position_bias)                      position_bias = -intercept / slope
    d    = (z_ab - z_ba) / 2                                  debiased log-odds that A is better
    l    = log(mean label mass) - mass_center
    P(A better) = sigmoid(d * max(0, pair_scale + mass_slope * l))

- Stage 1 fits (slope, intercept) by logistic regression on both orders of every pair (2N rows,
  target: the human label in that order's orientation). The intercept is the slot the judge leans to;
  after it is removed, the two orders agree more often, so fewer verdicts are TIEs
  (`consistent` = both calibrated orders prefer the same response).
- Stage 2 fits (pair_scale, mass_slope) on the N pairs: a temperature for the debiased log-odds, which
  may depend on how much of its probability the judge put on the labels at all (a judge that rarely
  answers with a bare label deserves less trust). The position bias cancels in `d` exactly, so the
  pair model needs no intercept: swapping A and B gives exactly 1 - P.
- Both fits are ridge-regularized towards the uncalibrated judge (slope 1, intercept 0, pair_scale 1,
  mass_slope 0) with strength `l2`, so a handful of labels moves the judge only a little.
- `fit_calibration` reports k-fold cross-validated metrics before/after (accuracy, ECE, log loss,
  consistency, tie rate) and refuses fewer than `MIN_PAIRS` pairs (warning below `FEW_PAIRS`).

A fitted `Calibration` belongs to one engine (its content `engine_id`), rubric (id, version and
fingerprint) and mode; `check` refuses any other. Its `id` is a content hash of all of that plus the
parameters: judgments record it (`PairwiseJudgment.calibration`) and it is part of the cache key.

    calibration = Calibration.load("calib.json")
    judge = PairwiseJudge(engine, "helpfulness", calibration=calibration)

Fitting from the command line: `rlaif calibrate --data HUMAN_FILE --engine SPEC --rubric ID --out calib.json`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlaif.judge.metrics import accuracy, expected_calibration_error, fit_logistic, wilson_interval
from rlaif.judge.types import OrderJudgment, PairwiseJudgment, order_verdict

CALIBRATION_FORMAT = "rlaif-calibration-v1"
MIN_PAIRS = 20
"""Below this many human-labeled pairs `fit_calibration` refuses: the cross-validation folds would hold a
handful of pairs each and the fit could not be told apart from noise."""
FEW_PAIRS = 100
"""Below this many pairs the fit is made but comes with a warning (intervals are wide)."""
_EPS = 1e-12
_MIN_MASS = 1e-6


class CalibrationError(ValueError):
    """A calibration file that is unreadable, or used with another engine, rubric or mode than it was fit on."""


class CalibrationParams(BaseModel):
    """The fitted numbers (see the module docstring for the model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slope: float = Field(1.0, description="Stage 1: per-order log-odds multiplier (1 / temperature of one order).")
    intercept: float = Field(0.0, description="Stage 1: per-order offset; > 0 means the judge over-prefers the first slot.")
    pair_scale: float = Field(1.0, description="Stage 2: multiplier of the debiased log-odds d (1 / temperature of the pair).")
    mass_slope: float = Field(0.0, description="Stage 2: change of pair_scale per unit of log label mass above mass_center.")
    mass_center: float = Field(0.0, description="Mean log label mass of the pairs the calibration was fit on.")

    @property
    def position_bias(self) -> float:
        """The judge's lean to the first slot, in its own log-odds units (-intercept / slope)."""
        return -self.intercept / self.slope if abs(self.slope) > 1e-9 else float("nan")

    @property
    def temperature(self) -> float:
        """Per-order temperature (1 / slope): > 1 means the judge was over-confident."""
        return 1.0 / self.slope if abs(self.slope) > 1e-9 else float("inf")


class CalibrationMetrics(BaseModel):
    """Agreement of one set of pairwise verdicts with human labels."""

    n: int
    accuracy: float = Field(description="P(A better) on the human-preferred side counts 1, exactly 0.5 counts 0.5.")
    accuracy_ci95: tuple[float, float]
    ece: float = Field(description="Expected calibration error of P(A better), 10 bins.")
    log_loss: float = Field(description="Mean cross-entropy of P(A better) against the human label.")
    position_consistency: float = Field(description="Share of pairs whose two orders prefer the same response.")
    tie_rate: float = Field(description="Share of TIE verdicts (orders disagree, or |P - 0.5| < tie margin).")
    decisive_accuracy: float | None = Field(None, description="Accuracy over the non-TIE verdicts only (None when all tie).")


class CalibrationFit(BaseModel):
    """How the calibration was fit and what it did on data it had not seen."""

    n_pairs: int
    l2: float
    folds: int
    seed: int
    tie_margin: float
    cv_before: CalibrationMetrics | None = Field(None, description="k-fold cross-validation: the uncalibrated judge.")
    cv_after: CalibrationMetrics | None = Field(None, description="k-fold cross-validation: calibrated on the other folds.")
    holdout_before: CalibrationMetrics | None = Field(None, description="Pairs held out of the fit (--holdout): uncalibrated.")
    holdout_after: CalibrationMetrics | None = Field(None, description="Pairs held out of the fit (--holdout): calibrated.")
    warnings: list[str] = Field(default_factory=list)


class Calibration(BaseModel):
    """A calibration file: the parameters plus what they apply to. Written by `rlaif calibrate`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["rlaif-calibration-v1"] = "rlaif-calibration-v1"
    engine: str = Field(description="`engine_id` of the judge it was fit on (a content fingerprint).")
    model: str = Field("", description="The judge's model name, for people.")
    rubric_id: str
    rubric_version: str
    rubric_fingerprint: str
    mode: Literal["logprob", "cot"] = "logprob"
    params: CalibrationParams
    fit: CalibrationFit | None = None
    data: str | None = Field(None, description="The human-labeled file it was fit on.")
    fitted_on: list[str] = Field(default_factory=list, description=(
        "`example_hash` of every pair used in the fit, so `rlaif eval` can report on the others (held out)."))
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    # ------------------------------------------------------------------ identity and files
    @property
    def id(self) -> str:
        """Content id: rubric + engine + mode + parameters. Part of judgment cache keys."""
        payload = json.dumps({"engine": self.engine, "rubric": [self.rubric_id, self.rubric_version, self.rubric_fingerprint],
                              "mode": self.mode, "params": self.params.model_dump()}, sort_keys=True)
        return f"calib-{self.rubric_id}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: no such calibration file (write one with `rlaif calibrate ... --out {path}`)")
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()[:5])
            raise CalibrationError(f"{path}: not a valid {CALIBRATION_FORMAT} file ({problems})") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    def check(self, *, engine_id: str, rubric_id: str, rubric_version: str, rubric_fingerprint: str, mode: str) -> None:
        """Refuse to calibrate a judge this file was not fit on (another model, rubric text or mode)."""
        problems = []
        if rubric_id != self.rubric_id:
            problems.append(f"rubric {rubric_id!r} (fit on {self.rubric_id!r})")
        elif (rubric_version, rubric_fingerprint) != (self.rubric_version, self.rubric_fingerprint):
            problems.append(f"rubric {rubric_id!r} has changed since the fit (version {rubric_version} vs "
                            f"{self.rubric_version}, content {rubric_fingerprint[:12]} vs {self.rubric_fingerprint[:12]})")
        if engine_id != self.engine:
            problems.append(f"engine {engine_id} (fit on {self.engine})")
        if mode != self.mode:
            problems.append(f"mode {mode!r} (fit on {self.mode!r})")
        if problems:
            raise CalibrationError(f"calibration {self.id} does not apply to this judge: " + "; ".join(problems)
                                   + ". Fit one for it with `rlaif calibrate`.")

    # ------------------------------------------------------------------ applying
    def apply(self, judgment: PairwiseJudgment, tie_margin: float) -> PairwiseJudgment:
        """The calibrated version of an uncalibrated judgment (raw numbers kept in `raw_*` fields)."""
        if judgment.calibration is not None:
            raise CalibrationError(f"judgment is already calibrated with {judgment.calibration}")
        features = _features([judgment])
        order_logits, prob_a = _predict(self.params, features)  # (1, 2), (1,)
        u_ab, u_ba = float(order_logits[0, 0]), float(order_logits[0, 1])
        p = float(prob_a[0])
        return verdict(judgment, p, _sigmoid_scalar(u_ab), _sigmoid_scalar(u_ba), tie_margin,
                       calibration=self.id)


def verdict(raw: PairwiseJudgment, prob_a: float, prob_first_ab: float, prob_first_ba: float, tie_margin: float,
            *, calibration: str) -> PairwiseJudgment:
    """`raw` with new probabilities: consistency, TIE rule and margin recomputed as the judge does."""
    prob_a_ab, prob_a_ba = prob_first_ab, 1.0 - prob_first_ba
    consistent, preference = order_verdict(prob_a_ab, prob_a_ba, prob_a, tie_margin)
    raw_ab, raw_ba = raw.per_order
    per_order = [
        OrderJudgment(order="ab", prob_first=prob_first_ab, prob_a=prob_a_ab, label_mass=raw_ab.label_mass,
                      rationale=raw_ab.rationale, raw_prob_first=raw_ab.prob_first),
        OrderJudgment(order="ba", prob_first=prob_first_ba, prob_a=prob_a_ba, label_mass=raw_ba.label_mass,
                      rationale=raw_ba.rationale, raw_prob_first=raw_ba.prob_first)]
    return raw.model_copy(update={"prob_a": prob_a, "preference": preference, "consistent": consistent,
                                  "margin": abs(prob_a - 0.5) * 2.0, "per_order": per_order,
                                  "calibration": calibration, "raw_prob_a": raw.prob_a,
                                  "raw_consistent": raw.consistent})


# ---------------------------------------------------------------------------------- math
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # no overflow for large |z|


def _sigmoid_scalar(z: float) -> float:
    return float(_sigmoid(np.array([z]))[0])


def _features(judgments: Sequence[PairwiseJudgment]) -> np.ndarray:
    """(N, 3): z_ab, z_ba (uncalibrated log-odds of "first better" per order) and log mean label mass."""
    rows = []
    for j in judgments:
        ab, ba = j.per_order
        first_ab = ab.raw_prob_first if ab.raw_prob_first is not None else ab.prob_first
        first_ba = ba.raw_prob_first if ba.raw_prob_first is not None else ba.prob_first
        rows.append((first_ab, first_ba, max(j.label_mass, _MIN_MASS)))
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return np.column_stack([_logit(table[:, 0]), _logit(table[:, 1]), np.log(table[:, 2])])


def _predict(params: CalibrationParams, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated per-order log-odds (N, 2) of "first better" and P(A better) (N,)."""
    z = features[:, :2]  # (N, 2)
    order_logits = params.slope * z + params.intercept  # (N, 2)
    d = (features[:, 0] - features[:, 1]) / 2.0  # (N,)
    scale = np.maximum(0.0, params.pair_scale + params.mass_slope * (features[:, 2] - params.mass_center))  # (N,)
    return order_logits, _sigmoid(d * scale)


def fit_ridge_logistic(features: np.ndarray, targets: np.ndarray, prior: np.ndarray, l2: float,
                       max_iter: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, bool]:
    """Logistic regression (Newton / IRLS with step halving) with the penalty 0.5 * l2 * ||beta - prior||^2.

    `features` (N, D) hold every column (no implicit intercept); `targets` are in [0, 1] (soft labels,
    e.g. 0.5 for a human tie, are fitted by cross-entropy). Returns (coefficients, converged)."""
    return fit_logistic(features, targets, l2=l2, max_iter=max_iter, tol=tol, prior=prior)


def fit_params(features: np.ndarray, outcome_a: np.ndarray, *, l2: float = 1.0) -> CalibrationParams:
    """Fit both stages on (N, 3) features and human outcomes (1: A better, 0: B better, 0.5: tie)."""
    y = np.asarray(outcome_a, dtype=np.float64)  # (N,)
    # Stage 1: every order is one row; its target is "the response shown first is better".
    z = np.concatenate([features[:, 0], features[:, 1]])  # (2N,)
    t = np.concatenate([y, 1.0 - y])  # (2N,)
    stage1, _ = fit_ridge_logistic(np.column_stack([z, np.ones_like(z)]), t, prior=np.array([1.0, 0.0]), l2=l2)
    # Stage 2: the pair's debiased log-odds, with a label-mass-dependent temperature.
    center = float(features[:, 2].mean())
    d = (features[:, 0] - features[:, 1]) / 2.0  # (N,)
    mass = features[:, 2] - center  # (N,)
    stage2, _ = fit_ridge_logistic(np.column_stack([d, d * mass]), y, prior=np.array([1.0, 0.0]), l2=l2)
    return CalibrationParams(slope=float(stage1[0]), intercept=float(stage1[1]), pair_scale=float(stage2[0]),
                             mass_slope=float(stage2[1]), mass_center=center)


def score_verdicts(prob_a: np.ndarray, consistent: np.ndarray, outcome_a: np.ndarray,
                   tie_margin: float) -> CalibrationMetrics:
    """Metrics of verdicts (P(A better), consistency) against human outcomes (0/1; 0.5 ties are skipped)."""
    prob_a, consistent, y = (np.asarray(a, dtype=np.float64) for a in (prob_a, consistent, outcome_a))
    keep = y != 0.5
    prob_a, consistent, y = prob_a[keep], consistent[keep].astype(bool), y[keep]
    n = int(y.size)
    if n == 0:
        raise ValueError("no decisive human labels to score against (all ties)")
    acc = accuracy(prob_a, y)
    low, high = wilson_interval(acc * n, n)
    clipped = np.clip(prob_a, 1e-6, 1 - 1e-6)
    tie = ~consistent | (np.abs(prob_a - 0.5) < tie_margin)
    decisive = ~tie
    return CalibrationMetrics(
        n=n, accuracy=acc, accuracy_ci95=(low, high), ece=expected_calibration_error(prob_a, y),
        log_loss=float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))),
        position_consistency=float(consistent.mean()), tie_rate=float(tie.mean()),
        decisive_accuracy=accuracy(prob_a[decisive], y[decisive]) if decisive.any() else None)


def raw_verdicts(judgments: Sequence[PairwiseJudgment]) -> tuple[np.ndarray, np.ndarray]:
    """P(A better) and consistency of judgments as the uncalibrated judge gave them."""
    prob = np.array([j.raw_prob_a if j.raw_prob_a is not None else j.prob_a for j in judgments])
    consistent = np.array([j.raw_consistent if j.raw_consistent is not None else j.consistent for j in judgments])
    return prob, consistent


def calibrated_verdicts(params: CalibrationParams, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order_logits, prob_a = _predict(params, features)
    consistent = (order_logits[:, 0] > 0) == (order_logits[:, 1] < 0)  # both orders prefer the same response
    return prob_a, consistent


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    ids = np.empty(n, dtype=int)
    ids[order] = np.arange(n) % folds
    return ids


def cross_validate(features: np.ndarray, outcome_a: np.ndarray, raw_prob: np.ndarray, raw_consistent: np.ndarray, *,
                   l2: float, folds: int, seed: int, tie_margin: float) -> tuple[CalibrationMetrics, CalibrationMetrics]:
    """k-fold CV (folds by pair): metrics of the uncalibrated judge and of calibrations fit on the other folds."""
    n = len(outcome_a)
    ids = _fold_ids(n, folds, seed)
    prob = np.zeros(n)
    consistent = np.zeros(n, dtype=bool)
    for fold in range(folds):
        test = ids == fold
        params = fit_params(features[~test], outcome_a[~test], l2=l2)
        prob[test], consistent[test] = calibrated_verdicts(params, features[test])
    return (score_verdicts(raw_prob, raw_consistent, outcome_a, tie_margin),
            score_verdicts(prob, consistent, outcome_a, tie_margin))


def example_hash(prompt: str, chosen: str, rejected: str) -> str:
    """Stable id of a human-labeled pair, independent of file, row and presentation order."""
    return hashlib.sha256(json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode()).hexdigest()[:16]


def fit_calibration(judgments: Sequence[PairwiseJudgment], outcome_a: Sequence[float], *, rubric_fingerprint: str,
                    l2: float = 1.0, folds: int = 5, seed: int = 0, tie_margin: float = 0.05,
                    fitted_on: Sequence[str] = (), data: str | None = None,
                    holdout: tuple[Sequence[PairwiseJudgment], Sequence[float]] | None = None) -> Calibration:
    """Fit a calibration on uncalibrated judgments and human outcomes (1: response_a better, 0: B, 0.5: tie).

    Raises ValueError below `MIN_PAIRS` decisive labels; warns (in `fit.warnings`) below `FEW_PAIRS` and
    when the calibrated judge does not beat the uncalibrated one in cross-validation (log loss) or on the
    held-out pairs."""
    if not judgments:
        raise ValueError("no judgments to calibrate")
    if any(j.calibration is not None for j in judgments):
        raise ValueError("fit on uncalibrated judgments (these already carry a calibration)")
    if l2 < 0 or not math.isfinite(l2):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    y = np.asarray(outcome_a, dtype=np.float64)
    if y.shape != (len(judgments),) or not np.all(np.isin(y, (0.0, 0.5, 1.0))):
        raise ValueError("outcome_a needs one value per judgment, each 1 (A better), 0 (B better) or 0.5 (tie)")
    decisive = int(np.sum(y != 0.5))
    if decisive < MIN_PAIRS:
        raise ValueError(f"{decisive} decisive human labels: a calibration needs at least {MIN_PAIRS} (better "
                         f"{FEW_PAIRS}+) to mean anything; label {MIN_PAIRS - decisive} more pairs")
    first = judgments[0]
    if any((j.engine, j.rubric_id, j.mode) != (first.engine, first.rubric_id, first.mode) for j in judgments):
        raise ValueError("all judgments must come from one engine, rubric and mode")
    features = _features(judgments)
    params = fit_params(features, y, l2=l2)
    warnings = []
    if decisive < FEW_PAIRS:
        warnings.append(f"only {decisive} decisive human labels (< {FEW_PAIRS}): the fit is rough and its "
                        "cross-validated numbers have wide intervals")
    folds = max(2, min(folds, decisive // 4))
    raw_prob, raw_consistent = raw_verdicts(judgments)
    cv_before, cv_after = cross_validate(features, y, raw_prob, raw_consistent, l2=l2, folds=folds, seed=seed,
                                         tie_margin=tie_margin)
    if cv_after.log_loss >= cv_before.log_loss:
        warnings.append(f"calibration does not help in {folds}-fold cross-validation: log loss "
                        f"{cv_after.log_loss:.3f} vs {cv_before.log_loss:.3f} uncalibrated")
    holdout_before = holdout_after = None
    if holdout is not None and len(holdout[0]):
        h_features = _features(holdout[0])
        h_y = np.asarray(holdout[1], dtype=np.float64)
        h_prob, h_consistent = raw_verdicts(holdout[0])
        holdout_before = score_verdicts(h_prob, h_consistent, h_y, tie_margin)
        holdout_after = score_verdicts(*calibrated_verdicts(params, h_features), h_y, tie_margin)
        warnings.extend(help_warnings(holdout_before, holdout_after, where="on the held-out pairs"))
    fit = CalibrationFit(n_pairs=len(judgments), l2=l2, folds=folds, seed=seed, tie_margin=tie_margin,
                         cv_before=cv_before, cv_after=cv_after, holdout_before=holdout_before,
                         holdout_after=holdout_after, warnings=warnings)
    return Calibration(engine=first.engine, model=first.model, rubric_id=first.rubric_id,
                       rubric_version=first.rubric_version, rubric_fingerprint=rubric_fingerprint, mode=first.mode,
                       params=params, fit=fit, data=data, fitted_on=list(fitted_on))


def help_warnings(before: CalibrationMetrics, after: CalibrationMetrics, *, where: str) -> list[str]:
    """Plain-language warnings when a calibration made things worse (or no better) on some data."""
    warnings = []
    if after.ece >= before.ece and after.log_loss >= before.log_loss:
        warnings.append(f"calibration does not help {where}: ECE {after.ece:.3f} vs {before.ece:.3f} and log loss "
                        f"{after.log_loss:.3f} vs {before.log_loss:.3f} uncalibrated (n={after.n})")
    if after.accuracy < before.accuracy - 1e-9:
        warnings.append(f"calibration lowers accuracy {where}: {after.accuracy:.1%} vs {before.accuracy:.1%} "
                        f"uncalibrated (n={after.n})")
    return warnings


def load_calibrations(paths: Sequence[str | Path]) -> dict[str, Calibration]:
    """rubric id -> calibration, from several files (one per rubric); two files for one rubric are refused."""
    found: dict[str, Calibration] = {}
    sources: dict[str, str] = {}
    for path in paths:
        calibration = Calibration.load(path)
        if calibration.rubric_id in found:
            raise CalibrationError(f"{path} and {sources[calibration.rubric_id]} both calibrate rubric "
                                   f"{calibration.rubric_id!r}; give one calibration per rubric")
        found[calibration.rubric_id] = calibration
        sources[calibration.rubric_id] = str(path)
    return found




class CalibrationReport(BaseModel):
    """What `rlaif eval --calibration` adds to its report: before/after on the pairs the fit never saw."""

    id: str
    held_out: int = Field(description="Pairs of this file not used to fit the calibration.")
    in_sample: int = Field(description="Pairs of this file that the calibration was fit on (not scored below).")
    before: CalibrationMetrics | None = Field(None, description="The uncalibrated judge on the held-out pairs.")
    after: CalibrationMetrics | None = Field(None, description="The calibrated judge on the held-out pairs.")
    warnings: list[str] = Field(default_factory=list)


def held_out_report(calibration: Calibration, judgments: Sequence[PairwiseJudgment], outcome_a: Sequence[float],
                    hashes: Sequence[str], tie_margin: float) -> CalibrationReport:
    """Before/after metrics of calibrated `judgments` on the pairs whose `example_hash` the fit did not use."""
    fitted = set(calibration.fitted_on)
    held = [i for i, h in enumerate(hashes) if h not in fitted]
    report = CalibrationReport(id=calibration.id, held_out=len(held), in_sample=len(hashes) - len(held))
    if not held:
        return report.model_copy(update={"warnings": [
            f"every pair of this file was used to fit calibration {calibration.id}: there is no held-out pair to "
            "measure it on; evaluate on other data, or fit with `rlaif calibrate --holdout 0.5`"]})
    chosen = [judgments[i] for i in held]
    y = np.asarray([outcome_a[i] for i in held], dtype=np.float64)
    before = score_verdicts(*raw_verdicts(chosen), y, tie_margin)
    after = score_verdicts(np.array([j.prob_a for j in chosen]), np.array([j.consistent for j in chosen]), y, tie_margin)
    return report.model_copy(update={"before": before, "after": after,
                                     "warnings": help_warnings(before, after, where=f"on {len(held)} held-out pairs")})


__all__ = ["CALIBRATION_FORMAT", "Calibration", "CalibrationError", "CalibrationFit", "CalibrationMetrics",
           "CalibrationParams", "CalibrationReport", "FEW_PAIRS", "MIN_PAIRS", "example_hash", "fit_calibration",
           "fit_params", "held_out_report", "help_warnings", "load_calibrations", "score_verdicts", "verdict"]
