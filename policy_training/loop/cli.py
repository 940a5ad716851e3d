"""`rlaif loop --config loop.yaml`: the iterative RLAIF loop as one resumable command.

Prints the summary as JSON on stdout (progress bars and guard warnings on stderr). Exit status:
0 done, 2 a user error (one line, no traceback: bad config field, missing prompts, a changed
config on resume), 3 stopped by a guard with `action: stop` (the report is written; change the
guard and re-run to continue). Re-running the same command after an interruption continues
where it stopped. Importing this module is light (typer only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `loop` command to `app` (the main `rlaif` CLI calls this)."""
    app.command("loop", help="Iterative RLAIF: per round sample -> label -> train RM -> PPO -> win rate; resumable. "
                             "See docs/loop.md.")(loop)


def loop(
    config: Annotated[Path, typer.Option("--config", help="YAML file of LoopConfig fields (docs/loop.md).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (overrides `out` in the file).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Rounds to run (overrides `rounds`; raise it to "
                                                                   "extend a finished run).")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress",
                                                     help="Progress bars on stderr (default: the file's `progress`).")] = None,
) -> None:
    """Run or resume an iterative RLAIF loop; prints the summary as JSON."""
    from rlaif.judge.cli import print_json, user_errors

    with user_errors():
        from rlaif.policy_training.loop.config import LoopConfig
        from rlaif.policy_training.loop.runner import LoopStopped, preflight, run_loop
        from rlaif.policy_training.loop.stages import LoopError

        try:
            loop_config = LoopConfig.from_yaml(config, out=str(out) if out is not None else None, rounds=rounds,
                                               progress=progress)
            preflight(loop_config)
            summary = run_loop(loop_config)
        except LoopError as exc:
            raise ValueError(str(exc)) from None
        except LoopStopped as exc:
            print_json(exc.summary)
            typer.echo(f"stopped: {exc}", err=True)
            raise typer.Exit(code=3) from None
    print_json(summary)
