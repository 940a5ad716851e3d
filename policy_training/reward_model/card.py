"""The written record of a reward-model run: training-curve PNG and the model card README."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlaif.policy_training.reward_model.config import RMTrainConfig


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
from rlaif.judge.reward_model import RewardModel


rm = RewardModel.load("{out}")
rm.score(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."])
```

As a PPO reward source: `rlaif.policy_training.reward_model.RewardModelReward("{out}")`; as a service:
`rlaif serve --reward-model {out}`.

## Configuration

| field | value |
|---|---|
{config_rows}
"""
    path = out / "README.md"
    path.write_text(text)
    return path
