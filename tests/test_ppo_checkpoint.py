"""Checkpoints, resume, run artifacts, "every parameter trains" smoke tests, and the CLI hook.

All runs use a tiny random Llama policy (same construction as in test_ppo_learning.py) so
each test takes a second or two on CPU.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlaif.policy_training.cli import config_from_cli, register
from rlaif.policy_training.config import ConfigError, PPOConfig
from rlaif.policy_training.ppo import PLOT_FILE, PPOTrainer
from rlaif.policy_training.rewards import FunctionReward
from rlaif.policy_training.sources import build_reward_source
from tests.tiny_policy import PROMPTS, make_tiny_policy


def distinct_words(prompt: str, response: str) -> float:
    # Varies a lot between samples, so group baselines (rloo/grpo) see non-zero advantages.
    return len(set(response.split())) / 6


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> str:
    return make_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


VARIANTS = {
    "ppo": {"estimator": "ppo"},
    "rloo": {"estimator": "rloo", "group_size": 2},
    "grpo": {"estimator": "grpo", "group_size": 2},
    "ppo-lora": {"estimator": "ppo", "lora_r": 4, "lora_alpha": 8},
}


def small_config(policy: str, out: Path, variant: str = "ppo", **overrides) -> PPOConfig:
    fields = dict(policy=policy, batch_size=4, max_new_tokens=6, temperature=1.0, learning_rate=1e-2, ppo_epochs=2,
                  num_minibatches=2, gradient_accumulation_steps=2, steps=4, save_every=2, plot_every=0,
                  tensorboard=False, output_dir=str(out), seed=3)
    fields.update(VARIANTS[variant])
    fields.update(overrides)
    return PPOConfig(**fields)


def trainer_for(config: PPOConfig) -> PPOTrainer:
    return PPOTrainer(config, FunctionReward(distinct_words), prompts=PROMPTS)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- every parameter trains


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_trained_parameter_changes(tiny_policy, tmp_path, variant):
    trainer = trainer_for(small_config(tiny_policy, tmp_path, variant, steps=3, save_every=0))
    policy_before = trainable_state(trainer.policy)
    frozen_before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()} if trainer.ref_model else {}
    value_before = trainable_state(trainer.value_model) if trainer.value_model is not None else {}
    trainer.train(progress=False)

    after = dict(trainer.policy.named_parameters())
    unchanged = [n for n, p in policy_before.items() if torch.equal(p, after[n])]
    assert not unchanged, f"{variant}: policy parameters that never changed: {unchanged}"
    if variant == "ppo-lora":
        assert all("lora_" in n for n in policy_before), "only adapter weights may train"
        assert all(torch.equal(p, after[n]) for n, p in frozen_before.items()), "frozen base weights moved"
        assert trainer.ref_model is None  # the reference is the adapter-disabled policy
    else:
        ref_after = dict(trainer.ref_model.named_parameters())
        assert all(torch.equal(p, ref_after[n]) for n, p in ref_before.items()), "the reference model moved"
    if variant in ("ppo", "ppo-lora"):
        value_after = dict(trainer.value_model.named_parameters())
        unchanged = [n for n, p in value_before.items() if torch.equal(p, value_after[n])]
        assert not unchanged, f"value parameters that never changed: {unchanged}"
    else:
        assert trainer.value_model is None, f"{variant} needs no critic"


# ----------------------------------------------------------------------------- checkpoints and resume


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_then_resume(tiny_policy, tmp_path, variant):
    first = trainer_for(small_config(tiny_policy, tmp_path, variant, steps=4, save_every=2))
    first.train(progress=False)

    # keep_checkpoints defaults to 1: checkpoint-2 was deleted once checkpoint-4 was complete.
    assert not (tmp_path / "checkpoint-2").exists()
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / ".complete").is_file()
    assert (tmp_path / "latest").resolve() == ckpt.resolve()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "rng_state.pt").is_file()
    assert (ckpt / "policy" / ("adapter_config.json" if "lora" in variant else "config.json")).is_file()
    assert (ckpt / "value" / "value_head.safetensors").is_file() == (VARIANTS[variant]["estimator"] == "ppo")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    png = tmp_path / PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "samples.jsonl").is_file()
    for record in read_metrics(tmp_path):
        for key in ("reward", "reward_with_kl", "kl", "entropy", "clipfrac", "approx_kl", "policy_loss",
                    "response_length", "reward_latency_s", "tokens_per_s"):
            assert key in record, f"{key} missing from metrics"
        if VARIANTS[variant]["estimator"] == "ppo":
            assert "value_loss" in record and "explained_variance" in record

    # The saved policy file holds exactly the in-memory weights.
    weights_file = "adapter_model.safetensors" if "lora" in variant else "model.safetensors"
    saved = load_file(str(tmp_path / "checkpoint-4" / "policy" / weights_file))
    live = {n: p for n, p in first.policy.state_dict().items()}
    for name, tensor in saved.items():
        match = [v for n, v in live.items() if n == name or n.replace(".default", "").endswith(name)]
        assert match and torch.equal(match[0], tensor), f"saved {name} differs from the trained weights"

    resumed = trainer_for(small_config(tiny_policy, tmp_path, variant, steps=6, save_every=2, resume=True))
    assert resumed.step_count == 4
    for (name, a), b in zip(first.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), f"resumed policy weight {name} differs from the checkpoint"
    if first.value_model is not None:
        for (name, a), b in zip(first.value_model.state_dict().items(), resumed.value_model.state_dict().values()):
            assert torch.equal(a, b), f"resumed value weight {name} differs"
    opt_a, opt_b = first.policy_optimizer.state_dict(), resumed.policy_optimizer.state_dict()
    for key, state in opt_a["state"].items():
        assert torch.equal(state["exp_avg"], opt_b["state"][key]["exp_avg"]), "optimizer state was not restored"
    # The reference stays the initial policy, not the checkpoint.
    if resumed.ref_model is not None:
        initial = PPOTrainer(small_config(tiny_policy, tmp_path / "fresh", variant), FunctionReward(distinct_words),
                             prompts=PROMPTS)
        for a, b in zip(initial.policy.state_dict().values(), resumed.ref_model.state_dict().values()):
            assert torch.equal(a, b)

    resumed.train(progress=False)
    assert resumed.step_count == 6
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert PPOTrainer.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (tmp_path / "latest").resolve() == (tmp_path / "checkpoint-6").resolve()


# ----------------------------------------------------------------------------- disk: retention, optimizer opt-out


@pytest.mark.parametrize(("keep", "left"), [(2, [4, 6]), (0, [2, 4, 6])])
def test_keep_checkpoints_keeps_the_newest(tiny_policy, tmp_path, keep, left):
    trainer_for(small_config(tiny_policy, tmp_path, "rloo", steps=6, save_every=2, keep_checkpoints=keep)).train(
        progress=False)
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*")) == left
    assert os.readlink(tmp_path / "latest") == "checkpoint-6"  # relative: survives moving the run directory
    assert not list(tmp_path.glob(".tmp-*"))


def test_without_optimizer_state_resume_says_it_restarts_the_optimizer(tiny_policy, tmp_path, caplog):
    first = trainer_for(small_config(tiny_policy, tmp_path, steps=2, save_every=2, save_optimizer=False))
    first.train(progress=False)
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / ".complete").is_file() and not (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["optimizer_saved"] is False
    assert first.policy_optimizer.state_dict()["state"], "the live optimizer did have state to leave out"

    with caplog.at_level(logging.WARNING, logger="rlaif.policy_training.checkpoint"):
        resumed = trainer_for(small_config(tiny_policy, tmp_path, steps=3, save_every=2, resume=True))
    assert resumed.step_count == 2
    assert any("no optimizer state" in r.message and "FRESH AdamW state" in r.message for r in caplog.records)
    assert not resumed.policy_optimizer.state_dict()["state"], "AdamW moments must start from zero"
    for a, b in zip(first.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), "the weights are still restored"
    resumed.train(progress=False)
    assert resumed.step_count == 3 and (tmp_path / "checkpoint-3" / "optimizer.pt").is_file()
    assert not ckpt.exists()


def test_winrate_reads_the_latest_link(tiny_policy, tmp_path):
    from rlaif.policy_training.winrate import resolve_policy_spec

    trainer_for(small_config(tiny_policy, tmp_path, "rloo", steps=2, save_every=1)).train(progress=False)
    policy_dir = str(tmp_path / "latest" / "policy")
    assert resolve_policy_spec(str(tmp_path / "latest")) == policy_dir
    assert Path(policy_dir).resolve() == (tmp_path / "checkpoint-2" / "policy").resolve()
    (tmp_path / "latest").unlink()  # e.g. copied by a tool that drops symlinks: the name still resolves
    assert resolve_policy_spec(str(tmp_path / "latest")) == str(tmp_path / "checkpoint-2" / "policy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        resolve_policy_spec(str(tmp_path / "empty" / "latest"))


def test_resume_continues_like_an_uninterrupted_run(tiny_policy, tmp_path):
    # Adaptive KL on, so the controller state must round-trip as well as weights, optimizer and RNG.
    extra = dict(adaptive_kl=True, kl_target=0.5, kl_horizon=20)
    straight = trainer_for(small_config(tiny_policy, tmp_path / "a", steps=4, save_every=0, **extra))
    straight.train(progress=False)

    interrupted = trainer_for(small_config(tiny_policy, tmp_path / "b", steps=2, save_every=2, **extra))
    interrupted.train(progress=False)
    resumed = trainer_for(small_config(tiny_policy, tmp_path / "b", steps=4, save_every=2, resume=True, **extra))
    resumed.train(progress=False)

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for ra, rb in zip(a, b):
        for key in ("reward", "kl", "kl_coef", "response_length", "policy_loss", "value_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), f"step {ra['step']}: {key} diverged"
    for (name, p), q in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


def test_resume_refuses_a_different_estimator(tiny_policy, tmp_path):
    trainer_for(small_config(tiny_policy, tmp_path, "ppo", steps=2, save_every=2)).train(progress=False)
    with pytest.raises(ConfigError, match="estimator"):
        trainer_for(small_config(tiny_policy, tmp_path, "rloo", steps=4, resume=True))


def test_resume_without_checkpoint_starts_fresh(tiny_policy, tmp_path):
    trainer = trainer_for(small_config(tiny_policy, tmp_path, resume=True))
    assert trainer.step_count == 0


# ----------------------------------------------------------------------------- config and CLI


def test_config_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "estimator": "grpo", "group_size": 4, "batch_size": 2}))
    config = PPOConfig.from_yaml(path, batch_size=3)
    assert (config.steps, config.estimator, config.group_size, config.batch_size) == (7, "grpo", 4, 3)
    config.to_yaml(tmp_path / "out.yaml")
    assert PPOConfig.from_yaml(tmp_path / "out.yaml") == config


CONFIG_ERRORS = [
    # a group baseline with nothing to compare against
    ({"estimator": "rloo"}, "group_size >= 2"),
    # typo in a field name: suggest the right one
    ({"batch_sise": 4}, "did you mean `batch_size`"),
    # out-of-range value: the message names the field and what it means
    ({"clip_range": 0}, "clip_range"),
    # more micro-batches than samples
    ({"batch_size": 2, "num_minibatches": 4}, "lower num_minibatches"),
    # two reward sources at once
    ({"judge_url": "http://x", "engine": "default"}, "give one reward source, not judge_url and engine"),
]


@pytest.mark.parametrize("fields,message", CONFIG_ERRORS)
def test_config_errors_say_how_to_fix(tmp_path, fields, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(fields))
    with pytest.raises(ConfigError, match=message) as info:
        PPOConfig.from_yaml(path)
    assert str(path) in str(info.value)


def test_cli_registers_ppo_and_requires_a_judge(tmp_path):
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so `ppo` is addressed by name as in the real CLI
        pass

    runner = CliRunner()
    help_text = runner.invoke(app, ["ppo", "--help"], terminal_width=200).output
    for flag in ("--config", "--prompts", "--policy", "--steps", "--batch-size", "--max-new-tokens", "--output-dir",
                 "--resume", "--judge-url", "--engine", "--rubric", "--reward-mode", "--estimator", "--kl-coef"):
        assert flag in help_text, f"{flag} missing from `rlaif ppo --help`"
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    result = runner.invoke(app, ["ppo", "--prompts", str(prompts), "--steps", "1"], terminal_width=200)
    assert result.exit_code == 2
    assert "give --judge-url URL" in result.output and "--engine SPEC" in result.output and "--reward-model DIR" in result.output


def test_ppo_help_shows_the_config_defaults():
    from rlaif.cli import build_app

    help_text = CliRunner().invoke(build_app(), ["ppo", "--help"], terminal_width=250, env={"COLUMNS": "250"}).output
    lines: dict[str, str] = {}  # option -> its help text, wrapped lines joined
    flag = ""
    for line in help_text.splitlines():
        if line.startswith("│ --"):
            flag = line.split()[1]
        if flag and line.startswith("│"):
            lines[flag] = lines.get(flag, "") + " " + line.strip("│ ")
    for flag, default in (("--steps", "100"), ("--batch-size", "8"), ("--keep-checkpoints", "1"),
                          ("--estimator", "ppo"), ("--output-dir", "runs/ppo"), ("--clip-range", "0.2")):
        assert f"[default: {default}]" in lines[flag], (flag, lines[flag])
    assert "[default: save-optimizer]" in lines["--save-optimizer"]
    assert "<bool>" not in help_text


def test_cli_defaults_never_override_the_yaml_file(tmp_path, monkeypatch):
    """The flags show the config defaults, but only flags actually typed override the file."""
    import rlaif.policy_training.cli as cli

    seen: list[PPOConfig] = []
    monkeypatch.setattr(cli, "run_ppo", lambda config: seen.append(config) or tmp_path)
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:
        pass

    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "engine": "default", "prompts": str(tmp_path / "p.txt"),
                                    "logging": {"keep_checkpoints": 3}, "estimator": "rloo", "group_size": 2}))
    result = CliRunner().invoke(app, ["ppo", "--config", str(path), "--batch-size", "2", "--no-save-optimizer"])
    assert result.exit_code == 0, result.output
    [config] = seen
    assert (config.steps, config.keep_checkpoints, config.estimator, config.batch_size) == (7, 3, "rloo", 2)
    assert config.save_optimizer is False and config.tensorboard is True


def test_cli_flags_override_the_yaml_file(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "batch_size": 2, "engine": "default"}))
    config = config_from_cli(path, {"steps": 9, "batch_size": None, "resume": True, "lora_target_modules": []})
    assert (config.steps, config.batch_size, config.resume, config.engine) == (9, 2, True, "default")
    assert config.lora_target_modules is None  # an empty repeated flag means "not given"


def test_build_reward_source_needs_a_judge():
    with pytest.raises(ValueError, match="give --judge-url URL"):
        build_reward_source(PPOConfig())


PROMPT_FILES = [
    # jsonl with a `prompt` column
    ("p.jsonl", '{"prompt": "one"}\n{"prompt": "two"}\n', None, ["one", "two"]),
    # alpaca-style `instruction`
    ("p.jsonl", '{"instruction": "do it", "output": "done"}\n', None, ["do it"]),
    # MT-Bench style: the first turn
    ("p.jsonl", '{"turns": ["first", "follow-up"]}\n', None, ["first"]),
    # JSON list, explicit column
    ("p.json", '[{"q": "why?"}, {"q": "how?"}]', "q", ["why?", "how?"]),
    # TRL conversational prompt: the last user turn
    ("p.json", '[{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]', None, ["u"]),
    # plain text, blank lines ignored
    ("p.txt", "alpha\n\nbeta\n", None, ["alpha", "beta"]),
]


@pytest.mark.parametrize("name,content,column,expected", PROMPT_FILES)
def test_load_prompts(tmp_path, name, content, column, expected):
    from rlaif.policy_training.ppo import load_prompts

    path = tmp_path / name
    path.write_text(content)
    assert load_prompts(path, column) == expected


def test_load_prompts_names_the_missing_column(tmp_path):
    from rlaif.policy_training.ppo import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "?"}\n')
    with pytest.raises(ValueError, match="set prompt_column"):
        load_prompts(path)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_model_ppo_step_and_checkpoint(tmp_path):
    # The embedded SmolLM2-135M-Instruct with LoRA and its chat template: one full PPO step.
    config = PPOConfig(policy="default", lora_r=4, steps=1, batch_size=2, max_new_tokens=8, ppo_epochs=1,
                       num_minibatches=1, learning_rate=1e-4, save_every=1, tensorboard=False,
                       missing_eos_penalty=0.5, output_dir=str(tmp_path))
    trainer = PPOTrainer(config, FunctionReward(lambda p, r: len(r) / 100), prompts=["Name a color.", "What is 2+2?"])
    before = trainable_state(trainer.policy)
    [record] = trainer.train(progress=False)
    # Before any update the policy IS the reference (LoRA B = 0): the KL must be exactly 0, and the
    # training forward pass must reproduce the rollout log-probs (ratio 1, nothing clipped).
    assert record["kl"] == pytest.approx(0.0, abs=1e-5)
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert record["clipfrac"] == 0.0
    for key in ("reward", "entropy", "policy_loss", "value_loss", "explained_variance", "tokens_per_s"):
        assert record[key] == record[key], f"{key} is NaN"
    after = dict(trainer.policy.named_parameters())
    assert all(not torch.equal(p, after[n]) for n, p in before.items() if "lora_B" in n)
    assert (tmp_path / "checkpoint-1" / "policy" / "adapter_model.safetensors").is_file()
