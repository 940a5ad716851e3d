"""`rlaif train-rm`: train a reward model on AI-labeled pairs (RLAIF §2.2.1).

Prints the run's metrics as JSON on stdout; a per-step progress bar (rate, ETA) goes to stderr. Bad inputs
(missing file, missing columns, invalid flag values) exit with status 2 and one line.

    rlaif train-rm --data runs/labels --out runs/rm --epochs 1 --human-eval data/llmbar_natural.json
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


class _Progress:
    """A tqdm bar on stderr that moves per optimizer step (rate and ETA from tqdm), loss/accuracy as postfix;
    evaluation results print as lines above it. The trainer's first event (`start`) says the step count."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, record: dict[str, Any]) -> None:
        from tqdm import tqdm

        event = record.get("event")
        if event == "start":
            self.bar = tqdm(total=record["total_steps"], desc="train-rm", unit="step", file=sys.stderr)
        elif event == "train" and self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix_str(f"loss {record['loss']:.4f} acc {record['accuracy']:.3f} "
                                     f"{record['tokens_per_second']:.0f} tok/s", refresh=True)
        elif event in {"eval", "human_eval"}:
            agreement = record.get("agreement", math.nan)
            line = (f"{'held-out' if event == 'eval' else 'human'} eval  n {record.get('n', 0)}  "
                    f"agreement {agreement:.3f}  loss {record.get('loss', math.nan):.4f}")
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def register(app: typer.Typer) -> None:
    @app.command("train-rm")
    def train_rm(
        data: Annotated[Path, typer.Option("--data", help="Labeled pairs: `rlaif label` output folder, or .jsonl/.json/.parquet with prompt, chosen, rejected[, judge_prob].")],
        out: Annotated[Path, typer.Option("--out", help="Output folder (weights, tokenizer, README.md card, metrics.json, training_curve.png).")],
        base: Annotated[str, typer.Option("--base", help="Base model: default (embedded SmolLM2-135M-Instruct), HF id or local path.")] = "default",
        epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training pairs.")] = 1,
        max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warmup, linear decay).")] = 2e-5,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per forward pass.")] = 8,
        grad_accum: Annotated[int, typer.Option("--grad-accum", help="Forward passes per optimizer step.")] = 1,
        max_length: Annotated[int, typer.Option("--max-length", help="Token limit of prompt + response; prompts are cut from the left.")] = 1024,
        eval_split: Annotated[float, typer.Option("--eval-split", help="Fraction of prompts held out for agreement with the judge.")] = 0.1,
        loss: Annotated[str, typer.Option("--loss", help="soft (cross-entropy with judge_prob) or hard (-log sigma(r_c - r_r)).")] = "soft",
        center_rewards: Annotated[Optional[float], typer.Option("--center-rewards", help="Reward-centering coefficient, e.g. 0.01.")] = None,
        human_eval: Annotated[Optional[Path], typer.Option("--human-eval", help="Human-labeled preference file (same formats as `rlaif eval`).")] = None,
        human_eval_limit: Annotated[Optional[int], typer.Option("--human-eval-limit", help="Use at most N human-labeled pairs.")] = None,
        limit: Annotated[Optional[int], typer.Option("--limit", help="Use at most N labeled pairs.")] = None,
        seed: Annotated[int, typer.Option("--seed", help="Seed for the split, shuffling and head init.")] = 0,
        warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Fraction of steps with linear warmup.")] = 0.05,
        weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
        max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping norm (0 = off).")] = 1.0,
        freeze_layers: Annotated[int, typer.Option("--freeze-layers", help="Freeze the embeddings and the first N blocks.")] = 0,
        shared_prefix: Annotated[str, typer.Option("--shared-prefix", help="auto | on | off: run each pair's prompt once.")] = "auto",
        gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")] = False,
        device: Annotated[str, typer.Option("--device", help="cpu or cuda[:N].")] = "cpu",
        dtype: Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16.")] = "auto",
        num_threads: Annotated[Optional[int], typer.Option("--num-threads", help="torch CPU threads.")] = None,
    ) -> None:
        """Train a reward model on AI-labeled preference pairs (Bradley-Terry, soft labels)."""
        from rlaif.judge.cli import print_json, user_errors

        with user_errors():
            from pydantic import ValidationError
            from rlaif.policy_training.reward_model.config import RMTrainConfig
            from rlaif.policy_training.reward_model.training import train_reward_model

            try:
                config = RMTrainConfig(
                    data=data, out=out, base=base, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
                    grad_accum=grad_accum, max_length=max_length, eval_split=eval_split, loss=loss,
                    center_rewards=center_rewards, human_eval=human_eval, human_eval_limit=human_eval_limit,
                    limit=limit, seed=seed, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                    max_grad_norm=max_grad_norm or None, freeze_layers=freeze_layers, shared_prefix=shared_prefix,
                    gradient_checkpointing=gradient_checkpointing, device=device, dtype=dtype, num_threads=num_threads)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"--{'-'.join(str(p) for p in first['loc']).replace('_', '-')}: {first['msg']}") from None
            if human_eval is not None and not human_eval.is_file():
                raise FileNotFoundError(f"--human-eval {human_eval}: no such file")
            progress = _Progress()
            try:
                result = train_reward_model(config, progress=progress)
            finally:
                progress.close()
            print_json({"out": str(result.out), **result.metrics})
