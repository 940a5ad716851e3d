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
    "rlaif.judge.calibration_cli",
    "rlaif.service.cli",
    "rlaif.service.review.cli",
    "rlaif.judge.labeling.cli",
    "rlaif.policy_training.reward_model.cli",
    "rlaif.policy_training.cli",
    "rlaif.policy_training.winrate_cli",
    "rlaif.policy_training.loop.cli",
)


def build_app() -> typer.Typer:
    _hide_flag_types()
    app = typer.Typer(name="rlaif", help="RLAIF toolkit: LLM judge, judge service, AI-labeled datasets, PPO with AI feedback.",
                      no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(app)
    return app


def _hide_flag_types() -> None:
    """Show no value type next to on/off flags in `--help` (typer's rich help prints `<bool>` for them,
    although a flag takes no value: `--no-cache <bool>` reads as if it wanted one). One place, every command."""
    from typer.core import TyperOption

    if getattr(TyperOption.display_type_rich, "_rlaif_flags_hidden", False):
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if self.is_flag or self.count else shown(self, ctx)

    display_type_rich._rlaif_flags_hidden = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def main() -> None:
    logging.basicConfig(level=os.environ.get("RLAIF_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build_app()()
