"""`rlaif ppo`: the policy-training command, registered onto the main Typer app.

    rlaif ppo --config ppo.yaml
    rlaif ppo --prompts prompts.jsonl --engine default --steps 200 --batch-size 8 --output-dir runs/ppo1
    rlaif ppo --config ppo.yaml --resume          # continue from the latest checkpoint
    rlaif ppo --config ppo.yaml --keep-checkpoints 3 --no-save-optimizer   # disk: 3 newest, no AdamW state
    rlaif ppo --prompts prompts.jsonl --reward-model runs/rm   # a distilled RM (`rlaif train-rm`) as reward

Every `PPOConfig` field is also a flag named after its flat key (`ppo.batch_size` ->
`--batch-size`, `policy.model` -> `--policy`, booleans as `--flag/--no-flag`); flags typed on the
command line override the YAML file, which overrides the defaults (shown in `--help`). The flags
are generated from the config's sections, so a new config field is a new flag with its
description as help text. Importing this module stays light (typer + pydantic): torch and
transformers load inside the command.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from pydantic import BaseModel
from rlaif.policy_training.config import FLAT_KEYS, SECTIONS, ConfigError, PPOConfig


def register(app: typer.Typer) -> None:
    """Add the `ppo` command to `app` (the main `rlaif` CLI calls this)."""
    app.command("ppo", help="Fine-tune a policy with PPO / RLOO / GRPO against the judge's rewards.",
                no_args_is_help=False)(_build_ppo_command())


def config_from_cli(config_file: Path | None, flags: dict[str, Any]) -> PPOConfig:
    """Defaults < YAML file < flags actually given on the command line."""
    given = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in flags.items()
             if v is not None and v != [] and v != ()}
    if "lora_target_modules" in given:
        given["lora_target_modules"] = list(given["lora_target_modules"])
    if config_file is not None:
        return PPOConfig.from_yaml(config_file, **given)
    return PPOConfig.validated(given, source="command-line flags")


def run_ppo(config: PPOConfig) -> Path:
    """Build the reward source and trainer from `config` and train; returns the run directory."""
    from rlaif.policy_training.ppo import PPOTrainer
    from rlaif.policy_training.sources import build_reward_source

    trainer = PPOTrainer(config, build_reward_source(config))
    try:
        trainer.train(progress=True)
    finally:
        trainer.close()
    return trainer.output_dir


def _build_ppo_command() -> Any:
    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
                  inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option(
            "--config", help="YAML file of PPOConfig fields; flags given here override it.",
            exists=True, dir_okay=False)])]
    for name, (section, field_name) in FLAT_KEYS.items():
        field = SECTIONS[section].model_fields[field_name]
        annotation = _cli_type(name, field.annotation)
        # The flag's default is the config default, so --help shows what a run gets; whether a flag was
        # actually typed (and so overrides the YAML file) comes from click's parameter source instead.
        default = field.get_default()
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            default=list(default) if isinstance(default, list) else default,
                                            annotation=Annotated[Optional[annotation], typer.Option(
                                                help=field.description, show_default=default is not None)]))

    def ppo(ctx: typer.Context, **kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        kwargs = _typed_flags(ctx, kwargs)
        try:
            config = config_from_cli(config_file, kwargs)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
        reward = config.reward
        if reward.judge_url is None and reward.engine is None and reward.reward_model is None and reward.rewards is None:
            from rlaif.policy_training.sources import NO_REWARD_SOURCE

            raise typer.BadParameter(NO_REWARD_SOURCE)
        if config.policy.prompts is None:
            raise typer.BadParameter("no prompts: give --prompts FILE (.jsonl/.json/.txt)")
        if reward.reward_model is not None:
            from rlaif.judge.reward_format import RM_CONFIG_FILE

            if not (Path(reward.reward_model) / RM_CONFIG_FILE).is_file():
                raise typer.BadParameter(f"--reward-model {reward.reward_model} is not a `rlaif train-rm` output "
                                         f"directory (no {RM_CONFIG_FILE} in it)")
        run_dir = run_ppo(config)
        typer.echo(f"done: metrics, plots and checkpoints in {run_dir}")
        from rlaif.policy_training.distributed import exit_after_group_teardown, launcher_world_size

        if launcher_world_size() > 1:  # the group is destroyed by now: see exit_after_group_teardown
            exit_after_group_teardown(0)

    ppo.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    ppo.__doc__ = "Fine-tune a policy with PPO / RLOO / GRPO against the judge's rewards."
    return ppo


def _typed_flags(context: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the flags given on the command line (or by environment); the rest become None = not given.

    The flags carry the config's defaults for --help, but a default must not override the YAML file.
    Sources compare by name: typer may run its own copy of click, whose enum is not `click.core`'s."""
    given = {"COMMANDLINE", "ENVIRONMENT"}
    return {k: v if getattr(context.get_parameter_source(k), "name", None) in given else None
            for k, v in values.items()}


def _cli_type(name: str, annotation: Any) -> Any:
    """Config annotation -> a type typer understands.

    Typer has no `Literal` support, so closed choices become a str-valued Enum (shown as
    choices in --help); `config_from_cli` turns members back into their values.
    """
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _cli_type(name, args[0])
    if origin is Literal:
        values = [str(a) for a in typing.get_args(annotation)]
        return enum.Enum(f"{name}_choices", {v: v for v in values}, type=str)
    if origin is list:
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return list[str]  # e.g. reward terms: the model parses its one-line form (`judge=helpfulness,weight=1`)
        return list[args[0]] if args else list[str]  # type: ignore[valid-type]  # built at run time from the annotation
    return annotation
