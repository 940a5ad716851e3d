"""Pairwise (position-debiased) and direct-score judges.

`PairwiseJudge` follows RLAIF (Lee et al. 2023, §2.1) and Constitutional AI (Bai et al. 2022, §4):
- the soft label is P(first response better), read from the label log-probs, never parsed text;
- every pair is judged in **both orders** and the two P(response_a better) are averaged, which
  cancels position bias; the per-order numbers and a `consistent` flag are kept so position
  bias stays visible; a TIE is declared when the orders disagree or the average is within
  `tie_margin` of 0.5 (MT-Bench's rule, softened by the margin);
- CoT mode is two-step: decode a rationale, then read the label distribution after it;
  optional self-consistency averages several sampled rationales;
- constitution rubrics judge each pair under k principles sampled per item with a seed (or all)
  and average;
- optional clamping of per-order probabilities (CAI clamped CoT labels to 40-60%).

`ScoreJudge` is d-RLAIF: the distribution over score labels gives an expected score, rescaled
to [0, 1].

Both judges take many items and make one engine call for all of them (both orders, every
principle), so engines can share the rubric prefix across the whole batch; a
`JudgmentCache` lets repeated items skip the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Generic, Literal, TypeVar

import numpy as np

from rlaif.judge.cache import JudgmentCache, cache_key
from rlaif.judge.calibration import Calibration
from rlaif.judge.engines.base import LABEL_SEMANTICS, Engine, GenerationParams, label_distribution
from rlaif.judge.rubric import Rubric, RubricError, load_rubric
from rlaif.judge.types import (ChatPrompt, OrderJudgment, PairwiseItem, PairwiseJudgment, ScoreItem,
                         ScoreJudgment, Timings, order_verdict)

Mode = Literal["logprob", "cot"]
ItemT = TypeVar("ItemT", PairwiseItem, ScoreItem)
ResultT = TypeVar("ResultT", PairwiseJudgment, ScoreJudgment)
AnyItem = TypeVar("AnyItem")
AnyResult = TypeVar("AnyResult")


def check_judge_setup(kind: Literal["pairwise", "score", "checklist"], rubric: Rubric | str, mode: str, *,
                      cot_samples: int | None = None) -> Rubric:
    """The rubric, loaded and checked for a judge of `kind` in `mode`; needs no engine, so commands call it
    before they load a model (a score rubric given to a pairwise command fails at once)."""
    loaded = rubric if isinstance(rubric, Rubric) else load_rubric(rubric)
    if loaded.kind != kind:
        raise RubricError(f"{loaded.source}: rubric '{loaded.id}' is a {loaded.kind} rubric, but this needs a {kind} "
                          f"rubric (the {loaded.kind} commands take {loaded.kind} rubrics; `rlaif judge rubrics` lists them)")
    if mode not in ("logprob", "cot"):
        raise ValueError(f"mode must be 'logprob' or 'cot', got {mode!r}")
    if mode == "cot" and loaded.cot is None:
        raise RubricError(f"{loaded.source}: rubric '{loaded.id}' has no 'cot' section, so mode=cot is unavailable")
    samples = cot_samples or (loaded.cot.samples if loaded.cot else 1)
    if mode == "cot" and samples > 1 and loaded.cot.temperature == 0:  # type: ignore[union-attr]
        raise ValueError("self-consistency (cot samples > 1) needs cot.temperature > 0 in the rubric")
    return loaded


def judge_through_cache(items: Sequence[AnyItem], keys: Sequence[str], cache: JudgmentCache | None, kind: str,
                        result_type: type, compute: Callable[[Sequence[AnyItem], Timings], list[AnyResult]],
                        started: float) -> list[AnyResult]:
    """Cached results for `keys` (marked `cached`), `compute(uncached items, timings)` for the rest, stored back.

    Every judge (pairwise, score, checklist, group) goes through here, so a cache hit means the same thing for
    all of them; output order matches input order, and the fresh results share one `Timings` of this call."""
    cached = cache.get_many(keys) if cache is not None else {}
    results: list[AnyResult | None] = [
        result_type.model_validate_json(cached[key]).model_copy(update={"cached": True}) if key in cached else None
        for key in keys]
    todo = [i for i, key in enumerate(keys) if key not in cached]
    if todo:
        timings = Timings(batch_size=len(todo))
        fresh = compute([items[i] for i in todo], timings)
        timings.total_seconds = time.perf_counter() - started
        for i, result in zip(todo, fresh):
            result.timings = timings  # type: ignore[attr-defined]
            results[i] = result
        if cache is not None:
            cache.put_many(kind, {keys[i]: results[i].model_dump_json() for i in todo})  # type: ignore[attr-defined]
    return results  # type: ignore[return-value]


class _BatchJudge(Generic[ItemT, ResultT]):
    """Shared plumbing: rubric/mode checks, cache lookups, timings."""

    kind: Literal["pairwise", "score", "checklist"]
    result_type: type

    def __init__(self, engine: Engine, rubric: Rubric | str, *, mode: Mode = "logprob",
                 cache: JudgmentCache | None = None, seed: int = 0, cot_samples: int | None = None) -> None:
        self.engine = engine
        self.rubric = check_judge_setup(self.kind, rubric, mode, cot_samples=cot_samples)
        self.mode: Mode = mode
        self.cache = cache
        self.seed = seed
        self.cot_samples = cot_samples or (self.rubric.cot.samples if self.rubric.cot else 1)

    # -- to be provided by subclasses
    def _judge_uncached(self, items: Sequence[ItemT], timings: Timings) -> list[ResultT]:
        raise NotImplementedError

    def _key_payload(self) -> dict[str, object]:
        return {"engine": self.engine.engine_id, "labels": LABEL_SEMANTICS, "rubric": self.rubric.id,
                "version": self.rubric.version,
                "fingerprint": self.rubric.fingerprint, "mode": self.mode, "seed": self.seed,
                "cot_samples": self.cot_samples if self.mode == "cot" else None}

    def item_key(self, item: ItemT) -> str:
        # exclude_none: an item without the optional fields added later (reference) keeps its old key.
        return cache_key({**self._key_payload(), "item": item.model_dump(exclude_none=True)})

    def check_items(self, items: Sequence[ItemT]) -> None:
        """Refuse items the rubric would misjudge (a reference it never shows, none where it needs one)."""
        for item in items:
            self.rubric.check_item_fields(reference=item.reference)

    def judge(self, items: Sequence[ItemT]) -> list[ResultT]:
        """Judge many items; cached ones skip the engine. Output order matches input order."""
        start = time.perf_counter()
        if not items:
            return []
        self.check_items(items)
        keys = [self.item_key(item) for item in items]
        return judge_through_cache(items, keys, self.cache, self.kind, self.result_type, self._judge_uncached, start)

    # -- engine helpers shared by both judges
    def _render_kwargs(self) -> dict[str, object]:
        """Extra rubric-render arguments: the engine's special tokens are defused in user text."""
        return {"special_tokens": tuple(getattr(self.engine, "special_tokens", ()) or ())}

    def _label_distributions(self, prompts: list[ChatPrompt],
                             timings: Timings) -> tuple[np.ndarray, np.ndarray, list[list[str]] | None]:
        """Per prompt: label distribution (N, L), label mass (N,), and the rationales in CoT mode."""
        rationales = self._rationales(prompts, timings) if self.mode == "cot" else None
        started = time.perf_counter()
        if rationales is None:
            dist = label_distribution(self.engine.label_logprobs(prompts, self.rubric.labels))
            probs, mass = dist.probs, dist.mass
        else:
            follow_ups = [self.rubric.render_cot_label(p, r) for p, samples in zip(prompts, rationales) for r in samples]
            dist = label_distribution(self.engine.label_logprobs(follow_ups, self.rubric.labels))
            probs = dist.probs.reshape(len(prompts), self.cot_samples, -1).mean(axis=1)  # self-consistency average
            mass = dist.mass.reshape(len(prompts), self.cot_samples).mean(axis=1)
        timings.engine_seconds += time.perf_counter() - started
        return probs, mass, rationales

    def _prompts_for(self, items: Sequence[ItemT]) -> list[ChatPrompt]:
        raise NotImplementedError

    def item_token_counts(self, items: Sequence[ItemT]) -> list[int]:
        """Most tokens any engine sequence of each item needs: its longest rendered prompt (every order and
        principle) plus what the judge adds after it (the CoT rationale and label request, or the label).

        This is what a token budget must check *before* judging (the service's 413s)."""
        if not items:
            return []
        self.check_items(items)
        prompts = self._prompts_for(items)
        counts = self.engine.prompt_token_counts(prompts)
        per_item = len(prompts) // len(items)
        extra = max(len(label) for label in self.rubric.labels) + 2  # label tokens + the token that ends it
        if self.mode == "cot":
            assert self.rubric.cot is not None
            extra += self.rubric.cot.max_new_tokens + 64  # rationale + the label request turn
        # `_prompts_for` is item-major: item i owns prompts [i * per_item, (i + 1) * per_item).
        return [max(counts[i * per_item:(i + 1) * per_item]) + extra for i in range(len(items))]

    def _rationales(self, prompts: list[ChatPrompt], timings: Timings) -> list[list[str]]:
        assert self.rubric.cot is not None
        cot = self.rubric.cot
        params = GenerationParams(max_new_tokens=cot.max_new_tokens, temperature=cot.temperature,
                                  n=self.cot_samples, seed=self.seed)
        started = time.perf_counter()
        rationales = self.engine.generate(prompts, params)
        timings.engine_seconds += time.perf_counter() - started
        return rationales

    def _common_fields(self) -> dict[str, object]:
        return {"rubric_id": self.rubric.id, "rubric_version": self.rubric.version, "engine": self.engine.engine_id,
                "model": self.engine.model_name, "mode": self.mode}


