"""Reward sources: what turns (prompt, response) pairs into scalar rewards for the trainer.

The trainer depends only on the `RewardSource` protocol. A source returns one value per
sample, or `None` where it could not score that sample (judge timeout, unparsable
verdict); the trainer then applies `PPOConfig.on_missing_reward` instead of guessing a 0.

Here:
- `RewardSource`            the protocol.
- `FunctionReward`          wraps a Python callable (deterministic rewards, tests, rule-based checks).
- `WeightedReward`          weighted sum of several sources (e.g. helpfulness + harmlessness,
                            as LLaMA-2 combined a helpfulness and a safety reward model).
- `RunningNormalizer`       wrapper: running mean/std normalization and clipping.
- `trl_reward_func`,        adapters to TRL GRPOTrainer's `reward_funcs` calling convention
  `trl_async_reward_func`   (keyword `prompts`, `completions`, `**kwargs`).
- `build_reward_source`     config -> source, used by `rlaif ppo`.

Judge-backed sources live in `rlaif.policy_training.judge_rewards` (a separate module):
`LocalJudgeReward` (in-process judge engine) and `HTTPJudgeReward` (the judge service
through `rlaif.service.client`). Each provides `from_config(config: PPOConfig) -> RewardSource`,
which `build_reward_source` calls; they read `engine` / `judge_url`, `rubric` and
`reward_mode` from the config.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.policy_training.config import PPOConfig

Reward = float | None


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
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

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
        self.names = list(names) if names is not None else [
            getattr(s, "name", f"{type(s).__name__}_{i}") for i, s in enumerate(sources)]
        self.last_components: dict[str, list[Reward]] = {}

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        components = {
            name: _check_batch(name, prompts, responses, source.rewards(prompts, responses))
            for name, source in zip(self.names, self.sources)
        }
        self.last_components = components
        total: list[Reward] = []
        for i in range(len(responses)):
            parts = [components[name][i] for name in self.names]
            if any(p is None for p in parts):
                total.append(None)
            else:
                total.append(sum(w * p for w, p in zip(self.weights, parts)))  # type: ignore[operator]
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
            return await native(p, c)
        return await asyncio.to_thread(source.rewards, p, c)

    reward_func.__name__ = name or f"{type(source).__name__}_reward"
    return reward_func


# ----------------------------------------------------------------------------- from config


NO_REWARD_SOURCE = ("no reward source: give --judge-url URL (a running `rlaif serve`), --engine SPEC (an "
                    "in-process judge, e.g. --engine default) or --reward-model DIR (a `rlaif train-rm` output)")


def build_reward_source(config: PPOConfig) -> RewardSource:
    """The reward source a CLI run asks for: the judge service (`judge_url`), an in-process
    judge (`engine`) or a distilled reward model (`reward_model`), optionally wrapped in a
    `RunningNormalizer`."""
    if config.judge_url:
        from rlaif.policy_training.judge_rewards import HTTPJudgeReward

        source: RewardSource = HTTPJudgeReward.from_config(config)
    elif config.engine:
        from rlaif.policy_training.judge_rewards import LocalJudgeReward

        source = LocalJudgeReward.from_config(config)
    elif config.reward_model:
        from rlaif.policy_training.rm_reward import RewardModelReward

        from rlaif.policy_training.config import resolve_device

        source = RewardModelReward.from_path(config.reward_model, batch_size=config.reward_model_batch_size,
                                             device=resolve_device(config.device))
    else:
        raise ValueError(NO_REWARD_SOURCE)
    if config.normalize_rewards or config.reward_clip is not None:
        source = RunningNormalizer(source, clip=config.reward_clip, center=config.normalize_rewards,
                                   scale=config.normalize_rewards)
    return source
