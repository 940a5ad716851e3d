"""A tiny random Llama policy over a 16-word vocabulary, for fast PPO tests on CPU.

Shared by the PPO learning, checkpoint and distributed tests (and importable by the
distributed workers, which run outside pytest): a 2-layer `LlamaForCausalLM` with a
word-level tokenizer whose pad token differs from EOS, randomly initialized with a fixed
seed, so its responses start near uniform and each PPO step takes milliseconds.

For equivalence tests (gradient accumulation, data parallelism) it also offers a fixed
stand-in for sampling, so two trainers update on exactly the same rollout, and a recorder
of the gradients each optimizer step applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rlaif.policy_training.ppo import PPOTrainer, Rollout

VOCAB = ["<pad>", "<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "g", "h", "x", "y", "z", "w"]
PROMPTS = ["a b c", "d e", "f g h a", "b", "c c d e f", "h"]


def make_tiny_policy(path: Path, seed: int = 0) -> str:
    """Save a randomly initialized tiny Llama + word-level tokenizer (pad != EOS) to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def fraction_of_x(prompt: str, response: str) -> float:
    """Reward: share of "x" words in the response (~1/16 for the random policy)."""
    words = response.split()
    return words.count("x") / len(words) if words else 0.0


def distinct_words(prompt: str, response: str) -> float:
    """Reward: distinct words / 6; varies between samples, so group baselines see non-zero advantages."""
    return len(set(response.split())) / 6


FIXED_RESPONSES = ["x", "a b x x", "c d", "x y z w x", "e", "f g h a b c", "b x", "y y y"]
"""Responses of 1 to 6 words (+ EOS): micro-batches of different token counts, where a mean of
per-micro-batch means and the token mean over the minibatch disagree."""


def fixed_rollout(trainer: PPOTrainer, prompts: Sequence[str]) -> Rollout:
    """What `trainer.generate(prompts)` returns, with each response fixed by (prompt, copy index).

    The k-th copy of a prompt in `prompts` (groups are contiguous) gets
    FIXED_RESPONSES[(character sum of the prompt + k) % 8], so a prompt's group is the same in
    whichever process or batch it lands. Every response ends with EOS.
    """
    from rlaif.policy_training.ppo import Rollout

    seen: dict[str, int] = {}
    texts = []
    for prompt in prompts:
        k = seen[prompt] = seen.get(prompt, -1) + 1
        texts.append(FIXED_RESPONSES[(sum(map(ord, prompt)) + k) % len(FIXED_RESPONSES)])
    query_ids, query_mask = trainer.collector.encode_batch(prompts)
    rows = [trainer.tokenizer(t, add_special_tokens=False)["input_ids"] + [trainer.eos_ids[0]] for t in texts]
    R = max(len(r) for r in rows)
    response_ids = torch.full((len(rows), R), trainer.tokenizer.pad_token_id, dtype=torch.long)  # (N, R)
    response_mask = torch.zeros((len(rows), R), dtype=torch.bool)  # (N, R)
    for i, row in enumerate(rows):
        response_ids[i, :len(row)] = torch.tensor(row)
        response_mask[i, :len(row)] = True
    device = trainer.device
    return Rollout(list(prompts), texts, query_ids, query_mask, response_ids.to(device), response_mask.to(device),
                   torch.ones(len(rows), dtype=torch.bool, device=device))


def use_fixed_rollouts(trainer: PPOTrainer) -> None:
    """Replace the trainer's sampling with `fixed_rollout`."""
    trainer.generate = lambda prompts: fixed_rollout(trainer, prompts)  # type: ignore[method-assign]


def record_step_gradients(trainer: PPOTrainer) -> list[list[torch.Tensor]]:
    """Append, at every optimizer step of the trainer, a copy of the gradients it applies.

    Recorded right before `optimizer.step()`: after the all-reduce and gradient clipping. One
    list per step, one tensor per optimized parameter (zeros for a missing gradient), the
    policy's and (separate critic) the value model's steps interleaved as they happen.
    """
    steps: list[list[torch.Tensor]] = []

    def hook(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        steps.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for group in optimizer.param_groups for p in group["params"]])

    for optimizer in (trainer.policy_optimizer, trainer.value_optimizer):
        if optimizer is not None:
            optimizer.register_step_pre_hook(hook)
    return steps
