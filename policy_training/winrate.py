"""Judged win rate of a trained policy against its initial policy on held-out prompts.

The number to select checkpoints by (Gao et al. 2022; Singhal et al. 2023): training reward
can rise while real quality falls, so we ask the judge which answer is better on prompts the
policy never trained on, and report length next to it, because a judge that likes long
answers turns "longer" into "better".

Per prompt: one response from each model (greedy by default, so the comparison is
deterministic), then one `PairwiseJudge` verdict with the policy as response A and the
base as response B, judged in **both orders** and averaged (RLAIF §2.1 position debiasing).
A win is a verdict for A in both orders, a loss one for B, anything else a tie (MT-Bench's
rule; `tie_margin` from the judge). Reported:
- `win_rate` = (wins + ties / 2) / n, with a 95% Wilson interval;
- `mean_prob_policy_better`: the soft version (mean debiased P(policy better)), with a 95%
  normal-approximation interval;
- `length_controlled_win_rate`: `rlaif.judge.metrics.length_controlled_win_rate` on the soft
  probabilities against the token-length difference (AlpacaEval-style: the win rate the
  fit predicts at equal length), with its slope (> 0: longer answers win more);
- mean response lengths of both models (tokens, with the base tokenizer, and characters).
- with a calibrated judge (`rlaif calibrate`), `uncalibrated`: the soft numbers of the same judgments
  read without the calibration (each sample also keeps `raw_prob_policy_better`).

    rlaif winrate --base default --policy runs/ppo --prompts heldout.jsonl --limit 100 --out runs/winrate

`--policy` accepts a run directory or its `latest` link (the latest checkpoint's policy is used), a
`checkpoint-N` directory, a save_pretrained directory, `default`, or `hf:<id or path>`.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.judge.data import PromptRecord, load_prompts
from rlaif.judge.types import PairwiseItem, PairwiseJudgment, Preference

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.judge.judges import PairwiseJudge

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
OUTCOME = {Preference.A: 1.0, Preference.B: 0.0, Preference.TIE: 0.5}
"""Policy is response A: a win counts 1, a tie 1/2, a loss 0."""
JUDGE_CHUNK = 8
"""Comparisons per judge call when a progress bar is shown: small enough that the bar moves every few seconds."""


@dataclass(frozen=True)
class WinRateSettings:
    """What to compare, on what, judged by whom."""

    base: str
    policy: str
    prompts: str
    prompt_column: str | None = None
    limit: int | None = None
    engine: str | None = "default"
    judge_url: str | None = None
    rubric: str | None = None
    judge_mode: str = "logprob"
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    out: str | None = "runs/winrate"
    judge_timeout: float = 600.0
    judge_api_key: str | None = None


def resolve_policy_spec(spec: str) -> str:
    """A model spec or run/checkpoint directory -> a path (or id) `from_pretrained` loads.

    A PPO run directory resolves to its latest complete checkpoint's `policy/`, so the
    command works on a run while it is still training; so does `<run>/latest` (a symlink the
    trainer keeps, resolved here too where the link could not be made or was not copied).
    """
    from rlaif.policy_training.checkpoint import LATEST_LINK, latest_checkpoint
    from rlaif.policy_training.models import resolve_model_path

    path = Path(spec)
    if path.name == LATEST_LINK and not path.exists() and path.parent.is_dir():
        newest = latest_checkpoint(path.parent)
        if newest is None:
            raise ValueError(f"{spec}: {path.parent} holds no complete checkpoint yet")
        path = newest
    if path.is_dir():
        if (path / "policy").is_dir():  # a checkpoint-N directory
            return str(path / "policy")
        latest = latest_checkpoint(path)
        if latest is not None:
            return str(latest / "policy")
        return str(path)
    return resolve_model_path(spec)


def chat_prompt(record: PromptRecord) -> list[dict[str, str]]:
    """The conversation a policy answers: the record's own messages, or one user turn."""
    return [dict(m) for m in record.messages] if record.messages else [{"role": "user", "content": record.text}]


def generate_responses(model_path: str, records: Sequence[PromptRecord], *, max_new_tokens: int, temperature: float,
                       seed: int, batch_size: int, device: str,
                       progress: Callable[[float], None] | None = None) -> list[str]:
    """Responses of one model to each prompt, with the model's chat template applied.

    The model is loaded, used and released here, so base and policy are never in memory together.
    `progress(k)` is told each finished share of the work, in responses (`HFEngine.generate`).
    """
    from rlaif.judge.engines.base import GenerationParams
    from rlaif.judge.engines.hf import HFEngine

    engine = HFEngine(model_path, device=device, max_batch_size=batch_size, prefix_cache=False)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    texts = [outs[0] for outs in engine.generate([chat_prompt(r) for r in records], params, progress=progress)]
    del engine
    gc.collect()
    return texts


