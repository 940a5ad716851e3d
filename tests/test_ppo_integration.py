"""The whole loop on real parts, and the shared-trunk critic.

The slow test runs the embedded SmolLM2 as policy, the real judge service on 127.0.0.1 as
reward (HTTP, pairwise against the initial policy's greedy answer), two PPO steps, a
checkpoint in between and a resume. Every reward the trainer logged is recomputed in
process with `PairwiseJudge` on the same engine: the number that trained the policy must be
the judge's verdict on that exact (prompt, response, reference), not something lost or
reshaped on the way.

The fast tests pin `value_model: shared` (a value head on the policy's last hidden state,
one forward and one backward per micro-batch) on the tiny random Llama of
test_ppo_checkpoint.py: values line up with the hidden state before each response token,
every parameter and the head train, and a resumed run continues like an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlaif.judge.judges import PairwiseJudge
from rlaif.judge.types import PairwiseItem
from rlaif.policy_training.config import ConfigError, PPOConfig
from rlaif.policy_training.ppo import PPOTrainer
from rlaif.policy_training.rewards import FunctionReward
from rlaif.policy_training.sources import build_reward_source
from rlaif.service.app import create_app
from rlaif.service.settings import ServiceSettings
from tests.fake_engines import ServerThread
from tests.test_ppo_checkpoint import PROMPTS as TINY_PROMPTS
from tests.test_ppo_checkpoint import distinct_words, make_tiny_policy, read_metrics, small_config


@pytest.fixture()
def one_thread():
    """One torch thread for this test (restored after): small models gain nothing from more, and on a
    shared CPU two spinning OpenMP threads are much slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PROMPTS = ["Name a primary color.", "What is the capital of Italy?", "Give one word that rhymes with cat."]


@pytest.mark.slow
def test_two_ppo_steps_against_the_judge_service_with_checkpoint_and_resume(default_engine, plain_checkpoint_dir,
                                                                            tmp_path, one_thread):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    app = create_app(ServiceSettings(cache=False, max_wait_ms=20), engine=default_engine)
    with ServerThread(app) as server:
        fields = dict(policy=str(plain_checkpoint_dir), prompts=str(prompts), judge_url=server.url,
                      reward_mode="pairwise", rubric="helpfulness", batch_size=2, max_new_tokens=8, ppo_epochs=1,
                      learning_rate=1e-5, steps=1, save_every=1, plot_every=0, tensorboard=False, seed=0,
                      output_dir=str(tmp_path / "run"), judge_timeout=600)
        first = PPOTrainer(PPOConfig(**fields), build_reward_source(PPOConfig(**fields)))
        first.train(progress=False)
        assert (tmp_path / "run" / "checkpoint-1" / ".complete").is_file()
        references = dict(first.collector._reference_cache)
        del first

        resumed_config = PPOConfig(**{**fields, "steps": 2, "resume": True})
        second = PPOTrainer(resumed_config, build_reward_source(resumed_config))
        assert second.step_count == 1
        second.train(progress=False)

    run = tmp_path / "run"
    assert (run / "checkpoint-2" / ".complete").is_file() and (run / "training_curves.png").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for record in metrics:
        assert record["reward_missing"] == 0 and record["samples_used"] == 2
        assert record["judge_latency_s"] > 0 and record["judge_failed_requests"] == 0
        assert 0.0 <= record["reward"] <= 1.0 and "reward/helpfulness" in record

    # Greedy references are deterministic: the resumed trainer regenerated the same ones.
    for prompt, reference in references.items():
        assert second.reference_responses([prompt]) == [reference]

    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2]
    items = [PairwiseItem(prompt=s["prompt"], response_a=s["response"],
                          response_b=second.reference_responses([s["prompt"]])[0]) for s in samples]
    want = [j.prob_a for j in PairwiseJudge(default_engine, "helpfulness").judge(items)]
    assert [s["reward"] for s in samples] == pytest.approx(want, abs=1e-4)

    # Two updates moved the policy away from the initial weights.
    initial = load_file(str(plain_checkpoint_dir / "model.safetensors"))
    trained = load_file(str(run / "checkpoint-2" / "policy" / "model.safetensors"))
    changed = [name for name, tensor in trained.items() if name in initial and not torch.equal(tensor, initial[name])]
    assert changed, "no parameter changed after two PPO steps"


