"""Reward modes measured with a judge: reference-guided vs plain grading, listwise vs round-robin groups.

The questions are short arithmetic and factual questions with known answers, written here (no
data files, no download). Each question has a correct and a wrong response written in the same
style and length (the wrong one differs in the answer only), so a judge can tell them apart only
by checking the answer, which is what a reference answer is for.

Measured, all on one engine (`--engine`, e.g. the capable judge as
`hf:<plain checkpoint>?dtype=bf16`), no judgment cache:

- score grading: `score-1-10` without the reference vs `correctness` with it; accuracy = share
  of questions where the correct response gets the higher expected score (a tie counts half);
- pairwise: `helpfulness` without the reference vs `correctness-pairwise` with it, both orders,
  debiased; accuracy = share of questions where P(correct response better) > 0.5 (exactly 0.5
  counts half), plus the mean soft probability on the correct response;
- groups of 4 (two correct answers in different wordings, two wrong ones): listwise
  (`group-listwise`, k presentation orders) vs pairwise round robin with a Bradley-Terry fit;
  pair accuracy = share of (correct, wrong) pairs in a group that the scores order correctly,
  agreement = share of response pairs both methods order the same way, and the judge cost
  (`tokens_computed` from the engine's counters, seconds).

    python benchmarks/reward_modes.py --engine 'hf:/path/to/qwen2.5-1.5b-plain?dtype=bf16'
    python benchmarks/reward_modes.py --engine default --questions 6       # quick look, embedded model
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Question:
    prompt: str
    reference: str
    correct: tuple[str, str]  # two wordings of a correct answer
    wrong: tuple[str, str]  # the same two wordings with a wrong answer


def _arith(a: int, b: int, op: str, off: int) -> Question:
    value = {"*": a * b, "+": a + b, "-": a - b}[op]
    word = {"*": "times", "+": "plus", "-": "minus"}[op]
    forms = (lambda v: f"{a} {op} {b} = {v}.", lambda v: f"{a} {word} {b} is {v}, so the answer is {v}.")
    return Question(f"What is {a} {op} {b}?", f"{value}", tuple(f(value) for f in forms),  # type: ignore[arg-type]
                    tuple(f(value + off) for f in forms))  # type: ignore[arg-type]


def _fact(prompt: str, right: str, wrong: str, template: str, template2: str) -> Question:
    return Question(prompt, right, (template.format(right), template2.format(right)),
                    (template.format(wrong), template2.format(wrong)))


def questions() -> list[Question]:
    """24 questions: 12 arithmetic (wrong answers off by a plausible slip), 12 factual."""
    arithmetic = [_arith(37, 24, "*", 10), _arith(56, 13, "*", -1), _arith(48, 29, "*", 100), _arith(73, 18, "*", 9),
                  _arith(482, 379, "+", 10), _arith(915, 268, "-", -10), _arith(64, 57, "*", 1),
                  _arith(1234, 987, "+", -100), _arith(702, 345, "-", 2), _arith(19, 86, "*", -10),
                  _arith(3456, 1789, "-", 100), _arith(27, 43, "*", 20)]
    facts = [
        _fact("What is the capital of Australia?", "Canberra", "Sydney",
              "The capital of Australia is {}.", "{} is Australia's capital city."),
        _fact("What is the chemical symbol of gold?", "Au", "Ag",
              "The chemical symbol of gold is {}.", "Gold's symbol on the periodic table is {}."),
        _fact("How many bones are in the adult human body?", "206", "212",
              "An adult human body has {} bones.", "There are {} bones in a grown-up human skeleton."),
        _fact("Which planet is closest to the Sun?", "Mercury", "Venus",
              "The planet closest to the Sun is {}.", "{} orbits nearest to the Sun."),
        _fact("In which year did the Berlin Wall fall?", "1989", "1991",
              "The Berlin Wall fell in {}.", "It came down in {}, when the border opened."),
        _fact("What is the boiling point of water at sea level in degrees Fahrenheit?", "212", "200",
              "Water boils at {} degrees Fahrenheit at sea level.", "At sea level the boiling point is {} °F."),
        _fact("Who wrote the novel 'Pride and Prejudice'?", "Jane Austen", "Charlotte Brontë",
              "'Pride and Prejudice' was written by {}.", "The author of 'Pride and Prejudice' is {}."),
        _fact("What is the largest ocean on Earth?", "the Pacific Ocean", "the Atlantic Ocean",
              "The largest ocean on Earth is {}.", "By area, {} is the biggest ocean."),
        _fact("How many sides does a hexagon have?", "6", "8",
              "A hexagon has {} sides.", "Every hexagon is a polygon with {} sides."),
        _fact("What is the capital of Canada?", "Ottawa", "Toronto",
              "The capital of Canada is {}.", "{} is Canada's capital city."),
        _fact("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide", "oxygen",
              "Plants absorb {} from the air for photosynthesis.", "For photosynthesis, plants take in {}."),
        _fact("What is the square root of 144?", "12", "14",
              "The square root of 144 is {}.", "{} is the square root of 144."),
    ]
    return arithmetic + facts


def _half(x: float, y: float) -> float:
    """1 if x > y, 0.5 on a tie, 0 otherwise: accuracy that does not reward a judge for ties."""
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _timed(engine: Any, run: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    engine.stats.reset()
    started = time.perf_counter()
    out = run()
    return out, {"seconds": round(time.perf_counter() - started, 1), "tokens_computed": engine.stats.tokens_computed,
                 "tokens_requested": engine.stats.tokens_requested}


def score_modes(engine: Any, qs: list[Question]) -> list[dict[str, Any]]:
    from rlaif.judge.judges import ScoreJudge
    from rlaif.judge.types import ScoreItem

    rows = []
    for name, rubric, with_reference in (("plain (`score-1-10`)", "score-1-10", False),
                                         ("reference-guided (`correctness`)", "correctness", True)):
        items = [ScoreItem(prompt=q.prompt, response=r, reference=q.reference if with_reference else None)
                 for q in qs for r in (q.correct[0], q.wrong[0])]
        out, cost = _timed(engine, lambda rubric=rubric, items=items: ScoreJudge(engine, rubric).judge(items))
        pairs = [(out[2 * i].score, out[2 * i + 1].score) for i in range(len(qs))]
        rows.append({"mode": name, "accuracy": sum(_half(c, w) for c, w in pairs) / len(pairs),
                     "mean_gap": sum(c - w for c, w in pairs) / len(pairs),
                     "label_mass": sum(j.label_mass for j in out) / len(out), **cost})
    return rows


def pairwise_modes(engine: Any, qs: list[Question]) -> list[dict[str, Any]]:
    from rlaif.judge.judges import PairwiseJudge
    from rlaif.judge.types import PairwiseItem

    rows = []
    for name, rubric, with_reference in (("plain (`helpfulness`)", "helpfulness", False),
                                         ("reference-guided (`correctness-pairwise`)", "correctness-pairwise", True)):
        # alternate which side holds the correct answer, so a position-biased judge cannot look accurate
        items = [PairwiseItem(prompt=q.prompt, response_a=q.correct[0] if i % 2 == 0 else q.wrong[0],
                              response_b=q.wrong[0] if i % 2 == 0 else q.correct[0],
                              reference=q.reference if with_reference else None) for i, q in enumerate(qs)]
        out, cost = _timed(engine, lambda rubric=rubric, items=items: PairwiseJudge(engine, rubric).judge(items))
        p_correct = [j.prob_a if i % 2 == 0 else 1.0 - j.prob_a for i, j in enumerate(out)]
        rows.append({"mode": name, "accuracy": sum(_half(p, 0.5) for p in p_correct) / len(p_correct),
                     "mean_p_correct": sum(p_correct) / len(p_correct),
                     "consistency": sum(j.consistent for j in out) / len(out),
                     "label_mass": sum(j.label_mass for j in out) / len(out), **cost})
    return rows


def group_modes(engine: Any, qs: list[Question], orders: int) -> tuple[list[dict[str, Any]], float]:
    from rlaif.judge.group import GroupJudge
    from rlaif.judge.types import GroupItem

    # responses 0 and 2 correct, 1 and 3 wrong: every wrong answer sits between correct ones in input order
    groups = [GroupItem(prompt=q.prompt, responses=(q.correct[0], q.wrong[1], q.correct[1], q.wrong[0])) for q in qs]
    correct = {0, 2}
    rows, scores = [], {}
    for name, judge in ((f"listwise, {orders} orders", GroupJudge(engine, method="listwise", orders=orders)),
                        ("round robin, N(N-1) = 12 orders", GroupJudge(engine, method="round_robin"))):
        out, cost = _timed(engine, lambda judge=judge: judge.judge(groups))
        scores[name] = [j.scores for j in out]
        pair_acc = [_half(s[c], s[w]) for s in scores[name] for c in correct for w in set(range(4)) - correct]
        rows.append({"mode": name, "pair_accuracy": sum(pair_acc) / len(pair_acc),
                     "top1_correct": sum(max(range(4), key=s.__getitem__) in correct for s in scores[name]) / len(groups),
                     "label_mass": sum(j.label_mass for j in out) / len(out), **cost})
    a, b = scores.values()
    same = [(x[i] - x[j]) * (y[i] - y[j]) > 0 for x, y in zip(a, b) for i, j in itertools.combinations(range(4), 2)]
    return rows, sum(same) / len(same)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="default", help="judge engine spec (default: the embedded model)")
    parser.add_argument("--questions", type=int, default=24, help="questions used (at most 24)")
    parser.add_argument("--orders", type=int, default=4, help="listwise presentation orders")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlaif.judge.engines import build_engine

    qs = questions()[:args.questions]
    engine = build_engine(args.engine)
    engine.label_logprobs([[{"role": "user", "content": "Say A."}]], ["A", "B"])  # warm-up: lazy init, kernels
    score_rows, pair_rows = score_modes(engine, qs), pairwise_modes(engine, qs)
    group_rows, agreement = group_modes(engine, qs, args.orders)
    command = "python benchmarks/reward_modes.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"**Reward modes** — {dt.date.today().isoformat()}, `{command.strip()}`, {len(qs)} questions\n")
    print("| grading | accuracy | mean score gap (correct - wrong) | label mass | tokens computed | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in score_rows:
        print(f"| {r['mode']} | {r['accuracy']:.3f} | {r['mean_gap']:+.3f} | {r['label_mass']:.2f} | "
              f"{r['tokens_computed']:,} | {r['seconds']} |")
    print("\n| pairwise | accuracy | mean P(correct better) | consistency | label mass | tokens computed | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in pair_rows:
        print(f"| {r['mode']} | {r['accuracy']:.3f} | {r['mean_p_correct']:.3f} | {r['consistency']:.2f} | "
              f"{r['label_mass']:.2f} | {r['tokens_computed']:,} | {r['seconds']} |")
    print("\n| group of 4 | pair accuracy | top-1 correct | label mass | tokens computed | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in group_rows:
        print(f"| {r['mode']} | {r['pair_accuracy']:.3f} | {r['top1_correct']:.3f} | {r['label_mass']:.2f} | "
              f"{r['tokens_computed']:,} | {r['seconds']} |")
    print(f"\nListwise vs round robin: same order on {agreement:.1%} of response pairs")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "score": score_rows, "pairwise": pair_rows,
                                         "group": group_rows, "agreement": agreement}, indent=1))


if __name__ == "__main__":
    main()
