"""PPO step time: rlaif's `PPOTrainer` vs TRL 1.12's `PPOTrainer`, same setting, same run.

Setting (identical on both sides):
- 8 prompts per update, up to 48 new tokens (stop at EOS), sampling temperature 0.9;
- 4 PPO epochs over the rollout batch, 1 minibatch, no gradient accumulation;
- policy, frozen reference and value model: the embedded SmolLM2-135M-Instruct (plain fp32
  checkpoint); value head on a copy of the trunk (TRL: `AutoModelForSequenceClassification`);
- reward: one forward pass of a sequence-classification model built once by this script from
  the same checkpoint (seeded score head) and loaded by both sides. rlaif calls it through a
  `FunctionReward` (re-tokenizing prompt + response), TRL through its `get_reward`, so the
  reward costs the same on both sides and neither gets a cheaper one;
- KL coef 0.05 (k1), clip 0.2, value clip 0.2, lr 1e-6, fp32 on CPU, `--threads` torch threads.

Three trainers are timed: `rlaif` (separate critic: a second trunk with a value head, the
same layout TRL 1.12 uses), `rlaif-shared` (`value_model: shared`: the value head sits on
the policy's last hidden state, so each micro-batch needs one forward and one backward
instead of two of each; TRL <= 0.11's value-head layout), and `trl` (TRL 1.12).

A step ("update") = generate, score, rollout forward passes (policy, reference, value),
advantages, 4 epochs of policy + value updates. Each side runs in its own fresh process,
does `--warmup` unmeasured updates, then times `--updates` updates; `--runs` repeats the pair,
alternating which side goes first so drifting background load hits both alike. Reported: the
median wall seconds and CPU seconds (process time, all threads) per update, generated tokens
per second of update time (response tokens up to and including EOS / update time), and each
rlaif variant's ratio to TRL. CPU seconds are the steadier number on a shared machine: other
processes stretch wall time (and, with several threads, make OpenMP threads wait for each
other), but inflate CPU time much less.

TRL 1.12 lives in its own virtual environment, so installing it can never change the main
environment's torch (the local CPU wheel satisfies torch==2.13.0; pip picks a transformers
that TRL 1.12 accepts):

    python -m venv /tmp/trl112
    /tmp/trl112/bin/pip install torch==2.13.0 trl==1.12.0

Run (quietly: other CPU load inflates both sides, not necessarily equally):

    python benchmarks/ppo_step.py --runs 3
    python benchmarks/ppo_step.py --runs 3 --trl-python /path/to/venv/bin/python --threads 2 --json-out r.json
    python benchmarks/ppo_step.py --skip-trl          # only rlaif's sides
    python benchmarks/ppo_step.py --sides rlaif-shared trl --threads 1

Before/after a change, in the same run (the machine's load then hits both alike): install the
old version of the package somewhere and pass it as `--baseline`; the `@baseline` sides run it
in their own processes (its `rlaif` package comes first on their path) and each rlaif side is
reported against its baseline:

    git archive <old-commit> | tar -x -C /tmp/old && pip install --no-deps --target /tmp/old-site /tmp/old
    python benchmarks/ppo_step.py --runs 3 --sides rlaif trl --baseline /tmp/old-site

The TRL side imports only torch/transformers/datasets/trl (never this repository's packages),
so it runs under the other interpreter as `benchmarks/ppo_step.py --side trl ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = "/tmp/trl112/bin/python"
SIDES = ("rlaif", "rlaif-shared", "trl", "rlaif@baseline", "rlaif-shared@baseline")
"""rlaif with a separate critic (TRL 1.12's layout), rlaif with the shared-trunk critic, TRL 1.12, and the two
rlaif sides run from `--baseline` (another version of this package, e.g. before a change)."""
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle's gears make climbing hills easier.",
    "Describe your ideal weekend, hour by hour.",
    "Write a letter to a friend describing a trip to the mountains.",
    "Explain why the sky is blue to a ten-year-old, with examples.",
    "List ten tips for learning a new language and explain each one.",
    "Describe how bread is made, from flour to the finished loaf.",
    "Write a poem about the ocean at night, at least eight lines long.",
]
BATCH = 8
RESPONSE_LENGTH = 48
PPO_EPOCHS = 4
TEMPERATURE = 0.9
KL_COEF = 0.05
LEARNING_RATE = 1e-6


# ----------------------------------------------------------------------------- shared pieces


def build_reward_model(plain: Path, out: Path) -> Path:
    """A sequence-classification reward model (num_labels=1) on the plain checkpoint, seeded head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(plain), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(plain))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def chat_text(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=False)


# ----------------------------------------------------------------------------- rlaif side