class PairwiseJudge(_BatchJudge[PairwiseItem, PairwiseJudgment]):
    """Soft, position-debiased pairwise preferences. See the module docstring."""

    kind = "pairwise"
    result_type = PairwiseJudgment

    def __init__(self, engine: Engine, rubric: Rubric | str = "helpfulness", *, mode: Mode = "logprob",
                 tie_margin: float = 0.05, clamp: tuple[float, float] | None = None,
                 cache: JudgmentCache | None = None, seed: int = 0, cot_samples: int | None = None,
                 calibration: Calibration | None = None) -> None:
        super().__init__(engine, rubric, mode=mode, cache=cache, seed=seed, cot_samples=cot_samples)
        if not 0.0 <= tie_margin < 0.5:
            raise ValueError("tie_margin must be in [0, 0.5)")
        self.tie_margin = tie_margin
        self.clamp = clamp if clamp is not None else self.rubric.clamp
        if calibration is not None:  # fit on this engine, rubric text and mode, or refused (rlaif.judge.calibration)
            calibration.check(engine_id=engine.engine_id, rubric_id=self.rubric.id, rubric_version=self.rubric.version,
                              rubric_fingerprint=self.rubric.fingerprint, mode=mode)
            # Raw verdicts come from an uncalibrated twin, so they (and their cache entries) are shared with
            # uncalibrated judging and with other calibrations; calibrated verdicts are cached under their own key.
            self._uncalibrated = PairwiseJudge(engine, self.rubric, mode=mode, tie_margin=tie_margin, clamp=self.clamp,
                                               cache=cache, seed=seed, cot_samples=cot_samples)
        self.calibration = calibration

    def _key_payload(self) -> dict[str, object]:
        payload = {**super()._key_payload(), "tie_margin": self.tie_margin, "clamp": self.clamp}
        if self.calibration is not None:  # only when set, so uncalibrated keys stay what they were
            payload["calibration"] = self.calibration.id
        return payload

    def _layout(self, items: Sequence[PairwiseItem]) -> tuple[list[ChatPrompt], list[tuple[int, int]], list[list[str | None]]]:
        """Every engine prompt of a batch: item-major, then order (ab, ba), then principle.

        Returns the prompts, each prompt's (item index, order: 0 = ab, 1 = ba) and the
        principles used per item."""
        principles = [self.rubric.select_principles(self.item_key(item), self.seed) for item in items]
        prompts: list[ChatPrompt] = []
        owners: list[tuple[int, int]] = []
        render = self.rubric.render_cot if self.mode == "cot" else self.rubric.render
        extra = self._render_kwargs()
        for i, item in enumerate(items):
            for order in (0, 1):
                first, second = (item.response_a, item.response_b) if order == 0 else (item.response_b, item.response_a)
                for principle in principles[i]:
                    prompts.append(render(prompt=item.prompt, response_a=first, response_b=second, principle=principle,
                                          reference=item.reference, **extra))
                    owners.append((i, order))
        return prompts, owners, principles

    def _prompts_for(self, items: Sequence[PairwiseItem]) -> list[ChatPrompt]:
        return self._layout(items)[0]

    def _judge_uncached(self, items: Sequence[PairwiseItem], timings: Timings) -> list[PairwiseJudgment]:
        if self.calibration is not None:
            raw = self._uncalibrated.judge(items)
            return [self.calibration.apply(j.model_copy(update={"cached": False}), self.tie_margin) for j in raw]
        prompts, owners, principles = self._layout(items)
        probs, mass, rationales = self._label_distributions(prompts, timings)  # (P, 2), (P,)
        prob_first = np.zeros((len(items), 2))
        mass_sum = np.zeros((len(items), 2))
        counts = np.zeros((len(items), 2))
        first_rationale: dict[tuple[int, int], str] = {}
        for row, (i, order) in enumerate(owners):
            p = float(probs[row, 0])
            if self.clamp is not None:
                p = float(np.clip(p, *self.clamp))
            prob_first[i, order] += p
            mass_sum[i, order] += float(mass[row])
            counts[i, order] += 1
            if rationales is not None and (i, order) not in first_rationale:
                first_rationale[(i, order)] = rationales[row][0]
        prob_first /= counts  # average over principles
        mass_mean = mass_sum / counts
        return [self._verdict(prob_first[i], mass_mean[i], principles[i], first_rationale.get((i, 0)),
                              first_rationale.get((i, 1))) for i in range(len(items))]

    def _verdict(self, prob_first: np.ndarray, mass: np.ndarray, principles: list[str | None], rationale_ab: str | None,
                 rationale_ba: str | None) -> PairwiseJudgment:
        prob_a_ab = float(prob_first[0])
        prob_a_ba = 1.0 - float(prob_first[1])  # in order "ba", response_a is shown second
        prob_a = (prob_a_ab + prob_a_ba) / 2.0
        consistent, preference = order_verdict(prob_a_ab, prob_a_ba, prob_a, self.tie_margin)
        used = [p for p in principles if p is not None]
        return PairwiseJudgment(
            prob_a=prob_a, preference=preference, consistent=consistent, margin=abs(prob_a - 0.5) * 2.0,
            label_mass=float(mass.mean()),
            per_order=[OrderJudgment(order="ab", prob_first=float(prob_first[0]), prob_a=prob_a_ab,
                                     label_mass=float(mass[0]), rationale=rationale_ab),
                       OrderJudgment(order="ba", prob_first=float(prob_first[1]), prob_a=prob_a_ba,
                                     label_mass=float(mass[1]), rationale=rationale_ba)],
            principles=used or None, rationale=rationale_ab, **self._common_fields())


