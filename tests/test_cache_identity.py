"""Cache identity: everything that changes a number changes the cache key, and nothing else shares one.

Judgment cache keys start from `engine.engine_id`. These tests build two real checkpoints that differ
only in their weights but live in folders of the same name, and check every result-affecting engine
option of the HF and OpenAI-compatible engines. The HF models are tiny random Llamas with the embedded
model's tokenizer (real transformers models, saved and loaded from disk).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from rlaif.judge.engines.hf import HFEngine
from rlaif.judge.engines.openai import OpenAIEngine
from rlaif.judge.judges import PairwiseJudge
from rlaif.judge.types import PairwiseItem

ITEM = PairwiseItem(prompt="What is 2+2?", response_a="4", response_b="5")


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, plain_checkpoint_dir):
    """runs/a/checkpoint-20 and runs/b/checkpoint-20: same architecture and name, different weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(plain_checkpoint_dir))
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for run, seed in (("a", 0), ("b", 1)):
        path = root / run / "checkpoint-20"
        _tiny_llama(seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def _engine(path, **options) -> HFEngine:
    return HFEngine(path, cpu_kernels="torch", **options)


def test_same_folder_name_different_weights_never_share_entries(two_checkpoints, judgment_cache):
    a, b = (_engine(path) for path in two_checkpoints)
    assert a.model_name == b.model_name == "checkpoint-20"
    assert a.engine_id != b.engine_id
    first = PairwiseJudge(a, "helpfulness", cache=judgment_cache).judge([ITEM])[0]
    second = PairwiseJudge(b, "helpfulness", cache=judgment_cache).judge([ITEM])[0]
    assert not first.cached and not second.cached, "checkpoint b must not be served checkpoint a's judgment"
    assert second.prob_a != first.prob_a


def test_identical_content_shares_identity(two_checkpoints, tmp_path):
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(two_checkpoints[0], copy)
    assert _engine(copy, name="checkpoint-20").engine_id == _engine(two_checkpoints[0]).engine_id


def test_training_leftovers_do_not_change_identity(two_checkpoints, tmp_path):
    copy = tmp_path / "checkpoint-20"
    shutil.copytree(two_checkpoints[0], copy)
    (copy / "optimizer.pt").write_bytes(b"\0" * 1024)
    (copy / "trainer_state.json").write_text("{}")
    assert _engine(copy).engine_id == _engine(two_checkpoints[0]).engine_id


def test_changed_weights_or_chat_template_change_identity(two_checkpoints, tmp_path):
    copy = tmp_path / "checkpoint-20"
    shutil.copytree(two_checkpoints[0], copy)
    before = _engine(copy).engine_id
    config = copy / "tokenizer_config.json"
    template = copy / "chat_template.jinja"
    target = template if template.exists() else config
    target.write_text(target.read_text().replace("assistant", "Assistant", 1))
    assert _engine(copy).engine_id != before


def test_dtype_changes_identity(two_checkpoints):
    assert _engine(two_checkpoints[0]).engine_id != _engine(two_checkpoints[0], dtype="bfloat16").engine_id


def test_a_model_object_is_fingerprinted_by_its_weights(two_checkpoints):
    from rlaif.judge.models import load_tokenizer

    tokenizer = load_tokenizer(two_checkpoints[0])
    one, two = _tiny_llama(0), _tiny_llama(1)
    assert (HFEngine("same-name", model=one, tokenizer=tokenizer).engine_id
            != HFEngine("same-name", model=two, tokenizer=tokenizer).engine_id)
    assert (HFEngine("same-name", model=one, tokenizer=tokenizer).engine_id
            == HFEngine("same-name", model=_tiny_llama(0), tokenizer=tokenizer).engine_id)


@pytest.mark.parametrize("change", [
    {"base_url": "http://127.0.0.1:9/v2"},
    {"model": "other"},
    {"endpoint": "completions"},
    {"top_logprobs": 5},
    {"extra_body": {"top_k": 1}},
    {"tokenizer": "some/tokenizer"},
])
def test_every_result_affecting_openai_option_changes_identity(change):
    base = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}  # port 9: nothing listens, identity stays local
    reference = OpenAIEngine(**base).engine_id
    changed = OpenAIEngine(**{**base, **change}).engine_id
    assert changed != reference
    # Options that do not change a number keep the identity.
    assert OpenAIEngine(**base, timeout=5, max_retries=0, concurrency=3).engine_id == reference


def test_judge_settings_are_part_of_the_key(two_checkpoints):
    engine = _engine(two_checkpoints[0])
    keys = {PairwiseJudge(engine, "helpfulness").item_key(ITEM),
            PairwiseJudge(engine, "helpfulness", tie_margin=0.1).item_key(ITEM),
            PairwiseJudge(engine, "helpfulness", clamp=(0.2, 0.8)).item_key(ITEM),
            PairwiseJudge(engine, "harmlessness").item_key(ITEM)}
    assert len(keys) == 4
