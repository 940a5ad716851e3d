"""Reward-model benchmark: training throughput vs TRL's RewardTrainer, scoring vs the LLM judge.

1. Training tokens/s of `rlaif train-rm`'s loop and of TRL 1.16 `RewardTrainer` on the same
   pairs (identical token ids: TRL gets them pre-tokenized), the same fresh
   `AutoModelForSequenceClassification` from the embedded SmolLM2-135M, the same batch size
   (pairs per step), fp32 on CPU, the same thread count. "Trained tokens" is counted as TRL
   counts them: the real (unpadded) tokens of the chosen and the rejected sequence, prompt
   included in both. Each trainer makes one pass over the pairs; the first step is excluded
   from both (allocator and kernel warm-up). Rows: ours as shipped (shared-prefix rows +
   length buckets); with `--ablation`, ours with `--shared-prefix off` (buckets only, to show
   where the gain comes from); TRL with gradient checkpointing off (its fastest fp32
   setting) and, with `--trl-defaults`, TRL with its own default (gradient checkpointing on).
   Tokens per CPU-second (process CPU time, all threads) are printed next to wall-clock
   tokens/s: on a shared machine they are far less sensitive to other processes.
2. Scoring throughput in pairs/s on the same pairs: the RM (two sequences per pair, and one
   shared-prefix row per pair) vs `PairwiseJudge(build_engine(--judge-engine))` (both orders,
   no cache; logprob mode, and CoT mode on `--cot-pairs` pairs). The RLAIF setting is a big
   judge distilled into a small RM: `--judge-engine` names the judge (default: the embedded
   135M model, the same size as the RM).

Run (about 10 minutes on 2 cores):

    python benchmarks/reward_model.py --threads 2 --pairs 32 --ablation --json /tmp/reward_model.json
    # the 135M RM against the 1.5B capable judge, scoring only (use ?dtype=float32 on a CPU without
    # AVX512-BF16/AMX); --data also takes a loop's eval_samples.jsonl (the held-out pairs it judged):
    python benchmarks/reward_model.py --skip-training --cot-pairs 0 --score-pairs 64 \
        --judge-engine 'hf:<capable-judge>.gguf?dtype=bf16'

The RM rows use `RewardModel`'s defaults (on a CPU at most `CPU_SCORING_BATCH_TOKENS` padded tokens
per forward; the token prefix all rows share, e.g. the chat template's system prompt, run once).
Two more rows time the layouts before those, for a before/after in the same run: shared-prefix
rows without the common-prefix KV, and additionally in batches of 16 rows without the token cap.

Each measurement runs in its own process (same starting state; a trainer's several GB are freed
before the next one starts).

TRL columns are skipped with a message when trl is not installed (`pip install trl==1.16.0`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DEFAULT_DATA = Path(__file__).parent / "data" / "hh_rlhf_harmless_base_test_first64.jsonl"


def load_pairs(path: Path, n: int) -> list[Any]:
    """Preference pairs from any `rlaif.judge.data` format, or unlabeled pairs: the pairs a win-rate
    evaluation judged (`eval_samples.jsonl` of `rlaif winrate` / `rlaif loop`: policy vs base answer)
    or `prompt`/`response1`/`response2` rows (`examples/distill_capable/`). Scoring cost does not
    depend on which side is "chosen"."""
    from types import SimpleNamespace

    from rlaif.judge.data import load_preferences

    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.suffix == ".jsonl" else []
    first = lines[0] if lines else ""
    sides = next((keys for keys in (("policy_response", "base_response"), ("response1", "response2"))
                  if all(f'"{k}"' in first for k in keys)), None)
    if sides is not None:
        rows = [json.loads(line) for line in lines]
        examples: list[Any] = [SimpleNamespace(prompt=r["prompt"], chosen=r[sides[0]], rejected=r[sides[1]])
                               for r in rows if r.get(sides[0]) and r.get(sides[1])][:n]
    else:
        examples = load_preferences(path, limit=n)
    if len(examples) < n:
        print(f"note: {path} has only {len(examples)} usable pairs", file=sys.stderr)
    return examples


def ours(examples: list[Any], args: argparse.Namespace, shared_prefix: str) -> dict[str, Any]:
    """One epoch of the shipped training loop (hard labels, no held-out split)."""
    from rlaif.policy_training.rm_training import RMTrainConfig, train_reward_model

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        with data.open("w") as handle:
            for e in examples:
                handle.write(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n")
        config = RMTrainConfig(data=data, out=Path(tmp) / "rm", base=args.base, epochs=1, lr=1e-5, loss="hard",
                               batch_size=args.batch_size, max_length=args.max_length, eval_split=0.0,
                               shared_prefix=shared_prefix, num_threads=args.threads, seed=0)
        result = train_reward_model(config)
    steps = result.log[1:]  # drop the warm-up step
    tokens = sum(r["trained_tokens"] for r in steps)
    seconds = sum(r["seconds"] for r in steps)
    cpu = sum(r["cpu_seconds"] for r in steps)
    return {"steps_timed": len(steps), "pairs": sum(r["pairs"] for r in steps), "trained_tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "cpu_seconds": cpu,
            "tokens_per_cpu_second": tokens / cpu,
            "shared_prefix": result.metrics["training"]["shared_prefix"],
            "all_steps_trained_tokens": result.metrics["training"]["trained_tokens"]}


def trl_run(examples: list[Any], args: argparse.Namespace, gradient_checkpointing: bool) -> dict[str, Any] | str:
    """One epoch of TRL's RewardTrainer on the same token ids."""
    try:
        import trl
        from trl import RewardConfig, RewardTrainer
    except ImportError:
        return "trl not installed (pip install trl==1.16.0): TRL column skipped"
    from datasets import Dataset
    from transformers import TrainerCallback

    from rlaif.policy_training.reward_model import RewardModel

    torch.manual_seed(0)
    rm = RewardModel.from_base(args.base, max_length=args.max_length)
    pairs, _ = rm.formatter.encode_pairs([e.prompt for e in examples], [e.chosen for e in examples],
                                         [e.rejected for e in examples], [1.0] * len(examples), args.max_length)
    dataset = Dataset.from_dict({"chosen_ids": [list(p.prompt + p.chosen) for p in pairs],
                                 "rejected_ids": [list(p.prompt + p.rejected) for p in pairs]})

    class StepTimer(TrainerCallback):
        """Wall time and TRL's own trained-token counter at the end of every optimizer step."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, float, int]] = []
            self.trainer: Any = None

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.marks.append((time.perf_counter(), time.process_time(), int(self.trainer._total_train_tokens)))

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        config = RewardConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                              learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0.05, logging_steps=1,
                              report_to="none", save_strategy="no", bf16=False, fp16=False, use_cpu=True,
                              gradient_checkpointing=gradient_checkpointing, max_length=None, seed=0,
                              disable_dropout=True, dataloader_num_workers=0, disable_tqdm=True)
        trainer = RewardTrainer(model=rm.model, args=config, train_dataset=dataset, processing_class=rm.tokenizer,
                                callbacks=[timer])
        timer.trainer = trainer
        trainer.train()
    (t0, c0, n0), (t1, c1, n1) = timer.marks[0], timer.marks[-1]
    return {"steps_timed": len(timer.marks) - 1, "trained_tokens": n1 - n0, "seconds": t1 - t0,
            "tokens_per_second": (n1 - n0) / (t1 - t0), "cpu_seconds": c1 - c0, "tokens_per_cpu_second": (n1 - n0) / (c1 - c0),
            "trl_version": trl.__version__, "all_steps_trained_tokens": n1,
            "gradient_checkpointing": gradient_checkpointing}


class Clock:
    """Wall and process-CPU seconds of a block (CPU time is robust to other processes on the box)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def scoring(examples: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Pairs/s: RM (flat and shared-prefix) vs the LLM pairwise judge, same pairs."""
    from rlaif.judge.reward_format import common_prefix_length
    from rlaif.policy_training.reward_model import RewardModel

    examples = examples[: args.score_pairs]
    n = len(examples)
    rm = RewardModel.from_base(args.base, max_length=args.max_length)
    rm.pack_for_inference()  # as RewardModelReward and the service load it (oneDNN kernels on CPU)
    print(f"# RM scoring kernels: {rm.cpu_kernels}", file=sys.stderr)
    prompts = [e.prompt for e in examples]
    rm.score(prompts[:2], [e.chosen for e in examples[:2]])  # warm-up
    with Clock() as flat:
        rm.score(prompts + prompts, [e.chosen for e in examples] + [e.rejected for e in examples], batch_size=16)
    pairs, _ = rm.formatter.encode_pairs(prompts, [e.chosen for e in examples], [e.rejected for e in examples],
                                         [1.0] * n, args.max_length)
    with Clock() as shared:
        rm.score_pairs(pairs, batch_size=16, shared_prefix=True)
    sharing = rm.prefix_sharing
    rm.share_common_prefix = False  # before common-prefix KV: every row recomputes the system prompt
    with Clock() as shared_no_common:
        rm.score_pairs(pairs, batch_size=16, shared_prefix=True)
    cap = rm.max_batch_tokens
    rm.max_batch_tokens = 10**9  # the layout before the token cap too: batches of 16 rows, whatever their length
    with Clock() as shared_rows16:
        rm.score_pairs(pairs, batch_size=16, shared_prefix=True)
    rm.max_batch_tokens, rm.share_common_prefix = cap, True
    rows: dict[str, Clock] = {"rm": flat, "rm_shared_prefix": shared, "rm_shared_prefix_no_common_kv": shared_no_common,
                              "rm_shared_prefix_rows16": shared_rows16}
    out: dict[str, Any] = {"pairs": n, "rm_max_batch_tokens": cap, "rm_prefix_sharing": sharing,
                           "rm_common_prefix_tokens": common_prefix_length([p.prompt for p in pairs]),
                           "rm_tokens_per_pair": sum(p.row_length for p in pairs) / max(n, 1)}
    if not args.skip_judge:
        from rlaif.judge.engines import build_engine
        from rlaif.judge.judges import PairwiseJudge
        from rlaif.judge.types import PairwiseItem

        judge = PairwiseJudge(build_engine(args.judge_engine), "helpfulness", cache=None)
        items = [PairwiseItem(prompt=e.prompt, response_a=e.chosen, response_b=e.rejected) for e in examples]
        judge.judge(items[:2])  # warm-up (also fills the shared-prefix KV cache, as in steady-state serving)
        with Clock() as judged:
            judge.judge(items)
        rows["judge"] = judged
        if args.cot_pairs:
            # CoT labels (RLAIF §2.1's best-aligned setting): a rationale is generated per order first.
            cot = PairwiseJudge(judge.engine, "helpfulness-cot", mode="cot", cache=None)
            with Clock() as cot_clock:
                cot.judge(items[: args.cot_pairs])
            rows["cot_judge"] = cot_clock
            out["cot_pairs"] = min(args.cot_pairs, n)
    for name, clock in rows.items():
        count = out["cot_pairs"] if name == "cot_judge" else n
        out[name] = {"seconds": clock.wall, "cpu_seconds": clock.cpu, "pairs_per_second": count / clock.wall,
                     "pairs_per_cpu_second": count / clock.cpu}
    for judge_name in ("judge", "cot_judge"):
        if judge_name in out:
            for rm_name in ("rm", "rm_shared_prefix", "rm_shared_prefix_no_common_kv", "rm_shared_prefix_rows16"):
                out[f"speedup_{rm_name}_vs_{judge_name}"] = {
                    "wall": out[rm_name]["pairs_per_second"] / out[judge_name]["pairs_per_second"],
                    "cpu": out[rm_name]["pairs_per_cpu_second"] / out[judge_name]["pairs_per_cpu_second"]}
    return out


WORKERS = {
    "ours": ("ours", lambda examples, args: ours(examples, args, "auto")),
    "ours-flat": ("ours (shared prefix off)", lambda examples, args: ours(examples, args, "off")),
    "trl": ("TRL RewardTrainer (grad. checkpointing off)", lambda examples, args: trl_run(examples, args, False)),
    "trl-defaults": ("TRL RewardTrainer (defaults: grad. checkpointing on)", lambda examples, args: trl_run(examples, args, True)),
    "scoring": ("scoring", lambda examples, args: scoring(examples, args)),
}


def run_worker(name: str, argv: list[str]) -> Any:
    """Run one measurement in a fresh process: each starts from the same state, and the
    memory of one trainer (several GB for 8 pairs of 135M in fp32) is freed before the next."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, __file__, *argv, "--worker", name, "--json", str(out)])
        if proc.returncode != 0 or not out.is_file():
            hint = " (killed: usually the OOM killer; try fewer --pairs or a quieter machine)" if proc.returncode == -9 else ""
            return f"failed, exit code {proc.returncode}{hint}"
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Preference file (rlaif.judge.data formats).")
    parser.add_argument("--base", default="default", help="Base model spec (default: embedded SmolLM2-135M).")
    parser.add_argument("--pairs", type=int, default=32, help="Pairs to train on (one pass).")
    parser.add_argument("--batch-size", type=int, default=8, help="Pairs per optimizer step.")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-pairs", type=int, default=32, help="Pairs for the scoring comparison.")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--ablation", action="store_true", help="Also time ours with --shared-prefix off.")
    parser.add_argument("--trl-defaults", action="store_true", help="Also time TRL with gradient checkpointing on (its default).")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--skip-judge", action="store_true")
    parser.add_argument("--skip-training", action="store_true", help="Only the scoring comparison.")
    parser.add_argument("--judge-engine", default="default", help="Engine spec of the LLM judge the RM is compared "
                        "with (default: the embedded model; e.g. the capable judge as hf:<file>.gguf?dtype=bf16).")
    parser.add_argument("--cot-pairs", type=int, default=4, help="Pairs for the CoT-judge row (0 = skip).")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="Write the results here as JSON.")
    args, _ = parser.parse_known_args()
    if args.pairs < 2 * args.batch_size:
        parser.error(f"--pairs must be at least 2 x --batch-size ({2 * args.batch_size}): the first step is not timed")

    torch.set_num_threads(args.threads)
    examples = load_pairs(args.data, max(args.pairs, args.score_pairs))
    if args.worker:
        result = WORKERS[args.worker][1](examples[: args.pairs] if args.worker != "scoring" else examples, args)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        return

    argv = [a for a in sys.argv[1:]]
    if "--json" in argv:
        i = argv.index("--json")
        del argv[i:i + 2]
    names = [] if args.skip_training else ["ours"] + (["ours-flat"] if args.ablation else []) \
        + ([] if args.skip_trl else ["trl"]) + (["trl-defaults"] if args.trl_defaults and not args.skip_trl else [])
    results: dict[str, Any] = {"data": str(args.data), "pairs": min(args.pairs, len(examples)), "batch_size": args.batch_size,
                               "threads": args.threads, "torch": torch.__version__,
                               "machine": platform.processor() or platform.machine(), "training": {}}
    for name in names:
        label = WORKERS[name][0]
        print(f"timing {label} ...", file=sys.stderr, flush=True)
        results["training"][label] = run_worker(name, argv)
    if not args.skip_scoring:
        print("timing scoring ...", file=sys.stderr, flush=True)
        results["scoring"] = run_worker("scoring", argv)

    print(f"\nTraining, {results['pairs']} pairs of {args.data.name}, {args.batch_size} pairs/step, "
          f"{args.threads} threads, fp32 CPU")
    print("| trainer | trained tokens/s | vs TRL | tokens per CPU-second | vs TRL | tokens, all steps (same data => equal) |\n"
          "|---|---|---|---|---|---|")
    baseline = results["training"].get(WORKERS["trl"][0])
    for name, value in results["training"].items():
        if isinstance(value, str):
            print(f"| {name} | skipped: {value} | | | | |")
            continue
        ratio, cpu_ratio = (f"{value[k] / baseline[k]:.2f}x" if isinstance(baseline, dict) else "n/a"
                            for k in ("tokens_per_second", "tokens_per_cpu_second"))
        print(f"| {name} | {value['tokens_per_second']:.0f} | {ratio} | {value['tokens_per_cpu_second']:.0f} | {cpu_ratio} "
              f"| {value['all_steps_trained_tokens']} |")
    s = results.get("scoring")
    if isinstance(s, dict):
        labels = {"rm": "RM, 2 sequences per pair", "rm_shared_prefix": "RM, one shared-prefix row per pair",
                  "rm_shared_prefix_no_common_kv": "RM, shared-prefix rows, common prefix recomputed per row",
                  "rm_shared_prefix_rows16": "RM, shared-prefix rows, 16 rows per batch (no token cap, no common KV)",
                  "judge": "LLM pairwise judge, logprob (both orders)",
                  "cot_judge": f"LLM pairwise judge, CoT ({s.get('cot_pairs')} pairs)"}
        print(f"\nScoring {s['pairs']} pairs, judge engine {args.judge_engine}\n| scorer | pairs/s | pairs per CPU-second |\n"
              "|---|---|---|")
        for key, label in labels.items():
            if key in s:
                print(f"| {label} | {s[key]['pairs_per_second']:.3f} | {s[key]['pairs_per_cpu_second']:.3f} |")
        print(f"RM batches: at most {s.get('rm_max_batch_tokens')} padded tokens; "
              f"{s.get('rm_tokens_per_pair', 0):.0f} tokens per shared-prefix row on average, "
              f"{s.get('rm_common_prefix_tokens')} of them common to all rows; prefix sharing: {s.get('rm_prefix_sharing')}")
        for key, value in s.items():
            if key.startswith("speedup_"):
                print(f"{key}: {value['wall']:.1f}x wall, {value['cpu']:.1f}x CPU")
    elif s is not None:
        print(f"\nScoring: {s}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
