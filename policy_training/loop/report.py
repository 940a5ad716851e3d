"""The per-round report of a loop run: `report.md` (tables, guard verdicts, definitions) and `report.png`.

Redrawn from the stored measurements after every round (and on every re-run), so it always shows
every finished round and the guard settings now in force.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlaif.policy_training.loop.guards import GuardResult, Measurements
from rlaif.policy_training.loop.layout import write_atomic

REPORT_MD = "report.md"
REPORT_PNG = "report.png"


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def write_report(root: Path, rounds: list[tuple[Measurements, list[GuardResult]]], config: dict[str, Any],
                 stopped_by: str | None) -> dict[str, str]:
    """Write both files; returns their paths."""
    png = plot_report(root / REPORT_PNG, [m for m, _ in rounds], config)
    lines = ["# rlaif loop report", "",
             f"Run folder `{root}`; judge `{config['judge']}`, rubric `{config['rubric']}`; policy `{config['policy']}`; "
             f"PPO reward: `{config['reward_source']}`. Every number compares round r's policy with the round-0 "
             "policy on the held-out prompts (greedy answers, both presentation orders judged).", ""]
    if stopped_by:
        lines += [f"**Stopped by a guard:** {stopped_by}", ""]
    lines += ["| round | held-out | win rate (ties ½) | soft win rate | LC win rate | ties | KL (nats) | "
              "RM agreement (fresh) | RM agreement (held-out labels) | tokens policy / base | labeled pairs |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, _ in rounds:
        lines.append(
            f"| {m.round} | {m.n_heldout} | {_f(m.win_rate)}{_ci(m.win_rate_ci95)} | "
            f"{_f(m.soft_win_rate)}{_ci(m.soft_win_rate_ci95)} | {_f(m.lc_win_rate)} | {m.ties} | {_f(m.kl, 2)} | "
            f"{_f(m.rm_agreement)} (n={m.rm_agreement_pairs}) | {_f(m.rm_heldout_agreement)} | "
            f"{m.mean_length_policy:.1f} / {m.mean_length_base:.1f} | {m.label_rows} |")
    calibrated = [m for m, _ in rounds if m.uncalibrated_soft_win_rate is not None]
    if calibrated:
        lines += ["", f"The judge is calibrated (`{config.get('calibration')}`): the table reads its calibrated "
                  "verdicts. The same judgments without the calibration give soft win rates of "
                  + ", ".join(f"{_f(m.uncalibrated_soft_win_rate)}{_ci(m.uncalibrated_soft_win_rate_ci95)} "
                              f"(round {m.round})" for m in calibrated) + "."]
    lines += ["", "## Guards", "", "| round | guard | value | limit | action | fired |", "|---:|---|---:|---|---|---|"]
    for m, results in rounds:
        for g in results:
            lines.append(f"| {m.round} | {g.guard} | {_f(g.value)} | {g.threshold} | {g.action} | "
                         f"{'**yes**' if g.fired else 'no'} |")
    lines += ["", "## Definitions", "",
              "- **win rate**: (wins + ties/2) / n; a win needs both presentation orders to prefer the policy "
              "(95% Wilson interval).",
              "- **soft win rate**: mean debiased P(policy better) (95% normal interval). With a judge whose hard "
              "verdict is mostly a tie (orders disagree), this is where its signal is.",
              "- **LC win rate** (length-controlled, AlpacaEval style): logistic regression of the soft "
              "P(policy better) on tanh(token-length difference / its std), read at equal length: "
              "sigmoid(intercept).",
              "- **KL**: PPO's sequence KL (k1, nats) of the round's rollouts to the round-0 policy, mean over the last "
              "quarter of the round's steps.",
              "- **RM agreement (fresh)**: on the held-out policy-vs-round-0 answers, share of decided pairs where the "
              "round's RM orders them as the judge does; **(held-out labels)**: the RM's agreement on its own "
              "held-out labeled pairs (train-rm's split).",
              "", f"![per-round metrics]({REPORT_PNG})", ""]
    md = root / REPORT_MD
    write_atomic(md, "\n".join(lines))
    return {"markdown": str(md), "plot": str(png)}


def plot_report(path: Path, rounds: list[Measurements], config: dict[str, Any]) -> Path:
    """Four panels over rounds: win rates, KL, RM agreement, response length."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    xs = [m.round for m in rounds]
    ax = axes[0][0]
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    if rounds:
        ax.errorbar(xs, [m.soft_win_rate for m in rounds],
                    yerr=[[m.soft_win_rate - m.soft_win_rate_ci95[0] for m in rounds],
                          [m.soft_win_rate_ci95[1] - m.soft_win_rate for m in rounds]], marker="o", capsize=3,
                    label="soft win rate")
        ax.plot(xs, [m.win_rate for m in rounds], marker="s", label="win rate (ties ½)")
        ax.plot(xs, [m.lc_win_rate for m in rounds], marker="^", label="length-controlled")
    ax.set(title="win rate vs round-0 policy (held-out)", xlabel="round", ylim=(0, 1))
    ax.legend(fontsize="small")
    ax = axes[0][1]
    ax.plot(xs, [m.kl if m.kl is not None else float("nan") for m in rounds], marker="o", label="KL (end of round)")
    ax.plot(xs, [m.kl_max if m.kl_max is not None else float("nan") for m in rounds], marker=".", linestyle=":",
            label="max step KL")
    ax.axhline(config["max_kl"], color="red", linestyle="--", linewidth=1, label="guard")
    ax.set(title="KL to the round-0 policy (nats)", xlabel="round")
    ax.legend(fontsize="small")
    ax = axes[1][0]
    ax.plot(xs, [m.rm_agreement if m.rm_agreement is not None else float("nan") for m in rounds], marker="o",
            label="fresh policy samples")
    ax.plot(xs, [m.rm_heldout_agreement if m.rm_heldout_agreement is not None else float("nan") for m in rounds],
            marker="s", label="held-out labeled pairs")
    ax.axhline(config["min_agreement"], color="red", linestyle="--", linewidth=1, label="guard")
    ax.set(title="RM agreement with the judge", xlabel="round", ylim=(0, 1))
    ax.legend(fontsize="small")
    ax = axes[1][1]
    ax.plot(xs, [m.mean_length_policy for m in rounds], marker="o", label="policy")
    ax.plot(xs, [m.mean_length_base for m in rounds], marker="s", label="round-0 policy")
    ax.set(title="mean response length (tokens, held-out)", xlabel="round")
    ax.legend(fontsize="small")
    for row in axes:
        for a in row:
            if xs:
                a.set_xticks(xs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path
