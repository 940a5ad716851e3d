"""HFEngine on the real embedded model: exact label semantics, and fast paths that compute what a plain forward does.

The engine arranges every query in a radix tree and runs each tree node once on top of its
ancestors' cached keys/values, pads rows into planned batches and swaps in oneDNN linear layers
on CPU. Each of those is checked against a slow reference: the same prompts one at a time, the
shared path off (plain left padding), and a stock transformers model run on the full token
sequence with no cache and no mask. The label semantics ("the reply is exactly this label") is
checked against an independent, slow construction of the ending-token set.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from rlaif.judge.data import load_preferences
from rlaif.judge.engines.base import GenerationParams, label_distribution, label_probs
from rlaif.judge.engines.hf import HFEngine, _build_radix_tree, _plan_batches, _walk
from rlaif.judge.judges import ScoreJudge
from rlaif.judge.rubric import load_rubric
from rlaif.judge.types import ScoreItem

TOL = 1e-4
SCORES = [str(i) for i in range(1, 11)]


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
    """label_logprobs of all prompts in one call, with prefix sharing on (True) and off (False)."""
    results = {}
    for prefix_cache in (True, False):
        default_engine.prefix_cache = prefix_cache
        try:
            results[prefix_cache] = default_engine.label_logprobs(pair_prompts, ["A", "B"])
        finally:
            default_engine.prefix_cache = True
    return results


def few_shot(score: str) -> list[dict[str, str]]:
    """A conversation after which SmolLM2 answers `score` greedily (three examples of it)."""
    messages = []
    for k in range(3):
        messages += [{"role": "user", "content": f"Rate this answer from 1 to 10: 'perfect answer {k}'"},
                     {"role": "assistant", "content": score}]
    return messages + [{"role": "user", "content": "Rate this answer from 1 to 10: 'perfect answer'"}]


# --------------------------------------------------------------------------- references
_REFERENCE_CACHE: dict[tuple[int, ...], torch.Tensor] = {}


@torch.inference_mode()
def reference_next_token_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log P(next token | ids) from one plain forward pass over the whole sequence. (V,)"""
    key = tuple(ids)
    if key not in _REFERENCE_CACHE:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        _REFERENCE_CACHE[key] = torch.log_softmax(logits, dim=-1)
    return _REFERENCE_CACHE[key]


_ENDING_CACHE: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}


