"""The distilled reward model's training side (RLAIF §2.2.1): `rlaif train-rm` and the PPO reward source.

The model itself (load/save/score, input format, batching) is `rlaif.judge.reward_model` /
`rlaif.judge.reward_format`, one layer down, because the judge service scores with it too.
Here:

- `losses`    soft / hard Bradley-Terry losses;
- `config`    `RMTrainConfig`;
- `data`      labeled pairs: reading, split by prompt, length buckets;
- `training`  `RewardModelTrainer`, `train_reward_model`, evaluation against the judge and people;
- `card`      training-curve plot and model card;
- `reward`    `RewardModelReward`: the RM as a PPO `RewardSource`;
- `cli`       `register(app)` adds `rlaif train-rm`.

The names below are importable from this package directly, e.g.
`from rlaif.policy_training.reward_model import RewardModel, train_reward_model`; each module
loads on first use, so importing the package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    **dict.fromkeys(["RM_CONFIG_FILE", "EncodedPair", "FlatBatch", "PairFormatter", "SharedPrefixBatch",
                     "TruncationStats", "as_messages", "collate_flat", "collate_shared_prefix", "fit_pair",
                     "fit_single", "length_sorted_batches", "prompt_key", "response_content"],
                    "rlaif.judge.reward_format"),
    **dict.fromkeys(["RewardModel", "disable_dropout", "resolve_base"], "rlaif.judge.reward_model"),
    **dict.fromkeys(["LOSSES", "hard_bradley_terry_loss", "soft_bradley_terry_loss"],
                    "rlaif.policy_training.reward_model.losses"),
    "RMTrainConfig": "rlaif.policy_training.reward_model.config",
    **dict.fromkeys(["LabeledPair", "bucketed_batches", "load_labeled_pairs", "split_by_prompt"],
                    "rlaif.policy_training.reward_model.data"),
    **dict.fromkeys(["RewardModelTrainer", "TrainResult", "evaluate_pairs", "linear_schedule", "train_reward_model"],
                    "rlaif.policy_training.reward_model.training"),
    "RewardModelReward": "rlaif.policy_training.reward_model.reward",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlaif.policy_training.reward_model' has no attribute {name!r}")
