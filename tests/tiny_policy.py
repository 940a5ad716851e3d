"""A tiny random Llama policy over a 16-word vocabulary, for fast PPO tests on CPU.

Shared by the PPO learning, checkpoint and distributed tests (and importable by the
distributed worker, which runs outside pytest): a 2-layer `LlamaForCausalLM` with a
word-level tokenizer whose pad token differs from EOS, randomly initialized with a fixed
seed, so its responses start near uniform and each PPO step takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
