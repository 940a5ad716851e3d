"""Does the trainer actually learn? End-to-end runs on a tiny random Llama policy.

The policy is a 2-layer LlamaForCausalLM over a 16-word vocabulary ("a".."h", "x", "y",
"z", "w" plus 4 special tokens), randomly initialized, so its responses start near
uniform; the reward is the fraction of "x" words in the response (~1/16 at start). A
working PPO/RLOO/GRPO loop drives it up within a few dozen CPU steps; the same run with
the advantage sign flipped must not improve, which guards against a sign error that a
"reward went up" test alone could miss when the reward rises by accident.

Also here: rollout masking (tokens after EOS, padding invariance of the log-probs on the
tiny and the real SmolLM2 model), the missing-reward policy, and the reward sources.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch

from rlaif.policy_training import estimators as ppo_module  # the estimators' loss functions call policy_loss
from rlaif.policy_training.config import PPOConfig
from rlaif.policy_training.estimators import AdvantageInputs, compute_advantages
from rlaif.policy_training.ppo import MissingRewardError, PPOTrainer, Rollout
from rlaif.policy_training.rewards import (
    FunctionReward,
    RunningNormalizer,
    WeightedReward,
    trl_async_reward_func,
    trl_reward_func,
)
from tests.tiny_policy import PROMPTS, fraction_of_x, make_tiny_policy


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> str:
    return make_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model's ops are microseconds; on a shared CPU, extra intra-op threads only spin.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def learning_config(policy: str, out: Path, estimator: str = "ppo", steps: int = 30) -> PPOConfig:
    group = 1 if estimator == "ppo" else 4
    return PPOConfig(policy=policy, estimator=estimator, group_size=group, batch_size=16 // group, steps=steps,
                     max_new_tokens=8, temperature=1.0, learning_rate=3e-3, kl_coef=0.0, ppo_epochs=4,
                     num_minibatches=2, save_every=0, tensorboard=False, log_samples=0, output_dir=str(out),
                     seed=0)


def reward_curve(config: PPOConfig) -> list[float]:
    trainer = PPOTrainer(config, FunctionReward(fraction_of_x), prompts=PROMPTS)
    return [r["reward"] for r in trainer.train(progress=False)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("estimator", ["ppo", "rloo", "grpo"])
def test_reward_rises(tiny_policy, tmp_path, estimator):
    curve = reward_curve(learning_config(tiny_policy, tmp_path, estimator))
    start, end = _mean(curve[:3]), _mean(curve[-5:])
    assert start < 0.2, f"the random policy should rarely say x, got {start:.3f}"
    assert end > start + 0.3, f"{estimator}: reward did not rise: first steps {curve[:3]}, last {curve[-5:]}"


def test_flipped_advantage_does_not_improve(tiny_policy, tmp_path, monkeypatch):
    # Same run, but the trainer's policy loss sees -advantages: gradient ascent on the wrong sign.
    original = ppo_module.policy_loss

    def flipped(logprobs, old_logprobs, advantages, mask, clip_range, num_tokens=None):
        return original(logprobs, old_logprobs, -advantages, mask, clip_range, num_tokens)

    monkeypatch.setattr(ppo_module, "policy_loss", flipped)
    curve = reward_curve(learning_config(tiny_policy, tmp_path, "ppo"))
    start, end = _mean(curve[:3]), _mean(curve[-5:])
    assert end <= start + 0.02, f"reward rose with flipped advantages: first {curve[:3]}, last {curve[-5:]}"


# ----------------------------------------------------------------------------- rollouts and masks


def test_rollout_masks_tokens_after_eos(tiny_policy, tmp_path):
    config = PPOConfig(policy=tiny_policy, max_new_tokens=10, temperature=1.0, output_dir=str(tmp_path),
                       tensorboard=False)
    trainer = PPOTrainer(config, FunctionReward(fraction_of_x), prompts=PROMPTS)
    rollout = trainer.generate(PROMPTS * 8)
    eos = trainer.tokenizer.eos_token_id
    assert rollout.has_eos.any() and (~rollout.has_eos).any(), "want both finished and truncated samples"
    for ids, mask, has_eos, text in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(),
                                        rollout.has_eos.tolist(), rollout.responses):
        n = sum(mask)
        assert mask == [True] * n + [False] * (len(mask) - n), "mask must be a prefix"
        if has_eos:
            assert ids.index(eos) == n - 1, "the first EOS is the last real token"
            assert all(t == trainer.tokenizer.pad_token_id for t in ids[n:]), "nothing after EOS survives"
        else:
            assert n == len(mask) and eos not in ids
        assert "</s>" not in text
    # Left padding: real prompt tokens sit at the right end of each row.
    lengths = rollout.query_mask.sum(dim=1)
    for row, n in zip(rollout.query_mask.tolist(), lengths.tolist()):
        assert row == [0] * (len(row) - n) + [1] * n


def test_score_lands_on_last_real_token_with_per_token_kl(tiny_policy, tmp_path):
    # gamma = lam = 1, values 0, no whitening: A_t = score - beta * sum_{k >= t} kl_k over real tokens.
    config = PPOConfig(policy=tiny_policy, kl_coef=0.1, gamma=1.0, lam=1.0, whiten_advantages=False,
                       output_dir=str(tmp_path), tensorboard=False)
    trainer = PPOTrainer(config, FunctionReward(fraction_of_x), prompts=PROMPTS)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    kl = torch.tensor([[1.0, 2.0, 3.0, 99.0], [0.5, 99.0, 99.0, 99.0]])  # 99 = after EOS, must not count
    score = torch.tensor([1.0, 2.0])
    stats = {"values": torch.zeros(2, 4)}
    adv, returns, usable = compute_advantages(trainer.config.ppo, trainer.kl_ctl.value,
                                              AdvantageInputs(mask, score, score, kl, torch.tensor([True, True]), stats["values"]))
    # row 0: token rewards [-0.1, -0.2, -0.3 + 1] -> A = [0.4, 0.5, 0.7]; row 1: [-0.05 + 2] -> 1.95
    torch.testing.assert_close(adv, torch.tensor([[0.4, 0.5, 0.7, 0.0], [1.95, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, adv)  # values are 0
    assert usable.tolist() == [True, True]


def test_rloo_advantage_is_shared_by_every_token(tiny_policy, tmp_path):
    config = PPOConfig(policy=tiny_policy, estimator="rloo", group_size=2, whiten_advantages=False,
                       output_dir=str(tmp_path), tensorboard=False)
    trainer = PPOTrainer(config, FunctionReward(fraction_of_x), prompts=PROMPTS)
    mask = torch.tensor([[True, True], [True, False]])
    seq_reward = torch.tensor([1.0, 3.0])  # peers' baselines: 3 and 1 -> advantages -2 and +2
    adv, returns, _ = compute_advantages(trainer.config.ppo, trainer.kl_ctl.value,
                                         AdvantageInputs(mask, seq_reward, seq_reward, torch.zeros(2, 2),
                                                         torch.tensor([True, True]), None))
    assert returns is None and trainer.value_model is None
    torch.testing.assert_close(adv, torch.tensor([[-2.0, -2.0], [2.0, 2.0]]))


def _padding_invariance(trainer: PPOTrainer, prompts: list[str]) -> None:
    """Stats of each sample in a padded batch == stats of that sample alone, unpadded."""
    if trainer.value_model is not None:  # a zero head would make the value check vacuous
        torch.nn.init.normal_(trainer.value_model.head.weight, std=0.1)
    torch.manual_seed(0)
    rollout = trainer.generate(prompts)
    batched = trainer.collector.stats(rollout)
    assert len(set(rollout.query_mask.sum(1).tolist())) > 1, "prompts of different lengths are needed"
    for i in range(len(prompts)):
        n = int(rollout.response_mask[i].sum())
        q = rollout.query_ids[i][rollout.query_mask[i].bool()][None]  # (1, P_i) no padding
        single = Rollout([prompts[i]], [""], q, torch.ones_like(q), rollout.response_ids[i:i + 1, :n],
                         rollout.response_mask[i:i + 1, :n], rollout.has_eos[i:i + 1])
        alone = trainer.collector.stats(single)
        for key, value in batched.items():
            assert torch.isfinite(value).all(), f"{key} has non-finite entries"
            torch.testing.assert_close(value[i, :n], alone[key][0], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{key} of sample {i} depends on padding: {m}")


def test_logprobs_do_not_depend_on_padding(tiny_policy, tmp_path):
    config = PPOConfig(policy=tiny_policy, max_new_tokens=10, temperature=0.9, output_dir=str(tmp_path),
                       tensorboard=False)
    trainer = PPOTrainer(config, FunctionReward(fraction_of_x), prompts=PROMPTS)
    _padding_invariance(trainer, ["a b c d e f", "b", "c d", "h a"])


@pytest.mark.slow
def test_logprobs_do_not_depend_on_padding_real_model(tmp_path):
    # The embedded SmolLM2 with its chat template; LoRA so the reference is the adapter-disabled model.
    config = PPOConfig(policy="default", lora_r=4, max_new_tokens=6, output_dir=str(tmp_path), tensorboard=False,
                       forward_batch_size=4)
    trainer = PPOTrainer(config, FunctionReward(lambda p, r: 0.0), prompts=["x"])
    _padding_invariance(trainer, ["What is 2+2? Answer briefly.", "Hi", "Name three colors of the rainbow."])


# ----------------------------------------------------------------------------- missing rewards


def _flaky(prompt: str, response: str) -> float | None:
    # Cannot score prompts starting with "b": deterministic "judge failures".
    return None if prompt.startswith("b") else fraction_of_x(prompt, response)


def test_missing_reward_fails_by_default(tiny_policy, tmp_path):
    config = PPOConfig(policy=tiny_policy, steps=1, batch_size=6, max_new_tokens=4, output_dir=str(tmp_path),
                       tensorboard=False)
    trainer = PPOTrainer(config, FunctionReward(_flaky), prompts=PROMPTS)
    with pytest.raises(MissingRewardError, match="on_missing_reward: skip"):
        trainer.step()


def test_missing_reward_skip_drops_samples_and_logs_count(tiny_policy, tmp_path):
    config = PPOConfig(policy=tiny_policy, steps=1, batch_size=6, max_new_tokens=4, output_dir=str(tmp_path),
                       tensorboard=False, on_missing_reward="skip")
    trainer = PPOTrainer(config, FunctionReward(_flaky), prompts=PROMPTS)
    record = trainer.step()
    # PROMPTS holds exactly one prompt starting with "b"; all 6 prompts are drawn once.
    assert record["reward_missing"] == 1
    assert record["samples_used"] == 5
    assert math.isfinite(record["policy_loss"])


def test_all_rewards_missing_skips_the_update(tiny_policy, tmp_path):
    config = PPOConfig(policy=tiny_policy, steps=1, batch_size=2, max_new_tokens=4, output_dir=str(tmp_path),
                       tensorboard=False, on_missing_reward="skip")
    trainer = PPOTrainer(config, FunctionReward(lambda p, r: None), prompts=PROMPTS)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    record = trainer.step()
    assert record["samples_used"] == 0 and "policy_loss" not in record
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


# ----------------------------------------------------------------------------- reward sources


def test_function_reward_validates_output():
    assert FunctionReward(fraction_of_x).rewards(["p", "p"], ["x a", ""]) == [0.5, 0.0]
    # NaN/inf mean "could not score": they come back as None, never as a number
    assert FunctionReward(lambda p, r: float("nan")).rewards(["p"], ["r"]) == [None]
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        FunctionReward(lambda ps, rs: [1.0], batched=True).rewards(["p", "q"], ["r", "s"])
    with pytest.raises(TypeError, match="expected a float or None"):
        FunctionReward(lambda p, r: "high").rewards(["p"], ["r"])


def test_weighted_reward():
    helpful = FunctionReward(lambda p, r: 1.0, name="helpful")
    harmless = FunctionReward(lambda p, r: None if r == "bad" else 0.5, name="harmless")
    combined = WeightedReward([helpful, harmless], [1.0, 2.0])
    # 1.0*1 + 2.0*0.5 = 2.0; the second sample has a missing component -> None, not a partial sum
    assert combined.rewards(["p", "p"], ["ok", "bad"]) == [2.0, None]
    assert combined.last_components == {"helpful": [1.0, 1.0], "harmless": [0.5, None]}
    with pytest.raises(ValueError, match="one weight per source"):
        WeightedReward([helpful], [1.0, 2.0])


def test_running_normalizer():
    values = iter([[1.0, 3.0], [5.0, None]])
    norm = RunningNormalizer(FunctionReward(lambda ps, rs: next(values), batched=True), clip=1.0)
    # batch 1: mean 2, population std 1 -> [-1, 1]
    assert norm.rewards(["p", "p"], ["a", "b"]) == pytest.approx([-1.0, 1.0], abs=1e-6)
    # batch 2 merges 5 into the stats: mean 3, std sqrt(8/3); (5 - 3)/1.633 = 1.22 -> clipped to 1
    out = norm.rewards(["p", "p"], ["a", "b"])
    assert out[0] == pytest.approx(1.0) and out[1] is None
    assert norm.mean == pytest.approx(3.0) and norm.std == pytest.approx(math.sqrt(8 / 3))
    restored = RunningNormalizer(FunctionReward(fraction_of_x))
    restored.load_state_dict(norm.state_dict())
    assert (restored.mean, restored.std) == (norm.mean, norm.std)


def test_trl_adapters_follow_trl_calling_convention():
    from trl.trainer.utils import get_callable_name, is_async_callable

    seen = []

    def record(p, r):
        seen.append((p, r))
        return fraction_of_x(p, r)

    source = FunctionReward(record)
    func = trl_reward_func(source, name="x_judge")
    assert get_callable_name(func) == "x_judge" and not is_async_callable(func)
    # standard format (strings) and conversational format (message lists), with TRL's extra kwargs
    assert func(prompts=["q"], completions=["x a"], completion_ids=[[1]], trainer_state=None) == [0.5]
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q2"}]
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "x x"}]}]
    assert func(prompts=[conversation], completions=[completion]) == [1.0]
    assert seen[-1] == ("q2", "x x")

    afunc = trl_async_reward_func(source)
    assert is_async_callable(afunc)
    assert asyncio.run(afunc(prompts=["q"], completions=["a"], log_metric=None)) == [0.0]


def test_unchanged_policy_has_exactly_the_reference_log_probs(tiny_policy, tmp_path):
    # The rollout's policy log-probs come from the same kind of full forward pass as the reference's,
    # not from generation's incremental KV-cache logits (which differ by float noise): before any
    # update the policy IS the reference, so every per-token log-prob, and the KL, is exactly equal.
    config = PPOConfig(policy=tiny_policy, max_new_tokens=10, temperature=0.7, output_dir=str(tmp_path),
                       tensorboard=False)
    trainer = PPOTrainer(config, FunctionReward(fraction_of_x), prompts=PROMPTS)
    torch.manual_seed(0)
    rollout = trainer.generate(PROMPTS * 2)
    stats = trainer.collector.stats(rollout)
    mask = rollout.response_mask
    assert mask.sum() > 0
    assert torch.equal(stats["logprobs"][mask], stats["ref_logprobs"][mask])
