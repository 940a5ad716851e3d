"""The datasets `rlaif label` / `rlaif best-of-n` write are usable as is by TRL.

The data comes from the real embedded model; the trained model is a tiny random Llama
(2 layers, hidden 64) with SmolLM2's tokenizer from the plain checkpoint, loaded through
`rlaif.judge.models.load_tokenizer` so the pad token is not EOS. Each trainer runs two steps, and
every trainable parameter must change (TRL's own smoke-test criterion), so a dataset that
tokenizes to nothing useful, or that the trainer silently ignores, fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rlaif.judge.labeling.best_of_n import run_best_of_n
from rlaif.judge.labeling.config import BestOfNConfig, LabelConfig
from rlaif.judge.labeling.label import run_label
from rlaif.judge.models import load_tokenizer

pytest.importorskip("trl")

DATA = Path(__file__).parent / "data"
PROMPTS = DATA / "self_instruct_user_oriented_sample.jsonl"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(plain_checkpoint_dir):
    tok = load_tokenizer(plain_checkpoint_dir)
    assert tok.pad_token_id != tok.eos_token_id
    return tok


def tiny_llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **extra)


def train_and_check(trainer) -> None:
    import torch

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses))), trainer.state.log_history
    unchanged = [name for name, p in trainer.model.named_parameters()
                 if name in before and torch.equal(before[name], p.detach())]
    assert not unchanged, f"parameters not updated: {unchanged}"


def common_args(output_dir: Path) -> dict:
    return dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                max_length=256, disable_tqdm=True)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, default_engine) -> Path:
    out = tmp_path_factory.mktemp("trl") / "pref"
    config = LabelConfig(prompts=PROMPTS, out=out, limit=4, n=2, max_new_tokens=12, batch_size=4, progress=False)
    summary = run_label(config, policy_engine=default_engine, judge_engine=default_engine)
    assert summary["rows"] >= 2, summary
    return out


@pytest.mark.slow
def test_dpo_trainer_runs_on_labeled_dataset(labeled, tokenizer, tmp_path):
    import datasets
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    dataset = datasets.load_from_disk(str(labeled / "dataset"))  # conversational: TRL applies the chat template
    model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    reference = copy.deepcopy(model)  # a model built from a config has no path TRL could reload it from
    trainer = DPOTrainer(model=model, ref_model=reference, args=DPOConfig(**common_args(tmp_path / "dpo")),
                         train_dataset=dataset, processing_class=tokenizer)
    train_and_check(trainer)


@pytest.mark.slow
def test_reward_trainer_runs_on_standard_format(labeled, tokenizer, tmp_path):
    import datasets
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    # The output format is not part of the job identity: re-running the finished job with
    # format=standard rewrites the dataset from the store, without any model.
    config = LabelConfig(prompts=PROMPTS, out=labeled, limit=4, n=2, max_new_tokens=12, batch_size=4, progress=False,
                         format="standard")
    summary = run_label(config)
    assert summary["resumed"] is True and summary["timing"]["judgments_per_s"] is None
    dataset = datasets.load_from_disk(str(labeled / "dataset"))
    assert isinstance(dataset[0]["prompt"], str) and isinstance(dataset[0]["chosen"], str)
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1))
    trainer = RewardTrainer(model=model, args=RewardConfig(**common_args(tmp_path / "rm")), train_dataset=dataset,
                            processing_class=tokenizer)
    train_and_check(trainer)


@pytest.mark.slow
def test_sft_trainer_runs_on_best_of_n_messages(tmp_path, default_engine, tokenizer):
    import datasets
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    config = BestOfNConfig(prompts=PROMPTS, out=tmp_path / "bon", limit=4, n=2, max_new_tokens=12, batch_size=4,
                           progress=False)
    run_best_of_n(config, policy_engine=default_engine, judge_engine=default_engine)
    dataset = datasets.load_from_disk(str(tmp_path / "bon" / "dataset"))
    for columns in (["messages"], ["prompt", "completion"]):  # either TRL SFT format, as documented
        model = LlamaForCausalLM(tiny_llama_config(tokenizer))
        trainer = SFTTrainer(model=model, args=SFTConfig(**common_args(tmp_path / f"sft-{columns[0]}")),
                             train_dataset=dataset.select_columns(columns), processing_class=tokenizer)
        train_and_check(trainer)
