"""Policy-gradient estimators: advantages and one `loss(batch) -> (loss, stats)` function each.

An estimator is two functions registered in `ESTIMATORS` (adding one is adding an entry,
not a branch in the trainer):

- `advantages(inputs, cfg, beta) -> (advantages (N, R), returns (N, R) | None, usable (N,))`
  from the step's scores and per-token KL (step 4 of `PPOTrainer`);
- `loss(batch, cfg, beta) -> (loss, stats)` on one micro-batch with gradients (step 5),
  written like CleanRL's loss block with named intermediates; every term is this
  micro-batch's share of the minibatch token mean (`batch.num_tokens`), so accumulation and
  data parallelism add up to the same update. `stats` are detached scalars.

The estimators (arithmetic in `ppo_math.py`):

- `ppo`   per-token reward -beta*KL plus the score at the last response token, GAE
          (Schulman et al. 2015), whitening; clipped surrogate + clipped value loss
          (Schulman et al. 2017), the value term in the same loss with the shared critic;
- `rloo`  leave-one-out baseline on score - beta*sum KL (Ahmadian et al. 2024), every token
          sharing its sequence's advantage; clipped surrogate;
- `grpo`  group-normalized score (Shao et al. 2024), KL as a k3 loss term instead of a reward
          penalty; clipped surrogate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from rlaif.policy_training.config import EstimatorConfig
from rlaif.policy_training.ppo_math import (
    compute_gae,
    entropy_from_logits,
    group_usable_mask,
    grpo_advantages,
    kl_k3,
    masked_token_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    value_loss,
)
from torch import Tensor


@dataclass
class AdvantageInputs:
    """What every estimator's advantages may read, for the whole step's batch."""

    mask: Tensor  # (N, R) bool response mask
    scores: Tensor  # (N,) rewards after the missing-EOS penalty
    seq_reward: Tensor  # (N,) scores - beta * sequence KL
    kl_tokens: Tensor  # (N, R) per-token KL estimate (k1 or k3, as configured)
    valid: Tensor  # (N,) bool, the reward source scored this sample
    values: Tensor | None  # (N, R) critic values at rollout time (ppo only)


@dataclass
class MicroBatch:
    """One micro-batch of the update: rollout constants, and the policy's outputs with gradients."""

    logprobs: Tensor  # (n, R) current policy, with grad
    logits: Tensor  # (n, R, V) temperature-scaled current logits (entropy bonus)
    old_logprobs: Tensor  # (n, R) sampling policy, constant
    ref_logprobs: Tensor  # (n, R) frozen reference, constant
    advantages: Tensor  # (n, R)
    mask: Tensor  # (n, R) bool
    num_tokens: Tensor  # () the minibatch's response tokens over all processes / world size
    values: Tensor | None = None  # (n, R) shared critic's current values, with grad
    old_values: Tensor | None = None  # (n, R) rollout-time values
    returns: Tensor | None = None  # (n, R) value targets


Stats = dict[str, Tensor]
AdvantageFn = Callable[[AdvantageInputs, EstimatorConfig, float], tuple[Tensor, Tensor | None, Tensor]]
LossFn = Callable[[MicroBatch, EstimatorConfig, float], tuple[Tensor, Stats]]


class Estimator(NamedTuple):
    advantages: AdvantageFn
    loss: LossFn
    critic: bool
    """Trains a value model (advantages read `AdvantageInputs.values`)."""
    whiten: bool
    """`ppo.whiten_advantages` applies (grpo already normalizes per group)."""


# ----------------------------------------------------------------------------- advantages


def ppo_advantages(x: AdvantageInputs, cfg: EstimatorConfig, beta: float) -> tuple[Tensor, Tensor | None, Tensor]:
    assert x.values is not None, "ppo's advantages need the critic's values"
    token_rewards = -beta * x.kl_tokens  # (N, R)
    last = (x.mask.sum(dim=1) - 1).clamp(min=0)  # (N,) index of the last real token
    # The sequence-level score arrives with the final action (Ziegler et al. 2019).
    token_rewards = token_rewards.scatter_add(1, last[:, None], x.scores[:, None])
    advantages, returns = compute_gae(token_rewards, x.values, x.mask, cfg.gamma, cfg.lam)
    return advantages, returns, x.valid


def _sequence_advantages(seq_adv: Tensor, like: Tensor) -> Tensor:
    """Every token of a response shares its sequence advantage: (N,) -> (N, R)."""
    return seq_adv[:, None].expand_as(like).contiguous()


