"""Reward sources: what turns (prompt, response) pairs into scalar rewards for the trainer.

The trainer depends only on the `RewardSource` protocol. A source returns one value per
sample, or `None` where it could not score that sample (judge timeout, unparsable
verdict); the trainer then applies `reward.on_missing_reward` instead of guessing a 0.

Here:
- `RewardSource`            the protocol.
- `FunctionReward`          wraps a Python callable (deterministic rewards, tests, rule-based checks).
- `WeightedReward`          weighted sum of several sources (e.g. helpfulness + harmlessness,
                            as LLaMA-2 combined a helpfulness and a safety reward model).
- `RunningNormalizer`       wrapper: running mean/std normalization and clipping.
- `trl_reward_func`,        adapters to TRL GRPOTrainer's `reward_funcs` calling convention
  `trl_async_reward_func`   (keyword `prompts`, `completions`, `**kwargs`).
- `fetch_rewards`           the trainer's call: one batch of rollouts -> reward tensors, with the
                            `reward.on_missing_reward` policy applied; `reward_source_metrics` collects
                            what the source (and the sources it wraps) report about the last batch.

Judge-backed sources live in `rlaif.policy_training.judge_rewards` (`LocalJudgeReward`,
`HTTPJudgeReward`), the distilled reward model in `rlaif.policy_training.reward_model.reward`
(`RewardModelReward`); `rlaif.policy_training.sources.build_reward_source(config)` picks one
from a config (what `rlaif ppo` uses).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from rlaif.policy_training.rubric_weights import Reward

if TYPE_CHECKING:  # torch loads only when the trainer calls `fetch_rewards`
    import torch


class MissingRewardError(RuntimeError):
    """The reward source could not score some samples and `on_missing_reward` is `fail`."""


@runtime_checkable
class RewardSource(Protocol):
    """Scores a batch of responses. One output per input; `None` = could not score that one.

    Optional attributes the trainer looks for (on the source or any source it wraps, see
    `iter_reward_sources`):
    - `needs_reference: bool` + `set_reference_generator(fn)`: the source compares each
      response with a reference response and wants the trainer's generator of the initial
      policy's answers (`fn(prompts) -> responses`);
    - `last_components: dict[str, list[float | None]]`: per-component values of the last
      batch, logged as `reward/<name>`;
    - `last_metrics: dict[str, float]`: e.g. judge latency of the last batch, logged as is.
    """

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float | None]: ...


def iter_reward_sources(source: Any) -> list[Any]:
    """`source` and every source it wraps (`.source` of wrappers, `.sources` of combinations), depth first."""
    found = [source]
    inner = getattr(source, "source", None)
    if inner is not None:
        found.extend(iter_reward_sources(inner))
    for child in getattr(source, "sources", None) or []:
        found.extend(iter_reward_sources(child))
    return found


def _check_batch(name: str, prompts: Sequence[str], responses: Sequence[str], out: Sequence[Any]) -> list[Reward]:
    """Validate a source's output and normalize it to floats or None (non-finite -> None)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    out = list(out)
    if len(out) != len(responses):
        raise ValueError(f"reward source {name} returned {len(out)} rewards for {len(responses)} responses")
    clean: list[Reward] = []
    for i, value in enumerate(out):
        if value is None:
            clean.append(None)
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"reward source {name} returned {value!r} at index {i}; expected a float or None") from None
        # NaN/inf mean "the scorer failed", not a reward: report them as missing.
        clean.append(value if math.isfinite(value) else None)
    return clean


class FunctionReward:
    """A reward source backed by a Python callable.

    `fn(prompt, response) -> float | None` per sample, or with `batched=True`,
    `fn(prompts, responses) -> list[float | None]`.
    """

    def __init__(self, fn: Callable[..., Any], *, batched: bool = False, name: str | None = None) -> None:
        self.fn = fn
        self.batched = batched
        self.name: str = name or str(getattr(fn, "__name__", type(fn).__name__))

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        out = self.fn(prompts, responses) if self.batched else [self.fn(p, r) for p, r in zip(prompts, responses)]
        return _check_batch(self.name, prompts, responses, out)


class WeightedReward:
    """sum_i w_i * r_i over several sources, e.g. helpfulness 1.0 + harmlessness 0.5.

    A sample is missing (None) when any component is missing for it: a partial sum would
    silently change the reward's meaning. The last batch's per-source values are kept in
    `last_components` so the trainer can log each one.
    """

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float],
                 names: Sequence[str] | None = None) -> None:
        if len(sources) == 0:
            raise ValueError("WeightedReward needs at least one source")
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights; give one weight per source")
        if names is not None and len(names) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(names)} names")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.names: list[str] = list(names) if names is not None else [
            str(getattr(s, "name", f"{type(s).__name__}_{i}")) for i, s in enumerate(sources)]
        self.last_components: dict[str, list[Reward]] = {}
        self.last_metrics: dict[str, float] = {}

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        components: dict[str, list[Reward]] = {}
        seconds: dict[str, float] = {}
        for name, source in zip(self.names, self.sources):
            started = time.perf_counter()
            components[name] = _check_batch(name, prompts, responses, source.rewards(prompts, responses))
            seconds[f"reward_s/{name}"] = time.perf_counter() - started  # per-source cost, beside reward/<name>
        self.last_components = components
        self.last_metrics = seconds
        total: list[Reward] = []
        for i in range(len(responses)):
            parts = [components[name][i] for name in self.names]
            present = [p for p in parts if p is not None]
            total.append(sum(w * p for w, p in zip(self.weights, present)) if len(present) == len(parts) else None)
        return total


