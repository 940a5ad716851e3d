"""`PreferenceEngine`: a judge engine whose verdicts follow fixed, known preferences (for the reward-mode math).

It implements the `rlaif.judge.engines.base.Engine` protocol (same signatures, unnormalized label
log-probs with a label mass below 1) and reads what a rubric rendered: the delimited responses,
criterion and the "Response N" index of a group question. Its answers come from a `quality`
function of a response's text, so tests know the right result exactly:

- pairwise prompts (labels [A, B]): P(first better) = sigmoid(q(first) - q(second) + position_bias);
- group (listwise) prompts (numeric labels): a label distribution centred on
  clip(5 + 2 q(asked) + position_bias * [asked response is shown first], 0, 10);
- checklist prompts (labels [Yes, No]): P(yes) = `criterion_yes[criterion text]`;
- score prompts: centred on 5 + 2 q(response).

Used for Bradley-Terry recovery, order averaging, checklist aggregation and the GRPO learning
test, beside (never instead of) the real-model tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rlaif.judge.engines.base import GenerationParams
from rlaif.judge.types import ChatPrompt

_BLOCK = {name: re.compile(rf"<{name}>\n(.*?)\n</{name}>", re.S) for name in ("response_a", "response_b", "response",
                                                                             "criterion")}
_INDEX = re.compile(r"Response number: (\d+)")


class PreferenceEngine:
    """Fixed preferences as label log-probs (see the module docstring)."""

    special_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")

    def __init__(self, quality: Callable[[str], float], *, position_bias: float = 0.0,
                 criterion_yes: Mapping[str, float] | None = None, mass: float = 0.9) -> None:
        self.quality = quality
        self.position_bias = position_bias
        self.criterion_yes = dict(criterion_yes or {})
        self.mass = mass
        self.calls = 0
        self.prompts_seen = 0

    engine_id = "fake:preference"
    model_name = "preference-test-engine"
    context_length = 100_000

    def label_logprobs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.prompts_seen += len(prompts)
        rows = [self._probs(prompt[-1]["content"], list(labels)) for prompt in prompts]
        return np.log(np.clip(np.array(rows), 1e-300, None) * self.mass)

    def _probs(self, text: str, labels: list[str]) -> list[float]:
        if labels[0] in ("Yes", "yes"):
            criterion = _BLOCK["criterion"].findall(text)[0]
            p = self.criterion_yes[criterion]
            return [p, 1.0 - p]
        if len(labels) == 2:  # pairwise
            first, second = _BLOCK["response_a"].findall(text)[0], _BLOCK["response_b"].findall(text)[0]
            p = 1.0 / (1.0 + math.exp(-(self.quality(first) - self.quality(second) + self.position_bias)))
            return [p, 1.0 - p]
        responses = _BLOCK["response"].findall(text)
        index = _INDEX.search(text)
        if index is not None:  # a group question about response `index`
            asked = int(index.group(1)) - 1
            centre = 5.0 + 2.0 * self.quality(responses[asked]) + (self.position_bias if asked == 0 else 0.0)
        else:
            centre = 5.0 + 2.0 * self.quality(responses[0])
        values = np.array([float(label) for label in labels])
        logits = -((values - np.clip(centre, values.min(), values.max())) ** 2)
        probs = np.exp(logits - logits.max())
        return list(probs / probs.sum())

    def prompt_token_counts(self, prompts: Sequence[ChatPrompt]) -> list[int]:
        return [sum(len(m["content"]) for m in p) // 4 + 1 for p in prompts]

    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        return [["rationale"] * params.n for _ in prompts]