# ----------------------------------------------------------------------------- shared critic (tiny model)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> str:
    return make_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


def shared_trainer(policy: str, out, **overrides) -> PPOTrainer:
    config = small_config(policy, out, "ppo", value_model="shared", vf_coef=0.5, **overrides)
    return PPOTrainer(config, FunctionReward(distinct_words), prompts=TINY_PROMPTS)


def test_shared_values_read_the_state_before_each_response_token(tiny_policy, tmp_path, one_thread):
    from rlaif.policy_training.ppo import sequence_inputs

    trainer = shared_trainer(tiny_policy, tmp_path)
    assert trainer.value_model is None and trainer.value_head is not None
    torch.nn.init.normal_(trainer.value_head.weight)  # zero-initialized heads would hide a misalignment
    rollout = trainer.generate(TINY_PROMPTS[:3])
    idx = torch.arange(3)
    logits, values = trainer.collector.policy_forward(trainer.policy, rollout, idx, with_values=True)
    input_ids, attention_mask, position_ids = sequence_inputs(rollout.query_ids, rollout.query_mask,
                                                              rollout.response_ids, rollout.response_mask)
    hidden = trainer.policy.model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state  # (3, P+R, H)
    P, R = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
    want = trainer.value_head(hidden[:, P - 1:P + R - 1]).squeeze(-1)  # (3, R)
    torch.testing.assert_close(values, want)
    torch.testing.assert_close(logits, trainer.collector.policy_logits(trainer.policy, rollout, idx))


def test_shared_critic_trains_policy_and_head(tiny_policy, tmp_path, one_thread):
    trainer = shared_trainer(tiny_policy, tmp_path, steps=3, save_every=0)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    head_before = trainer.value_head.weight.detach().clone()
    trainer.train(progress=False)
    unchanged = [n for n, p in trainer.policy.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"policy parameters that never changed: {unchanged}"
    assert not torch.equal(trainer.value_head.weight, head_before), "the value head never trained"
    assert len(trainer.policy_optimizer.param_groups) == 2  # trunk + head, one optimizer step per minibatch
    for record in read_metrics(tmp_path):
        assert "value_loss" in record and "explained_variance" in record and "value_grad_norm" not in record
    assert (tmp_path / "checkpoint-3" / "value_head.safetensors").is_file()
    assert not (tmp_path / "checkpoint-3" / "value").exists()  # no second trunk to save


def test_shared_critic_resume_continues_like_an_uninterrupted_run(tiny_policy, tmp_path, one_thread):
    straight = shared_trainer(tiny_policy, tmp_path / "a", steps=4, save_every=0)
    straight.train(progress=False)
    shared_trainer(tiny_policy, tmp_path / "b", steps=2, save_every=2).train(progress=False)
    resumed = shared_trainer(tiny_policy, tmp_path / "b", steps=4, save_every=2, resume=True)
    assert resumed.step_count == 2
    resumed.train(progress=False)
    for ra, rb in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")):
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), f"step {ra['step']}: {key} diverged"
    torch.testing.assert_close(straight.value_head.weight, resumed.value_head.weight)
    for p, q in zip(straight.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q)

    with pytest.raises(ConfigError, match="value_model"):  # a shared-critic checkpoint cannot feed a separate critic
        PPOTrainer(small_config(tiny_policy, tmp_path / "b", "ppo", steps=6, resume=True),
                   FunctionReward(distinct_words), prompts=TINY_PROMPTS)
