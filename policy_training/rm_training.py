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
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlaif.policy_training.reward_model import (
    LOSSES,
    EncodedPair,
    Prompt,
    RewardModel,
    as_messages,
    disable_dropout,
    prompt_key,
    response_content,
    soft_bradley_terry_loss,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


class RMTrainConfig(BaseModel):
    """Everything one `rlaif train-rm` run needs; saved verbatim into the model card."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="Labeled pairs: a `save_to_disk` folder from `rlaif label`, or a .jsonl/.json/.parquet file.")
    out: Path = Field(description="Output folder for the reward model, card, metrics and plots.")
    base: str = Field("default", description="Base model: `default` (embedded SmolLM2-135M-Instruct), an HF id or a local path.")
    epochs: int = Field(1, description="Passes over the training pairs.")
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps (smoke tests, benchmarks).")
    lr: float = Field(2e-5, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, description="AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = Field(0.05, description="Fraction of optimizer steps with linear warmup; linear decay to 0 after.")
    batch_size: int = Field(8, description="Pairs per forward pass (each pair = chosen + rejected).")
    grad_accum: int = Field(1, description="Forward passes per optimizer step.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm to this; None = no clipping.")
    max_length: int = Field(1024, description="Token limit of prompt + response; longer prompts lose their left part.")
    eval_split: float = Field(0.1, description="Fraction of prompts held out to measure agreement with the judge.")
    eval_batch_size: int = Field(16, description="Pairs per forward pass during evaluation.")
    loss: Literal["soft", "hard"] = Field("soft", description="soft: cross-entropy with judge_prob (RLAIF §2.2.1); hard: -log sigma(r_c - r_r).")
    center_rewards: float | None = Field(None, description="Coefficient of the reward-centering term coef * mean((r_c + r_r)^2); 0.01 is typical.")
    human_eval: Path | None = Field(None, description="Human-labeled preference file to measure agreement with people.")
    human_eval_limit: int | None = Field(None, description="Use at most this many human-labeled pairs.")
    limit: int | None = Field(None, description="Use at most this many labeled pairs (taken in file order).")
    seed: int = Field(0, description="Seed for the split, shuffling and the new head's initialization.")
    freeze_layers: int = Field(0, description="Freeze the embeddings and the first N transformer blocks (faster, less memory).")
    shared_prefix: Literal["auto", "on", "off"] = Field("auto", description="Run the prompt once per pair (auto: when a self-check on the model passes).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, ~1/3 more compute.")
    bucket_batches: int = Field(64, description="Batches per length bucket: shuffle, cut into buckets, sort each by length.")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: fp32 on CPU, bf16 autocast on CUDA.")
    num_threads: int | None = Field(None, description="torch CPU threads (default: torch's choice).")
    log_every: int = Field(1, description="Write a train_log.jsonl record every N optimizer steps.")

    @field_validator("epochs", "batch_size", "grad_accum", "eval_batch_size", "bucket_batches", "log_every")
    @classmethod
    def _positive(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, value: int) -> int:
        if value < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {value}")
        return value

    @field_validator("eval_split")
    @classmethod
    def _split(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"eval_split must be in [0, 1) (0 = no held-out set), got {value}")
        return value

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"lr must be > 0, got {value}")
        return value

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _checks(self) -> RMTrainConfig:
        for name in ("max_steps", "limit", "human_eval_limit", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or left unset), got {value}")
        if self.freeze_layers < 0:
            raise ValueError(f"freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.center_rewards is not None and self.center_rewards < 0:
            raise ValueError(f"center_rewards must be >= 0, got {self.center_rewards}")
        return self


# ============================================================================ data


@dataclass(frozen=True)
class LabeledPair:
    """One AI-labeled comparison. `target` = P(chosen better) (1.0 for hard labels).

    `prompt` is text, or chat messages when the labels were written in TRL's conversational
    format (the default of `rlaif label`); responses are always reduced to their text.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    target: float


@dataclass
class LabeledData:
    train: list[LabeledPair]
    eval: list[LabeledPair]
    soft_labels: bool
    source: str
    eval_source: str = "split"


Columns = dict[str, list[Any]]


def _columns_of_records(records: list[dict[str, Any]]) -> Columns:
    names = list(dict.fromkeys(key for record in records for key in record))
    return {name: [record.get(name) for record in records] for name in names}


def _read_table(path: Path) -> tuple[Columns, Columns | None]:
    """(train columns, held-out columns or None) from a `datasets` folder or a data file.

    JSON files are read directly (no `datasets` build cache for a one-off read); `save_to_disk`
    folders and Parquet go through `datasets`.
    """
    if path.is_dir():
        import datasets

        saved = ("dataset_info.json", "dataset_dict.json", "state.json")
        if not any((path / name).is_file() for name in saved) and (path / "dataset").is_dir():
            path = path / "dataset"  # an `rlaif label --out DIR` folder: the dataset lives in DIR/dataset
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path}: a DatasetDict needs a 'train' split (found {list(loaded)})")
            held_out = next((loaded[s] for s in ("test", "validation", "eval") if s in loaded), None)
            return loaded["train"].to_dict(), held_out.to_dict() if held_out is not None else None
        return loaded.to_dict(), None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labeled dataset (give a `rlaif label` output folder or a .jsonl/.parquet file)")
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        from rlaif.judge.data import read_json_records

        return _columns_of_records(read_json_records(path)), None
    if name.endswith(".parquet"):
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_dict(), None
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .parquet, or a save_to_disk folder")


