"""`ChecklistJudge`: grade a response against its prompt's own checklist (Rubrics as Rewards).

Each item carries `criteria: [{text, weight}]`, written for that prompt ("states that the answer
is 12", "gives one example"). Two modes:

- **explicit** (rubric kind `checklist`, default `checklist`): one yes/no question per criterion;
  P(yes) is read from the label log-probs with the engines' exact-label semantics, never parsed
  text. The item's score is the weighted mean `sum_i w_i P_i(yes) / sum_i w_i` in [0, 1]
  (`weighted_sum` keeps the unnormalized `sum_i w_i P_i(yes)`), with the per-criterion verdicts
  kept. Every criterion question of a response repeats the same rubric + prompt + response text
  and differs only after it, so all questions of a batch go in **one** `label_logprobs` call and
  the HF engine's radix tree runs that shared prefix once per response.
- **implicit** (a score rubric whose template shows `criteria`, default `checklist-implicit`):
  the whole checklist in one prompt, one score distribution; cheaper (one question per
  response) but no breakdown.

Criterion texts and the reference answer are user text: the rubric delimits and defuses them
exactly like responses. Cache keys hold the whole item (criteria, weights, reference) and the
checklist mode, so changing a weight never reuses a stale verdict.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from rlaif.judge.cache import JudgmentCache
from rlaif.judge.engines.base import Engine
from rlaif.judge.judges import _BatchJudge
from rlaif.judge.rubric import Rubric, RubricError, load_rubric
from rlaif.judge.types import ChatPrompt, ChecklistItem, ChecklistJudgment, Criterion, CriterionJudgment, Timings

ChecklistMode = Literal["explicit", "implicit"]
DEFAULT_CHECKLIST_RUBRICS: dict[str, str] = {"explicit": "checklist", "implicit": "checklist-implicit"}


def parse_criteria(value: Any, where: str) -> tuple[Criterion, ...]:
    """A data file's checklist cell -> `Criterion`s: a list of texts or of {text, weight} mappings.

    A cell that is a JSON string (CSV, some parquet exports) is decoded first. `where` names the
    file and row in the error, so a bad criterion in row 900 of a prompt file is found at once."""
    from pydantic import ValidationError

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: criteria must be a list of texts or {{text, weight}} objects (or that list as "
                             f"JSON text), got the string {value[:60]!r}") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: criteria must be a non-empty list of texts or {{text, weight}} objects, got "
                         f"{type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        try:
            out.append(Criterion(text=entry) if isinstance(entry, str) else Criterion.model_validate(entry))
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(str(p) for p in problem["loc"])
            raise ValueError(f"{where}: criterion {i}: {field + ': ' if field else ''}{problem['msg']}") from None
    return tuple(out)


def aggregate_checklist(prob_yes: Sequence[float], weights: Sequence[float]) -> tuple[float, float]:
    """(score, weighted_sum): sum_i w_i p_i / sum_i w_i and sum_i w_i p_i. Weights are positive."""
    w = np.asarray(weights, dtype=np.float64)
    p = np.asarray(prob_yes, dtype=np.float64)
    total = float(w @ p)
    return total / float(w.sum()), total


def check_checklist_setup(rubric: Rubric | str | None, checklist_mode: str) -> Rubric:
    """The rubric (default per mode), checked for `checklist_mode`; needs no engine, so commands call it first."""
    if checklist_mode not in DEFAULT_CHECKLIST_RUBRICS:
        raise ValueError(f"checklist_mode must be 'explicit' or 'implicit', got {checklist_mode!r}")
    loaded = rubric if isinstance(rubric, Rubric) else load_rubric(rubric or DEFAULT_CHECKLIST_RUBRICS[checklist_mode])
    if checklist_mode == "explicit" and loaded.kind != "checklist":
        raise RubricError(f"{loaded.source}: explicit checklist mode needs a checklist rubric (one yes/no question per "
                          f"criterion, e.g. checklist); '{loaded.id}' is a {loaded.kind} rubric")
    if checklist_mode == "implicit" and (loaded.kind != "score" or not loaded.uses_criteria):
        raise RubricError(f"{loaded.source}: implicit checklist mode needs a score rubric whose template shows "
                          f"`criteria` (e.g. checklist-implicit); '{loaded.id}' is a {loaded.kind} rubric"
                          + ("" if loaded.kind != "score" else " without `criteria`"))
    return loaded


class ChecklistJudge(_BatchJudge):
    """Per-item checklist grading, explicit (one yes/no question per criterion) or implicit (one prompt)."""

    result_type = ChecklistJudgment

    def __init__(self, engine: Engine, rubric: Rubric | str | None = None, *, checklist_mode: ChecklistMode = "explicit",
                 cache: JudgmentCache | None = None, seed: int = 0) -> None:
        loaded = check_checklist_setup(rubric, checklist_mode)
        self.kind = "checklist" if checklist_mode == "explicit" else "score"
        super().__init__(engine, loaded, mode="logprob", cache=cache, seed=seed)
        self.checklist_mode: ChecklistMode = checklist_mode
        self.values = np.asarray(self.rubric.label_values, dtype=np.float64) if checklist_mode == "implicit" else None

    def _key_payload(self) -> dict[str, object]:
        return {**super()._key_payload(), "checklist_mode": self.checklist_mode}

    def check_items(self, items: Sequence[ChecklistItem]) -> None:
        for item in items:
            self.rubric.check_item_fields(reference=item.reference, criteria=item.criteria)

    def _layout(self, items: Sequence[ChecklistItem]) -> tuple[list[ChatPrompt], list[int]]:
        """Engine prompts, item-major (explicit: one per criterion, in order), and each prompt's item index."""
        special = tuple(getattr(self.engine, "special_tokens", ()) or ())
        prompts: list[ChatPrompt] = []
        owners: list[int] = []
        for i, item in enumerate(items):
            if self.checklist_mode == "implicit":
                prompts.append(self.rubric.render(prompt=item.prompt, response=item.response, criteria=item.criteria,
                                                  reference=item.reference, special_tokens=special))
                owners.append(i)
                continue
            for criterion in item.criteria:
                prompts.append(self.rubric.render(prompt=item.prompt, response=item.response, criterion=criterion.text,
                                                  reference=item.reference, special_tokens=special))
                owners.append(i)
        return prompts, owners

    def _prompts_for(self, items: Sequence[ChecklistItem]) -> list[ChatPrompt]:
        return self._layout(items)[0]

    def item_token_counts(self, items: Sequence[ChecklistItem]) -> list[int]:
        """Longest engine sequence of each item (its longest criterion question), label included."""
        if not items:
            return []
        self.check_items(items)
        prompts, owners = self._layout(items)
        counts = self.engine.prompt_token_counts(prompts)
        extra = max(len(label) for label in self.rubric.labels) + 2
        longest = [0] * len(items)
        for owner, count in zip(owners, counts):
            longest[owner] = max(longest[owner], count + extra)
        return longest

    def sequences_per_item(self, item: ChecklistItem) -> int:
        """Engine sequences the item becomes (a batch's token cost counts all of them)."""
        return len(item.criteria) if self.checklist_mode == "explicit" else 1

    def _judge_uncached(self, items: Sequence[ChecklistItem], timings: Timings) -> list[ChecklistJudgment]:
        prompts, owners = self._layout(items)
        probs, mass, _ = self._label_distributions(prompts, timings)  # (P, L), (P,): one engine call for the batch
        common = self._common_fields()
        rows_of: list[list[int]] = [[] for _ in items]
        for row, owner in enumerate(owners):
            rows_of[owner].append(row)
        results = []
        for item, rows in zip(items, rows_of):
            if self.checklist_mode == "implicit":
                assert self.values is not None
                row = rows[0]
                low, high = float(self.values.min()), float(self.values.max())
                score = (float(probs[row] @ self.values) - low) / (high - low)
                weight_total = sum(c.weight for c in item.criteria)
                results.append(ChecklistJudgment(
                    score=score, weighted_sum=score * weight_total, checklist_mode="implicit",
                    distribution={label: float(p) for label, p in zip(self.rubric.labels, probs[row])},
                    label_mass=float(mass[row]), **common))
                continue
            verdicts = [CriterionJudgment(text=c.text, weight=c.weight, prob_yes=float(probs[row, 0]),
                                          label_mass=float(mass[row])) for c, row in zip(item.criteria, rows)]
            score, weighted = aggregate_checklist([v.prob_yes for v in verdicts], [v.weight for v in verdicts])
            results.append(ChecklistJudgment(score=score, weighted_sum=weighted, checklist_mode="explicit",
                                             criteria=verdicts, label_mass=float(np.mean([mass[r] for r in rows])),
                                             **common))
        return results
