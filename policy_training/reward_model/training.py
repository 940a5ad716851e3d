"""`rlaif train-rm`: distill AI preference labels into a reward model (RLAIF §2.2.1).

Input: a labeled dataset from `rlaif label` (a `datasets` folder written by `save_to_disk`,
or a .jsonl/.json/.parquet file) with `prompt`, `chosen`, `rejected` strings and, when the
labels are soft, `judge_prob` = the judge's debiased P(chosen better). Output folder:
`save_pretrained` weights + tokenizer + `rlaif_reward_model.json` (input format), a model
card `README.md`, `metrics.json`, `train_log.jsonl` and `training_curve.png`.

The loop is our own rather than HF `Trainer`/TRL `RewardTrainer`, because the speed comes
from things those do not do for a reward model on a CPU:
- each pair is one row `prompt | chosen | rejected` with a mask that keeps the two responses
  apart (see `reward_model.collate_shared_prefix`): the prompt is computed once, not twice;
- pairs are tokenized once up front and batched by length within shuffled buckets, so rows
  in a batch have nearly equal length and padding costs almost nothing;
- no gradient checkpointing by default (the recomputation is a third more compute; the
  135M default fits easily), fp32 on CPU (exact; `--dtype bf16` for autocast);
- logging reuses the training forward's rewards (dropout is off), no extra passes.

Evaluation: agreement of the RM with the judge on held-out prompts (the split is by
prompt, so several pairs of one prompt never straddle train and eval), and with people on
a human-labeled file (`--human-eval`, any format `rlaif.judge.data.load_preferences` reads).

Run: `rlaif train-rm --data runs/labels --out runs/rm --epochs 1 --human-eval data/llmbar_natural.json`
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rlaif.judge.reward_format import EncodedPair
from rlaif.judge.reward_model import RewardModel, disable_dropout
from rlaif.policy_training.reward_model.card import (
    plot_training_curve,
    write_model_card,
)
from rlaif.policy_training.reward_model.config import RMTrainConfig
from rlaif.policy_training.reward_model.data import bucketed_batches, load_labeled_pairs
from rlaif.policy_training.reward_model.losses import LOSSES, soft_bradley_terry_loss

logger = logging.getLogger(__name__)

def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0 to 1, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# ============================================================================ evaluation


def wilson(k: int, n: int) -> tuple[float, float]:
    from rlaif.judge.metrics import wilson_interval

    return wilson_interval(k, n) if n else (float("nan"), float("nan"))


def evaluate_pairs(rm: RewardModel, pairs: Sequence[EncodedPair], *, batch_size: int, shared_prefix: bool) -> dict[str, Any]:
    """Agreement of the RM's preference with the label's direction, soft-label loss, mean margin."""
    if not pairs:
        return {"n": 0}
    chosen, rejected = rm.score_pairs(pairs, batch_size=batch_size, shared_prefix=shared_prefix)
    r_c, r_r = torch.tensor(chosen), torch.tensor(rejected)
    target = torch.tensor([p.target for p in pairs])
    loss, stats = soft_bradley_terry_loss(r_c, r_r, target)
    decided = [(c - r > 0) == (p.target > 0.5) for c, r, p in zip(chosen, rejected, pairs) if p.target != 0.5]
    k, n = sum(decided), len(decided)
    low, high = wilson(k, n)
    return {"n": len(pairs), "n_decided": n, "agreement": k / n if n else float("nan"), "agreement_ci95": [low, high],
            "loss": float(loss), "margin": stats["margin"], "reward_mean": stats["reward_mean"],
            "reward_std": stats["reward_std"]}


def evaluate_human(rm: RewardModel, path: str | Path, *, limit: int | None, batch_size: int,
                   shared_prefix: bool) -> dict[str, Any]:
    """Agreement with human labels (`rlaif eval` formats), next to the pick-the-shorter baseline."""
    from rlaif.judge.data import load_preferences
    from rlaif.judge.metrics import shorter_answer_baseline

    examples = load_preferences(path, limit=limit)
    if not examples:
        raise ValueError(f"{path}: no human-labeled pairs to evaluate on")
    encoded, truncation = rm.formatter.encode_pairs([e.prompt for e in examples], [e.chosen for e in examples],
                                                   [e.rejected for e in examples], [1.0] * len(examples), rm.max_length)
    result = evaluate_pairs(rm, encoded, batch_size=batch_size, shared_prefix=shared_prefix)
    result.update({"file": str(path), "shorter_answer_baseline": shorter_answer_baseline(examples),
                   "truncation": truncation.as_dict()})
    return result


# ============================================================================ training


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)


def _freeze(rm: RewardModel, n_layers: int) -> int:
    """Freeze input embeddings + the first `n_layers` blocks; returns how many blocks were frozen."""
    if n_layers == 0:
        return 0
    model = rm.model
    blocks = None
    body = getattr(model, model.base_model_prefix, model)
    for module in body.children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == getattr(model.config, "num_hidden_layers", -1):
            blocks = module
            break
    if blocks is None:
        raise ValueError(f"--freeze-layers: could not find the transformer blocks of {type(model).__name__}")
    if n_layers > len(blocks):
        raise ValueError(f"--freeze-layers {n_layers}: the model has only {len(blocks)} blocks")
    model.get_input_embeddings().requires_grad_(False)
    for block in list(blocks)[:n_layers]:
        block.requires_grad_(False)
    return n_layers


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # fused AdamW (CPU and CUDA since torch 2.4) is one kernel per step instead of a loop of ops
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def _autocast(device: torch.device, dtype: str):
    import contextlib

    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resolve_shared_prefix(rm: RewardModel, mode: str, probe: EncodedPair) -> tuple[bool, str]:
    if mode == "off":
        return False, "disabled (--shared-prefix off)"
    ok, detail = rm.check_shared_prefix(probe)
    if ok:
        return True, f"on ({detail})"
    if mode == "on":
        raise ValueError(f"--shared-prefix on, but this model cannot use it: {detail}; use auto or off")
    logger.warning("shared-prefix batching disabled: %s; using separate chosen/rejected rows", detail)
    return False, f"off ({detail})"


class RewardModelTrainer:
    """Holds the model, data and optimizer of one run; `train()` runs it and writes the outputs."""

    def __init__(self, config: RMTrainConfig, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.progress = progress
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.data = load_labeled_pairs(config.data, soft=config.loss == "soft", limit=config.limit,
                                       eval_split=config.eval_split, seed=config.seed)
        self.rm = RewardModel.from_base(config.base, max_length=config.max_length, device=config.device)
        self.device = self.rm.device
        fmt = self.rm.formatter
        d = self.data
        self.train_pairs, self.train_truncation = fmt.encode_pairs(
            [p.prompt for p in d.train], [p.chosen for p in d.train], [p.rejected for p in d.train],
            [p.target for p in d.train], config.max_length)
        self.eval_pairs, self.eval_truncation = fmt.encode_pairs(
            [p.prompt for p in d.eval], [p.chosen for p in d.eval], [p.rejected for p in d.eval],
            [p.target for p in d.eval], config.max_length)
        for name, stats in (("train", self.train_truncation), ("eval", self.eval_truncation)):
            if stats.truncated:
                logger.warning("%s: %d of %d pairs exceeded max_length=%d and were truncated from the left of the "
                               "prompt (%d of them had a response longer than max_length, which lost its start too)",
                               name, stats.truncated, stats.total, config.max_length, stats.response_truncated)
        self.shared_prefix, self.shared_prefix_detail = _resolve_shared_prefix(self.rm, config.shared_prefix,
                                                                               self.train_pairs[0])
        self.frozen_layers = _freeze(self.rm, config.freeze_layers)
        if config.gradient_checkpointing:
            self.rm.model.gradient_checkpointing_enable()
        disable_dropout(self.rm.model)
        self.loss_fn = LOSSES[config.loss]
        self.optimizer = _optimizer(self.rm.model, config.lr, config.weight_decay)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train_pairs) / config.batch_size) / config.grad_accum)
        total = self.steps_per_epoch * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.warmup_steps = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(self.warmup_steps, self.total_steps))
        self.log: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ pieces
    def _emit(self, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(record)

    def evaluate(self, step: int, epoch: float) -> dict[str, Any]:
        result = evaluate_pairs(self.rm, self.eval_pairs, batch_size=self.config.eval_batch_size,
                                shared_prefix=self.shared_prefix)
        self.rm.model.train()
        record = {"step": step, "epoch": epoch, **result}
        self.evals.append(record)
        self._emit({"event": "eval", **record})
        return record

    def _step(self, micro_batches: list[list[int]]) -> dict[str, float]:
        """One optimizer step over `micro_batches` (each a list of pair indices)."""
        n_pairs = sum(len(m) for m in micro_batches)
        totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "reward_mean": 0.0}
        tokens = 0
        for micro in micro_batches:
            pairs = [self.train_pairs[i] for i in micro]
            target = torch.tensor([p.target for p in pairs], device=self.device)
            with _autocast(self.device, self.config.dtype):
                r_c, r_r = self.rm.pair_rewards(pairs, shared_prefix=self.shared_prefix)
            loss, stats = self.loss_fn(r_c.float(), r_r.float(), target, center_coef=self.config.center_rewards)
            weight = len(pairs) / n_pairs  # exact mean over the step's pairs, even with a short last batch
            (loss * weight).backward()
            totals["loss"] += float(loss.detach()) * weight
            for key in ("accuracy", "margin", "reward_mean"):
                if not math.isnan(stats[key]):
                    totals[key] += stats[key] * weight
            tokens += sum(p.trained_tokens for p in pairs)
        params = [p for p in self.rm.model.parameters() if p.requires_grad]
        if self.config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**totals, "grad_norm": grad_norm, "lr": float(lr), "pairs": n_pairs, "trained_tokens": tokens}

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg = self.config
        started = time.perf_counter()
        self._emit({"event": "start", "total_steps": self.total_steps, "train_pairs": len(self.train_pairs)})
        initial_eval = self.evaluate(0, 0.0) if self.eval_pairs else None
        self.rm.model.train()
        step, train_seconds, trained_tokens, trained_pairs = 0, 0.0, 0, 0
        lengths = [p.row_length if self.shared_prefix else max(len(p.prompt) + len(p.chosen), len(p.prompt) + len(p.rejected))
                   for p in self.train_pairs]
        for epoch in range(cfg.epochs):
            batches = bucketed_batches(lengths, cfg.batch_size, cfg.bucket_batches, self.rng)
            progress = float(epoch)
            for start in range(0, len(batches), cfg.grad_accum):
                t0, cpu0 = time.perf_counter(), time.process_time()
                record = self._step(batches[start:start + cfg.grad_accum])
                dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                step += 1
                train_seconds += dt
                trained_tokens += int(record["trained_tokens"])
                trained_pairs += int(record["pairs"])
                progress = epoch + min(1.0, (start + cfg.grad_accum) / len(batches))
                # cpu_seconds (all threads of this process) tells a slow step from a busy machine.
                record.update({"step": step, "epoch": progress, "seconds": dt, "cpu_seconds": cpu,
                               "tokens_per_second": record["trained_tokens"] / dt})
                if step % cfg.log_every == 0 or step == self.total_steps:
                    self.log.append(record)
                    self._emit({"event": "train", **record})
                if step >= self.total_steps:
                    break
            if self.eval_pairs:
                self.evaluate(step, progress)
            if step >= self.total_steps:
                break
        human = None
        if cfg.human_eval is not None:
            human = evaluate_human(self.rm, cfg.human_eval, limit=cfg.human_eval_limit,
                                   batch_size=cfg.eval_batch_size, shared_prefix=self.shared_prefix)
            self._emit({"event": "human_eval", **human})
        metrics = self._metrics(initial_eval, human, step, train_seconds, trained_tokens, trained_pairs,
                                time.perf_counter() - started)
        self._write_outputs(metrics)
        return TrainResult(out=cfg.out, metrics=metrics, log=self.log)

    def _metrics(self, initial_eval: dict[str, Any] | None, human: dict[str, Any] | None, steps: int,
                 train_seconds: float, trained_tokens: int, trained_pairs: int, wall: float) -> dict[str, Any]:
        d = self.data
        return {
            "data": {"source": d.source, "train_pairs": len(self.train_pairs), "eval_pairs": len(self.eval_pairs),
                     "eval_source": d.eval_source, "labels": "soft (judge_prob)" if d.soft_labels else "hard",
                     "truncation": {"train": self.train_truncation.as_dict(), "eval": self.eval_truncation.as_dict()}},
            "training": {"steps": steps, "trained_pairs": trained_pairs, "trained_tokens": trained_tokens,
                         "train_seconds": train_seconds,
                         "tokens_per_second": trained_tokens / train_seconds if train_seconds else 0.0,
                         "pairs_per_second": trained_pairs / train_seconds if train_seconds else 0.0,
                         "wall_seconds": wall, "shared_prefix": self.shared_prefix_detail,
                         "frozen_layers": self.frozen_layers, "threads": torch.get_num_threads(),
                         "final_train_loss": self.log[-1]["loss"] if self.log else None},
            "eval_initial": initial_eval,
            "eval": self.evals[-1] if self.evals and self.evals[-1] is not initial_eval else None,
            "human_eval": human,
        }

    def _write_outputs(self, metrics: dict[str, Any]) -> None:
        out = Path(self.config.out)
        self.rm.save(out, extra={"training_config": self.config.model_dump(mode="json"),
                                 "soft_labels": self.data.soft_labels})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        with (out / "train_log.jsonl").open("w") as handle:
            for record in self.log + [{"event": "eval", **e} for e in self.evals]:
                handle.write(json.dumps(record, default=str) + "\n")
        plot_training_curve(self.log, self.evals, out / "training_curve.png")
        write_model_card(out, self.config, metrics)


def train_reward_model(config: RMTrainConfig, progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train, evaluate and save a reward model as `config` says."""
    return RewardModelTrainer(config, progress).train()


# ============================================================================ outputs: plot and card