def run_ours(plain: Path, reward_model: Path, warmup: int, updates: int, threads: int,
             value_model: str = "separate") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    from rlaif.judge.models import load_tokenizer
    from rlaif.policy_training.config import PPOConfig
    from rlaif.policy_training.ppo import PPOTrainer
    from rlaif.policy_training.rewards import FunctionReward

    rm_tokenizer = load_tokenizer(reward_model)
    rm_tokenizer.padding_side = "right"
    rm = AutoModelForSequenceClassification.from_pretrained(str(reward_model)).eval()

    @torch.inference_mode()
    def rm_scores(prompts: list[str], responses: list[str]) -> list[float]:
        texts = [chat_text(rm_tokenizer, p) + r for p, r in zip(prompts, responses)]
        batch = rm_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return rm(**batch).logits[:, 0].tolist()  # the model pools at the last non-pad token

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(policy=str(plain), batch_size=BATCH, max_new_tokens=RESPONSE_LENGTH, ppo_epochs=PPO_EPOCHS,
                           num_minibatches=1, gradient_accumulation_steps=1, forward_batch_size=BATCH,
                           temperature=TEMPERATURE, kl_coef=KL_COEF, learning_rate=LEARNING_RATE,
                           steps=warmup + updates, save_every=0, plot_every=0, log_samples=0, tensorboard=False,
                           output_dir=out, seed=0, value_model=value_model, vf_coef=0.1)
        trainer = PPOTrainer(config, FunctionReward(rm_scores, batched=True, name="reward_model"), prompts=PROMPTS)
        times, cpu, tokens, parts = [], [], [], []
        for i in range(warmup + updates):
            started, cpu_started = time.perf_counter(), time.process_time()
            record = trainer.step()
            elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
            if i >= warmup:
                times.append(elapsed)
                cpu.append(cpu_elapsed)
                tokens.append(record["response_length"] * BATCH)
                parts.append({"generation_s": record["generation_s"], "reward_s": record["reward_latency_s"],
                              # phases a trainer before they were logged does not report
                              "rollout_forward_s": record.get("rollout_forward_s"), "update_s": record.get("update_s")})
    side = "rlaif" if value_model == "separate" else "rlaif-shared"
    if os.environ.get("RLAIF_BENCH_BASELINE"):
        side += "@baseline"
    return {"side": side, "step_s": times, "cpu_s": cpu, "tokens": tokens, "parts": parts}


# ----------------------------------------------------------------------------- TRL side


