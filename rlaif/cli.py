"""`rlaif` console script: assembles the commands each package registers.

Command modules import only light things at module level (typer, pydantic); torch and
transformers are imported inside the commands, so `rlaif --help` is instant.
"""

from __future__ import annotations

import importlib
import logging
import os

import typer

# Each module exposes `register(app: typer.Typer) -> None`.
COMMAND_MODULES = (
    "rlaif.judge.cli",
    "rlaif.service.cli",
    "rlaif.judge.labeling.cli",
    "rlaif.policy_training.rm_cli",
    "rlaif.policy_training.cli",
    "rlaif.policy_training.winrate_cli",
)


def build_app() -> typer.Typer:
    app = typer.Typer(name="rlaif", help="RLAIF toolkit: LLM judge, judge service, AI-labeled datasets, PPO with AI feedback.",
                      no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(app)
    return app


def main() -> None:
    logging.basicConfig(level=os.environ.get("RLAIF_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build_app()()