def rloo_advantages_(x: AdvantageInputs, cfg: EstimatorConfig, beta: float) -> tuple[Tensor, Tensor | None, Tensor]:
    seq_adv = rloo_advantages(x.seq_reward, cfg.group_size, x.valid)  # (N,)
    return _sequence_advantages(seq_adv, x.kl_tokens), None, group_usable_mask(x.valid, cfg.group_size)


def grpo_advantages_(x: AdvantageInputs, cfg: EstimatorConfig, beta: float) -> tuple[Tensor, Tensor | None, Tensor]:
    seq_adv = grpo_advantages(x.scores, cfg.group_size, x.valid)  # (N,): KL enters as a loss term, not the reward
    return _sequence_advantages(seq_adv, x.kl_tokens), None, group_usable_mask(x.valid, cfg.group_size)


def compute_advantages(cfg: EstimatorConfig, beta: float, x: AdvantageInputs,
                       all_sum: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The configured estimator's advantages, value targets and usable-sample mask.

    Whitened over the whole step's batch (all processes' usable tokens, `all_sum`), before
    any split into minibatches, micro-batches or processes can change the statistics.
    """
    estimator = ESTIMATORS[cfg.estimator]
    advantages, returns, usable = estimator.advantages(x, cfg, beta)
    total = all_sum or (lambda t: t)
    if cfg.whiten_advantages and estimator.whiten and int(total(usable.sum())) > 1:
        advantages = masked_whiten(advantages, x.mask & usable[:, None], all_sum=all_sum)
    return advantages, returns, usable


# ----------------------------------------------------------------------------- losses


def _surrogate(b: MicroBatch, cfg: EstimatorConfig) -> tuple[Tensor, Stats]:
    """Clipped surrogate minus the entropy bonus; stats carry `policy_loss`."""
    pg_loss, stats = policy_loss(b.logprobs, b.old_logprobs, b.advantages, b.mask, cfg.clip_range, b.num_tokens)
    loss = pg_loss
    if cfg.entropy_coef > 0:
        entropy = masked_token_mean(entropy_from_logits(b.logits), b.mask, b.num_tokens)
        loss = loss - cfg.entropy_coef * entropy
    return loss, {"policy_loss": pg_loss.detach(), **stats}


def critic_loss(b: MicroBatch, cfg: EstimatorConfig) -> tuple[Tensor, Stats]:
    """Clipped value loss of `b.values` against `b.returns` (the separate critic's own loss)."""
    assert b.values is not None and b.old_values is not None and b.returns is not None
    v_loss, stats = value_loss(b.values, b.old_values, b.returns, b.mask, cfg.clip_range_value, b.num_tokens)
    return v_loss, {"value_loss": v_loss.detach(), **stats}


def ppo_loss(b: MicroBatch, cfg: EstimatorConfig, beta: float) -> tuple[Tensor, Stats]:
    loss, stats = _surrogate(b, cfg)
    if b.values is not None:  # shared critic: one backward through the policy's trunk trains both
        v_loss, v_stats = critic_loss(b, cfg)
        loss = loss + cfg.vf_coef * v_loss
        stats.update(v_stats)
    return loss, stats


def rloo_loss(b: MicroBatch, cfg: EstimatorConfig, beta: float) -> tuple[Tensor, Stats]:
    return _surrogate(b, cfg)


def grpo_loss(b: MicroBatch, cfg: EstimatorConfig, beta: float) -> tuple[Tensor, Stats]:
    loss, stats = _surrogate(b, cfg)
    if beta > 0:
        kl_loss = masked_token_mean(kl_k3(b.logprobs, b.ref_logprobs), b.mask, b.num_tokens)
        loss = loss + beta * kl_loss
        stats["kl_loss"] = kl_loss.detach()
    return loss, stats


def loss_keys(cfg: EstimatorConfig, beta: float, has_critic: bool) -> list[str]:
    """Every stat one update logs, so every process logs every key (zeros included) and merged
    records average over all of them."""
    keys = ["policy_loss", "approx_kl", "clipfrac", "ratio_mean"]
    keys += ["kl_loss"] if cfg.estimator == "grpo" and beta > 0 else []
    return keys + (["value_loss", "vf_clipfrac"] if has_critic else [])


ESTIMATORS: dict[str, Estimator] = {
    "ppo": Estimator(ppo_advantages, ppo_loss, critic=True, whiten=True),
    "rloo": Estimator(rloo_advantages_, rloo_loss, critic=False, whiten=True),
    "grpo": Estimator(grpo_advantages_, grpo_loss, critic=False, whiten=False),
}
"""Estimator name (`ppo.estimator`) -> its advantages and loss."""
