"""TRL interop: our reward sources drive TRL's own `GRPOTrainer` through `trl_reward_func`.

A tiny random Llama (2 layers, hidden 64) with the embedded SmolLM2's real tokenizer and chat
template keeps a GRPO step to seconds on CPU. Checked: TRL calls our adapter with its
conversational prompts/completions, logs the reward under the function's name with the
values our source returned, and the step updates the model. The judge-backed variant scores
TRL's completions with the real embedded judge and compares with direct `ScoreJudge` calls.
"""

from __future__ import annotations

import pytest
import torch

from rlaif.judge.judges import ScoreJudge
from rlaif.judge.models import load_tokenizer
from rlaif.judge.types import ScoreItem
from rlaif.policy_training.judge_rewards import LocalJudgeReward
from rlaif.policy_training.rewards import FunctionReward, trl_reward_func


@pytest.fixture()
def one_thread():
    """One torch thread for this test (restored after): small models gain nothing from more, and on a
    shared CPU two spinning OpenMP threads are much slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PROMPTS = ["Name a color.", "Say hi.", "Count to three.", "What is 2+2?"]


class Recording:
    """Wraps a reward source and keeps every batch it scored (what TRL handed us, what we answered)."""

    def __init__(self, source) -> None:
        self.source = source
        self.calls: list[tuple[list[str], list[str], list[float | None]]] = []

    def rewards(self, prompts, responses):
        out = self.source.rewards(prompts, responses)
        self.calls.append((list(prompts), list(responses), list(out)))
        return out


def tiny_llama(plain_checkpoint_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(plain_checkpoint_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config), tokenizer


def run_one_grpo_step(plain_checkpoint_dir, tmp_path, reward_funcs):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny_llama(plain_checkpoint_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=1, learning_rate=1e-2, logging_steps=1, report_to="none",
                      save_strategy="no", use_cpu=True, seed=0, temperature=1.0, beta=0.0, bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    return trainer, before


def assert_trained(trainer, before):
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach().cpu(), before[name])}
    untouched = sorted(set(before) - changed - {"model.embed_tokens.weight"})  # only used embedding rows get gradients
    assert not untouched, f"parameters not updated by the GRPO step: {untouched}"


def test_function_reward_drives_trl_grpo(plain_checkpoint_dir, tmp_path, one_thread):
    source = Recording(FunctionReward(lambda prompt, response: len(set(response)) / 10.0))
    trainer, before = run_one_grpo_step(plain_checkpoint_dir, tmp_path, [trl_reward_func(source, name="distinct_chars")])

    assert source.calls, "TRL never called the reward function"
    prompts, responses, rewards = source.calls[0]
    assert set(prompts) <= set(PROMPTS)  # the adapter handed us the user turn's text, not a message list
    assert all(isinstance(r, str) for r in responses)
    assert rewards == [len(set(r)) / 10.0 for r in responses]
    logged = [entry for entry in trainer.state.log_history if "rewards/distinct_chars/mean" in entry]
    assert logged and logged[0]["rewards/distinct_chars/mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-5)
    assert_trained(trainer, before)


def test_local_judge_reward_drives_trl_grpo(plain_checkpoint_dir, default_engine, tmp_path, one_thread):
    judge_source = Recording(LocalJudgeReward(default_engine, mode="score"))
    length = FunctionReward(lambda prompt, response: len(response) / 100.0)
    trainer, before = run_one_grpo_step(plain_checkpoint_dir, tmp_path, [
        trl_reward_func(judge_source, name="judge_score"), trl_reward_func(length, name="length")])

    prompts, responses, rewards = judge_source.calls[0]
    direct = ScoreJudge(default_engine, "score-1-10").judge(
        [ScoreItem(prompt=p, response=r) for p, r in zip(prompts, responses)])
    assert rewards == pytest.approx([j.score for j in direct], abs=1e-4)
    logged = [entry for entry in trainer.state.log_history if "rewards/judge_score/mean" in entry]
    assert logged and logged[0]["rewards/judge_score/mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-4)
    assert "rewards/length/mean" in logged[0]
    assert_trained(trainer, before)
