"""Worker for the data-parallel equivalence test: run by `torch.distributed.run` (2 processes, Gloo, CPU).

Not a test module itself (pytest collects `test_*.py` only). For each estimator, each
process takes one training step on its half of a fixed rollout (`tests.tiny_policy.
fixed_rollout`) with `gradient_accumulation_steps: 1`, recording the gradient every
optimizer step applies (after the all-reduce) and the trained weights after the step. Rank
0 saves them; the test compares them with one process holding the whole batch.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_equivalence_worker.py --policy DIR --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlaif.policy_training.config import PPOConfig  # noqa: E402
from rlaif.policy_training.distributed import exit_after_group_teardown  # noqa: E402
from rlaif.policy_training.ppo import PPOTrainer  # noqa: E402
from rlaif.policy_training.rewards import FunctionReward  # noqa: E402
from tests.tiny_policy import PROMPTS, distinct_words, record_step_gradients, use_fixed_rollouts  # noqa: E402

ESTIMATORS = ("ppo", "rloo", "grpo")


def data_parallel_config(policy: str, out: str, estimator: str, batch_size: int) -> PPOConfig:
    """One minibatch (so each process's minibatch is its whole half), 2 epochs, entropy bonus and KL on."""
    return PPOConfig(policy=policy, estimator=estimator, group_size=2, batch_size=batch_size, max_new_tokens=6,
                     learning_rate=1e-2, ppo_epochs=2, num_minibatches=1, gradient_accumulation_steps=1,
                     kl_coef=0.1, entropy_coef=0.01, steps=1, save_every=0, plot_every=0, tensorboard=False,
                     log_samples=0, output_dir=out, seed=5)


def one_step(config: PPOConfig) -> dict:
    """The recorded gradients, the trained weights before and after one step (flat), and the step's merged record."""
    trainer = PPOTrainer(config, FunctionReward(distinct_words), prompts=PROMPTS)
    use_fixed_rollouts(trainer)
    gradients = record_step_gradients(trainer)
    before = torch.cat([p.detach().flatten() for p in trainer.models.trainable_parameters()])
    record = trainer.step()
    after = torch.cat([p.detach().flatten() for p in trainer.models.trainable_parameters()])
    return {"gradients": gradients, "before": before, "after": after, "record": record}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # joined here, so every trainer below reuses one group
    results = {estimator: one_step(data_parallel_config(args.policy, str(Path(args.out) / estimator), estimator,
                                                        batch_size=2))
               for estimator in ESTIMATORS}
    if dist.get_rank() == 0:
        torch.save(results, Path(args.out) / "ddp_equivalence.pt")
    dist.barrier()  # nobody tears the group down while a peer still uses it
    dist.destroy_process_group()
    exit_after_group_teardown(0)  # torch/Gloo can abort during finalization after a clean destroy


if __name__ == "__main__":
    main()
