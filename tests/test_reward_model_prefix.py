"""Common-prefix KV sharing in reward-model scoring: the same rewards, or no sharing at all.

`RewardModel.score` / `score_pairs` run the token prefix every row of a call starts with (the
chat template's system prompt; one prompt scored against many responses) once and put its
keys/values in front of every batch. These tests pin that (a) the rewards equal the plain forward's
on the embedded model and on every tiny architecture of `tests/test_hf_architectures.py`'s matrix,
(b) the first batch's check turns sharing off when the two disagree (failure injection through a
subclass whose shared path is deliberately wrong: no real architecture that passes the static rule
is known to be wrong), and (c) architectures the rule does not vouch for never share.
"""

from __future__ import annotations

import logging

import pytest
import torch

from rlaif.judge.reward_format import EncodedPair, common_prefix_length
from rlaif.judge.reward_model import RewardModel, SharedPrefixKV
from tests.test_hf_architectures import ARCHS, tiny_config


def _has_classification_head(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


RM_ARCHS = [arch for arch in ARCHS if _has_classification_head(arch.model_type)]
"""The matrix's architectures transformers has a sequence-classification (RM) class for."""

QUESTIONS = ["How do I boil an egg?", "Name three rivers in Europe.", "What is 7 times 8?",
             "Write a haiku about rain.", "Why is the sky blue?", "Give me a tip for learning Python."]
ANSWERS = ["Put it in boiling water for eight minutes, then cool it.", "The Danube, the Rhine and the Loire.",
           "56.", "Soft rain on the roof / the garden drinks slowly / grey clouds hum along",
           "Air scatters blue light more than red light.", "Write a small program every day and read others' code."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(plain_checkpoint_dir):
    from rlaif.judge.models import load_tokenizer

    return load_tokenizer(plain_checkpoint_dir)


def scores_both_ways(rm: RewardModel, prompts: list[str], chosen: list[str], rejected: list[str]):
    """(pair scores, single scores) with sharing on, then the same with sharing off."""
    pairs, _ = rm.formatter.encode_pairs(prompts, chosen, rejected, [1.0] * len(prompts), rm.max_length)
    shared = rm.score_pairs(pairs, batch_size=4), rm.score(prompts, chosen, batch_size=4)
    rm.share_common_prefix = False
    plain = rm.score_pairs(pairs, batch_size=4), rm.score(prompts, chosen, batch_size=4)
    rm.share_common_prefix = True
    return shared, plain


def assert_same(shared, plain, tol: float = 1e-4) -> None:
    (pair_c, pair_r), single = shared
    (ref_c, ref_r), ref_single = plain
    assert pair_c == pytest.approx(ref_c, abs=tol)
    assert pair_r == pytest.approx(ref_r, abs=tol)
    assert single == pytest.approx(ref_single, abs=tol)


def test_common_prefix_length_leaves_each_row_its_own_tokens():
    assert common_prefix_length([(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 9)]) == 2
    assert common_prefix_length([(1, 2, 3), (1, 2, 3)]) == 3
    assert common_prefix_length([(1, 2, 3), (1, 2, 3)], keep=1) == 2
    assert common_prefix_length([(1, 2), (1, 2, 3)], keep=1) == 1
    assert common_prefix_length([(7,), (8,)]) == 0
    assert common_prefix_length([]) == 0
    assert common_prefix_length([(1,)], keep=1) == 0


def test_shared_prefix_scores_equal_the_plain_forward_on_the_embedded_model(plain_checkpoint_dir):
    """The embedded RM (SmolLM2-135M body): its chat template's 24-token system prompt is shared."""
    rm = RewardModel.from_base(str(plain_checkpoint_dir), max_length=512)
    assert rm.prefix_sharing == "unverified"
    prompts = QUESTIONS
    shared, plain = scores_both_ways(rm, prompts, ANSWERS, ANSWERS[1:] + ANSWERS[:1])
    assert_same(shared, plain)
    assert rm.prefix_sharing.startswith("exact")
    ids = rm.formatter.encode(prompts, [ANSWERS])[0]
    assert common_prefix_length(ids) >= 20  # what is shared: the system prompt and the user turn's header

    # One prompt against many responses (best-of-n, PPO groups): the whole prompt is the common prefix,
    # so pair rows start right at their responses.
    same = [QUESTIONS[0]] * 4
    shared, plain = scores_both_ways(rm, same, ANSWERS[:4], ANSWERS[2:6])
    assert_same(shared, plain)
    # ... and it is really used: the prefix the pair rows share is the full encoded prompt.
    pairs, _ = rm.formatter.encode_pairs(same, ANSWERS[:4], ANSWERS[2:6], [1.0] * 4, 512)
    prefix = rm._shared_prefix([p.prompt for p in pairs], keep=0)
    assert isinstance(prefix, SharedPrefixKV) and prefix.tokens == pairs[0].prompt


@pytest.mark.parametrize("arch", RM_ARCHS, ids=[arch.name for arch in RM_ARCHS])
def test_shared_prefix_scores_are_exact_on_every_architecture_of_the_matrix(arch, tokenizer):
    """Tiny random sequence-classification heads on each architecture: the rewards with sharing equal
    the plain forward; sliding-window models share only batches that fit their window."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(arch.model_type, arch.overrides, attn=arch.attn)
    config.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
    rm = RewardModel(model, tokenizer, max_length=256)
    shared, plain = scores_both_ways(rm, QUESTIONS, ANSWERS, ANSWERS[::-1])
    assert_same(shared, plain)
    if arch.exact or (arch.window or 0) >= 100:  # these rows are <= 70 tokens: they fit a 192-token window
        assert rm.prefix_sharing.startswith("exact"), rm.prefix_sharing
    else:  # Mistral's 16-token window: every row is longer, no batch may share, nothing was checked or used
        assert rm.prefix_sharing == "unverified"


def test_unverified_architectures_never_share(tokenizer):
    """GPT-NeoX is not on the rule's verified list: scoring works, without a shared prefix."""
    from transformers import AutoModelForSequenceClassification, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_labels=1, pad_token_id=2)
    torch.manual_seed(0)
    rm = RewardModel(AutoModelForSequenceClassification.from_config(config).eval(), tokenizer)
    assert rm.prefix_sharing.startswith("off: gpt_neox")
    assert rm._shared_prefix([(5, 6, 7, 8, 9, 10, 11, 12, 13), (5, 6, 7, 8, 9, 10, 11, 12, 14)], keep=1) is None
    scores = rm.score(QUESTIONS, ANSWERS)
    assert len(scores) == len(QUESTIONS) and all(torch.isfinite(torch.tensor(scores)))


class MisalignedPrefixRM(RewardModel):
    """Failure injection: a shared path that is off by 0.5 (as a wrong position offset would be)."""

    def pair_rewards(self, pairs: list[EncodedPair], *, shared_prefix: bool, prefix: SharedPrefixKV | None = None):
        chosen, rejected = super().pair_rewards(pairs, shared_prefix=shared_prefix, prefix=prefix)
        return (chosen + 0.5 if prefix is not None else chosen), rejected

    def sequence_rewards(self, batch, prefix: SharedPrefixKV | None = None):
        rewards = super().sequence_rewards(batch, prefix)
        return rewards + 0.5 if prefix is not None else rewards


def test_a_shared_path_that_disagrees_is_turned_off_and_its_rewards_discarded(plain_checkpoint_dir, tokenizer, caplog):
    reference = RewardModel.from_base(str(plain_checkpoint_dir), max_length=512)
    reference.share_common_prefix = False
    rm = MisalignedPrefixRM(reference.model, reference.tokenizer, max_length=512)
    pairs, _ = rm.formatter.encode_pairs(QUESTIONS, ANSWERS, ANSWERS[::-1], [1.0] * 6, 512)
    with caplog.at_level(logging.WARNING, logger="rlaif.judge.reward_model"):
        got = rm.score_pairs(pairs, batch_size=2)
    assert rm.prefix_sharing.startswith("off: common-prefix KV rewards differed from the plain forward by 5.00e-01")
    assert "scoring without prefix sharing" in caplog.text
    expected = reference.score_pairs(pairs, batch_size=2)
    assert got[0] == pytest.approx(expected[0], abs=1e-4) and got[1] == pytest.approx(expected[1], abs=1e-4)
    # Once off, it stays off for this model (single sequences too): no more shifted rewards.
    assert rm.score(QUESTIONS, ANSWERS) == pytest.approx(reference.score(QUESTIONS, ANSWERS), abs=1e-4)
    assert rm._shared_prefix([p.prompt for p in pairs], keep=0) is None