class RunningNormalizer:
    """Wraps a source: (r - running_mean) / running_std, then optional clipping.

    Rewards from an LLM judge drift in scale and offset across rubrics and judges; PPO's
    KL coefficient and value learning rate only mean something if the reward scale is
    stable. Statistics update with each batch *before* normalizing it (Chan et al.'s
    parallel variance merge), so the first batch is already centered. Missing values pass
    through as None and do not enter the statistics. `center=False, scale=False` only clips.
    """

    def __init__(self, source: RewardSource, *, clip: float | None = None, center: bool = True,
                 scale: bool = True, eps: float = 1e-8) -> None:
        self.source = source
        self.clip = clip
        self.center = center
        self.scale = scale
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def update(self, values: Sequence[float]) -> None:
        """Merge a batch into the running statistics."""
        n = len(values)
        if n == 0:
            return
        batch_mean = sum(values) / n
        batch_m2 = sum((v - batch_mean) ** 2 for v in values)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def normalize(self, value: float) -> float:
        z = (value - self.mean) if self.center else value
        if self.scale:
            z /= self.std + self.eps
        if self.clip is not None:
            z = min(max(z, -self.clip), self.clip)
        return z

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        raw = _check_batch(type(self.source).__name__, prompts, responses, self.source.rewards(prompts, responses))
        self.update([r for r in raw if r is not None])
        return [None if r is None else self.normalize(r) for r in raw]

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


# ----------------------------------------------------------------------------- TRL adapters


def _message_text(content: Any) -> str:
    """Text of a chat message's content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _prompt_text(prompt: Any) -> str:
    """A TRL prompt is a string or a conversation; for a conversation we score against the last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    last = users[-1] if users else prompt[-1]
    return _message_text(last.get("content", ""))


def _completion_text(completion: Any) -> str:
    """A TRL completion is a string or a list of messages; we score the assistant text."""
    if isinstance(completion, str):
        return completion
    return "".join(_message_text(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant")


def trl_reward_func(source: RewardSource, name: str | None = None) -> Callable[..., list[float | None]]:
    """Adapt a `RewardSource` to TRL's `reward_funcs` convention.

    The returned function is called as `f(prompts=..., completions=..., **kwargs)` where
    prompts/completions are strings (standard format) or message lists (conversational
    format); it returns one float or None per completion (TRL turns None into NaN and
    ignores it in its weighted sum). `name` becomes the function's `__name__`, which TRL
    logs the reward under.
    """

    def reward_func(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        return source.rewards([_prompt_text(p) for p in prompts], [_completion_text(c) for c in completions])

    reward_func.__name__ = name or f"{type(source).__name__}_reward"
    return reward_func


def trl_async_reward_func(source: RewardSource, name: str | None = None) -> Callable[..., Any]:
    """Async variant of `trl_reward_func`; TRL runs async reward functions concurrently.

    Uses the source's own coroutine `arewards(prompts, responses)` when it has one (an HTTP
    judge can then overlap requests); otherwise runs the blocking `rewards` in a worker
    thread so the event loop stays free.
    """

    async def reward_func(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        p = [_prompt_text(x) for x in prompts]
        c = [_completion_text(x) for x in completions]
        native = getattr(source, "arewards", None)
        if native is not None and inspect.iscoroutinefunction(native):
            scored: list[float | None] = await native(p, c)
            return scored
        return await asyncio.to_thread(source.rewards, p, c)

    reward_func.__name__ = name or f"{type(source).__name__}_reward"
    return reward_func


# ----------------------------------------------------------------------------- the trainer's call


@dataclass
class RewardBatch:
    """One batch's rewards as the trainer uses them."""

    scores: torch.Tensor  # (N,) float32; a placeholder 0 where missing, masked out via `valid` everywhere
    valid: torch.Tensor  # (N,) bool
    n_missing: int
    latency_s: float


def fetch_rewards(source: RewardSource, prompts: list[str], responses: list[str],
                  on_missing: Literal["fail", "skip"], device: torch.device) -> RewardBatch:
    """Score a batch; `on_missing="fail"` raises `MissingRewardError` when any sample has no reward."""
    import torch

    started = time.perf_counter()
    raw = source.rewards(prompts, responses)
    latency = time.perf_counter() - started
    if len(raw) != len(responses):
        raise ValueError(f"reward source returned {len(raw)} rewards for {len(responses)} responses")
    present = [r is not None and math.isfinite(float(r)) for r in raw]
    n_missing = present.count(False)
    if n_missing and on_missing == "fail":
        missing = [i for i, ok in enumerate(present) if not ok]
        raise MissingRewardError(
            f"the reward source could not score {n_missing} of {len(raw)} responses (indices {missing[:10]}); "
            f"set on_missing_reward: skip to drop such samples instead")
    valid = torch.tensor(present, dtype=torch.bool, device=device)
    scores = torch.tensor([float(r) if ok and r is not None else 0.0 for r, ok in zip(raw, present)],
                          dtype=torch.float32, device=device)
    return RewardBatch(scores, valid, n_missing, latency)


def reward_source_metrics(source: Any) -> dict[str, float]:
    """`reward/<name>` means of the last batch's components and the sources' own `last_metrics`
    (e.g. judge latency, failed requests), over `source` and every source it wraps."""
    record: dict[str, float] = {}
    for inner in iter_reward_sources(source):
        components = getattr(inner, "last_components", None)
        if isinstance(components, dict):
            for name, values in components.items():
                present = [v for v in values if v is not None]
                record[f"reward/{name}"] = sum(present) / len(present) if present else float("nan")
        metrics = getattr(inner, "last_metrics", None)
        if isinstance(metrics, dict):
            record.update({k: float(v) for k, v in metrics.items()})
    return record
