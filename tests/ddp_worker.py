"""Worker for the data-parallel PPO test: run by `torch.distributed.run` (2 processes, Gloo, CPU).

Not a test module itself (pytest collects `test_*.py` only). Each process trains the tiny
policy for 2 steps, resumes from that checkpoint for a 3rd step, and reports what the
test needs to check: a checksum of every trainable parameter (identical across ranks
only if gradients were averaged and the start was broadcast), the prompts each rank
drew (disjoint slices of one order), and the merged metrics.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py --policy DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlaif.policy_training.config import PPOConfig  # noqa: E402
from rlaif.policy_training.distributed import exit_after_group_teardown  # noqa: E402
from rlaif.policy_training.ppo import PPOTrainer  # noqa: E402
from rlaif.policy_training.rewards import FunctionReward  # noqa: E402
from tests.tiny_policy import fraction_of_x  # noqa: E402

PROMPTS = ["a b c", "d e", "f g h a", "b", "c c d e f", "h", "a a", "g h", "e f g", "c"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # joined here, so both trainers below reuse one group
    seen: list[str] = []

    def reward(prompt: str, response: str) -> float:
        seen.append(prompt)
        return fraction_of_x(prompt, response)

    fields = dict(policy=args.policy, batch_size=2, steps=2, max_new_tokens=6, temperature=1.0, learning_rate=3e-3,
                  ppo_epochs=2, save_every=2, keep_checkpoints=0, tensorboard=False, log_samples=1, output_dir=args.out,
                  seed=0)
    initial = None
    first = PPOTrainer(PPOConfig(**fields), FunctionReward(reward), prompts=PROMPTS)
    initial = [float(p.double().sum()) for p in first.models.trainable_parameters()]
    first.train(progress=False)
    resumed = PPOTrainer(PPOConfig(**{**fields, "steps": 3, "resume": True}), FunctionReward(reward), prompts=PROMPTS)
    history = resumed.train(progress=False)
    sums = [float(p.double().sum()) for p in resumed.models.trainable_parameters()]
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank(), "param_sums": sums, "initial_sums": initial,
                                      "prompts": seen, "history": history})
    if dist.get_rank() == 0:
        (Path(args.out) / "ddp_report.json").write_text(json.dumps(gathered))
    dist.barrier()  # nobody tears the group down while a peer still uses it
    dist.destroy_process_group()
    exit_after_group_teardown(0)  # torch/Gloo can abort during finalization after a clean destroy


if __name__ == "__main__":
    main()