def judge_pairs(items: Sequence[PairwiseItem], settings: WinRateSettings, judge: PairwiseJudge | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[list[PairwiseJudgment], str]:
    """Debiased pairwise judgments (both orders) in process or through the judge service; also the judge's name.

    `judge`: a ready `PairwiseJudge` to use instead of building one from the settings (`rlaif loop`
    keeps one judge engine, and its judgment cache, for all of its stages). With `progress`, the
    comparisons go in chunks of `JUDGE_CHUNK` and `progress(k)` is told each chunk's size."""
    if judge is not None:
        return _in_chunks(judge.judge, items, progress), judge.engine.engine_id
    if settings.judge_url:
        from rlaif.judge.api.client import JudgeClient

        with JudgeClient(settings.judge_url, api_key=settings.judge_api_key, timeout=settings.judge_timeout) as client:
            def remote(chunk: list[PairwiseItem]) -> list[PairwiseJudgment]:
                return client.pairwise([item.model_dump() for item in chunk], rubric=settings.rubric,
                                       mode=settings.judge_mode)  # type: ignore[arg-type]

            judgments = _in_chunks(remote, items, progress)
        return judgments, settings.judge_url
    from rlaif.judge.engines import build_engine
    from rlaif.judge.judges import PairwiseJudge

    judge = PairwiseJudge(build_engine(settings.engine or "default"), settings.rubric or "helpfulness",
                          mode=settings.judge_mode)  # type: ignore[arg-type]
    return _in_chunks(judge.judge, items, progress), judge.engine.engine_id


def _in_chunks(judge: Callable[[list[PairwiseItem]], list[PairwiseJudgment]], items: Sequence[PairwiseItem],
               progress: Callable[[int], None] | None) -> list[PairwiseJudgment]:
    """All of `items` in one call without a progress callback (the judge batches them best), else per chunk."""
    if progress is None:
        return judge(list(items))
    out: list[PairwiseJudgment] = []
    for start in range(0, len(items), JUDGE_CHUNK):
        chunk = list(items[start:start + JUDGE_CHUNK])
        out.extend(judge(chunk))
        progress(len(chunk))
    return out


def summarize(judgments: Sequence[PairwiseJudgment], policy_lengths: Sequence[int], base_lengths: Sequence[int],
              policy_texts: Sequence[str], base_texts: Sequence[str]) -> dict[str, Any]:
    """The win-rate numbers of the module docstring from verdicts with the policy as response A."""
    import numpy as np
    from rlaif.judge.metrics import length_controlled_win_rate, wilson_interval

    n = len(judgments)
    if n == 0:
        raise ValueError("no comparisons to summarize")
    outcomes = [OUTCOME[j.preference] for j in judgments]
    probs = [j.prob_a for j in judgments]
    low, high = wilson_interval(sum(outcomes), n)
    soft, soft_ci = _soft_win_rate(probs)
    diffs = np.asarray(policy_lengths, dtype=float) - np.asarray(base_lengths, dtype=float)  # (n,)
    lc = length_controlled_win_rate(probs, diffs)
    summary: dict[str, Any] = {
        "n": n,
        "win_rate": sum(outcomes) / n,
        "win_rate_ci95": [low, high],
        "wins": sum(j.preference is Preference.A for j in judgments),
        "losses": sum(j.preference is Preference.B for j in judgments),
        "ties": sum(j.preference is Preference.TIE for j in judgments),
        "mean_prob_policy_better": soft,
        "mean_prob_policy_better_ci95": soft_ci,
        "consistent_frac": sum(j.consistent for j in judgments) / n,
        "length_controlled_win_rate": lc.win_rate,
        "length_slope": lc.slope,
        "length_fit_converged": lc.converged,
        "mean_length_tokens": {"policy": float(np.mean(policy_lengths)), "base": float(np.mean(base_lengths))},
        "mean_length_chars": {"policy": float(np.mean([len(t) for t in policy_texts])),
                              "base": float(np.mean([len(t) for t in base_texts]))},
    }
    if any(j.calibration is not None for j in judgments):
        summary["uncalibrated"] = _uncalibrated(judgments, diffs)
    return summary


def _soft_win_rate(probs: Sequence[float]) -> tuple[float, list[float]]:
    """Mean P(policy better) with a 95% normal-approximation interval, clipped to [0, 1]. A capable judge's
    hard verdicts are mostly ties, so this soft mean is where its signal is (docs/loop.md)."""
    import numpy as np

    n = len(probs)
    mean = sum(probs) / n
    half = 1.96 * float(np.std(probs, ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def _uncalibrated(judgments: Sequence[PairwiseJudgment], length_diffs: Any) -> dict[str, Any]:
    """The soft numbers of the judge's own (uncalibrated) probabilities, for judgments made with a calibration.

    A calibration changes what a verdict means (position bias removed, temperature applied), so a win
    rate judged with one is reported beside the same judgments read without it: two readings of one
    set of model calls, not a second judging."""
    from rlaif.judge.metrics import length_controlled_win_rate

    probs = [j.raw_prob_a if j.raw_prob_a is not None else j.prob_a for j in judgments]
    consistent = [j.raw_consistent if j.raw_consistent is not None else j.consistent for j in judgments]
    soft, soft_ci = _soft_win_rate(probs)
    return {"mean_prob_policy_better": soft,
            "mean_prob_policy_better_ci95": soft_ci,
            "consistent_frac": sum(consistent) / len(probs),
            "length_controlled_win_rate": length_controlled_win_rate(probs, length_diffs).win_rate}


def run_winrate(settings: WinRateSettings, *, judge: PairwiseJudge | None = None, progress: bool = False) -> dict[str, Any]:
    """Generate with both models, judge, summarize; write samples.jsonl + summary.json to `settings.out`.

    `judge` replaces the judge the settings describe (see `judge_pairs`). `progress`: one tqdm bar on
    stderr per stage (base answers, policy answers, judging), each moving per response or chunk of
    comparisons with rate and ETA."""
    if settings.engine and settings.judge_url and judge is None:
        raise ValueError("give either a judge engine or a judge URL, not both")
    records = load_prompts(settings.prompts, settings.prompt_column, settings.limit)
    if not records:
        raise ValueError(f"{settings.prompts} holds no prompts")
    base_path, policy_path = resolve_policy_spec(settings.base), resolve_policy_spec(settings.policy)
    started = time.perf_counter()
    gen = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, seed=settings.seed,
               batch_size=settings.batch_size, device=settings.device)
    with _bar(progress, len(records), "winrate: base answers", "response") as bar:
        base_texts = generate_responses(base_path, records, **gen, progress=bar.update)  # type: ignore[arg-type]
    with _bar(progress, len(records), "winrate: policy answers", "response") as bar:
        policy_texts = generate_responses(policy_path, records, **gen, progress=bar.update)  # type: ignore[arg-type]
    generation_s = time.perf_counter() - started
    # One yardstick for both models' lengths: the base tokenizer (a policy may have added tokens).
    from rlaif.judge.models import load_tokenizer

    tokenizer = load_tokenizer(base_path)
    base_lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in base_texts]
    policy_lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in policy_texts]

    items = [PairwiseItem(prompt=r.text, response_a=p, response_b=b)
             for r, p, b in zip(records, policy_texts, base_texts)]
    judged = time.perf_counter()
    with _bar(progress, len(items), "winrate: judging", "pair") as bar:
        judgments, judge_name = judge_pairs(items, settings, judge, progress=bar.update if progress else None)
    judge_s = time.perf_counter() - judged

    summary = summarize(judgments, policy_lengths, base_lengths, policy_texts, base_texts)
    summary.update({"base": settings.base, "policy": settings.policy, "base_path": base_path,
                    "policy_path": policy_path, "judge": judge_name, "rubric": judgments[0].rubric_id,
                    "judge_mode": settings.judge_mode, "max_new_tokens": settings.max_new_tokens,
                    "temperature": settings.temperature, "prompts": settings.prompts,
                    "generation_s": generation_s, "judge_s": judge_s})
    if settings.out:
        out = Path(settings.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / SAMPLES_FILE, "w") as f:
            for r, j, p, b, lp, lb in zip(records, judgments, policy_texts, base_texts, policy_lengths, base_lengths):
                winner = {Preference.A: "policy", Preference.B: "base", Preference.TIE: "tie"}[j.preference]
                f.write(json.dumps({
                    "id": r.id, "prompt": r.text, "policy_response": p, "base_response": b,
                    "prob_policy_better": j.prob_a, "prob_by_order": {o.order: o.prob_a for o in j.per_order},
                    "winner": winner, "consistent": j.consistent, "policy_tokens": lp, "base_tokens": lb,
                    **({"calibration": j.calibration, "raw_prob_policy_better": j.raw_prob_a,
                        "raw_consistent": j.raw_consistent} if j.calibration is not None else {}),
                }, ensure_ascii=False) + "\n")
        summary["samples"] = str(out / SAMPLES_FILE)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class _Bar:
    """A tqdm bar that accepts fractional progress (the sampler reports shares of a response) and ends on
    the whole count, so the last line reads `3/3`, not `3.0/3`."""

    def __init__(self, enabled: bool, total: int, desc: str, unit: str) -> None:
        from tqdm import tqdm

        self.total = total
        self.tqdm = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def update(self, k: float) -> None:
        self.tqdm.update(k)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.tqdm.n = self.total
            self.tqdm.refresh()
        self.tqdm.close()


def _bar(enabled: bool, total: int, desc: str, unit: str) -> _Bar:
    return _Bar(enabled, total, desc, unit)
