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
- `mean_prob_policy_better`: the soft version (mean debiased P(policy better));
- `length_controlled_win_rate`: `rlaif.judge.metrics.length_controlled_win_rate` on the soft
  probabilities against the token-length difference (AlpacaEval-style: the win rate the
  fit predicts at equal length), with its slope (> 0: longer answers win more);
- mean response lengths of both models (tokens, with the base tokenizer, and characters).

    rlaif winrate --base default --policy runs/ppo --prompts heldout.jsonl --limit 100 --out runs/winrate

`--policy` accepts a run directory (its latest checkpoint's policy is used), a
`checkpoint-N` directory, a save_pretrained directory, `default`, or `hf:<id or path>`.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.judge.data import PromptRecord, load_prompts
from rlaif.judge.types import PairwiseItem, PairwiseJudgment, Preference

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
OUTCOME = {Preference.A: 1.0, Preference.B: 0.0, Preference.TIE: 0.5}
"""Policy is response A: a win counts 1, a tie 1/2, a loss 0."""


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
    command works on a run while it is still training.
    """
    from rlaif.policy_training.ppo import PPOTrainer, resolve_model_path

    path = Path(spec)
    if path.is_dir():
        if (path / "policy").is_dir():  # a checkpoint-N directory
            return str(path / "policy")
        latest = PPOTrainer.latest_checkpoint(path)
        if latest is not None:
            return str(latest / "policy")
        return str(path)
    return resolve_model_path(spec)


def chat_prompt(record: PromptRecord) -> list[dict[str, str]]:
    """The conversation a policy answers: the record's own messages, or one user turn."""
    return [dict(m) for m in record.messages] if record.messages else [{"role": "user", "content": record.text}]


def generate_responses(model_path: str, records: Sequence[PromptRecord], *, max_new_tokens: int, temperature: float,
                       seed: int, batch_size: int, device: str) -> list[str]:
    """Responses of one model to each prompt, with the model's chat template applied.

    The model is loaded, used and released here, so base and policy are never in memory together.
    """
    from rlaif.judge.engines.base import GenerationParams
    from rlaif.judge.engines.hf import HFEngine

    engine = HFEngine(model_path, device=device, max_batch_size=batch_size, prefix_cache=False)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    texts = [outs[0] for outs in engine.generate([chat_prompt(r) for r in records], params)]
    del engine
    gc.collect()
    return texts


def judge_pairs(items: Sequence[PairwiseItem], settings: WinRateSettings) -> tuple[list[PairwiseJudgment], str]:
    """Debiased pairwise judgments (both orders) in process or through the judge service; also the judge's name."""
    if settings.judge_url:
        from rlaif.service.client import JudgeClient

        with JudgeClient(settings.judge_url, api_key=settings.judge_api_key, timeout=settings.judge_timeout) as client:
            judgments = client.pairwise([item.model_dump() for item in items], rubric=settings.rubric,
                                        mode=settings.judge_mode)  # type: ignore[arg-type]
        return judgments, settings.judge_url
    from rlaif.judge.engines import build_engine
    from rlaif.judge.judges import PairwiseJudge

    judge = PairwiseJudge(build_engine(settings.engine or "default"), settings.rubric or "helpfulness",
                          mode=settings.judge_mode)  # type: ignore[arg-type]
    return judge.judge(list(items)), judge.engine.engine_id


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
    diffs = np.asarray(policy_lengths, dtype=float) - np.asarray(base_lengths, dtype=float)  # (n,)
    lc = length_controlled_win_rate(probs, diffs)
    return {
        "n": n,
        "win_rate": sum(outcomes) / n,
        "win_rate_ci95": [low, high],
        "wins": sum(j.preference is Preference.A for j in judgments),
        "losses": sum(j.preference is Preference.B for j in judgments),
        "ties": sum(j.preference is Preference.TIE for j in judgments),
        "mean_prob_policy_better": sum(probs) / n,
        "consistent_frac": sum(j.consistent for j in judgments) / n,
        "length_controlled_win_rate": lc.win_rate,
        "length_slope": lc.slope,
        "length_fit_converged": lc.converged,
        "mean_length_tokens": {"policy": float(np.mean(policy_lengths)), "base": float(np.mean(base_lengths))},
        "mean_length_chars": {"policy": float(np.mean([len(t) for t in policy_texts])),
                              "base": float(np.mean([len(t) for t in base_texts]))},
    }


def run_winrate(settings: WinRateSettings) -> dict[str, Any]:
    """Generate with both models, judge, summarize; write samples.jsonl + summary.json to `settings.out`."""
    if settings.engine and settings.judge_url:
        raise ValueError("give either a judge engine or a judge URL, not both")
    records = load_prompts(settings.prompts, settings.prompt_column, settings.limit)
    if not records:
        raise ValueError(f"{settings.prompts} holds no prompts")
    base_path, policy_path = resolve_policy_spec(settings.base), resolve_policy_spec(settings.policy)
    started = time.perf_counter()
    gen = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, seed=settings.seed,
               batch_size=settings.batch_size, device=settings.device)
    base_texts = generate_responses(base_path, records, **gen)  # type: ignore[arg-type]
    policy_texts = generate_responses(policy_path, records, **gen)  # type: ignore[arg-type]
    generation_s = time.perf_counter() - started
    # One yardstick for both models' lengths: the base tokenizer (a policy may have added tokens).
    from rlaif.judge.models import load_tokenizer

    tokenizer = load_tokenizer(base_path)
    base_lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in base_texts]
    policy_lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in policy_texts]

    items = [PairwiseItem(prompt=r.text, response_a=p, response_b=b)
             for r, p, b in zip(records, policy_texts, base_texts)]
    judged = time.perf_counter()
    judgments, judge_name = judge_pairs(items, settings)
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
                }, ensure_ascii=False) + "\n")
        summary["samples"] = str(out / SAMPLES_FILE)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary

