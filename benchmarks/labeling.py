"""Labeling throughput: prompts/s and judgments/s of `rlaif label` on the embedded model.

Runs the real CLI (`python -m rlaif label`) in a subprocess on 64 prompts: the first 30 of
the MT-Bench and self-instruct samples in `tests/data/` plus 4 arena-hard questions, so it
needs nothing outside the repository. Rates come from the job's own progress store, so they
count engine work only (model loading is reported apart):

- prompts/s: prompts finished / (generation + judging seconds);
- samples/s: sampled responses / generation seconds;
- judgments/s: pairwise comparisons (both presentation orders each) / judging seconds;
- wall: the whole command, model loading included (`other_seconds` = wall minus persisted engine time).

Bounded: the job is SIGKILLed at `--time-limit` seconds and the rates are computed from the
batches it had persisted (the run is resumable, so nothing measured is lost); the report
says `completed: false` then.

    python benchmarks/labeling.py                                   # n=2, 32 new tokens, CPU
    python benchmarks/labeling.py --n 4 --max-new-tokens 16 --threads 2
    python benchmarks/labeling.py --engine "default?device=cuda" --policy "default?device=cuda"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def write_prompts(path: Path, count: int) -> None:
    """64 short, real, distinct prompts from the repository's test data (see module docstring)."""
    rows: list[dict[str, str]] = []
    for name, field in (("mt_bench_questions_sample.jsonl", "turns"), ("self_instruct_user_oriented_sample.jsonl", "instruction"),
                        ("arena_hard_v0.1_questions_sample.jsonl", "prompt")):
        for line in (DATA / name).read_text().splitlines():
            record = json.loads(line)
            text = record[field][0] if field == "turns" else record[field]
            rows.append({"id": f"{Path(name).stem}-{len(rows)}", "prompt": text})
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} prompts available in tests/data, asked for {count}")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:count]))


def store_rates(out: Path, n_prompts: int, batch_size: int) -> dict[str, float | int]:
    """Work persisted by the job (complete or killed), read from its progress store."""
    with sqlite3.connect(f"file:{out / 'progress.sqlite'}?mode=ro", uri=True) as conn:
        stages = {stage: (count, seconds) for stage, count, seconds in conn.execute(
            "SELECT stage, SUM(count), SUM(seconds) FROM stages GROUP BY stage")}
        judged_batches = [b for (b,) in conn.execute("SELECT batch FROM stages WHERE stage = 'pairs'")]
    samples, generate_s = stages.get("generate", (0, 0.0))
    judgments, judge_s = stages.get("pairs", (0, 0.0))
    prompts_done = sum(min(batch_size, n_prompts - b * batch_size) for b in judged_batches)
    return {"batches_done": len(judged_batches), "prompts_done": prompts_done, "samples": samples,
            "judgments": judgments, "generate_seconds": round(generate_s, 3), "judge_seconds": round(judge_s, 3),
            "samples_per_s": round(samples / generate_s, 3) if generate_s else 0.0,
            "judgments_per_s": round(judgments / judge_s, 3) if judge_s else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="Number of prompts (at most 90).")
    parser.add_argument("--n", type=int, default=2, help="Samples per prompt.")
    parser.add_argument("--pairs", default="best-worst", choices=["best-worst", "all", "random"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per labeling batch.")
    parser.add_argument("--policy", default="default")
    parser.add_argument("--engine", default="default")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (OMP_NUM_THREADS); 1 is fastest on a machine shared with other jobs.")
    parser.add_argument("--time-limit", type=float, default=900.0, help="Kill the job after this many seconds.")
    parser.add_argument("--keep", type=Path, default=None, help="Write the job here and keep it (default: a temp dir).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rlaif-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        prompts = workdir / "prompts.jsonl"
        write_prompts(prompts, args.prompts)
        out = workdir / "out"
        command = [sys.executable, "-m", "rlaif", "label", "--prompts", str(prompts), "--out", str(out), "--n", str(args.n),
                   "--pairs", args.pairs, "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                   "--policy", args.policy, "--engine", args.engine, "--overwrite", "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=args.time_limit)
            completed = process.returncode == 0
            if not completed:
                raise SystemExit(f"rlaif label failed ({process.returncode}):\n{stderr[-3000:]}")
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            completed, stdout = False, ""
        wall = time.perf_counter() - started
        rates = store_rates(out, args.prompts, args.batch_size)
        engine_seconds = rates["generate_seconds"] + rates["judge_seconds"]
        summary = json.loads(stdout) if completed else {}
        report = {
            "benchmark": "labeling", "completed": completed, "prompts": args.prompts, "n": args.n, "pairs": args.pairs,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "policy": args.policy,
            "engine": args.engine, "threads": args.threads, **rates,
            "prompts_per_s": round(rates["prompts_done"] / engine_seconds, 3) if engine_seconds else 0.0,
            "wall_seconds": round(wall, 1),
            "other_seconds": round(wall - engine_seconds, 1),  # model loading, I/O, and unpersisted work if killed
            "rows": summary.get("rows"), "position_consistency": summary.get("position_consistency"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        }
    print(json.dumps(report, indent=2))
    print(f"| {args.prompts} | {args.n} | {args.max_new_tokens} | {args.threads} | {report['prompts_per_s']} | "
          f"{report['samples_per_s']} | {report['judgments_per_s']} | {report['wall_seconds']} |")


if __name__ == "__main__":
    main()