def _to_pairs(table: Columns, where: str, use_soft: bool, limit: int | None) -> tuple[list[LabeledPair], bool]:
    missing = [c for c in REQUIRED_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; labeled data needs {list(REQUIRED_COLUMNS)} "
                         f"(+ optional judge_prob), found {list(table)}")
    n = len(table["prompt"]) if limit is None else min(limit, len(table["prompt"]))
    soft = use_soft and "judge_prob" in table
    probs = table["judge_prob"][:n] if soft else [1.0] * n
    pairs = []
    for row, (prompt, chosen, rejected, prob) in enumerate(zip(table["prompt"][:n], table["chosen"][:n],
                                                               table["rejected"][:n], probs)):
        try:
            if not isinstance(prompt, str):
                prompt = as_messages(prompt)
            chosen, rejected = response_content(chosen), response_content(rejected)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} row {row}: prompt/chosen/rejected must be strings or chat messages "
                             f"({type(exc).__name__}: {exc})") from None
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"{where} row {row}: judge_prob must be a probability in [0, 1], got {prob!r}")
        pairs.append(LabeledPair(prompt, chosen, rejected, float(prob)))
    return pairs, soft


def split_by_prompt(pairs: Sequence[LabeledPair], fraction: float, seed: int) -> tuple[list[LabeledPair], list[LabeledPair]]:
    """Hold out a `fraction` of the distinct prompts (all their pairs) for evaluation.

    Splitting by prompt rather than by pair keeps the held-out agreement honest when the
    labeler produced several pairs per prompt.
    """
    keys = [prompt_key(p.prompt) for p in pairs]
    prompts = list(dict.fromkeys(keys))
    n_eval = int(round(len(prompts) * fraction))
    if fraction > 0 and n_eval == 0 and len(prompts) > 1:
        n_eval = 1
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[:n_eval])
    return ([p for p, k in zip(pairs, keys) if k not in held_out], [p for p, k in zip(pairs, keys) if k in held_out])


def load_labeled_pairs(path: str | Path, *, soft: bool = True, limit: int | None = None,
                       eval_split: float = 0.1, seed: int = 0) -> LabeledData:
    """Read labeled pairs and split off the held-out set (a DatasetDict's test split is used as is)."""
    path = Path(path)
    train_table, eval_table = _read_table(path)
    train, has_soft = _to_pairs(train_table, str(path), soft, limit)
    if not train:
        raise ValueError(f"{path}: no labeled pairs")
    if eval_table is not None:
        held_out, _ = _to_pairs(eval_table, f"{path} (eval split)", soft, None)
        return LabeledData(train, held_out, has_soft, str(path), eval_source="dataset split")
    train, held_out = split_by_prompt(train, eval_split, seed)
    if not train:
        raise ValueError(f"{path}: eval_split={eval_split} left no training pairs")
    return LabeledData(train, held_out, has_soft, str(path), eval_source=f"{eval_split:.0%} of prompts")


# ============================================================================ batching


