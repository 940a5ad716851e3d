"""The three engines implement one label semantics: they agree on the same model within stated tolerances.

- `HFEngine` (exact, full vocabulary) on the dequantized fp32 checkpoint of the embedded GGUF;
- `VLLMEngine`'s label math through a transformers-backed stand-in for vLLM's offline API
  (tests/vllm_standin: vLLM needs CUDA and cannot run here, see its docstring) on the same
  checkpoint: top-20 lists only, so P(ending) is a lower bound; tolerance 0.02 on normalized
  probabilities, 0.05 on label mass;
- `OpenAIEngine` against a real llama.cpp server on the Q4_1 GGUF itself: quantized weights,
  top-20 lists; tolerance 0.15 on normalized probabilities and label mass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rlaif.judge.engines.base import label_distribution
from rlaif.judge.engines.openai import OpenAIEngine
from rlaif.judge.rubric import load_rubric
from tests.llamacpp import MODEL_ALIAS, llamacpp_server_module  # noqa: F401 - pytest fixture

STANDIN = Path(__file__).parent / "vllm_standin"


def _few_shot(score: str) -> list[dict[str, str]]:
    messages = []
    for k in range(3):
        messages += [{"role": "user", "content": f"Rate this answer from 1 to 10: 'perfect answer {k}'"},
                     {"role": "assistant", "content": score}]
    return messages + [{"role": "user", "content": "Rate this answer from 1 to 10: 'perfect answer'"}]


@pytest.fixture(scope="module")
def cases():
    pairwise, score = load_rubric("helpfulness"), load_rubric("score-1-10")
    return {
        "pairwise": ([pairwise.render(prompt="What is the capital of France?", response_a="Paris.", response_b="Lyon."),
                      pairwise.render(prompt="What is the capital of France?", response_a="Lyon.", response_b="Paris."),
                      pairwise.render(prompt="Say hello.", response_a="Hello!", response_b="Go away.")], pairwise.labels),
        "score": ([score.render(prompt="What is 2+2?", response="4"), _few_shot("10"), _few_shot("9")], score.labels),
    }


@pytest.fixture(scope="module")
def vllm_engine(plain_checkpoint_dir):
    sys.path.insert(0, str(STANDIN))
    try:
        from rlaif.judge.engines.vllm import VLLMEngine

        yield VLLMEngine(str(plain_checkpoint_dir), name="smollm2")
    finally:
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]


@pytest.mark.parametrize("kind", ["pairwise", "score"])
def test_vllm_label_math_agrees_with_hf(default_engine, vllm_engine, cases, kind):
    prompts, labels = cases[kind]
    hf = label_distribution(default_engine.label_logprobs(prompts, labels))
    vllm = label_distribution(vllm_engine.label_logprobs(prompts, labels))
    assert np.abs(hf.probs - vllm.probs).max() < 0.02, (hf.probs, vllm.probs)
    assert np.abs(hf.mass - vllm.mass).max() < 0.05, (hf.mass, vllm.mass)
    assert np.all(vllm.mass <= hf.mass + 1e-4), "top-k ending mass is a lower bound of the exact one"


@pytest.mark.parametrize("kind", ["pairwise", "score"])
def test_llamacpp_agrees_with_hf(default_engine, llamacpp_server_module, cases, kind):
    prompts, labels = cases[kind]
    hf = label_distribution(default_engine.label_logprobs(prompts, labels))
    with OpenAIEngine(llamacpp_server_module.base_url, MODEL_ALIAS) as engine:
        served = label_distribution(engine.label_logprobs(prompts, labels))
    assert np.abs(hf.probs - served.probs).max() < 0.15, (hf.probs, served.probs)
    assert np.abs(hf.mass - served.mass).max() < 0.15, (hf.mass, served.mass)
    if kind == "score":  # the certain-10 conversation scores 10 on every engine
        assert int(served.probs[1].argmax()) == 9 and int(hf.probs[1].argmax()) == 9


def test_vllm_engine_reports_identity_and_budgets(vllm_engine, default_engine):
    assert vllm_engine.engine_id.startswith("vllm:smollm2@float32/cuda#")
    assert vllm_engine.engine_id.split("#")[1] == default_engine.engine_id.split("#")[1], "same files, same fingerprint"
    assert vllm_engine.context_length == 8192
    assert "<|im_end|>" in vllm_engine.special_tokens
