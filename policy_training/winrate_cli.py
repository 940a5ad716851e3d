"""`rlaif winrate`: judged win rate of a trained policy against its initial policy.

    rlaif winrate --base default --policy runs/ppo --prompts heldout.jsonl --limit 100
    rlaif winrate --base default --policy runs/ppo/latest --prompts heldout.jsonl \\
        --judge-url http://127.0.0.1:8000 --rubric helpfulness --out runs/winrate

Prints the summary as JSON and writes `samples.jsonl` + `summary.json` to `--out`. Importing
this module stays light (typer only); models load inside the command. See
`rlaif.policy_training.winrate` for what each number means.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `winrate` command to `app` (the main `rlaif` CLI calls this)."""
    app.command("winrate", help="Judged win rate (both orders, debiased) of a policy vs its base on held-out prompts, "
                                "with length statistics and a length-controlled win rate.")(winrate)


def winrate(
    policy: Annotated[str, typer.Option(help="Trained policy: a PPO run directory or its `latest` link (newest checkpoint), "
                                             "a checkpoint-N directory, a save_pretrained directory, `default` or `hf:<id or path>`.")],
    prompts: Annotated[Path, typer.Option(help="Held-out prompts: jsonl/json/parquet/csv or a save_to_disk directory.",
                                          exists=True)],
    base: Annotated[str, typer.Option(help="Initial policy to compare against (same forms as --policy).")] = "default",
    prompt_column: Annotated[Optional[str], typer.Option(help="Prompt field (e.g. `turns[0]`); unset = detected.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N prompts.")] = None,
    engine: Annotated[Optional[str], typer.Option(help="In-process judge engine spec; default when no --judge-url.")] = None,
    judge_url: Annotated[Optional[str], typer.Option(help="URL of a running `rlaif serve` to judge with.")] = None,
    rubric: Annotated[Optional[str], typer.Option(help="Pairwise rubric id or YAML path; unset = helpfulness "
                                                       "(or the service's default).")] = None,
    judge_mode: Annotated[str, typer.Option(help="`logprob` or `cot`.")] = "logprob",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest response of each model, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 = greedy (deterministic).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (temperature > 0).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 8,
    device: Annotated[str, typer.Option(help="Device for generation and the in-process judge.")] = "cpu",
    out: Annotated[Optional[Path], typer.Option(help="Directory for samples.jsonl and summary.json.")] = Path("runs/winrate"),
    judge_api_key_env: Annotated[str, typer.Option(help="Environment variable holding the service's bearer token.")] =
        "RLAIF_JUDGE_API_KEY",
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr (per response and per chunk of comparisons, "
                                                "with rate and ETA).")] = True,
) -> None:
    """Judged win rate of --policy vs --base on held-out prompts; prints JSON."""
    from rlaif.policy_training.winrate import WinRateSettings, run_winrate

    if engine and judge_url:
        raise typer.BadParameter("give either --engine or --judge-url, not both")
    if judge_mode not in ("logprob", "cot"):
        raise typer.BadParameter(f"--judge-mode must be logprob or cot, got {judge_mode!r}")
    settings = WinRateSettings(
        base=base, policy=policy, prompts=str(prompts), prompt_column=prompt_column, limit=limit,
        engine=None if judge_url else (engine or "default"), judge_url=judge_url, rubric=rubric, judge_mode=judge_mode,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size, device=device,
        out=str(out) if out is not None else None, judge_api_key=os.environ.get(judge_api_key_env) or None)
    summary = run_winrate(settings, progress=progress)
    typer.echo(json.dumps(summary, indent=2))
