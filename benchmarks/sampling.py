"""Policy sampling throughput: `HFEngine.generate` vs llama.cpp's server on the same GGUF, same tokens.

The sampling stage of `rlaif label` / `rlaif best-of-n` is one `generate` call per labeling batch:
`--batch-size` prompts x `--n` samples each. This script times exactly that call, in one process run,
against llama.cpp's own C++ server (the `xllamacpp` wheel) serving the Q4_1 GGUF our plain checkpoint
is dequantized from, with as many parallel slots as the call has sequences, so both run every
sequence of the batch concurrently:

- `hf-slots`: `HFEngine.generate` (engine `default`, fp32; `rlaif.judge.engines.sampling`);
- `hf-slots-bf16`: the same engine as `default?dtype=bf16`;
- `hf-stock`: transformers' `generate()` as `HFEngine` ran it before (the fallback path);
- `llamacpp`: one `/completion` request per sequence, all in flight at once, each asked for
  exactly as many tokens as the `hf-slots` run produced for that sequence (`n_predict`, with
  `ignore_eos`), the prompt sent as the same token ids (the GGUF has the same vocabulary), same
  temperature and top-p, no prompt cache across runs (`cache_prompt: false`, `--cache-ram-mib 0`).

Rate = generated tokens / wall time of the whole call (prefill included). Methods are interleaved
per run and the median of `--runs` is reported with the load average, since absolute rates move
with machine load; read the ratio within one run.

    python benchmarks/sampling.py --prompts 16 --n 4 --max-new-tokens 128 --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo (judge, tests) must be importable
    sys.path.insert(0, str(REPO))

METHODS = ("hf-slots", "hf-slots-bf16", "hf-stock", "llamacpp")
PROMPTS = REPO / "tests" / "data" / "mt_bench_questions_sample.jsonl"


def load_prompts(count: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    if count > len(rows):
        raise SystemExit(f"--prompts {count}: {PROMPTS.name} has {len(rows)} prompts")
    return [[{"role": "user", "content": row["turns"][0]}] for row in rows[:count]]


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _import_llamacpp():
    from rlaif.judge.engines.llamacpp_server import start_llamacpp_server
    return start_llamacpp_server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per call (a labeling batch)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--skip", nargs="*", default=[], choices=METHODS, help="methods to leave out")
    parser.add_argument("--json", type=Path, help="also write raw timings here")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import httpx
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    from rlaif.judge.engines import build_engine
    from rlaif.judge.engines.base import GenerationParams

    methods = [m for m in METHODS if m not in args.skip]
    prompts = load_prompts(args.prompts)
    sequences = args.prompts * args.n
    load_at_start = load_average()
    engines = {"hf-slots": build_engine("default")}
    if "hf-slots-bf16" in methods:
        engines["hf-slots-bf16"] = build_engine("default?dtype=bf16")
    base = engines["hf-slots"]
    prompt_ids = [base.encode_prompt(p) for p in prompts]
    # One slot per sequence; each slot's context holds the longest prompt plus the longest answer.
    ctx = max(map(len, prompt_ids)) + args.max_new_tokens + 16
    server = None
    if "llamacpp" in methods:
        server = _import_llamacpp()(threads=args.threads, parallel=sequences, ctx_size=ctx, cache_ram_mib=0)
    targets: list[int] = []  # tokens per sequence, from the first hf-slots run

    def hf(name: str, seed: int) -> int:
        engine = engines.get(name, base)
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  n=args.n, seed=seed)
        before = engine.stats.tokens_generated
        if name == "hf-stock":
            with engine._lock:  # noqa: SLF001 - the fallback path, timed on its own
                engine._generate_stock(prompt_ids, params, None)  # noqa: SLF001
        else:
            engine.generate(prompts, params)
        return engine.stats.tokens_generated - before

    def llamacpp(seed: int) -> int:
        assert server is not None and targets
        jobs = [(prompt_ids[k // args.n], targets[k], seed + k) for k in range(sequences) if targets[k] > 0]

        def one(job) -> int:
            ids, n_predict, job_seed = job
            body = {"prompt": ids, "n_predict": n_predict, "ignore_eos": True, "temperature": args.temperature,
                    "top_p": args.top_p, "top_k": 0, "min_p": 0.0, "seed": job_seed, "cache_prompt": False}
            response = client.post(f"{server.root_url}/completion", json=body)
            response.raise_for_status()
            return int(response.json()["tokens_predicted"])

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            return sum(pool.map(one, jobs))

    seconds: dict[str, list[float]] = {m: [] for m in methods}
    tokens: dict[str, list[int]] = {m: [] for m in methods}
    client = httpx.Client(timeout=3600.0, limits=httpx.Limits(max_connections=sequences + 4))
    try:
        # Warm-up (lazy inits, oneDNN JIT, llama.cpp's first batch), then the per-sequence token targets:
        # what hf-slots produces with the timed runs' seed.
        hf("hf-slots", 0)
        if "hf-slots-bf16" in methods:
            hf("hf-slots-bf16", 0)
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  n=args.n, seed=1)
        targets.extend(_per_sequence_tokens(base, prompts, params))
        if server is not None:
            llamacpp(0)
        for run in range(args.runs):
            for method in methods:
                start = time.perf_counter()
                produced = llamacpp(1) if method == "llamacpp" else hf(method, 1)
                elapsed = time.perf_counter() - start
                seconds[method].append(elapsed)
                tokens[method].append(produced)
                print(f"# run {run + 1}/{args.runs} {method}: {produced} tokens in {elapsed:.1f} s = "
                      f"{produced / elapsed:.1f} tokens/s (load {load_average()})", file=sys.stderr, flush=True)
    finally:
        client.close()
        if server is not None:
            server.stop()

    rates = {m: [t / s for t, s in zip(tokens[m], seconds[m])] for m in methods}
    medians = {m: statistics.median(r) for m, r in rates.items()}
    reference = medians.get("llamacpp")
    command = "python benchmarks/sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"**Policy sampling** — {dt.date.today().isoformat()}, `{command.strip()}`\n")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads; "
          f"load average {load_at_start} at start, {load_average()} at end")
    print(f"- software: Python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, xllamacpp {_version('xllamacpp')}")
    print(f"- workload: {args.prompts} MT-Bench prompts x {args.n} samples = {sequences} sequences, "
          f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, top_p {args.top_p}; prompt tokens "
          f"{min(map(len, prompt_ids))}-{max(map(len, prompt_ids))}; {sum(targets)} generated tokens per call "
          f"(llama.cpp: {sequences} slots)\n")
    print("| method | tokens/s (median) | min | max | runs | × llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in methods:
        ratio = f"{medians[method] / reference:.2f}×" if reference else "n/a"
        print(f"| {method} | {medians[method]:.1f} | {min(rates[method]):.1f} | {max(rates[method]):.1f} | "
              f"{len(rates[method])} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "seconds": seconds, "tokens": tokens,
                                         "targets": targets}, indent=1))


def _per_sequence_tokens(engine, prompts, params) -> list[int]:
    """Tokens each sequence of one `generate` call produced, in (prompt, sample) order."""
    from rlaif.judge.engines.sampling import sample_sequences

    ids = [engine.encode_prompt(p) for p in prompts]
    with engine._lock:  # noqa: SLF001
        produced = sample_sequences(engine.model, ids, n=params.n, max_new_tokens=params.max_new_tokens,
                                    temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                                    stop_token_ids=engine._stop_token_ids(),  # noqa: SLF001
                                    max_slots=engine.max_batch_size * params.n,
                                    pad_token_id=engine.tokenizer.pad_token_id or 0, device=engine.device)
    return [len(sample) for samples in produced for sample in samples]


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - reporting only
        return "not installed"


if __name__ == "__main__":
    main()
