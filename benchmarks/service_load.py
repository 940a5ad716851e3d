"""Judge service under load: throughput and latency at 1, 4, 16, 64 concurrent clients vs in-process judging.

What it measures, all in one run on one machine:
1. **in-process baseline**: `PairwiseJudge.judge` (or `ScoreJudge`) on the same items, in
   batches of `--max-batch-size`, with an engine built from the same spec: the best the
   engine can do with no HTTP at all. Measured before and after the service runs, so drift
   from other load on the machine shows up.
2. **service**: `rlaif serve` in a subprocess on 127.0.0.1 (never another interface),
   cache off, and a load generator that keeps `c` single-item requests in flight (the worst
   case for a server: every request is one judgment; only the micro-batcher can recover
   batch efficiency). Reports items/s, its ratio to the baseline, p50/p99 request latency
   and the mean engine batch the micro-batcher formed (from /metrics).

Bounded: `--items` requests per level and `--time-limit` seconds per level (a level that
hits the limit reports what completed). Target: >= 90% of in-process throughput at >= 16
concurrent clients.

    python benchmarks/service_load.py                      # embedded model, pairwise, 64 items
    python benchmarks/service_load.py --items 32 --concurrency 1,16 --time-limit 60
    python benchmarks/service_load.py --engine "default?device=cuda" --items 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class LevelResult:
    concurrency: int
    completed: int
    errors: int
    seconds: float
    items_per_s: float
    p50_s: float
    p99_s: float
    mean_batch: float


def make_items(n: int, kind: str) -> list[dict[str, str]]:
    """Short, distinct, deterministic items: short texts make HTTP overhead as visible as it gets."""
    items = []
    for i in range(n):
        prompt = f"What is {i} plus {i + 1}? Answer briefly."
        good, bad = f"{2 * i + 1}.", f"I believe the answer is {2 * i + 3}."
        items.append({"prompt": prompt, "response_a": good, "response_b": bad} if kind == "pairwise"
                     else {"prompt": prompt, "response": good if i % 2 else bad})
    return items


def in_process(engine_spec: str, kind: str, items: list[dict[str, str]], batch_size: int) -> float:
    """Items/s of the judge's batch API on `items` (after one warm-up call)."""
    from rlaif.judge.engines import build_engine
    from rlaif.judge.judges import PairwiseJudge, ScoreJudge
    from rlaif.judge.types import PairwiseItem, ScoreItem

    engine = build_engine(engine_spec)
    if kind == "pairwise":
        judge, typed = PairwiseJudge(engine), [PairwiseItem(**item) for item in items]
    else:
        judge, typed = ScoreJudge(engine), [ScoreItem(**item) for item in items]
    judge.judge(typed[:1])  # warm-up: prefix KV cache, kernels
    started = time.perf_counter()
    for start in range(0, len(typed), batch_size):
        judge.judge(typed[start:start + batch_size])
    return len(typed) / (time.perf_counter() - started)


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "rlaif", "serve", "--host", "127.0.0.1", "--port", str(port), "--engine", args.engine,
               "--no-cache", "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(max(1024, args.items * 2)), "--request-timeout", "3600", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rlaif serve exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("service not ready in time")


def batch_stats(url: str, kind: str) -> tuple[float, float]:
    """(sum, count) of the batch-size histogram for `kind`."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for suffix in ("sum", "count"):
        match = re.search(rf'^rlaif_batch_size_items_{suffix}{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
        values[suffix] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


async def load_level(url: str, kind: str, items: list[dict[str, str]], concurrency: int, time_limit: float) -> LevelResult:
    path = "/v1/judge/pairwise" if kind == "pairwise" else "/v1/judge/score"
    latencies: list[float] = []
    errors = 0
    next_index = 0
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < len(items) and time.perf_counter() - started < time_limit:
                item = items[next_index]
                next_index += 1
                sent = time.perf_counter()
                response = await client.post(path, json={"items": [item]})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

        before = batch_stats(url, kind)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        after = batch_stats(url, kind)
    batches = after[1] - before[1]
    ordered = sorted(latencies) or [float("nan")]
    p99_index = min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))
    return LevelResult(concurrency=concurrency, completed=len(latencies), errors=errors, seconds=seconds,
                       items_per_s=len(latencies) / seconds, p50_s=statistics.median(ordered), p99_s=ordered[p99_index],
                       mean_batch=(after[0] - before[0]) / batches if batches else float("nan"))


def render(args: argparse.Namespace, baseline: tuple[float, float], levels: list[LevelResult]) -> str:
    reference = statistics.mean(baseline)
    lines = [f"Engine `{args.engine}`, {args.kind} items, {args.items} single-item requests per level, "
             f"max_batch_size={args.max_batch_size}, max_wait_ms={args.max_wait_ms:g}, cache off, "
             f"{platform.machine()} with {os.cpu_count()} CPUs.",
             f"In-process baseline (batches of {args.max_batch_size}): {baseline[0]:.2f} items/s before, "
             f"{baseline[1]:.2f} items/s after the service runs (ratio uses their mean, {reference:.2f}).", "",
             "| concurrent clients | completed | items/s | vs in-process | p50 latency (s) | p99 latency (s) | mean engine batch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for level in levels:
        lines.append(f"| {level.concurrency} | {level.completed}{f' ({level.errors} errors)' if level.errors else ''} | "
                     f"{level.items_per_s:.2f} | {level.items_per_s / reference:.0%} | {level.p50_s:.2f} | "
                     f"{level.p99_s:.2f} | {level.mean_batch:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="default", help="Engine spec for both the service and the baseline.")
    parser.add_argument("--kind", choices=["pairwise", "score"], default="pairwise")
    parser.add_argument("--items", type=int, default=64, help="Requests (one item each) per concurrency level.")
    parser.add_argument("--concurrency", default="1,4,16,64", help="Comma-separated client counts.")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--time-limit", type=float, default=300.0, help="Seconds per level before it stops sending.")
    parser.add_argument("--json", type=Path, help="Also write the raw results here.")
    args = parser.parse_args()
    items = make_items(args.items, args.kind)
    levels_wanted = [int(c) for c in args.concurrency.split(",")]

    print(f"in-process baseline on {len(items)} items ...", file=sys.stderr, flush=True)
    before = in_process(args.engine, args.kind, items, args.max_batch_size)
    from rlaif.judge.engines.llamacpp_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    levels: list[LevelResult] = []
    try:
        wait_ready(url, proc)
        warm = httpx.post(f"{url}/v1/judge/{args.kind}", json={"items": items[:1]}, timeout=3600)
        warm.raise_for_status()
        for concurrency in levels_wanted:
            print(f"service at concurrency {concurrency} ...", file=sys.stderr, flush=True)
            levels.append(asyncio.run(load_level(url, args.kind, items, concurrency, args.time_limit)))
            print(f"  {asdict(levels[-1])}", file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("in-process baseline again ...", file=sys.stderr, flush=True)
    after = in_process(args.engine, args.kind, items, args.max_batch_size)
    table = render(args, (before, after), levels)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "baseline": [before, after],
                                         "levels": [asdict(level) for level in levels]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
