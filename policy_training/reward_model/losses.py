"""Bradley-Terry losses of reward-model training, each a few lines, with accuracy and margin beside them.

`soft_bradley_terry_loss` is RLAIF §2.2.1's cross-entropy against the judge's soft label
(CAI found soft labels better than hard ones); `hard_bradley_terry_loss` is
-log sigma(r_chosen - r_rejected), TRL `RewardTrainer`'s loss. Stats are computed without
gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_stats(margin: torch.Tensor, target: torch.Tensor, r_chosen: torch.Tensor,
                r_rejected: torch.Tensor) -> dict[str, float]:
    """Agreement with the label's direction (ties, target == 0.5, excluded), margin, reward level."""
    with torch.no_grad():
        decided = target != 0.5
        agree = ((margin > 0) == (target > 0.5)) & decided
        n_decided = int(decided.sum())
        rewards = torch.cat([r_chosen, r_rejected])
        return {
            "accuracy": float(agree.sum()) / n_decided if n_decided else float("nan"),
            "margin": float(margin.mean()),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        }


def _centering(r_chosen: torch.Tensor, r_rejected: torch.Tensor, coef: float | None) -> torch.Tensor | float:
    """Auxiliary loss pulling rewards toward zero mean (Eisenstein et al. 2023, as TRL's center_rewards_coefficient)."""
    return coef * ((r_chosen + r_rejected) ** 2).mean() if coef else 0.0


def soft_bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, target: torch.Tensor,
                            center_coef: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy between the judge's P(chosen better) and sigma(r_chosen - r_rejected) (RLAIF §2.2.1).

    With target = 1 this is the hard Bradley-Terry loss; a soft target keeps the labeler's
    uncertainty instead of pretending every AI label is certain (CAI found soft labels better).
    """
    margin = r_chosen - r_rejected  # (B,)
    loss = F.binary_cross_entropy_with_logits(margin, target.to(margin.dtype)) + _centering(r_chosen, r_rejected, center_coef)
    return loss, _pair_stats(margin, target, r_chosen, r_rejected)


def hard_bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, target: torch.Tensor | None = None,
                            center_coef: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigma(r_chosen - r_rejected): every pair treated as a certain preference for `chosen`.

    `target` is accepted so both losses share one signature, and ignored: `chosen` is the
    labeler's pick by construction of the dataset.
    """
    margin = r_chosen - r_rejected  # (B,)
    loss = -F.logsigmoid(margin).mean() + _centering(r_chosen, r_rejected, center_coef)
    return loss, _pair_stats(margin, torch.ones_like(margin), r_chosen, r_rejected)


LOSSES = {"soft": soft_bradley_terry_loss, "hard": hard_bradley_terry_loss}
