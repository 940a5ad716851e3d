"""`VLLMEngine`: judge and generate with in-process vLLM (GPU), with prefix caching.

**Not run on real vLLM here.** vLLM needs CUDA and cannot be installed on the CPU machines this
project is developed and tested on. This module is written against vLLM's documented offline API
(`vllm.LLM`, `SamplingParams(max_tokens, temperature, logprobs)`, `vllm.inputs.TokensPrompt`,
`RequestOutput.outputs[i].token_ids` / `.logprobs`), and its label math is tested against
`HFEngine` through a stand-in `vllm` module backed by transformers (tests/test_engine_agreement.py),
which checks our use of those fields, not vLLM itself.

How labels are scored (the project's one label semantics, `rlaif.judge.engines.base`: log P(the reply is
exactly the label)), with ordinary generation requests only, so vLLM's prefix cache serves every
one of them:

- One request per distinct token prefix of the labels, including each whole label, with
  `max_tokens=1, logprobs=k`: the top-k after `prompt + label[:j]` gives log P(label[j]) (the floor
  of `missing_label_floor` when absent), and the top-k after the whole label gives the mass of the
  tokens that end it (the same per-vocabulary rule as `HFEngine`, looked up by token id). Ending
  tokens outside the top-k are unseen, so P(exact label) is a lower bound, as on any top-k server.
- The request for the bare prompt asks for two tokens: the second position's top-k follows the
  greedy first token, which covers the ending check of the label the judge actually chose.
- A/B labels: 3 requests per prompt (prompt, prompt + "A", prompt + "B"), the last two one token
  past a cached prefix; "1".."10": 12 (prompt, each label, and "1" + "0").

Prompts are rendered with the model's own chat template and passed as token ids, exactly as
`HFEngine` does, so both engines see identical token sequences.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlaif.judge.engines.base import (
    EngineError,
    GenerationParams,
    LocalTokenizerMixin,
    check_labels,
    missing_label_floor,
    tokenizer_special_tokens,
)
from rlaif.judge.types import ChatPrompt

INSTALL_HINT = "vLLM is not installed: pip install 'rlaif[vllm]' on a CUDA machine"


class VLLMEngine(LocalTokenizerMixin):
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
        model_config = self.llm.llm_engine.model_config
        self._dtype = str(model_config.dtype).removeprefix("torch.")
        self._context_length = getattr(model_config, "max_model_len", None)
        self._fingerprint = _model_identity(model)
        self._lock = threading.Lock()

    @property
    def engine_id(self) -> str:
        return f"vllm:{self._name}@{self._dtype}/cuda#{self._fingerprint}"

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def context_length(self) -> int | None:
        return int(self._context_length) if self._context_length else None

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tokenizer_special_tokens(self.tokenizer)

    # ------------------------------------------------------------------ labels
    def label_logprobs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(labels)))
        targets = check_labels(labels)
        prompt_ids = [tuple(self.encode_prompt(p)) for p in prompts]
        label_ids = [tuple(self.encode_label(label)) for label in targets]
        ending = self.label_ending_masks(tuple(targets))
        # Distinct continuations to request: (prompt row, label token prefix), the bare prompt first.
        prefixes = sorted({tokens[:j] for tokens in label_ids for j in range(len(tokens) + 1)}, key=len)
        requests = [(row, prefix) for row in range(len(prompt_ids)) for prefix in prefixes]
        tops: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
        with self._lock:
            outputs = self._generate([self._tokens_prompt(list(prompt_ids[row] + prefix)) for row, prefix in requests],
                                     [self._params(2 if not prefix else 1) for _, prefix in requests])
        for (row, prefix), output in zip(requests, outputs):
            completion = output.outputs[0]
            steps = completion.logprobs or []
            if not steps:
                raise EngineError("vLLM returned no logprobs; is max_logprobs >= top_logprobs?")
            tops.setdefault((row, prefix), _as_logprobs(steps[0]))
            if not prefix and len(steps) > 1 and completion.token_ids:
                tops.setdefault((row, (int(completion.token_ids[0]),)), _as_logprobs(steps[1]))
        scores = np.empty((len(prompt_ids), len(label_ids)))
        for row in range(len(prompt_ids)):
            for k, tokens in enumerate(label_ids):
                total = 0.0
                for j, token in enumerate(tokens):
                    top = tops[(row, tokens[:j])]
                    total += top.get(token, missing_label_floor(list(top.values())))
                after = tops[(row, tokens)]
                mass = sum(np.exp(lp) for token, lp in after.items() if token < len(ending[k]) and ending[k][token])
                scores[row, k] = total + (np.log(mass) if mass > 0 else -np.inf)
        return scores

    def _params(self, max_tokens: int) -> Any:
        return self._vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=self.top_logprobs)

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


def _as_logprobs(step: Any) -> dict[int, float]:
    """vLLM's per-position `{token_id: Logprob}` as `{token_id: float}`."""
    return {int(token): float(getattr(entry, "logprob", entry)) for token, entry in step.items()}


def _model_identity(model: str) -> str:
    """Content fingerprint when the model's files are local (path or cached hub id), else the name."""
    from rlaif.judge.models import ModelNotFound, model_fingerprint

    try:
        return model_fingerprint(model)
    except ModelNotFound:
        return f"unresolved:{model}"


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.lower() in {"1", "true", "yes", "on"}
    return bool(value)
