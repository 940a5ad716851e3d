"""Policy training against the judge: reward sources, the PPO/RLOO/GRPO trainer, its CLI.

Modules:
- `config`    `PPOConfig` (pydantic, YAML-loadable).
- `ppo_math`  pure functions: GAE, whitening, KL estimators, clipped losses, group baselines.
- `ppo`       `PPOTrainer`, `ValueModel`, rollout generation, checkpoints, plots.
- `rewards`   the `RewardSource` protocol and generic sources/wrappers/TRL adapters.
- `judge_rewards`  `LocalJudgeReward` / `HTTPJudgeReward`: the judge (in process / service) as reward.
- `winrate`   judged win rate of a trained policy vs its base (`rlaif winrate`, `winrate_cli`).
- `cli`       `register(app)` adds `rlaif ppo`.

Importing the package is cheap; torch loads with `ppo_math`/`ppo`.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "PPOConfig": "rlaif.policy_training.config",
    "PPOTrainer": "rlaif.policy_training.ppo",
    "ValueModel": "rlaif.policy_training.ppo",
    "RewardSource": "rlaif.policy_training.rewards",
    "FunctionReward": "rlaif.policy_training.rewards",
    "WeightedReward": "rlaif.policy_training.rewards",
    "RunningNormalizer": "rlaif.policy_training.rewards",
    "LocalJudgeReward": "rlaif.policy_training.judge_rewards",
    "HTTPJudgeReward": "rlaif.policy_training.judge_rewards",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'policy_training' has no attribute {name!r}")
