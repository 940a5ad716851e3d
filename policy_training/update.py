"""The optimization phase of one step: `ppo_epochs` passes of minibatch updates over a rollout.

`run_update` shuffles the usable samples (`ppo.num_minibatches` minibatches per pass, one
optimizer step each), cuts each minibatch into `distributed.gradient_accumulation_steps`
micro-batches, and for each micro-batch runs the policy forward with gradients, the
estimator's `loss(batch)` and one backward; with a separate critic, the critic's forward,
clipped value loss and backward follow. Gradients are averaged across processes right
before each optimizer step and clipped there.

Each loss term is a token mean over the whole minibatch, on all processes together: every
micro-batch adds its token sum divided by the minibatch's token count (`minibatch_tokens`),
so accumulation and the number of processes change memory use and speed, never the update.
Logged losses and stats are the same minibatch token means, averaged over minibatches and
epochs.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from rlaif.policy_training.config import PPOConfig
from rlaif.policy_training.distributed import DistContext
from rlaif.policy_training.estimators import (
    ESTIMATORS,
    MicroBatch,
    critic_loss,
    loss_keys,
)
from rlaif.policy_training.models import PolicyModels, optimized_parameters
from rlaif.policy_training.ppo_math import logprobs_from_logits
from rlaif.policy_training.rollout import Rollout, RolloutCollector
from torch import Tensor


def minibatch_tokens(mask: Tensor, dist: DistContext) -> Tensor:
    """The divisor that turns a micro-batch's token sum into its share of the minibatch token mean.

    That is the minibatch's response tokens on all processes, over the number of processes:
    `average_gradients` divides the processes' summed gradients by their number, so
    sum / (tokens / world_size) on each process averages to sum / tokens over all of them.
    """
    tokens = dist.sum_across(mask.sum())  # exact integer count of the whole minibatch
    return tokens.to(torch.float32) / dist.world_size


def optimizer_step(optimizer: torch.optim.Optimizer, dist: DistContext, max_grad_norm: float | None) -> float:
    """All-reduce, clip and apply the gradients of everything `optimizer` updates; returns the gradient norm."""
    # Everything the optimizer updates is clipped together (the shared critic's head included).
    dist.average_gradients(optimized_parameters(optimizer))
    params = [p for p in optimized_parameters(optimizer) if p.grad is not None]
    if not params:
        return 0.0
    if max_grad_norm is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def run_update(config: PPOConfig, models: PolicyModels, collector: RolloutCollector, dist: DistContext,
               generator: torch.Generator, beta: float, rollout: Rollout, keep: Tensor, stats: dict[str, Tensor],
               advantages: Tensor, returns: Tensor | None) -> dict[str, float]:
    """`ppo_epochs` passes of minibatch updates over the usable samples `keep`; returns the averaged stats."""
    cfg = config.ppo
    loss_fn = ESTIMATORS[cfg.estimator].loss
    shared_critic = models.value_head is not None
    keys = loss_keys(cfg, beta, models.has_critic)
    logs: dict[str, list[float]] = defaultdict(list)
    for _ in range(cfg.ppo_epochs):
        perm = keep[torch.randperm(len(keep), generator=generator).to(keep.device)]
        for minibatch in perm.tensor_split(cfg.num_minibatches):
            if len(minibatch) == 0 and not dist.enabled:
                continue  # distributed: every process joins each all-reduce, with or without samples
            num_tokens = minibatch_tokens(rollout.response_mask[minibatch], dist)
            shares = dict.fromkeys(keys, 0.0)  # this process's share of each minibatch token mean
            for micro in minibatch.tensor_split(config.distributed.gradient_accumulation_steps):
                if len(micro) == 0:
                    continue
                # (n, R, V) logits; with the shared critic also (n, R) values from the same pass
                logits, values = collector.policy_forward(models.policy, rollout, micro, with_values=shared_critic)
                batch = MicroBatch(
                    logprobs=logprobs_from_logits(logits, rollout.response_ids[micro]),  # (n, R)
                    logits=logits, old_logprobs=stats["logprobs"][micro], ref_logprobs=stats["ref_logprobs"][micro],
                    advantages=advantages[micro], mask=rollout.response_mask[micro], num_tokens=num_tokens,
                    values=values, old_values=stats["values"][micro] if models.has_critic else None,
                    returns=returns[micro] if returns is not None else None)
                loss, loss_stats = loss_fn(batch, cfg, beta)
                loss.backward()
                if models.value_model is not None:  # the separate critic: its own forward and backward
                    batch.values = collector.values(rollout, micro)  # (n, R)
                    v_loss, v_stats = critic_loss(batch, cfg)
                    v_loss.backward()
                    loss_stats.update(v_stats)
                for key, value in loss_stats.items():
                    shares[key] += float(value)
            for key, share in shares.items():
                logs[key].append(share)
            logs["grad_norm"].append(optimizer_step(models.policy_optimizer, dist, config.optimizer.max_grad_norm))
            if models.value_optimizer is not None:
                logs["value_grad_norm"].append(
                    optimizer_step(models.value_optimizer, dist, config.optimizer.max_grad_norm))
    return {k: sum(v) / len(v) for k, v in logs.items() if v}
