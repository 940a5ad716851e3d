"""`HFEngine.generate`'s slot sampler (`rlaif.judge.engines.sampling`) against slow references.

- greedy: token for token what stock transformers `generate()` returns, on the embedded model and on
  tiny random models of several architectures;
- sampling: what a slow reference returns that runs each sequence alone through the stock model,
  recomputing the whole sequence every step (no cache, no padding, no mask), with the same per-step
  uniforms and a plain full-vocabulary CDF;
- a sample depends only on (seed, prompt, copy, index): the same texts whatever the slot count (refills
  and slot moves), the call's other prompts, or their order;
- stop strings end rows early without changing the text; `progress` counts every sequence;
- models the exactness rule does not vouch for use transformers' `generate()`.
"""

from __future__ import annotations

import pytest
import torch

from rlaif.judge.engines.base import GenerationParams
from rlaif.judge.engines.sampling import inverse_cdf, pick_tokens, sequence_key, step_uniform

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("What is the capital of France?", "Write a haiku about the sea, with a title.", "Name three colors.",
            "Explain recursion to a child in two sentences.")]


# ---------------------------------------------------------------------------------- references
def reference_pick(logits: torch.Tensor, u: float, temperature: float, top_p: float) -> int:
    """The textbook draw: softmax in float64, top-p by sorting, first index whose CDF reaches u."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.arange(len(probs))
    if top_p < 1.0:
        probs, order = probs.sort(descending=True)
        keep = (probs.cumsum(0) - probs) < top_p
        probs = probs * keep
    cdf = probs.cumsum(0)
    index = int((cdf < u * cdf[-1]).sum())
    return int(order[min(index, len(order) - 1)])


@torch.inference_mode()
def reference_generate(engine, prompt, params: GenerationParams, occurrence: int = 0) -> list[str]:
    """One sequence at a time, whole sequence recomputed every step through the stock model."""
    ids = engine.encode_prompt(prompt)
    stops = engine._stop_token_ids()
    texts = []
    for sample in range(params.n):
        key = sequence_key(params.seed, ids, occurrence, sample)
        tokens: list[int] = []
        for step in range(params.max_new_tokens):
            logits = engine.model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].float()
            token = reference_pick(logits, step_uniform(key, step), params.temperature, params.top_p)
            if token in stops:
                break
            tokens.append(token)
        texts.append(engine.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


def stock_generate(engine, prompts, params: GenerationParams) -> list[list[str]]:
    with engine._lock:
        return engine._generate_stock([engine.encode_prompt(p) for p in prompts], params, None)


# ---------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize(("weights", "u", "expected"), [
    ([0.1, 0.2, 0.7], 0.05, 0),       # inside the first token's mass
    ([0.1, 0.2, 0.7], 0.1, 0),        # exactly on a boundary: the token that reaches it
    ([0.1, 0.2, 0.7], 0.1000001, 1),  # just past it
    ([0.0, 0.0, 1.0], 1e-9, 2),       # zero-mass tokens are never picked
    ([2.0, 2.0], 0.75, 1),            # unnormalized weights: u scales the total
])
def test_inverse_cdf_cases(weights, u, expected):
    assert int(inverse_cdf(torch.tensor([weights]), torch.tensor([u]))[0]) == expected


def test_inverse_cdf_matches_a_full_cumsum_across_blocks():
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand((64, 49152 + 7), generator=generator) ** 8  # several blocks, a ragged last one
    uniforms = torch.rand(64, generator=generator, dtype=torch.float64)
    fast = inverse_cdf(weights, uniforms)
    cdf = weights.double().cumsum(-1)
    slow = (cdf < uniforms.unsqueeze(1) * cdf[:, -1:]).sum(-1)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3, 1e-6])
def test_pick_tokens_matches_the_textbook_draw(top_p):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn((32, 1000), generator=generator) * 3
    uniforms = torch.rand(32, generator=generator, dtype=torch.float64)
    fast = pick_tokens(logits, uniforms, temperature=0.8, top_p=top_p)
    assert fast.tolist() == [reference_pick(logits[i], float(uniforms[i]), 0.8, top_p) for i in range(32)]


def test_step_uniforms_are_in_range_and_distinct():
    key = sequence_key(0, [1, 2, 3], 0, 0)
    values = [step_uniform(key, step) for step in range(10000)]
    assert all(0.0 < v < 1.0 for v in values) and len(set(values)) == len(values)
    assert abs(sum(values) / len(values) - 0.5) < 0.01
    assert sequence_key(0, [1, 2, 3], 0, 1) != key != sequence_key(1, [1, 2, 3], 0, 0)


# ---------------------------------------------------------------------------------- the embedded model
def test_embedded_model_uses_the_slot_path(default_engine):
    assert default_engine.generate_path == "slots"


def test_greedy_equals_stock_transformers(default_engine):
    params = GenerationParams(max_new_tokens=16)
    assert default_engine.generate(PROMPTS, params) == stock_generate(default_engine, PROMPTS, params)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_equals_the_slow_reference(default_engine, top_p):
    params = GenerationParams(max_new_tokens=10, temperature=0.9, top_p=top_p, n=2, seed=3)
    fast = default_engine.generate(PROMPTS[:2], params)
    assert fast == [reference_generate(default_engine, p, params) for p in PROMPTS[:2]]
    assert len({text for samples in fast for text in samples}) == 4


def test_a_sample_does_not_depend_on_its_batch(default_engine):
    params = GenerationParams(max_new_tokens=12, temperature=0.8, n=3, seed=11)
    together = default_engine.generate(PROMPTS, params)
    assert together == [default_engine.generate([p], params)[0] for p in PROMPTS]  # alone
    assert default_engine.generate(PROMPTS[::-1], params) == together[::-1]  # other order
    saved = default_engine.max_batch_size
    try:
        default_engine.max_batch_size = 1  # 3 slots: every prompt waits for a free slot, rows move
        assert default_engine.generate(PROMPTS, params) == together
    finally:
        default_engine.max_batch_size = saved
    # A repeated prompt is another copy, with its own samples; the first copy keeps its texts.
    repeated = default_engine.generate([PROMPTS[0], PROMPTS[0]], params)
    assert repeated[0] == together[0] and repeated[1] != repeated[0]
    assert default_engine.generate(PROMPTS, params.model_copy(update={"seed": 12})) != together


def test_stop_strings_end_rows_early_with_the_same_text(default_engine):
    base = GenerationParams(max_new_tokens=40, temperature=0.8, n=2, seed=5)
    full = default_engine.generate(PROMPTS[1:3], base)
    stop = next(word for word in full[0][0].split() if len(word) > 3)
    stopped = default_engine.generate(PROMPTS[1:3], base.model_copy(update={"stop": (stop,)}))
    from rlaif.judge.engines.hf import _cut_at_stop

    assert stopped == [[_cut_at_stop(text, (stop,)).strip() for text in samples] for samples in full]


def test_progress_moves_every_step_and_adds_up_to_the_sequences(default_engine):
    seen: list[float] = []
    default_engine.generate(PROMPTS[:3], GenerationParams(max_new_tokens=6, temperature=0.7, n=2, seed=0),
                            progress=seen.append)
    assert sum(seen) == pytest.approx(6.0) and len(seen) >= 6  # every step reports, not only the last
    assert all(amount > 0 for amount in seen)


def test_generated_tokens_are_counted(default_engine):
    before = default_engine.stats.tokens_generated
    [[text]] = default_engine.generate(PROMPTS[:1], GenerationParams(max_new_tokens=5))
    assert text and 0 < default_engine.stats.tokens_generated - before <= 5


# ---------------------------------------------------------------------------------- tiny architectures
@pytest.fixture(scope="module")
def tiny_engine(plain_checkpoint_dir):
    from rlaif.judge.engines.hf import HFEngine
    from rlaif.judge.models import load_tokenizer
    from tests.test_hf_architectures import BY_NAME, build_model, tiny_config

    tokenizer = load_tokenizer(plain_checkpoint_dir)

    def make(name: str) -> HFEngine:
        arch = BY_NAME[name]
        model = build_model(tiny_config(arch.model_type, arch.overrides, attn=arch.attn))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return HFEngine(f"tiny-{name}", model=model, tokenizer=tokenizer, max_batch_size=2)
    return make


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "gpt2", "gemma", "smollm3"])
def test_tiny_architectures_match_stock_generate(tiny_engine, name):
    engine = tiny_engine(name)
    assert engine.generate_path == "slots"
    greedy = GenerationParams(max_new_tokens=12)
    assert engine.generate(PROMPTS, greedy) == stock_generate(engine, PROMPTS, greedy)
    # Sampled text is compared on the real model only: a tiny random model's next-token distribution is nearly
    # uniform over 49k tokens (CDF steps of ~2e-5), so float noise of ~1e-6 between a batched forward and a
    # full recompute moves a draw across a boundary every few tokens; a trained model's peaked ones do not.
    sampled = GenerationParams(max_new_tokens=8, temperature=1.0, n=2, seed=2)
    assert engine.generate(PROMPTS[:2], sampled) == engine.generate(PROMPTS[:2][::-1], sampled)[::-1]


@pytest.mark.parametrize("name", ["mistral-sw16", "gemma2"])
def test_unverified_layouts_use_stock_generate(tiny_engine, name):
    engine = tiny_engine(name)
    assert engine.generate_path == "transformers"
    params = GenerationParams(max_new_tokens=6)
    assert engine.generate(PROMPTS[:2], params) == stock_generate(engine, PROMPTS[:2], params)


def test_masked_slot_columns_never_matter(default_engine, monkeypatch):
    """Columns a slot does not own (never written, or left by an earlier occupant) are masked: filling them
    with garbage changes nothing. They start as zeros, since NaN garbage would survive any additive mask
    (a freshly reused allocation once cut two of three greedy answers after one token)."""
    from rlaif.judge.engines import sampling

    params = GenerationParams(max_new_tokens=10, temperature=0.8, n=2, seed=4)
    clean = default_engine.generate(PROMPTS[:3], params)
    allocate = sampling._SlotLayer.allocate
    seen = []

    def garbage(self, like, slots, capacity):
        allocate(self, like, slots, capacity)
        seen.append(bool(torch.all(self.key_buffer == 0) and torch.all(self.value_buffer == 0)))
        self.key_buffer.uniform_(-1e3, 1e3)
        self.value_buffer.uniform_(-1e3, 1e3)

    monkeypatch.setattr(sampling._SlotLayer, "allocate", garbage)
    assert default_engine.generate(PROMPTS[:3], params) == clean
    assert seen and all(seen)
