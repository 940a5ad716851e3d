"""Policy training against the judge: reward sources, the PPO/RLOO/GRPO trainer, the distilled reward model.

Modules, bottom-up (each imports only modules above it in this list, never below):
- `rubric_weights`  rubric terms of a judge reward and their weighted sum (pure).
- `config`          `PPOConfig` in sections (pydantic, YAML-loadable; flat keys still accepted).
- `ppo_math`        pure functions: GAE, whitening, KL estimators, clipped losses, group baselines.
- `distributed`     `DistContext`: data parallelism under torchrun / accelerate launch.
- `prompt_data`     prompt files and the seeded per-step prompt order.
- `rewards`         the `RewardSource` protocol, generic sources/wrappers, TRL adapters, `fetch_rewards`.
- `judge_rewards`   `LocalJudgeReward` / `HTTPJudgeReward`: the judge (in process / service) as reward.
- `reward_model/`   distilled reward model: losses, `rlaif train-rm`, `RewardModelReward`.
- `sources`         `build_reward_source(config)`.
- `models`          policy, reference, `ValueModel`, optimizers.
- `rollout`         `RolloutCollector`: generation, log-probs, values.
- `estimators`      advantages and `loss(batch)` per estimator (ppo, rloo, grpo), registered by name.
- `update`          minibatch epochs, accumulation, optimizer steps.
- `run_log`, `checkpoint`  metrics/samples/plots; checkpoints and resume.
- `ppo`             `PPOTrainer`: the step, top-down.
- `winrate`         judged win rate of a trained policy vs its base (`rlaif winrate`, `winrate_cli`).
- `cli`             `register(app)` adds `rlaif ppo`.

Importing the package is cheap; torch loads with the trainer modules.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "PPOConfig": "rlaif.policy_training.config",
    "PPOTrainer": "rlaif.policy_training.ppo",
    "ValueModel": "rlaif.policy_training.models",
    "RewardSource": "rlaif.policy_training.rewards",
    "FunctionReward": "rlaif.policy_training.rewards",
    "WeightedReward": "rlaif.policy_training.rewards",
    "RunningNormalizer": "rlaif.policy_training.rewards",
    "LocalJudgeReward": "rlaif.policy_training.judge_rewards",
    "HTTPJudgeReward": "rlaif.policy_training.judge_rewards",
    "RewardModelReward": "rlaif.policy_training.reward_model.reward",
    "build_reward_source": "rlaif.policy_training.sources",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlaif.policy_training' has no attribute {name!r}")
