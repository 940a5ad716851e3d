"""HFEngine on the real embedded model: the fast paths must compute exactly what a plain forward pass does.

The engine reuses the KV of the shared rubric prefix, groups prompts that share more (the two
orders of a pair, a prompt and its multi-token label queries), pads rows into planned batches
and swaps in oneDNN linear layers on CPU. Each of those is checked against a slow reference:
the same prompts one at a time, the prefix cache off, and a stock transformers model run on
the full token sequence with no cache and no mask.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from judge.data import load_preferences
from judge.engines.base import GenerationParams
from judge.engines.hf import HFEngine, _plan_batches, _share_groups
from judge.rubric import load_rubric

TOL = 1e-4


@pytest.fixture(scope="module")
def stock_model(plain_checkpoint_dir):
    """The same checkpoint loaded by plain transformers (default kernels, nothing swapped)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(plain_checkpoint_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pair_prompts():
    """10 judge prompts of varied length: both orders of 4 real LLMBar pairs + 2 short ones."""
    rubric = load_rubric("helpfulness")
    examples = load_preferences("tests/data/llmbar_natural_sample.json")[:4]
    prompts = []
    for e in examples:
        prompts.append(rubric.render(prompt=e.prompt, response_a=e.chosen, response_b=e.rejected))
        prompts.append(rubric.render(prompt=e.prompt, response_a=e.rejected, response_b=e.chosen))
    prompts.append(rubric.render(prompt="Hi", response_a="Hello!", response_b="Go away."))
    prompts.append(rubric.render(prompt="Name a color.", response_a="Blue.", response_b="Blue is a color, as is red."))
    return prompts


@pytest.fixture(scope="module")
def batched(default_engine, pair_prompts):
    """label_probs of all prompts in one call, with the prefix cache on (True) and off (False)."""
    results = {}
    for prefix_cache in (True, False):
        default_engine.prefix_cache = prefix_cache
        try:
            results[prefix_cache] = default_engine.label_probs(pair_prompts, ["A", "B"])
        finally:
            default_engine.prefix_cache = True
    return results


_REFERENCE_CACHE: dict[tuple[int, ...], torch.Tensor] = {}


@torch.inference_mode()
def reference_next_token_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log P(next token | ids) from one plain forward pass over the whole sequence. (V,)"""
    key = tuple(ids)
    if key not in _REFERENCE_CACHE:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        _REFERENCE_CACHE[key] = torch.log_softmax(logits, dim=-1)
    return _REFERENCE_CACHE[key]


def reference_label_probs(model, engine: HFEngine, prompt, labels) -> np.ndarray:
    """Label distribution computed by hand: sum of label-token log-probs, softmax over labels."""
    ids = engine.encode_prompt(prompt)
    scores = []
    for label in labels:
        tokens = engine.encode_label(label)
        scores.append(sum(float(reference_next_token_log_probs(model, ids + tokens[:j])[tokens[j]])
                          for j in range(len(tokens))))
    scores = np.array(scores)
    return np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batched_equals_unbatched(default_engine, pair_prompts, batched, prefix_cache):
    lengths = [len(default_engine.encode_prompt(p)) for p in pair_prompts]
    assert len(pair_prompts) >= 8 and max(lengths) > 2 * min(lengths), f"need varied lengths, got {lengths}"
    default_engine.prefix_cache = prefix_cache
    try:
        alone = np.concatenate([default_engine.label_probs([p], ["A", "B"]) for p in pair_prompts])
    finally:
        default_engine.prefix_cache = True
    got = batched[prefix_cache]
    assert got.shape == (len(pair_prompts), 2)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(got, alone, atol=TOL)


def test_prefix_cache_on_equals_off(batched):
    np.testing.assert_allclose(batched[True], batched[False], atol=TOL)


def test_small_batches_and_waves_change_nothing(pair_prompts, batched, default_engine):
    """Batch planning limits (one row per forward, tiny token budget, many waves) must not change results."""
    tight = HFEngine("tight", model=default_engine.model, tokenizer=default_engine.tokenizer,
                     max_batch_size=1, max_batch_tokens=64)
    np.testing.assert_allclose(tight.label_probs(pair_prompts[:6], ["A", "B"]), batched[True][:6], atol=TOL)


def test_matches_plain_forward_pass(default_engine, stock_model, pair_prompts, batched):
    """Engine (prefix KV + groups + oneDNN) vs stock transformers on the full sequence, no cache."""
    got = batched[True]
    for row, prompt in enumerate(pair_prompts[:3]):
        np.testing.assert_allclose(got[row], reference_label_probs(stock_model, default_engine, prompt, ["A", "B"]),
                                   atol=TOL)


def test_multi_token_labels_match_hand_computation(default_engine, stock_model):
    rubric = load_rubric("score-1-10")
    assert len(default_engine.encode_label("10")) == 2, "premise: '10' is two tokens for SmolLM2"
    prompts = [rubric.render(prompt="What is 2+2?", response="2+2 equals 4."),
               rubric.render(prompt="Name a prime number.", response="Nine is a prime number.")]
    got = default_engine.label_probs(prompts, rubric.labels)
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    for row, prompt in enumerate(prompts):
        expected = reference_label_probs(stock_model, default_engine, prompt, rubric.labels)
        np.testing.assert_allclose(got[row], expected, atol=TOL)
    # "10" really is scored as P("1") * P("0" | "1"), so it can never beat "1".
    assert np.all(got[:, 9] <= got[:, 0])


def test_pad_token_inside_prompt_is_not_masked(default_engine, stock_model, pair_prompts):
    """SmolLM2's EOS (<|im_end|>) and our pad token (<|endoftext|>) typed inside a prompt are real tokens."""
    tricky = [{"role": "user", "content": "Repeat <|endoftext|> and <|im_end|> literally. Then answer: is the "
                                          "sky blue? Reply with A for yes or B for no."}]
    ids = default_engine.encode_prompt(tricky)
    assert default_engine.tokenizer.pad_token_id in ids, "premise: the pad token id occurs inside the prompt"
    assert ids.count(default_engine.tokenizer.eos_token_id) >= 3
    got = default_engine.label_probs([tricky, *pair_prompts[-2:]], ["A", "B"])  # batched with other prompts
    np.testing.assert_allclose(got[0], reference_label_probs(stock_model, default_engine, tricky, ["A", "B"]),
                               atol=TOL)


def test_onednn_swap_only_on_owned_models(default_engine, stock_model, plain_checkpoint_dir):
    from judge.models import load_tokenizer

    if default_engine.cpu_kernels_in_use == "onednn":  # x86 CPU builds of torch ship oneDNN
        assert not any(type(m) is torch.nn.Linear for m in default_engine.model.model.layers.modules())
    model, tokenizer = stock_model, load_tokenizer(plain_checkpoint_dir)
    borrowed = HFEngine("borrowed", model=model, tokenizer=tokenizer)
    assert borrowed.cpu_kernels_in_use == "torch"
    assert sum(type(m) is torch.nn.Linear for m in model.model.layers.modules()) == 7 * len(model.model.layers)
    explicit = HFEngine("explicit", model=model, tokenizer=tokenizer, cpu_kernels="torch")
    assert explicit.cpu_kernels_in_use == "torch"


def test_generate_greedy_is_deterministic_and_batch_independent(default_engine):
    prompts = [[{"role": "user", "content": c}] for c in
               ["What is the capital of France?", "Write a haiku about the sea, with a title.", "Name three colors."]]
    params = GenerationParams(max_new_tokens=10)
    batched = default_engine.generate(prompts, params)
    assert batched == default_engine.generate(prompts, params)
    assert batched == [default_engine.generate([p], params)[0] for p in prompts]
    assert all(len(texts) == 1 and texts[0] for texts in batched)


def test_generate_same_seed_same_samples(default_engine):
    prompts = [[{"role": "user", "content": "Tell me a short story."}], [{"role": "user", "content": "Say hi."}]]
    params = GenerationParams(max_new_tokens=8, temperature=0.9, n=2, seed=7)
    first = default_engine.generate(prompts, params)
    assert first == default_engine.generate(prompts, params)
    assert [len(texts) for texts in first] == [2, 2]


# --------------------------------------------------------------------------- planning helpers (pure)
def _brute_force_cost(widths, max_batch_size, max_batch_tokens, overhead):
    best = float("inf")
    n = len(widths)
    for cuts in itertools.product([False, True], repeat=n - 1):
        spans, begin = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                spans.append((begin, i))
                begin = i
        spans.append((begin, n))
        if any(e - b > max_batch_size or (e - b > 1 and (e - b) * widths[e - 1] > max_batch_tokens) for b, e in spans):
            continue
        best = min(best, sum((e - b) * widths[e - 1] + overhead for b, e in spans))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_is_optimal_and_valid(seed):
    rng = random.Random(seed)
    widths = sorted(rng.randint(1, 300) for _ in range(rng.randint(1, 9)))
    max_batch_size, max_batch_tokens, overhead = rng.choice([1, 2, 4, 16]), rng.choice([64, 512, 4096]), 32
    spans = _plan_batches(widths, max_batch_size, max_batch_tokens, overhead)
    assert spans[0][0] == 0 and spans[-1][1] == len(widths)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "batches must tile the rows"
    for begin, end in spans:
        assert end - begin <= max_batch_size
        assert end - begin == 1 or (end - begin) * widths[end - 1] <= max_batch_tokens
    cost = sum((e - b) * widths[e - 1] + overhead for b, e in spans)
    assert cost == _brute_force_cost(widths, max_batch_size, max_batch_tokens, overhead)


def test_plan_batches_cases():
    # Equal widths and free overhead: padding is zero either way, so fewer forwards never lose.
    assert _plan_batches([100] * 4, 16, 10_000, 32) == [(0, 4)]
    # One very long row next to short ones: it gets its own forward rather than padding the rest.
    assert _plan_batches([10, 10, 10, 500], 16, 10_000, 32) == [(0, 3), (3, 4)]
    # A single row wider than the token budget is still allowed alone.
    assert _plan_batches([5000], 16, 100, 32) == [(0, 1)]


def test_share_groups():
    prefix = tuple(range(100, 120))  # 20 shared tokens, the "rubric head"
    ab = prefix + tuple(range(1, 40)) + (7, 8, 9)     # pair 1, order ab
    ba = prefix + tuple(range(1, 40)) + (9, 8, 7)     # pair 1, order ba: shares the 39-token "request"
    other = prefix + (500, 501, 502)                  # another item: shares only the prefix
    label_query = ab + (33,)                          # multi-token label query on top of `ab`
    groups = _share_groups([ab, ba, other, label_query], start=len(prefix), min_shared=8)
    by_members = {tuple(sorted(m)): end for m, end in groups}
    assert by_members[(2,)] == len(prefix), "a singleton shares nothing beyond the prefix"
    assert (0, 1, 3) in by_members, f"the pair and its label query form one group: {groups}"
    assert by_members[(0, 1, 3)] == len(prefix) + 39
    for members, end in groups:
        seqs = [[ab, ba, other, label_query][i] for i in members]
        assert all(len(s) > end for s in seqs), "every member keeps at least one token to run"
        assert all(s[:end] == seqs[0][:end] for s in seqs)
