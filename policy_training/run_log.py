"""What a PPO run writes besides checkpoints: step metrics, sample responses, TensorBoard, plots.

- `rollout_metrics(...)`: the step record's rollout half (reward, KL, entropy, lengths,
  missing rewards, timings, the reward source's own metrics); the update adds its losses;
- `RunLog`: `<output_dir>/metrics.jsonl` (one strict-JSON object per logged step; NaN becomes
  null), `samples.jsonl` (a few prompt/response/reward examples per step), TensorBoard when
  installed, and `training_curves.png` (`plot_training_curves`). Only rank 0 writes; a resumed
  run first drops the lines of steps it will redo.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlaif.policy_training.config import LoggingConfig
from rlaif.policy_training.ppo_math import masked_mean, masked_sum
from rlaif.policy_training.rewards import RewardBatch, reward_source_metrics
from rlaif.policy_training.rollout import Rollout
from torch import Tensor

logger = logging.getLogger(__name__)

PLOT_FILE = "training_curves.png"


def _mean(x: Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


def rollout_metrics(step: int, rollout: Rollout, rewards: RewardBatch, stats: dict[str, Tensor],
                    seq_reward: Tensor, beta: float, usable: Tensor, generation_s: float,
                    reward_source: Any) -> dict[str, Any]:
    """The step record before the update: what was sampled, how it scored, how far it drifted."""
    mask, lengths, scores, valid = rollout.response_mask, rollout.lengths, rewards.scores, rewards.valid
    record: dict[str, Any] = {
        "step": step,
        "reward": _mean(scores[valid]),
        "reward_std": float(scores[valid].std()) if int(valid.sum()) > 1 else 0.0,
        "reward_with_kl": _mean(seq_reward[valid]),
        "kl": _mean(masked_sum(stats["logprobs"] - stats["ref_logprobs"], mask, dim=1)[valid]),
        "kl_coef": beta,
        "entropy": float(masked_mean(stats["entropy"], mask)),
        "response_length": float(lengths.float().mean()),
        "eos_missing_frac": float((~rollout.has_eos).float().mean()),
        "reward_missing": rewards.n_missing,
        "samples_used": int(usable.sum()),
        "reward_latency_s": rewards.latency_s,
        "generation_s": generation_s,
        "tokens_per_s": float(lengths.sum()) / max(generation_s, 1e-9),
    }
    record.update(reward_source_metrics(reward_source))
    return record


class RunLog:
    """metrics.jsonl, samples.jsonl, TensorBoard and the curves PNG of one run (rank 0 writes)."""

    def __init__(self, output_dir: Path, config: LoggingConfig, is_main: bool) -> None:
        self.output_dir = output_dir
        self.config = config
        self.is_main = is_main
        self.history: list[dict[str, Any]] = []
        self.tensorboard = self._make_tensorboard()

    def _make_tensorboard(self) -> Any:
        if not self.config.tensorboard or not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        # NaN (e.g. explained variance of constant returns) becomes null: metrics.jsonl stays strict JSON.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def write_samples(self, step: int, rollout: Rollout, scores: Tensor, valid: Tensor) -> None:
        if not self.config.log_samples or not self.is_main:
            return
        with open(self.output_dir / "samples.jsonl", "a") as f:
            for i in range(min(self.config.log_samples, len(rollout.prompts))):
                f.write(json.dumps({"step": step, "prompt": rollout.prompts[i], "response": rollout.responses[i],
                                    "reward": float(scores[i]) if bool(valid[i]) else None}) + "\n")

    def plot(self) -> Path:
        """Redraw `training_curves.png` from the logged history."""
        return plot_training_curves(self.history, self.output_dir / PLOT_FILE)

    def truncate(self, step: int) -> None:
        """Steps logged after `step` (a checkpoint's) will be redone: drop them so the log has no duplicates."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.output_dir / name
            if path.is_file():
                lines = [line for line in path.read_text().splitlines()
                         if line.strip() and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in lines))
                if name == "metrics.jsonl":
                    self.history = [json.loads(line) for line in lines]

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """Flush and close TensorBoard's event file (its writer thread must not be left to exit handlers:
        distributed runs end with `os._exit`)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


PLOT_PANELS = (
    ("reward", "reward (after normalize/clip, if on)"), ("reward_with_kl", "reward - beta*KL"), ("kl", "KL(policy || ref), nats"),
    ("entropy", "token entropy"), ("response_length", "response length (tokens)"), ("clipfrac", "clip fraction"),
    ("approx_kl", "approx KL per update"), ("value_loss", "value loss"), ("explained_variance", "explained variance"),
)


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """A grid of the main curves (reward, KL, entropy, length, ...) against step, as a PNG.

    Uses matplotlib's object API with the Agg canvas: no global backend switch, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(k, title) for k, title in PLOT_PANELS if any(k in r for r in records)] or [("reward", "reward")]
    # Per-component rewards as the source produced them (e.g. a judge's raw win probability per rubric).
    components = sorted({k for r in records for k in r if k.startswith("reward/")})
    panels[1:1] = [(k, f"{k[len('reward/'):]} (component, raw)") for k in components]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
