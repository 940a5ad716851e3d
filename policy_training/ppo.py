"""`PPOTrainer`: fine-tune a causal LM against a `RewardSource` with PPO, RLOO or GRPO.

One training step (Ziegler et al. 2019 / Stiennon et al. 2020 recipe), each line of `step`
a call into a module with one job:

1. `prompt_data`  draw `batch_size` prompts; `rollout` generates `group_size` responses each
   (temperature, top-p, stop at EOS), keeping the policy's log-probs of the sampled tokens;
2. `rewards`      score them with the reward source (missing scores follow `on_missing_reward`);
3. `rollout`      one no-grad pass of the frozen reference and (ppo) the critic over
   prompt + response: left-padded prompts, right-padded responses, every token after the
   first EOS masked out;
4. `estimators`   advantages: ppo = per-token -beta*KL plus the score at the last token, GAE
   and whitening; rloo = leave-one-out baseline; grpo = group-normalized score;
5. `update`       `ppo_epochs` passes over shuffled minibatches with the estimator's loss,
   gradient clipping, AdamW; every loss is a token mean over the whole minibatch;
6. `run_log` / `checkpoint`  metrics, samples, plots; `checkpoint-{step}/` every `save_every`.

Models (policy, reference, critic, optimizers) are built by `models.build_models`; data
parallelism under `torchrun` / `accelerate launch` is `distributed.DistContext`. Reward sources
with `needs_reference` get the frozen initial policy's greedy answers through
`set_reference_generator`; their `last_metrics` / `last_components` are logged.

    from rlaif.policy_training.config import PPOConfig
    from rlaif.policy_training.ppo import PPOTrainer
    from rlaif.policy_training.rewards import FunctionReward

    trainer = PPOTrainer(PPOConfig(steps=10, output_dir="runs/demo"),
                         FunctionReward(lambda p, r: -abs(len(r) - 40) / 40),
                         prompts=["Write a haiku about autumn."])
    trainer.train()
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rlaif.policy_training import checkpoint as ckpt
from rlaif.policy_training.config import ConfigError, PPOConfig, resolve_device
from rlaif.policy_training.distributed import DistContext
from rlaif.policy_training.estimators import AdvantageInputs, compute_advantages
from rlaif.policy_training.models import ValueModel, build_models, resolve_model_path
from rlaif.policy_training.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    kl_penalty,
    masked_sum,
)
from rlaif.policy_training.prompt_data import PromptSampler, load_prompts
from rlaif.policy_training.rewards import (
    MissingRewardError,
    RewardSource,
    fetch_rewards,
    iter_reward_sources,
)
from rlaif.policy_training.rollout import Rollout, RolloutCollector, sequence_inputs
from rlaif.policy_training.run_log import (
    PLOT_FILE,
    RunLog,
    plot_training_curves,
    rollout_metrics,
)
from rlaif.policy_training.update import run_update

__all__ = ["PLOT_FILE", "MissingRewardError", "PPOTrainer", "Rollout", "ValueModel", "load_prompts",
           "plot_training_curves", "resolve_model_path", "sequence_inputs"]

logger = logging.getLogger(__name__)


class PPOTrainer:
    """Policy-gradient fine-tuning of a causal LM against a reward source (see module docstring).

    `prompts` overrides `config.policy.prompts` (a file). With `logging.resume`, the latest
    complete checkpoint in `output_dir` is loaded: weights, optimizer states, KL coefficient,
    prompt order and RNG states, so the run continues as if it had not stopped.
    `init_policy` starts the policy from other weights than `config.policy.model`, which stays
    the reference (see `models.build_models`; `rlaif loop` continues each round's policy this way).
    """

    def __init__(self, config: PPOConfig, reward_source: RewardSource, prompts: Sequence[str] | None = None, *,
                 init_policy: str | Path | None = None) -> None:
        self.config, self.reward_source = config, reward_source
        if prompts is None:
            if config.policy.prompts is None:
                raise ConfigError("no prompts: set `prompts` in the config (a .jsonl/.json/.txt file) or pass prompts=[...]")
            prompts = load_prompts(config.policy.prompts, config.policy.prompt_column)
        if not prompts:
            raise ConfigError("the prompt list is empty")
        self.output_dir = Path(config.logging.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        device = resolve_device(config.distributed.device)
        self.dist = DistContext.from_env(device)  # under torchrun / accelerate launch: join the group
        if self.dist.enabled and device == "cuda":
            device = f"cuda:{self.dist.local_rank}"  # each process drives its own GPU
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        seed = config.ppo.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.sampler = PromptSampler(prompts, config.ppo.batch_size, seed, self.dist.rank, self.dist.world_size)
        self.update_gen = torch.Generator().manual_seed(seed + 1)
        checkpoint = self.latest_checkpoint(self.output_dir) if config.logging.resume else None
        if config.logging.resume and checkpoint is None:
            logger.info("resume requested but %s holds no complete checkpoint; starting fresh", self.output_dir)
        if checkpoint is not None:
            ckpt.check_resumable(checkpoint, config)
        self.models = build_models(config, self.device, checkpoint, init_policy)
        m = self.models  # the pieces tests and callers reach for by name
        self.policy, self.ref_model, self.tokenizer, self.eos_ids = m.policy, m.ref_model, m.tokenizer, m.eos_ids
        self.value_model, self.value_head = m.value_model, m.value_head
        self.policy_optimizer, self.value_optimizer = m.policy_optimizer, m.value_optimizer
        if self.dist.enabled:
            self.dist.broadcast_parameters(m.trainable_parameters())
            torch.manual_seed(seed + self.dist.rank)  # same weights everywhere, each process samples its own
        est = config.ppo
        self.kl_ctl = (AdaptiveKLController(est.kl_coef, est.kl_target, est.kl_horizon) if est.adaptive_kl
                       else FixedKLController(est.kl_coef))
        self.state = ckpt.TrainerState(0, self.kl_ctl, self.sampler, self.update_gen, reward_source)
        self.log = RunLog(self.output_dir, config.logging, self.dist.is_main)
        if checkpoint is not None:
            ckpt.load_state(checkpoint, config, m, self.state, self.dist, self.device)
            self.log.truncate(self.state.step)
            logger.info("resumed from %s at step %d", checkpoint, self.state.step)
        self.collector = RolloutCollector(config, m, self.device)
        # Pairwise judge rewards compare each response with the initial policy's answer to the same prompt.
        for source in iter_reward_sources(reward_source):
            if getattr(source, "needs_reference", False):
                source.set_reference_generator(self.reference_responses)

    @property
    def step_count(self) -> int:
        return self.state.step

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.log.history

    def generate(self, prompts: list[str]) -> Rollout:
        """Sample one response per entry of `prompts` from the current policy."""
        return self.collector.generate(prompts)

    def reference_responses(self, prompts: Sequence[str]) -> list[str]:
        """The frozen initial policy's greedy response to each prompt (cached; see `RolloutCollector`)."""
        return self.collector.reference_responses(prompts)

    def step(self) -> dict[str, Any]:
        """Run one training step (rollout, scoring, advantages, updates) and return its metrics."""
        cfg, started = self.config, time.perf_counter()
        prompts = [p for p in self.sampler.next_batch() for _ in range(cfg.ppo.group_size)]  # (N,) groups contiguous
        rollout = self.generate(prompts)
        generation_s = time.perf_counter() - started
        rewards = fetch_rewards(self.reward_source, rollout.prompts, rollout.responses,
                                cfg.reward.on_missing_reward, self.device)
        forward_started = time.perf_counter()
        stats = self.collector.stats(rollout)
        forward_s = time.perf_counter() - forward_started

        beta, mask = self.kl_ctl.value, rollout.response_mask  # (N, R)
        scores = rewards.scores  # (N,)
        if cfg.reward.missing_eos_penalty is not None:
            scores = torch.where(rollout.has_eos, scores, scores - cfg.reward.missing_eos_penalty)
        kl_tokens = kl_penalty(stats["logprobs"], stats["ref_logprobs"], cfg.ppo.kl_estimator)  # (N, R)
        seq_reward = scores - beta * masked_sum(kl_tokens, mask, dim=1)  # (N,): what the estimator maximizes
        inputs = AdvantageInputs(mask, scores, seq_reward, kl_tokens, rewards.valid, stats.get("values"))
        advantages, returns, usable = compute_advantages(cfg.ppo, beta, inputs, all_sum=self.dist.sum_across)

        record = rollout_metrics(self.state.step + 1, rollout, rewards, stats, seq_reward, beta, usable,
                                 generation_s, self.reward_source)
        record["rollout_forward_s"] = forward_s
        if returns is not None:
            record["explained_variance"] = float(explained_variance(stats["values"], returns, mask & rewards.valid[:, None]))
        if int(usable.sum()) == 0 and not self.dist.enabled:
            logger.warning("step %d: no usable samples (all rewards missing); skipping the update", self.state.step + 1)
        else:  # distributed: every process joins each gradient all-reduce, with or without samples
            keep = usable.nonzero().squeeze(1)  # indices of samples that enter the loss
            update_started = time.perf_counter()
            record.update(run_update(cfg, self.models, self.collector, self.dist, self.update_gen, beta, rollout, keep,
                                     stats, advantages, returns))
            record["update_s"] = time.perf_counter() - update_started
        record = self.dist.merge_records(record)
        self.kl_ctl.update(record["kl"], len(rollout.prompts) * self.dist.world_size)
        self.state.step += 1
        record["step_s"] = time.perf_counter() - started
        self.log.write_samples(self.state.step, rollout, rewards.scores, rewards.valid)
        return record

    def train(self, progress: bool = True) -> list[dict[str, Any]]:
        """Run until `ppo.steps` steps are done; returns all logged records."""
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.ppo.steps, initial=self.state.step, disable=not progress or not self.dist.is_main,
                   desc="ppo", unit="step")
        try:
            while self.state.step < cfg.ppo.steps:
                record = self.step()
                step = self.state.step
                if step % cfg.logging.log_every == 0 or step == cfg.ppo.steps:
                    self.log.log(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
                if cfg.logging.save_every and step % cfg.logging.save_every == 0:
                    self.save_checkpoint()
                elif cfg.logging.plot_every and step % cfg.logging.plot_every == 0 and self.dist.is_main:
                    self.plot()
            if not (self.output_dir / f"{ckpt.CHECKPOINT_PREFIX}{self.state.step}").is_dir():
                self.save_checkpoint()
        finally:
            bar.close()
            self.log.flush()
        return self.history

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-{step}/` atomically (see `checkpoint.save_checkpoint`) and redraw the plots."""
        return ckpt.save_checkpoint(self.output_dir, self.config, self.models, self.state, self.dist, self.plot)

    def plot(self) -> Path:
        """Redraw `training_curves.png` from the logged history."""
        return self.log.plot()

    def close(self) -> None:
        """Close the run's TensorBoard writer and leave the process group this trainer joined (if any)."""
        self.log.close()
        self.dist.close()

    @staticmethod
    def latest_checkpoint(output_dir: str | Path) -> Path | None:
        """The complete `checkpoint-{step}` directory with the highest step, if any."""
        return ckpt.latest_checkpoint(output_dir)