def reference_ending_mask(tokenizer, label: str, labels: list[str], vocab: int) -> torch.Tensor:
    """Tokens that end `label`, built the slow way: decode label + token, look at what follows the label.

    Independent of the engine's anchor-decoding shortcut: a token ends the label if it is special,
    or the text after the label starts with a non-word character and does not spell another label."""
    key = (label, tuple(labels))
    if key in _ENDING_CACHE:
        return _ENDING_CACHE[key]
    label_ids = tokenizer(label, add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    texts = tokenizer.batch_decode([label_ids + [t] for t in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    mask = torch.zeros(vocab, dtype=torch.bool)
    for token, text in enumerate(texts):
        following = text[len(label):]
        if token in specials or following == "":
            mask[token] = True
        elif not (following[0].isalnum() or following[0] in "_\ufffd"):
            mask[token] = not any(o != label and o.startswith(label) and ((label + following).startswith(o)
                                                                          or o.startswith(label + following))
                                  for o in labels)
    _ENDING_CACHE[key] = mask
    return mask


def reference_label_logprobs(model, engine: HFEngine, prompt, labels: list[str]) -> np.ndarray:
    """log P(reply is exactly label), by hand: label-token log-probs + log-mass of the tokens that end it."""
    ids = engine.encode_prompt(prompt)
    scores = []
    for label in labels:
        tokens = engine.encode_label(label)
        total = sum(float(reference_next_token_log_probs(model, ids + tokens[:j])[tokens[j]]) for j in range(len(tokens)))
        after = reference_next_token_log_probs(model, ids + tokens)
        mask = reference_ending_mask(engine.tokenizer, label, labels, after.shape[0])
        scores.append(total + float(torch.logsumexp(after[mask], dim=0)))
    return np.array(scores)


# --------------------------------------------------------------------------- label semantics
def test_certain_ten_gets_the_top_score(default_engine):
    """A judge certain of "10" must score 10, not 5.5: P(token "1") contains every "10" continuation."""
    probs = {s: label_probs(default_engine, [few_shot(s)], SCORES)[0] for s in ("10", "9")}
    ten, nine = probs["10"], probs["9"]
    # Premise: the greedy reply is "10", and the first token "1" alone carries almost all of it.
    assert default_engine.generate([few_shot("10")], GenerationParams(max_new_tokens=3))[0][0] == "10"
    one = default_engine.encode_label("1")
    first_token = default_engine.next_token_logprobs([tuple(default_engine.encode_prompt(few_shot("10")))])[0]
    assert float(first_token[one[0]].exp()) > 0.8, "premise: P(first token '1') is high when the answer is 10"
    assert int(np.argmax(ten)) == 9 and ten[9] > 0.8 and ten[0] < 0.1
    expected_ten = float(ten @ np.arange(1, 11))
    expected_nine = float(nine @ np.arange(1, 11))
    assert expected_ten > 9.0 and expected_ten > expected_nine


def test_label_logprobs_match_reference(default_engine, stock_model, batched, pair_prompts):
    """Engine (radix tree + oneDNN) vs stock transformers, with the slow ending-token construction."""
    for row, prompt in enumerate(pair_prompts[:3]):
        np.testing.assert_allclose(batched[True][row], reference_label_logprobs(stock_model, default_engine, prompt,
                                                                                ["A", "B"]), atol=TOL)


def test_multi_token_labels_match_reference(default_engine, stock_model):
    rubric = load_rubric("score-1-10")
    assert len(default_engine.encode_label("10")) == 2, "premise: '10' is two tokens for SmolLM2"
    prompts = [rubric.render(prompt="What is 2+2?", response="2+2 equals 4."), few_shot("10")]
    got = default_engine.label_logprobs(prompts, rubric.labels)
    assert got.shape == (2, 10)
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(got[row], reference_label_logprobs(stock_model, default_engine, prompt, rubric.labels),
                                   atol=TOL)


def test_label_mass_is_reported_and_below_one(default_engine, pair_prompts, batched):
    dist = label_distribution(batched[True])
    np.testing.assert_allclose(dist.probs.sum(axis=1), 1.0, atol=1e-9)
    assert np.all((dist.mass > 0) & (dist.mass < 1))
    # A prompt that asks for prose, not a label: almost no mass on "A"/"B".
    prose = [[{"role": "user", "content": "Write a long poem about the ocean."}]]
    assert label_distribution(default_engine.label_logprobs(prose, ["A", "B"])).mass[0] < 0.05


def test_ending_tokens_of_a_label(default_engine):
    masks = default_engine._ending_masks_for(tuple(SCORES))
    vocab = default_engine.tokenizer.convert_tokens_to_ids
    one = masks[0]
    assert not one[vocab("0")], "'0' after '1' spells '10'"
    assert one[default_engine.tokenizer.eos_token_id] and one[vocab(".")] and one[vocab("Ġis")]
    assert not one[vocab("st")], "'1st' is not the label '1'"


# --------------------------------------------------------------------------- exactness of the fast paths
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batched_equals_unbatched(default_engine, pair_prompts, batched, prefix_cache):
    lengths = [len(default_engine.encode_prompt(p)) for p in pair_prompts]
    assert len(pair_prompts) >= 8 and max(lengths) > 2 * min(lengths), f"need varied lengths, got {lengths}"
    default_engine.prefix_cache = prefix_cache
    try:
        alone = np.concatenate([default_engine.label_logprobs([p], ["A", "B"]) for p in pair_prompts])
    finally:
        default_engine.prefix_cache = True
    got = batched[prefix_cache]
    assert got.shape == (len(pair_prompts), 2)
    np.testing.assert_allclose(got, alone, atol=TOL)


def test_shared_path_equals_plain_path(batched):
    np.testing.assert_allclose(batched[True], batched[False], atol=TOL)


def test_sharing_actually_happens(default_engine, pair_prompts):
    """The shared path must run far fewer tokens than the plain one: a speed regression must not pass silently."""
    stats = default_engine.stats
    stats.reset()
    default_engine.label_logprobs(pair_prompts, ["A", "B"])
    assert stats.shared_calls == 1 and stats.plain_calls == 0
    shared_tokens = stats.tokens_computed
    # 3 queries per prompt (prompt, +A, +B): the plain path runs each in full.
    assert shared_tokens < 0.45 * stats.tokens_requested, stats
    default_engine.prefix_cache = False
    try:
        stats.reset()
        default_engine.label_logprobs(pair_prompts, ["A", "B"])
    finally:
        default_engine.prefix_cache = True
    assert stats.plain_calls == 1 and stats.tokens_computed == stats.tokens_requested
    assert shared_tokens < 0.45 * stats.tokens_computed


def test_small_batches_and_waves_change_nothing(pair_prompts, batched, default_engine):
    """Batch planning limits (one row per forward, tiny token budget, many waves) must not change results."""
    tight = HFEngine("tight", model=default_engine.model, tokenizer=default_engine.tokenizer,
                     max_batch_size=1, max_batch_tokens=64, max_wave_tokens=32)
    np.testing.assert_allclose(tight.label_logprobs(pair_prompts[:6], ["A", "B"]), batched[True][:6], atol=TOL)


def test_next_token_logprobs_match_reference(default_engine, stock_model):
    """Raw next-token distributions over sequences that nest (a sequence that is a prefix of another)."""
    ids = default_engine.encode_prompt([{"role": "user", "content": "Count: one two three four five six"}])
    sequences = [tuple(ids), tuple(ids[:-3]), tuple(ids[:-3]) + (28, 29), tuple(ids[:12]), tuple(ids)]
    got = default_engine.next_token_logprobs(sequences)
    assert got.shape[0] == len(sequences)
    for row, sequence in enumerate(sequences):
        expected = reference_next_token_log_probs(stock_model, list(sequence))
        assert float((got[row] - expected).abs().max()) < TOL


def test_pad_token_inside_prompt_is_not_masked(default_engine, stock_model, pair_prompts):
    """SmolLM2's EOS (<|im_end|>) and our pad token (<|endoftext|>) typed inside a prompt are real tokens."""
    tricky = [{"role": "user", "content": "Repeat <|endoftext|> and <|im_end|> literally. Then answer: is the "
                                          "sky blue? Reply with A for yes or B for no."}]
    ids = default_engine.encode_prompt(tricky)
    assert default_engine.tokenizer.pad_token_id in ids, "premise: the pad token id occurs inside the prompt"
    assert ids.count(default_engine.tokenizer.eos_token_id) >= 3
    got = default_engine.label_logprobs([tricky, *pair_prompts[-2:]], ["A", "B"])  # batched with other prompts
    np.testing.assert_allclose(got[0], reference_label_logprobs(stock_model, default_engine, tricky, ["A", "B"]),
                               atol=TOL)


def test_onednn_swap_only_on_owned_models(default_engine, stock_model, plain_checkpoint_dir):
    from rlaif.judge.models import load_tokenizer

    if default_engine.cpu_kernels_in_use == "onednn":  # x86 CPU builds of torch ship oneDNN
        assert not any(type(m) is torch.nn.Linear for m in default_engine.model.model.layers.modules())
    model, tokenizer = stock_model, load_tokenizer(plain_checkpoint_dir)
    borrowed = HFEngine("borrowed", model=model, tokenizer=tokenizer)
    assert borrowed.cpu_kernels_in_use == "torch"
    assert sum(type(m) is torch.nn.Linear for m in model.model.layers.modules()) == 7 * len(model.model.layers)
    explicit = HFEngine("explicit", model=model, tokenizer=tokenizer, cpu_kernels="torch")
    assert explicit.cpu_kernels_in_use == "torch"


def test_budget_and_identity_properties(default_engine):
    assert default_engine.context_length == 8192
    prompt = [{"role": "user", "content": "Hello there"}]
    assert default_engine.prompt_token_counts([prompt]) == [len(default_engine.encode_prompt(prompt))]
    specials = default_engine.special_tokens
    assert "<|im_start|>" in specials and "<file_sep>" in specials and len(specials) == 17
    assert default_engine.engine_id.startswith("hf:SmolLM2-135M-Instruct@float32/cpu#")


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


def test_score_judge_reports_label_mass(default_engine):
    judgment = ScoreJudge(default_engine, "score-1-10").judge([ScoreItem(prompt="2+2?", response="4")])[0]
    assert 0.0 < judgment.label_mass < 1.0
    assert sum(judgment.distribution.values()) == pytest.approx(1.0)


# --------------------------------------------------------------------------- radix tree (pure)
def test_radix_tree_runs_every_token_once():
    prefix = tuple(range(100, 120))  # the shared "rubric head"
    ab = prefix + tuple(range(1, 40)) + (7, 8, 9)     # pair 1, order ab
    ba = prefix + tuple(range(1, 40)) + (9, 8, 7)     # pair 1, order ba: shares the 39-token "request"
    other = prefix + (500, 501, 502)                  # another item: shares only the prefix
    label_a, label_b = ab + (33,), ab + (34,)         # label queries on top of `ab`
    sequences = [ab, ba, other, label_a, label_b, prefix + (500,)]
    root = _build_radix_tree(sequences)
    nodes = list(_walk(root))[1:]
    # Every distinct (position, token) of the trie is in exactly one node.
    trie = {s[:j + 1] for s in sequences for j in range(len(s))}
    assert sum(node.end - node.start for node in nodes) == len(trie)
    # Each sequence ends at exactly one node, whose path spells it.
    ends = {q: node for node in nodes for q in node.queries}
    assert sorted(ends) == list(range(len(sequences)))
    for q, node in ends.items():
        assert node.end == len(sequences[q]) and sequences[node.rep][:node.end] == sequences[q]
    # Structure: prefix node -> {request node -> {ab -> {A, B}, ba}, "500" node -> {other}}.
    top = root.children
    assert len(top) == 1 and (top[0].start, top[0].end) == (0, len(prefix))
    assert sorted(c.end - c.start for c in ends[0].children) == [1, 1]


@pytest.mark.parametrize("seed", range(4))
def test_radix_tree_on_random_sequences(seed):
    rng = random.Random(seed)
    base = [rng.randrange(5) for _ in range(6)]
    sequences = list({tuple(base[:rng.randint(1, 6)] + [rng.randrange(3) for _ in range(rng.randint(0, 4))])
                      for _ in range(30)})
    nodes = list(_walk(_build_radix_tree(sequences)))[1:]
    trie = {s[:j + 1] for s in sequences for j in range(len(s))}
    assert sum(node.end - node.start for node in nodes) == len(trie)
    assert sorted(q for node in nodes for q in node.queries) == list(range(len(sequences)))
    for node in nodes:
        assert node.end > node.start
        if node.parent is not None and node.parent.end:
            assert node.start == node.parent.end


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


def test_a_gguf_spec_runs_its_dequantized_weights(default_engine):
    """`hf:<file>.gguf` dequantizes once into the cache: same weights, so the same content fingerprint as `default`."""
    from rlaif.judge.engines import build_engine
    from rlaif.judge.models import default_gguf_path

    engine = build_engine(f"hf:{default_gguf_path()}")
    assert engine.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert engine.engine_id.split("#")[1] == default_engine.engine_id.split("#")[1]
    prompt = [[{"role": "user", "content": "Answer A or B."}]]
    np.testing.assert_allclose(engine.label_logprobs(prompt, ["A", "B"]), default_engine.label_logprobs(prompt, ["A", "B"]),
                               atol=TOL)