def run_trl(plain: Path, reward_model: Path, warmup: int, updates: int, threads: int) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(plain), padding_side="left")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id, "the plain checkpoint's pad token must differ from EOS"
    dataset = Dataset.from_dict({"input_ids": [tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"]
                                               for p in PROMPTS]})
    policy = AutoModelForCausalLM.from_pretrained(str(plain))
    ref_policy = AutoModelForCausalLM.from_pretrained(str(plain))
    value_model = AutoModelForSequenceClassification.from_pretrained(str(plain), num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(str(reward_model))

    generated: list[int] = []
    original_generation = trl_ppo_module.batch_generation

    def counting_generation(model, queries, *args, **kwargs):  # response tokens up to and including EOS
        query_responses, logits = original_generation(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1]:]
        is_eos = responses == tokenizer.eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], responses.shape[1],
                                                                                          dtype=torch.long))
        generated.append(int(lengths.sum()))
        return query_responses, logits

    trl_ppo_module.batch_generation = counting_generation

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                         num_mini_batches=1, num_ppo_epochs=PPO_EPOCHS, response_length=RESPONSE_LENGTH,
                         stop_token="eos", temperature=TEMPERATURE, kl_coef=KL_COEF, learning_rate=LEARNING_RATE,
                         total_episodes=BATCH * (warmup + updates), local_rollout_forward_batch_size=BATCH,
                         num_sample_generations=0, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                         logging_steps=1, disable_tqdm=True, bf16=False)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                             reward_model=reward, value_model=value_model, train_dataset=dataset, callbacks=[clock])
        trainer.train()
    steps = [b[0] - a[0] for a, b in zip(clock.marks, clock.marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(clock.marks, clock.marks[1:])]
    return {"side": "trl", "trl_version": trl.__version__, "step_s": steps[warmup:], "cpu_s": cpu[warmup:],
            "tokens": generated[warmup:]}


# ----------------------------------------------------------------------------- driver


def run_side(python: str, side: str, plain: Path, reward_model: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    command = [python, str(Path(__file__).resolve()), "--side", side, "--plain", str(plain),
               "--reward-model", str(reward_model), "--warmup", str(args.warmup), "--updates", str(args.updates),
               "--threads", str(args.threads), "--result", result_path]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": "" if side == "trl" else str(REPO)}
    if side.endswith("@baseline"):
        # The baseline's `rlaif` package shadows the editable install: sys.path entries come before its finder.
        env.update(PYTHONPATH=str(args.baseline), RLAIF_BENCH_BASELINE="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for r in results for s in r["step_s"]]
    tokens = [t for r in results for t in r["tokens"]]
    rates = [t / s for r in results for t, s in zip(r["tokens"], r["step_s"])]
    cpu = [c for r in results for c in r["cpu_s"]]
    parts = [p for r in results for p in r.get("parts", [])]
    phases = {k: statistics.median(p[k] for p in parts) for k in (parts[0] if parts else {})
              if all(p.get(k) is not None for p in parts)}
    return {"median_step_s": statistics.median(steps), "min_step_s": min(steps), "max_step_s": max(steps),
            "median_cpu_s": statistics.median(cpu),
            "median_tokens_per_s": statistics.median(rates), "mean_response_tokens": sum(tokens) / len(tokens) / BATCH,
            "updates_timed": len(steps), "median_phase_s": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="Repeat the (rlaif, TRL) pair this many times.")
    parser.add_argument("--updates", type=int, default=2, help="Timed updates per side per run.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed updates first (allocator, caches).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides.")
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="Interpreter of the TRL 1.12 venv.")
    parser.add_argument("--skip-trl", action="store_true", help="Time only rlaif's trainer.")
    parser.add_argument("--json-out", type=Path, help="Also write all results here.")
    parser.add_argument("--baseline", type=Path, help=(
        "A directory holding another version of the `rlaif` package (`pip install --no-deps --target DIR <tree>`, "
        "e.g. of the commit before a change); adds the `@baseline` sides, timed in the same run."))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rlaif-ppo-bench")
    # internal: one side in a child process
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES[:3]),
                        help="Which trainers to time (default: rlaif, rlaif-shared, trl; --baseline adds theirs).")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reward-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side is not None:
        if args.side == "trl":
            result = run_trl(args.plain, args.reward_model, args.warmup, args.updates, args.threads)
        else:
            result = run_ours(args.plain, args.reward_model, args.warmup, args.updates, args.threads,
                              value_model="shared" if args.side.startswith("rlaif-shared") else "separate")
        args.result.write_text(json.dumps(result))
        return

    sys.path.insert(0, str(REPO))
    from rlaif.judge.models import plain_checkpoint

    plain = plain_checkpoint()
    args.workdir.mkdir(parents=True, exist_ok=True)
    reward_model = build_reward_model(plain, args.workdir / "reward_model")
    sides = [s for s in SIDES if s in args.sides and not (s == "trl" and args.skip_trl)]
    if args.baseline is not None:
        sides += [f"{s}@baseline" for s in sides if s in ("rlaif", "rlaif-shared") and f"{s}@baseline" not in sides]
    else:
        sides = [s for s in sides if not s.endswith("@baseline")]
    if "trl" in sides and not Path(args.trl_python).is_file():
        sys.exit(f"no TRL interpreter at {args.trl_python}; create the venv (see this script's docstring) "
                 f"or pass --trl-python / --skip-trl")
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for run in range(args.runs):
        order = sides if run % 2 == 0 else sides[::-1]
        for side in order:
            python = args.trl_python if side == "trl" else sys.executable
            result = run_side(python, side, plain, reward_model, args)
            results[side].append(result)
            print(f"run {run + 1}/{args.runs} {side}: " + ", ".join(f"{s:.1f}s" for s in result["step_s"]), flush=True)
    summary = {side: summarize(r) for side, r in results.items() if r}
    for side in ("rlaif", "rlaif-shared"):
        if side in summary and f"{side}@baseline" in summary:
            summary[side]["step_ratio_vs_baseline"] = (summary[side]["median_step_s"]
                                                       / summary[f"{side}@baseline"]["median_step_s"])
    if "trl" in summary:
        for side in ("rlaif", "rlaif-shared", "rlaif@baseline", "rlaif-shared@baseline"):
            if side in summary:
                summary[side]["step_ratio_vs_trl"] = summary[side]["median_step_s"] / summary["trl"]["median_step_s"]
                summary[side]["cpu_ratio_vs_trl"] = summary[side]["median_cpu_s"] / summary["trl"]["median_cpu_s"]
    summary["setting"] = {"prompts": BATCH, "max_new_tokens": RESPONSE_LENGTH, "ppo_epochs": PPO_EPOCHS,
                          "threads": args.threads, "runs": args.runs, "updates_per_run": args.updates,
                          "warmup": args.warmup, "cpu_count": os.cpu_count(),
                          "load_avg_1m_at_end": os.getloadavg()[0]}
    print(json.dumps(summary, indent=2))
    print("\n| trainer | s / update (median) | CPU s / update | generated tokens / s | mean response tokens | vs TRL "
          "| vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for side in sides:
        s = summary[side]
        ratio = f"{s['step_ratio_vs_trl']:.2f}x" if "step_ratio_vs_trl" in s else "-"
        base = f"{s['step_ratio_vs_baseline']:.2f}x" if "step_ratio_vs_baseline" in s else "-"
        print(f"| {side} | {s['median_step_s']:.1f} | {s['median_cpu_s']:.1f} | {s['median_tokens_per_s']:.1f} | "
              f"{s['mean_response_tokens']:.1f} | {ratio} | {base} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "results": results}, indent=2))


if __name__ == "__main__":
    main()
