"""A stand-in for the parts of vLLM's offline API that `rlaif.judge.engines.vllm.VLLMEngine` uses, backed by transformers.

**A mock of something that cannot run here**: vLLM needs CUDA and cannot be installed on the CPU
machines this project is tested on. It implements, with the documented field names and shapes,
`LLM(model=..., **kwargs)`, `LLM.get_tokenizer()`, `LLM.llm_engine.model_config.{dtype,max_model_len}`,
`LLM.generate(prompts, sampling_params, use_tqdm=False)` for `TokensPrompt` inputs with greedy
decoding and `logprobs=k`, returning `RequestOutput`-like objects whose `outputs[0]` has `token_ids`,
`text` and `logprobs` (one `{token_id: Logprob}` dict per generated position, holding the top-k
plus the sampled token, as vLLM does). Each prompt runs alone through the model (no batching), so
the numbers are those of the stock model. It checks our use of vLLM's fields, not vLLM itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

__version__ = "0.0-standin"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    logprobs: int | None = None
    n: int = 1
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    prompt_logprobs: int | None = None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = field(default=None)


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = kwargs
        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self._model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            dtype=torch.float32, max_model_len=int(getattr(self._model.config, "max_position_embeddings", 2048))))

    def get_tokenizer(self):
        return self._tokenizer

    @torch.inference_mode()
    def generate(self, prompts, sampling_params, use_tqdm: bool = True) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        results = []
        for prompt, param in zip(prompts, params):
            assert param.temperature == 0.0, "the stand-in only decodes greedily"
            ids = list(prompt["prompt_token_ids"])
            generated, steps = [], []
            for _ in range(param.max_tokens):
                logits = self._model(input_ids=torch.tensor([ids + generated])).logits[0, -1].float()
                log_probs = torch.log_softmax(logits, dim=-1)
                token = int(log_probs.argmax())
                step: dict[int, Logprob] = {}
                if param.logprobs:
                    values, indices = log_probs.topk(param.logprobs)
                    step = {int(i): Logprob(float(v), rank=r + 1) for r, (v, i) in enumerate(zip(values, indices))}
                step.setdefault(token, Logprob(float(log_probs[token])))
                steps.append(step)
                generated.append(token)
                if token == self._tokenizer.eos_token_id:
                    break
            text = self._tokenizer.decode(generated, skip_special_tokens=True)
            results.append(RequestOutput(prompt_token_ids=ids, outputs=[CompletionOutput(
                index=0, text=text, token_ids=generated, logprobs=steps if param.logprobs else None)]))
        return results
