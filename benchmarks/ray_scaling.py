"""Ray backends vs the local paths on the same work, in one run: `rlaif label --ray` vs `rlaif label`,
and `rlaif serve --ray --replicas 1` vs `rlaif serve` at 16 concurrent clients.

Labeling: the real CLI in subprocesses on the same prompts and settings (embedded model as policy
and judge, batches of `--batch-size` prompts), locally with one torch thread and on a fresh local
Ray cluster with one generate actor and one judge actor (one CPU each). Each backend runs a
one-batch job and the full job; reported:

- wall: each whole command (model loading, and for Ray the cluster start, included);
- marginal prompts/s = (full prompts - one batch) / (full wall - one-batch wall): the rate once
  started, with every per-batch cost of the backend in it (Ray: serialization, scheduling, the
  driver's commits) and the start-up cancelled out.

Ray pipelines the two stages (generation of batch k+1 overlaps judging of batch k) over two
CPUs, the local job runs them one after the other on one thread: the ratio shows Ray's overhead
and the pipelining together, which is what a user of one machine gets from `--ray`.

Serving: `rlaif serve` and `rlaif serve --ray --replicas 1 --replica-cpus 1` with the same engine
and batcher settings (cache off, one torch thread), loaded by the closed-loop client of
`benchmarks/service_load.py` at `--clients` concurrent single-item pairwise requests. `--rounds`
repeats both in alternating order, since the machine's load drifts.

    python benchmarks/ray_scaling.py                       # 16 prompts, n=2, 16 tokens; 64 requests at 16 clients
    python benchmarks/ray_scaling.py --json ray_scaling.json --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.labeling import write_prompts  # noqa: E402
from benchmarks.service_load import load_level, make_items, wait_ready  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------- labeling
def label_run(prompts: Path, out: Path, args: argparse.Namespace, ray: bool) -> dict[str, float | str]:
    """One backend: a one-batch job, then the full job (see the module docstring)."""
    small = _label_wall(prompts, out / "one-batch", args, ray, limit=args.batch_size)
    load_before = load_average()
    full = _label_wall(prompts, out / "full", args, ray, limit=args.prompts)
    marginal = (args.prompts - args.batch_size) / (full - small) if full > small else float("nan")
    return {"backend": "ray" if ray else "local", "one_batch_wall_s": round(small, 2), "wall_s": round(full, 2),
            "marginal_prompts_per_s": round(marginal, 4), "load_before": load_before, "load_after": load_average()}


def _label_wall(prompts: Path, out: Path, args: argparse.Namespace, ray: bool, *, limit: int) -> float:
    command = [sys.executable, "-m", "rlaif", "label", "--prompts", str(prompts), "--out", str(out), "--n", str(args.n),
               "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--no-progress",
               "--export", "jsonl", "--limit", str(limit)]
    if ray:
        command += ["--ray", "--ray-actors", "1", "--ray-cpus", "1"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=args.time_limit)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{'ray' if ray else 'local'} labeling failed:\n{done.stderr[-3000:]}")
    return wall


# ---------------------------------------------------------------------------------- serving
def start_server(port: int, args: argparse.Namespace, ray: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "rlaif", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-cache",
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", "10", "--request-timeout", "3600",
               "--log-level", "warning"]
    if ray:
        command += ["--ray", "--replicas", "1", "--replica-cpus", "1"]
    return subprocess.Popen(command, cwd=REPO, env={k: v for k, v in ENV.items() if k != "RAY_ADDRESS"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def serve_run(port: int, args: argparse.Namespace, ray: bool) -> dict[str, float | str]:
    server = start_server(port, args, ray)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        items = make_items(args.items, "pairwise")
        asyncio.run(load_level(url, "pairwise", items[:8], 4, args.time_limit))  # warm-up: kernels, connections
        load_before = load_average()
        level = asyncio.run(load_level(url, "pairwise", items, args.clients, args.time_limit))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        server.stderr.close()
    return {"backend": "ray serve, 1 replica" if ray else "rlaif serve", "completed": level.completed,
            "errors": level.errors, "items_per_s": round(level.items_per_s, 3), "p50_s": round(level.p50_s, 3),
            "p99_s": round(level.p99_s, 3), "mean_batch": round(level.mean_batch, 1), "load_before": load_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--items", type=int, default=64, help="Single-item requests per serving measurement.")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="Repeat each comparison, alternating which side runs first.")
    parser.add_argument("--time-limit", type=float, default=1800.0)
    parser.add_argument("--skip", choices=["label", "serve"], help="Leave one part out.")
    parser.add_argument("--json", type=Path, help="Also write the raw results here.")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"label": [], "serve": []}
    with tempfile.TemporaryDirectory(prefix="rlaif-ray-bench-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, args.prompts)
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            if args.skip != "label":
                for ray in order:
                    out = Path(tmp) / f"label-{round_index}-{'ray' if ray else 'local'}"
                    results["label"].append(label_run(prompts, out, args, ray))
                    print(json.dumps(results["label"][-1]), file=sys.stderr, flush=True)
            if args.skip != "serve":
                for ray in order:
                    results["serve"].append(serve_run(18000 + 10 * round_index + ray, args, ray))
                    print(json.dumps(results["serve"][-1]), file=sys.stderr, flush=True)

    print(f"{platform.machine()}, {os.cpu_count()} CPUs; labeling {args.prompts} prompts, n={args.n}, "
          f"{args.max_new_tokens} new tokens, batches of {args.batch_size}; serving {args.items} requests at "
          f"{args.clients} clients, max_batch_size={args.max_batch_size}.\n")
    if results["label"]:
        print(f"| labeling | wall, {args.batch_size} prompts (s) | wall, {args.prompts} prompts (s) | marginal prompts/s | "
              "load before / after |\n|---|---:|---:|---:|---|")
        for row in results["label"]:
            print(f"| {row['backend']} | {row['one_batch_wall_s']} | {row['wall_s']} | {row['marginal_prompts_per_s']} | "
                  f"{row['load_before']} / {row['load_after']} |")
    if results["serve"]:
        print(f"\n| serving, {args.clients} clients | completed | items/s | p50 (s) | p99 (s) | mean batch | load before |\n"
              "|---|---:|---:|---:|---:|---:|---|")
        for row in results["serve"]:
            errors = f" ({row['errors']} errors)" if row["errors"] else ""
            print(f"| {row['backend']} | {row['completed']}{errors} | "
                  f"{row['items_per_s']} | {row['p50_s']} | {row['p99_s']} | {row['mean_batch']} | {row['load_before']} |")
    for part, key, label in (("label", "marginal_prompts_per_s", "labeling marginal throughput"),
                             ("serve", "items_per_s", "serving throughput")):
        pairs = list(zip(results[part][0::2], results[part][1::2]))
        for first, second in pairs:
            ray_row, local_row = (first, second) if first["backend"].startswith("ray") else (second, first)
            print(f"\n{label}: ray / local = {ray_row[key] / local_row[key]:.2f}")
        if part == "label":
            for first, second in pairs:
                ray_row, local_row = (first, second) if first["backend"] == "ray" else (second, first)
                print(f"labeling wall: local / ray = {local_row['wall_s'] / ray_row['wall_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=2))


if __name__ == "__main__":
    main()