def bucketed_batches(lengths: Sequence[int], batch_size: int, bucket_batches: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, cut into buckets of `bucket_batches` batches, sort each bucket by length, batch, shuffle batches.

    Rows in a batch then have nearly equal length (little padding), while the order of the
    data still changes every epoch.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        bucket = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
    rng.shuffle(batches)
    return batches


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
    decay, no_decay = [], []
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
        return {**totals, "grad_norm": grad_norm, "lr": lr, "pairs": n_pairs, "trained_tokens": tokens}

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg = self.config
        started = time.perf_counter()
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
                trained_tokens += record["trained_tokens"]
                trained_pairs += record["pairs"]
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


def plot_training_curve(log: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss and agreement per optimizer step (train batches) with the held-out evaluations on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in log]
    ax_loss.plot(steps, [r["loss"] for r in log], lw=1, alpha=0.6, label="train batch")
    ax_acc.plot(steps, [r["accuracy"] for r in log], lw=1, alpha=0.6, label="train batch")
    if len(log) >= 5:
        window = max(2, len(log) // 10)
        smooth = lambda key: [sum(r[key] for r in log[max(0, i - window + 1): i + 1]) / len(log[max(0, i - window + 1): i + 1])  # noqa: E731
                              for i in range(len(log))]
        ax_loss.plot(steps, smooth("loss"), lw=2, label=f"train (mean of {window})")
        ax_acc.plot(steps, smooth("accuracy"), lw=2, label=f"train (mean of {window})")
    if evals:
        ax_loss.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="held-out")
        ax_acc.plot([e["step"] for e in evals], [e["agreement"] for e in evals], "o-", label="held-out vs judge")
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_loss.set(xlabel="optimizer step", ylabel="Bradley-Terry loss", title="loss")
    ax_acc.set(xlabel="optimizer step", ylabel="agreement", title="agreement with the judge's label", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _agreement_row(name: str, result: dict[str, Any] | None, extra: str = "") -> str:
    if not result or not result.get("n"):
        return f"| {name} | n/a | | | {extra} |"
    low, high = result["agreement_ci95"]
    return (f"| {name} | {_fmt(result['agreement'], pct=True)} | {_fmt(low, pct=True)} – {_fmt(high, pct=True)} | "
            f"{result['n']} | {extra} |")


def write_model_card(out: Path, config: RMTrainConfig, metrics: dict[str, Any]) -> Path:
    """README.md with the data, configuration, metrics and usage of the trained RM."""
    data, training = metrics["data"], metrics["training"]
    initial, final, human = metrics["eval_initial"], metrics["eval"], metrics["human_eval"]
    trunc = data["truncation"]
    human_extra = f"pick-the-shorter baseline {_fmt(human['shorter_answer_baseline'], pct=True)}" if human else ""
    config_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in config.model_dump(mode="json").items())
    text = f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [reward-model, rlaif]
base_model: {"HuggingFaceTB/SmolLM2-135M-Instruct" if config.base == "default" else config.base}
---

# Reward model distilled from AI preference labels

An `AutoModelForSequenceClassification` scalar reward model (one output) on base `{config.base}`{" (the embedded SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF to fp32)" if config.base == "default" else ""},
trained by `rlaif train-rm` on pairs labeled by an LLM judge, with the {"soft-label cross-entropy of RLAIF §2.2.1 (target = the judge's debiased P(chosen better))" if config.loss == "soft" else "hard-label Bradley-Terry loss -log sigma(r_chosen - r_rejected)"}.

## Data

- Source: `{data['source']}`, labels: {data['labels']}
- Training pairs: {data['train_pairs']}; held-out pairs: {data['eval_pairs']} ({data['eval_source']}, split by prompt)
- Longer than `max_length={config.max_length}` and truncated from the left of the prompt (none dropped):
  train {trunc['train']['truncated']} of {trunc['train']['total']} ({trunc['train']['response_truncated']} with a response longer than the limit),
  held-out {trunc['eval']['truncated']} of {trunc['eval']['total']}

## Results

| agreement | value | 95% CI (Wilson) | pairs | note |
|---|---|---|---|---|
{_agreement_row("held-out vs judge, before training", initial)}
{_agreement_row("held-out vs judge, after training", final)}
{_agreement_row("human labels" + (f" (`{Path(human['file']).name}`)" if human else ""), human, human_extra)}

Held-out soft-label loss: {_fmt(initial['loss'] if initial else None)} before, {_fmt(final['loss'] if final else None)} after.
For scale: the RLAIF paper's RMs trained on AI labels (PaLM 2 labelers) agreed with people
67.8% (helpful) / 69.7% (harmless) of the time; compare with the judge's own agreement on
the same file (`rlaif eval`), which bounds what distilling it can reach.

Training: {training['steps']} optimizer steps, {training['trained_pairs']} pairs, {training['trained_tokens']} tokens
in {training['train_seconds']:.1f} s ({training['tokens_per_second']:.0f} tokens/s, {training['threads']} threads),
shared-prefix batching {training['shared_prefix']}, frozen blocks: {training['frozen_layers']}.

![training curve](training_curve.png)

## Input format

The prompt is rendered with the tokenizer's chat template as a user turn plus the assistant
generation header; the response is the assistant turn that follows (template end-of-turn
tokens included). The reward is the head's output at the last token. `max_length` =
{config.max_length}; longer inputs lose prompt tokens from the left. `rlaif_reward_model.json`
records this so that scoring formats inputs exactly as training did.

## Usage

```python
from rlaif.policy_training.reward_model import RewardModel

rm = RewardModel.load("{out}")
rm.score(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."])
```

As a PPO reward source: `rlaif.policy_training.rm_reward.RewardModelReward("{out}")`; as a service:
`rlaif serve --reward-model {out}`.

## Configuration

| field | value |
|---|---|
{config_rows}
"""
    path = out / "README.md"
    path.write_text(text)
    return path
