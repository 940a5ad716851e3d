"""Data-parallel PPO: two real processes on CPU (Gloo), launched like `accelerate launch` does.

`accelerate launch --multi_gpu` starts its processes through `torch.distributed.run`
(torchrun); these tests use that launcher directly with 2 CPU processes, so the trainer
sees exactly the environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, rendezvous) a multi-GPU
run gives it. Only the backend differs (Gloo instead of NCCL), which this machine cannot
test.

Besides training and resuming together, two processes must compute the update one
process would on their whole batch: losses are token means over every process's tokens and
advantages are whitened over all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_policy import make_tiny_policy

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> str:
    return make_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


def test_two_processes_train_one_policy(tmp_path, tiny_policy):
    """Same start, averaged gradients, disjoint prompts, one log, per-rank RNG in checkpoints, resume."""
    out = tmp_path / "run"
    result = torchrun(str(REPO / "tests" / "ddp_worker.py"), "--policy", tiny_policy, "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = json.loads((out / "ddp_report.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["initial_sums"] == ranks[1]["initial_sums"]
    # Trained (the weights moved) and still identical on both processes: gradients were averaged.
    assert ranks[0]["param_sums"] != pytest.approx(ranks[0]["initial_sums"], abs=1e-6)
    assert ranks[0]["param_sums"] == pytest.approx(ranks[1]["param_sums"], abs=1e-9)
    # Each step every process scores its own 2 prompts, disjoint slices of one shuffled order.
    for step in range(2):
        mine, theirs = (set(r["prompts"][2 * step:2 * step + 2]) for r in ranks)
        assert len(mine) == 2 and not mine & theirs
    # Rank 0 logs the merged record of both processes; the resumed run continued at step 3.
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["world_size"] == 2 and m["samples_used"] == 4 for m in metrics)
    assert [m["step"] for m in ranks[0]["history"]] == [1, 2, 3]
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "rng_state.pt").is_file() and (checkpoint / "rng_state_rank1.pt").is_file()
    assert (out / "checkpoint-3" / "policy" / "config.json").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2, 3]  # log_samples=1, written by rank 0 only


def test_rlaif_ppo_cli_runs_under_the_launcher_unchanged(tmp_path, tiny_policy):
    """`torchrun -m rlaif ppo ...` (what `accelerate launch -m rlaif ppo ...` runs) with a reward model."""
    from rlaif.policy_training.reward_model import RewardModel

    RewardModel.from_base(tiny_policy, max_length=64).save(tmp_path / "rm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a b c\nd e\nf g h a\nb\nc c d e f\nh\n")
    out = tmp_path / "run"
    result = torchrun("-m", "rlaif", "ppo", "--prompts", str(prompts), "--policy", tiny_policy, "--reward-model",
                      str(tmp_path / "rm"), "--steps", "2", "--batch-size", "2", "--max-new-tokens", "5",
                      "--ppo-epochs", "1", "--output-dir", str(out), "--no-tensorboard")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["world_size"] == 2 for m in metrics)
    assert all(m["samples_used"] == 4 for m in metrics)
    assert (out / "checkpoint-2" / "rng_state_rank1.pt").is_file()


def test_two_processes_update_like_one_process_with_the_whole_batch(tmp_path, tiny_policy):
    """2 processes x 4 responses (1 micro-batch each) == 1 process x 8 responses, for ppo, rloo, grpo.

    The responses differ in length between the halves, so averaging per-process token means
    (or whitening per process) would change the gradients by tens of percent."""
    from tests.ddp_equivalence_worker import ESTIMATORS, data_parallel_config, one_step

    out = tmp_path / "ddp"
    result = torchrun(str(REPO / "tests" / "ddp_equivalence_worker.py"), "--policy", tiny_policy, "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parallel = torch.load(out / "ddp_equivalence.pt", weights_only=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {e: one_step(data_parallel_config(tiny_policy, str(tmp_path / e), e, batch_size=4))
                  for e in ESTIMATORS}
    finally:
        torch.set_num_threads(previous)
    for estimator in ESTIMATORS:
        one, two = single[estimator], parallel[estimator]
        assert two["record"]["samples_used"] == one["record"]["samples_used"] == 8
        assert len(two["gradients"]) == len(one["gradients"]) == (4 if estimator == "ppo" else 2)
        for i, (g_one, g_two) in enumerate(zip(one["gradients"], two["gradients"])):
            scale = max(float(g.abs().max()) for g in g_one)
            for a, b in zip(g_one, g_two):
                torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-4 * scale,
                                           msg=lambda m: f"{estimator}, optimizer step {i}: {m}")
        torch.testing.assert_close(two["before"], one["before"])
        update = one["after"] - one["before"]
        drift = float((two["after"] - one["after"]).norm() / update.norm())
        assert drift < 1e-3, f"{estimator}: the update differs by {drift:.1e} of its norm"
        for key in ("policy_loss", "clipfrac", "value_loss", "kl_loss"):
            if key in one["record"]:
                assert two["record"][key] == pytest.approx(one["record"][key], rel=1e-4, abs=1e-6), key
