"""`RMTrainConfig`: everything one `rlaif train-rm` run needs; saved verbatim into the model card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)



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


