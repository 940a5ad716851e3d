"""Verifiers: programmatic reward functions beside the judge (exact answers, formats, unit tests).

A verifier is any callable with TRL's reward-function signature,

    def f(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

named in a config as `module:function` (imported from the trainer's Python path), or one of
the built-in checks against each prompt's reference answer (`reward.answer_column`, passed as
the keyword `reference`):

- `exact`    1 if the completion equals the reference after trimming, case folding and
             collapsing whitespace (a trailing period is ignored), else 0;
- `numeric`  1 if the last number in the completion equals the reference number (relative
             tolerance 1e-6; thousands separators ignored), else 0; no number -> 0;
- `regex`    1 if the reference, read as a regular expression, matches somewhere in the
             completion (`re.search`), else 0.

Like TRL, the verifier also receives every other column of the prompt file as a keyword (one
value per completion), so `def f(prompts, completions, tests, **kw)` can read a `tests` column.
A prompt without a reference gets None from the built-ins (a missing reward, never a made-up 0).
`VerifierReward` wraps one as a `RewardSource`; `rewards: [{verifier: ..., weight: ...}]` in a PPO
config mixes it with judge terms (`rlaif.policy_training.sources`).
"""

from __future__ import annotations

import importlib
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlaif.policy_training.rewards import _check_batch

Verifier = Callable[..., Sequence[Any]]


class VerifierError(ValueError):
    """A verifier spec names nothing callable, or a built-in lacks what it checks against."""


def _normalize(text: str) -> str:
    return " ".join(text.strip().casefold().split()).rstrip(".")


def exact_match(prompts: list[str], completions: list[str], reference: Sequence[str | None] | None = None,
                **_: Any) -> list[float | None]:
    """1.0 where the normalized completion equals the normalized reference, else 0.0 (None: no reference)."""
    refs = _references("exact", reference, len(completions))
    return [None if ref is None else float(_normalize(c) == _normalize(str(ref))) for c, ref in zip(completions, refs)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(prompts: list[str], completions: list[str], reference: Sequence[str | float | None] | None = None,
                  **_: Any) -> list[float | None]:
    """1.0 where the completion's last number equals the reference number (rel. tol. 1e-6), else 0.0."""
    refs = _references("numeric", reference, len(completions))
    out: list[float | None] = []
    for completion, ref in zip(completions, refs):
        if ref is None:
            out.append(None)
            continue
        target = ref if isinstance(ref, (int, float)) else _last_number(str(ref))
        if target is None:
            raise VerifierError(f"verifier numeric: reference {str(ref)[:60]!r} holds no number")
        got = _last_number(completion)
        out.append(float(got is not None and math.isclose(got, float(target), rel_tol=1e-6, abs_tol=1e-9)))
    return out


def regex_match(prompts: list[str], completions: list[str], reference: Sequence[str | None] | None = None,
                **_: Any) -> list[float | None]:
    """1.0 where the reference pattern matches somewhere in the completion, else 0.0."""
    refs = _references("regex", reference, len(completions))
    out: list[float | None] = []
    for completion, pattern in zip(completions, refs):
        if pattern is None:
            out.append(None)
            continue
        try:
            out.append(float(re.search(str(pattern), completion) is not None))
        except re.error as exc:
            raise VerifierError(f"verifier regex: reference {str(pattern)[:60]!r} is not a valid pattern: {exc}") from None
    return out


BUILTIN_VERIFIERS: dict[str, Verifier] = {"exact": exact_match, "numeric": numeric_match, "regex": regex_match}


def _references(name: str, reference: Sequence[Any] | None, n: int) -> Sequence[Any]:
    if reference is None:
        raise VerifierError(f"verifier {name} checks each completion against its prompt's reference answer, and there "
                            "is none: set reward.answer_column to the prompt-file column holding the answers")
    if len(reference) != n:
        raise VerifierError(f"verifier {name}: {len(reference)} references for {n} completions")
    return reference


def load_verifier(spec: str) -> Verifier:
    """A built-in name (exact, numeric, regex) or `module:function` -> the callable; one-line errors otherwise."""
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise VerifierError(f"verifier {spec!r}: use a built-in ({', '.join(BUILTIN_VERIFIERS)}) or "
                            "`module:function`, e.g. mypkg.checks:is_valid_json")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VerifierError(f"verifier {spec!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise VerifierError(f"verifier {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise VerifierError(f"verifier {spec!r}: {attr!r} is a {type(target).__name__}, not a function")
    return target


class VerifierReward:
    """A verifier as a `RewardSource`: TRL's call, with the prompt file's columns as keywords."""

    def __init__(self, verifier: str | Verifier, *, rows: Mapping[str, Mapping[str, Any]] | None = None,
                 answers: Mapping[str, str] | None = None, name: str | None = None) -> None:
        self.fn = load_verifier(verifier) if isinstance(verifier, str) else verifier
        self.rows = rows or {}
        self.answers = answers
        self.name = name or (verifier if isinstance(verifier, str) else getattr(verifier, "__name__", "verifier"))
        self.last_metrics: dict[str, float] = {}

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        columns = dict.fromkeys(k for p in prompts for k in self.rows.get(p, {}))
        kwargs: dict[str, Any] = {c: [self.rows.get(p, {}).get(c) for p in prompts] for c in columns
                                  if c not in ("prompts", "completions")}
        if self.answers is not None:
            kwargs["reference"] = [self.answers.get(p) for p in prompts]
        started = time.perf_counter()
        out = self.fn(prompts=list(prompts), completions=list(responses), **kwargs)
        values = _check_batch(f"verifier {self.name}", prompts, responses, out)
        self.last_metrics = {f"verifier_s/{self.name}": time.perf_counter() - started}
        return values
