"""`RewardModelReward`: a distilled reward model as a PPO reward source.

RLAIF §2.2.1 trains the policy against a reward model distilled from the AI labeler rather
than querying the labeler for every rollout: one forward pass per (prompt, response)
instead of two judge passes per pair. This adapter puts `RewardModel.score` behind the
`RewardSource` protocol of `rlaif.policy_training.rewards`, so the trainer can use it alone or
inside `WeightedReward` / `RunningNormalizer` like any other source.

    source = RewardModelReward.from_path("runs/rm")
    source.rewards(["Name a color."], ["Blue."])   # -> [0.83]
"""

from __future__ import annotations

import math
from pathlib import Path

from rlaif.judge.reward_model import RewardModel


class RewardModelReward:
    """Raw RM scores as rewards; a non-finite score is reported as missing (None), never guessed."""

    def __init__(self, model: RewardModel | str | Path, *, batch_size: int = 16, device: str = "cpu",
                 name: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model if isinstance(model, RewardModel) else RewardModel.load(model, device=device, inference=True)
        self.batch_size = batch_size
        self.name = name or "reward_model"

    @classmethod
    def from_path(cls, path: str | Path, *, batch_size: int = 16, device: str = "cpu") -> RewardModelReward:
        """Load a `rlaif train-rm` output directory, with the fast inference kernels (scoring only)."""
        return cls(path, batch_size=batch_size, device=device)

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        scores = self.model.score(list(prompts), list(responses), batch_size=self.batch_size)
        return [value if math.isfinite(value) else None for value in scores]
