"""Judge cost of group-relative judging (GRPO / RLOO groups) vs independent score calls.

For G groups of N responses to one prompt each, every method judges all groups in one judge
call on a fresh `HFEngine`, and the engine's own counters say what it ran:

- `independent`: `ScoreJudge` (`score-1-10`) on the N responses of every group: N prompts per
  group that share the rubric + user prompt (the radix tree runs that prefix once);
- `listwise-k`: `GroupJudge(method="listwise", orders=k)`: per order, one prompt holding the
  whole group plus N short questions that share it;
- `round-robin`: `GroupJudge(method="round_robin")`: every pair in both orders, N(N-1) prompts.

Each method gets a fresh engine, so its cross-call prefix cache starts empty (no method profits
from another's). (`prefix_cache=false` would also switch off the radix-tree sharing within a call.)

`tokens_computed` (tokens actually run through the model, cached prefixes and padding
excluded) is the judge cost; `tokens_requested` is the sum of the queried sequence lengths
(what an engine without prefix sharing would run). The groups are arithmetic questions with N
candidate answers of varied length and wording (short answers, worked solutions, wrong ones; no
two open alike, as sampled answers rarely do), written here so the benchmark needs no data files.

    python benchmarks/group_judging.py                     # G=4 groups of N=8
    python benchmarks/group_judging.py --groups 2 --n 4 --orders 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

from rlaif.judge.engines import build_engine
from rlaif.judge.group import GroupJudge
from rlaif.judge.judges import ScoreJudge
from rlaif.judge.types import GroupItem, ScoreItem


def make_groups(count: int, n: int, seed: int = 0) -> list[GroupItem]:
    """`count` arithmetic questions, each with `n` candidate answers (correct and wrong, short and worked)."""
    rng = random.Random(seed)
    groups = []
    for _ in range(count):
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        right = a * b
        first, second = a * (b // 10 * 10), a * (b % 10)
        styles = [  # eight different openings: no two answers of a group share a long prefix (as sampled ones rarely do)
            lambda v, a=a, b=b, first=first, second=second: f"{v}",
            lambda v, a=a, b=b, first=first, second=second: f"The answer is {v}.",
            lambda v, a=a, b=b, first=first, second=second: f"{a} * {b} = {a} * {b // 10 * 10} + {a} * {b % 10} = {first} + {second} = {v}.",
            lambda v, a=a, b=b, first=first, second=second: f"Let me work it out step by step. First, {a} times {b // 10 * 10} is {first}. Then {a} times "
                      f"{b % 10} is {second}. Adding them gives {v}. So the product is {v}.",
            lambda v, a=a, b=b, first=first, second=second: f"I think it is about {v}, but I am not completely sure about the last digit.",
            lambda v, a=a, b=b, first=first, second=second: f"Multiplying {a} by {b} gives {v}.",
            lambda v, a=a, b=b, first=first, second=second: f"Sure! Breaking {b} into {b // 10 * 10} and {b % 10}: {first} plus {second} makes {v}.",
            lambda v, a=a, b=b, first=first, second=second: f"{v} is the result of {a} * {b}.",
        ]
        responses = []
        for i in range(n):
            value = right if i % 2 == 0 else right + rng.choice([-10, -1, 1, 9, 100])
            responses.append(styles[i % len(styles)](value))
        groups.append(GroupItem(prompt=f"What is {a} * {b}?", responses=tuple(responses)))
    return groups


def measure(name: str, run: Callable[[Any], object]) -> dict[str, float | str]:
    engine = build_engine("default")  # a fresh engine per method: its cross-call prefix cache starts empty
    engine.stats.reset()
    started = time.perf_counter()
    run(engine)
    seconds = time.perf_counter() - started
    stats = engine.stats
    return {"method": name, "tokens_computed": stats.tokens_computed, "tokens_requested": stats.tokens_requested,
            "forward_passes": stats.forward_passes, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=4, help="groups (prompts) judged in one call")
    parser.add_argument("--n", type=int, default=8, help="responses per group")
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2, 4], help="listwise orders to measure")
    parser.add_argument("--skip-round-robin", action="store_true")
    args = parser.parse_args()
    groups = make_groups(args.groups, args.n)
    score_items = [ScoreItem(prompt=g.prompt, response=r) for g in groups for r in g.responses]

    methods: list[tuple[str, Callable[[Any], object]]] = [("independent", lambda e: ScoreJudge(e).judge(score_items))]
    methods += [(f"listwise-{k}", lambda e, k=k: GroupJudge(e, orders=k).judge(groups)) for k in args.orders]
    if not args.skip_round_robin:
        methods.append(("round-robin", lambda e: GroupJudge(e, method="round_robin").judge(groups)))
    rows = [measure(name, run) for name, run in methods]
    base = float(rows[0]["tokens_computed"])
    print(f"G={args.groups} groups of N={args.n} responses; engine default (SmolLM2-135M, fp32, CPU), fresh engine per method")
    print("| method | tokens computed / group | × independent | tokens requested / group | forward passes | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| `{row['method']}` | {int(row['tokens_computed']) / args.groups:.0f} | "
              f"{float(row['tokens_computed']) / base:.2f}× | {int(row['tokens_requested']) / args.groups:.0f} | "
              f"{row['forward_passes']} | {row['seconds']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