class ScoreJudge(_BatchJudge[ScoreItem, ScoreJudgment]):
    """Direct scores (d-RLAIF): expected score under the label distribution, rescaled to [0, 1]."""

    kind = "score"
    result_type = ScoreJudgment

    def __init__(self, engine: Engine, rubric: Rubric | str = "score-1-10", *, mode: Mode = "logprob",
                 cache: JudgmentCache | None = None, seed: int = 0, cot_samples: int | None = None) -> None:
        super().__init__(engine, rubric, mode=mode, cache=cache, seed=seed, cot_samples=cot_samples)
        if self.rubric.uses_criteria:
            raise RubricError(f"rubric '{self.rubric.id}' shows a per-item checklist (`criteria`); judge with "
                              "rlaif.judge.checklist.ChecklistJudge(checklist_mode='implicit') instead of ScoreJudge")
        self.values = np.asarray(self.rubric.label_values, dtype=np.float64)

    def _prompts_for(self, items: Sequence[ScoreItem]) -> list[ChatPrompt]:
        render: Callable[..., ChatPrompt] = self.rubric.render_cot if self.mode == "cot" else self.rubric.render
        extra = self._render_kwargs()
        return [render(prompt=item.prompt, response=item.response, reference=item.reference, **extra) for item in items]

    def _judge_uncached(self, items: Sequence[ScoreItem], timings: Timings) -> list[ScoreJudgment]:
        prompts = self._prompts_for(items)
        probs, mass, rationales = self._label_distributions(prompts, timings)  # (N, L), (N,)
        low, high = float(self.values.min()), float(self.values.max())
        results = []
        for row in range(len(items)):
            expected = float(probs[row] @ self.values)
            results.append(ScoreJudgment(
                score=(expected - low) / (high - low), expected_score=expected,
                label=self.rubric.labels[int(np.argmax(probs[row]))],
                distribution={label: float(p) for label, p in zip(self.rubric.labels, probs[row])},
                label_mass=float(mass[row]),
                rationale=rationales[row][0] if rationales is not None else None, **self._common_fields()))
        return results
