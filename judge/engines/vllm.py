"""`VLLMEngine`: judge and generate with in-process vLLM (GPU), with prefix caching.

**Untested here.** vLLM needs CUDA and cannot be installed on the CPU machines this project
is developed and tested on; this module is written against vLLM's documented offline API
(`vllm.LLM`, `SamplingParams`, `vllm.inputs.TokensPrompt`, `RequestOutput.outputs[i].logprobs`
and `RequestOutput.prompt_logprobs`) and only its missing-dependency error is tested. The
same judges run on CPU through `HFEngine`, or against `vllm serve` through `OpenAIEngine`,
which is tested against a real llama.cpp server.

How labels are scored (same definition as `HFEngine`: a label's probability is that of its
tokens as the start of the assistant reply, normalized over the label set):

- **Single-token label sets** (A/B): one request per prompt, `max_tokens=1` with
  `logprobs=k`; the label token ids are looked up in the returned top-k (plus the sampled
  token). A label outside the top-k gets the floor log-prob documented in
  `judge.engines.openai.missing_label_floor`. With `enable_prefix_caching=True` (our default)
  the shared rubric prefix is computed once across the batch.
- **Multi-token label sets** ("1".."10" with "10" = "1" + "0"): each label is appended to the
  prompt and scored exactly with `prompt_logprobs=0` (vLLM always returns the log-prob of the
  actual prompt token). Labels whose tokens are a prefix of another label's ("1" of "10") ride
  on that label's request, so "1".."10" needs 9 requests per prompt. vLLM may not reuse the
  prefix cache for requests that ask for prompt log-probs, so these cost a full prompt pass
  per request; prefer single-token labels on vLLM when throughput matters.

Prompts are rendered with the model's own chat template and passed as token ids, exactly as
`HFEngine` does, so both engines see identical token sequences.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from judge.engines.base import (
    EngineError,
    GenerationParams,
    encode_chat_prompt,
    encode_label_ids,
    normalize_log_probs,
)
from judge.engines.openai import missing_label_floor
from judge.types import ChatPrompt

INSTALL_HINT = "vLLM is not installed: pip install 'rlaif[vllm]' on a CUDA machine"


class VLLMEngine:
    """In-process vLLM engine. Construct once (it owns the GPU); calls are serialized by a lock."""

    def __init__(self, model: str, *, name: str | None = None, enable_prefix_caching: bool = True,
                 top_logprobs: int = 20, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0, **llm_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(INSTALL_HINT) from exc
        self._vllm = vllm
        self.top_logprobs = int(top_logprobs)
        kwargs: dict[str, Any] = {"model": model, "enable_prefix_caching": _as_bool(enable_prefix_caching),
                                  "tensor_parallel_size": int(tensor_parallel_size),
                                  "gpu_memory_utilization": float(gpu_memory_utilization), "dtype": dtype,
                                  "seed": int(seed), "max_logprobs": max(self.top_logprobs, 20), **llm_kwargs}
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise EngineError(f"{model}: the tokenizer has no chat template; judges need a chat/instruct model")
        self._model = model
        self._name = name or model
        self._dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self._lock = threading.Lock()

    @property
    def engine_id(self) -> str:
        return f"vllm:{self._model}@{self._dtype}"

    @property
    def model_name(self) -> str:
        return self._name

    # ------------------------------------------------------------------ tokenization
    def encode_prompt(self, prompt: ChatPrompt) -> list[int]:
        return encode_chat_prompt(self.tokenizer, prompt)

    def encode_label(self, label: str) -> list[int]:
        return encode_label_ids(self.tokenizer, label)

    # ------------------------------------------------------------------ label_probs
    def label_probs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(labels)))
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        label_ids = [self.encode_label(label) for label in labels]
        with self._lock:
            if all(len(tokens) == 1 for tokens in label_ids):
                scores = self._single_token_scores(prompt_ids, [tokens[0] for tokens in label_ids])
            else:
                scores = self._continuation_scores(prompt_ids, label_ids)
        return normalize_log_probs(scores)

    def _single_token_scores(self, prompt_ids: list[list[int]], label_tokens: list[int]) -> np.ndarray:
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)
        outputs = self._generate([self._tokens_prompt(ids) for ids in prompt_ids], params)
        scores = np.empty((len(prompt_ids), len(label_tokens)))
        for row, output in enumerate(outputs):
            step = output.outputs[0].logprobs[0]  # dict[token id, Logprob] for the first generated token
            floor = missing_label_floor([entry.logprob for entry in step.values()])
            scores[row] = [step[token].logprob if token in step else floor for token in label_tokens]
        return scores

    def _continuation_scores(self, prompt_ids: list[list[int]], label_ids: list[list[int]]) -> np.ndarray:
        """Exact sum of label-token log-probs from `prompt_logprobs` of prompt + label."""
        leaves = [k for k, tokens in enumerate(label_ids)
                  if not any(len(other) > len(tokens) and other[:len(tokens)] == tokens for other in label_ids)]
        requests = [(row, k) for row in range(len(prompt_ids)) for k in leaves]
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._generate([self._tokens_prompt(prompt_ids[row] + label_ids[k]) for row, k in requests], params)
        # Per prompt: log P(token at position p) for every scored continuation position.
        position_logprob: list[dict[tuple[int, ...], float]] = [{} for _ in prompt_ids]
        for (row, k), output in zip(requests, outputs):
            start = len(prompt_ids[row])
            tokens = label_ids[k]
            for j, token in enumerate(tokens):
                entry = output.prompt_logprobs[start + j]
                position_logprob[row][tuple(tokens[:j + 1])] = entry[token].logprob
        scores = np.empty((len(prompt_ids), len(label_ids)))
        for row in range(len(prompt_ids)):
            for k, tokens in enumerate(label_ids):
                scores[row, k] = sum(position_logprob[row][tuple(tokens[:j + 1])] for j in range(len(tokens)))
        return scores

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        if not prompts:
            return []
        if params.n > 1 and params.temperature == 0:
            raise EngineError("n > 1 needs temperature > 0 (greedy decoding would repeat the same text)")
        sampling = self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                             max_tokens=params.max_new_tokens, seed=params.seed,
                                             stop=list(params.stop) or None)
        with self._lock:
            outputs = self._generate([self._tokens_prompt(self.encode_prompt(p)) for p in prompts], sampling)
        return [[completion.text.strip() for completion in output.outputs] for output in outputs]

    # ------------------------------------------------------------------ plumbing
    def _tokens_prompt(self, ids: list[int]) -> Any:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=list(ids))

    def _generate(self, prompts: list[Any], params: Any) -> list[Any]:
        import torch

        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except torch.OutOfMemoryError as exc:
            raise EngineError(f"vLLM ran out of GPU memory on {len(prompts)} prompts: lower "
                              "gpu_memory_utilization or max_model_len, or send smaller batches") from exc
        except (RuntimeError, ValueError) as exc:  # vLLM's engine and validation errors
            raise EngineError(f"vLLM generate failed: {type(exc).__name__}: {exc}") from exc


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.lower() in {"1", "true", "yes", "on"}
    return bool(value)

