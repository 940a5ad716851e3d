"""The engine protocol every backend implements (HF transformers, vLLM, OpenAI-compatible HTTP).

Judges only ever need two things from a language model:
- `label_probs`: the distribution over a small, closed set of answer labels as the model's
  next tokens (single-token labels in one forward pass; multi-token labels such as "10" by
  the summed log-probs of their tokens), normalized over that set;
- `generate`: free text, for chain-of-thought rationales and for policy rollouts.

Keeping the protocol this small is what lets the same judge run in-process on CPU, on a
GPU with vLLM, or against any OpenAI-compatible server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from judge.types import ChatPrompt


class EngineError(RuntimeError):
    """An engine could not produce what was asked (server down, no logprobs, OOM, ...)."""


class GenerationParams(BaseModel):
    """Decoding settings for `Engine.generate`. Part of every cache key that involves generation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64, description="Samples per prompt.")
    seed: int | None = Field(None, description="Seed for sampling; same seed + same batch -> same text.")
    stop: tuple[str, ...] = Field((), description="Extra stop strings (EOS always stops).")


@runtime_checkable
class Engine(Protocol):
    """What a judge needs from a model backend."""

    @property
    def engine_id(self) -> str:
        """Stable identity of engine + model (+ precision), used in cache keys and results."""
        ...

    @property
    def model_name(self) -> str:
        """Human-readable model name reported in judgments."""
        ...

    def label_probs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(prompts), len(labels)); each row sums to 1.

        The probability of label `l` for prompt `p` is proportional to
        exp(sum of log P(token) over the tokens of `l`) with `l` as the first tokens of the
        assistant's reply after the chat template has been applied to `p`.
        """
        ...

    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        """Return `params.n` completions for each prompt (outer list aligned with `prompts`)."""
        ...


def normalize_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for very negative log-probs. (N, L) -> (N, L)."""
    shifted = log_probs - log_probs.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    return probs / probs.sum(axis=-1, keepdims=True)


def encode_chat_prompt(tokenizer: Any, prompt: ChatPrompt) -> list[int]:
    """Chat template + generation header, tokenized without adding extra special tokens.

    Engines that tokenize locally (HF, vLLM) share this, so both see the same ids for a prompt."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_label_ids(tokenizer: Any, label: str) -> list[int]:
    """Token ids of a label as it follows the prompt; a label that tokenizes to nothing is an error."""
    ids = list(tokenizer(label, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EngineError(f"label {label!r} tokenizes to nothing")
    return ids
