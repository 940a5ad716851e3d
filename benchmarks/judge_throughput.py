"""Pairwise-judging throughput: our batched log-prob judging vs naive generation vs llama.cpp.

Same machine, same model (SmolLM2-135M-Instruct), same 64 pairwise prompts (the
`helpfulness` rubric rendered on the first 64 hh-rlhf harmless-base test pairs, one
presentation order, ~384 tokens each with the chat template) for every method:

- `hf-batched`: `HFEngine.label_logprobs` (radix-tree prefix KV, padding-aware batches, oneDNN linears).
- `hf-batched-bf16`: the same engine with `dtype=bfloat16` (`hf:<path>?dtype=bf16`): bf16
  weights and activations through oneDNN's AVX512-BF16 kernels, fp32 log-softmax. Needs a
  CPU with AVX512-BF16 or AMX to pay off; precision comparable to llama.cpp's Q4_1 or better.
- `hf-naive`: plain transformers, `generate()` one prompt at a time (greedy, 4 new tokens),
  the first "A"/"B" in the text is the verdict. What one writes without an engine.
- `llamacpp-cache` / `llamacpp-nocache`: llama.cpp's server (xllamacpp) on the Q4_1 GGUF the
  dequantized checkpoint comes from, queried one prompt at a time by `OpenAIEngine`
  (top-20 log-probs, 1 slot) with `cache_prompt` true (llama.cpp's default: the common
  prefix with the previous prompt is reused) and false. Note: the xllamacpp wheel is built
  for AVX2 (its binary holds no AVX-512 instructions), so on an AVX-512 CPU it is not
  llama.cpp's best.
- `llamacpp-native` (only with `--native-python PY`): llama-cpp-python's server compiled on
  this machine (`GGML_NATIVE=ON`: AVX-512/VNNI where the CPU has them), run by the
  interpreter PY, queried on `/v1/completions` with the same chat-templated text. It always
  reuses the common prefix with the previous prompt (its `Llama` object keeps the KV of the
  last call). Build it once in a venv:

      python -m venv /tmp/lcp
      CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/lcp/bin/pip install 'llama-cpp-python[server]'
      python benchmarks/judge_throughput.py --runs 3 --native-python /tmp/lcp/bin/python

Other judges (`--hf-spec SPEC --gguf FILE`): the same comparison for any model whose GGUF
llama.cpp serves and whose checkpoint (or the same GGUF, dequantized) our engine loads, e.g.
the capable judge; `--both-orders` renders every pair in both presentation orders (what
`PairwiseJudge` sends) and compares the debiased pair verdicts too:

    python benchmarks/judge_throughput.py --runs 1 --both-orders --skip hf-batched hf-naive llamacpp-nocache \
        --hf-spec hf:<capable-judge>.gguf --gguf <capable-judge>.gguf

Every method is warmed up once, then the timed runs are interleaved (run 1 of every method,
then run 2, ...) so slow drift on a shared machine hits all methods alike. Caches are not
cleared between runs (steady state for both our prefix LRU and llama.cpp's slot cache).
Torch and llama.cpp both get `--threads` threads.

    python benchmarks/judge_throughput.py --runs 3            # prints a markdown table
    python benchmarks/judge_throughput.py --runs 1 --pairs 16 --skip naive   # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo (judge, tests) must be importable
    sys.path.insert(0, str(REPO))

DATA = REPO / "benchmarks" / "data" / "hh_rlhf_harmless_base_test_first64.jsonl"
METHODS = ("hf-batched", "hf-batched-bf16", "hf-naive", "llamacpp-cache", "llamacpp-nocache", "llamacpp-native")


@dataclass
class Result:
    method: str
    seconds: list[float] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)  # P(first label, "A") per prompt from the last run

    @property
    def verdicts(self) -> list[str]:
        return ["A" if p > 0.5 else "B" if p < 0.5 else "?" for p in self.probs]

    def rates(self, n: int) -> list[float]:
        return [n / s for s in self.seconds]


def load_prompts(n: int, both_orders: bool = False) -> list[list[dict[str, str]]]:
    """The rendered pairwise prompts; with `both_orders`, (A, B) then (B, A) for every pair."""
    from rlaif.judge.data import load_preferences
    from rlaif.judge.rubric import load_rubric

    rubric = load_rubric("helpfulness")
    examples = load_preferences(DATA)[:n]
    if len(examples) < n:
        raise SystemExit(f"{DATA} has only {len(examples)} pairs")
    prompts = []
    for e in examples:
        prompts.append(rubric.render(prompt=e.prompt, response_a=e.chosen, response_b=e.rejected))
        if both_orders:
            prompts.append(rubric.render(prompt=e.prompt, response_a=e.rejected, response_b=e.chosen))
    return prompts


Runner = Callable[[list[list[dict[str, str]]]], list[float]]
"""Judges a list of prompts, returns P("A" | the reply is "A" or "B") for each."""


def label_runner(engine, labels: list[str]) -> Runner:
    """P(first label) per prompt, from `engine.label_logprobs` normalized over the two labels."""
    import numpy as np

    def run(prompts) -> list[float]:
        logprobs = np.asarray(engine.label_logprobs(prompts, labels), dtype=np.float64)
        return [float(x) for x in 1.0 / (1.0 + np.exp(logprobs[:, 1] - logprobs[:, 0]))]
    return run


def with_option(spec: str, option: str) -> str:
    return f"{spec}&{option}" if "?" in spec else f"{spec}?{option}"


def hf_batched(labels: list[str], spec: str = "default") -> tuple[Runner, object]:
    from rlaif.judge.engines import build_engine

    engine = build_engine(spec)
    print(f"# hf-batched {spec}: linear kernels = {engine.cpu_kernels_in_use}", file=sys.stderr)
    return label_runner(engine, labels), engine


def hf_naive() -> Runner:
    import torch
    from transformers import AutoModelForCausalLM

    from rlaif.judge.models import load_tokenizer, plain_checkpoint

    path = plain_checkpoint()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    letter = re.compile(r"\b([AB])\b")

    @torch.inference_mode()
    def run(prompts) -> list[float]:
        verdicts = []
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            match = letter.search(text)
            verdicts.append({"A": 1.0, "B": 0.0}.get(match.group(1), 0.5) if match else 0.5)
        return verdicts
    return run


def llamacpp(server, labels: list[str], cache_prompt: bool) -> Runner:
    from rlaif.judge.engines.openai import OpenAIEngine

    engine = OpenAIEngine(server.base_url, "smollm2", concurrency=1, timeout=600.0,
                          extra_body={"cache_prompt": cache_prompt})
    return label_runner(engine, labels)


class NativeLlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server in a child process on a free 127.0.0.1 port."""

    def __init__(self, python: str, threads: int) -> None:
        import subprocess
        import tempfile

        import httpx

        from rlaif.judge.models import default_gguf_path
        from rlaif.judge.engines.llamacpp_server import free_port

        port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llamacpp-native-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", str(default_gguf_path()), "--host", "127.0.0.1",
             "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
             "--model_alias", "smollm2"], stdout=self.log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"llama_cpp.server exited; log: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit("llama_cpp.server did not become ready in 180 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except Exception:  # noqa: BLE001 - last resort
            self.process.kill()


def llamacpp_native(server: NativeLlamaCppServer, labels: list[str]) -> Runner:
    from rlaif.judge.engines.openai import OpenAIEngine
    from rlaif.judge.models import plain_checkpoint

    engine = OpenAIEngine(server.base_url, "smollm2", endpoint="completions", tokenizer=str(plain_checkpoint()),
                          concurrency=1, timeout=600.0)
    return label_runner(engine, labels)


def machine_line(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {threads} threads used"


def load_average() -> str:
    """1/5/15-minute load averages: above the CPU count, other work was competing with the benchmark."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--pairs", type=int, default=64, help="number of pairwise prompts (max 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--skip", nargs="*", default=[], choices=METHODS, help="methods to leave out")
    parser.add_argument("--json", type=Path, help="also write raw timings here")
    parser.add_argument("--hf-spec", default="default", help="our engine's spec (default: the embedded model); "
                        "hf-batched-bf16 adds dtype=bf16 to it")
    parser.add_argument("--gguf", type=Path, help="the GGUF llama.cpp serves (default: the embedded model's)")
    parser.add_argument("--both-orders", action="store_true", help="judge every pair in both presentation orders "
                        "and compare the debiased pair verdicts")
    parser.add_argument("--native-python", help="interpreter with llama-cpp-python[server] built natively: adds "
                        "the llamacpp-native method")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    from rlaif.judge.models import DEFAULT_MODEL_NAME, load_tokenizer, plain_checkpoint
    from rlaif.judge.rubric import load_rubric

    labels = load_rubric("helpfulness").labels
    prompts = load_prompts(args.pairs, args.both_orders)
    custom = args.hf_spec != "default" or args.gguf is not None
    methods = [m for m in METHODS if m not in args.skip and (m != "llamacpp-native" or args.native_python)]
    if custom and {"hf-naive", "llamacpp-native"} & set(methods):
        parser.error("hf-naive and llamacpp-native run the embedded model only: --skip them with --hf-spec/--gguf")
    tokenizer = None
    load_at_start = load_average()
    server = native = None
    runners: dict[str, Runner] = {}
    try:
        if "llamacpp-native" in methods:
            native = NativeLlamaCppServer(args.native_python, args.threads)
        if any(m in ("llamacpp-cache", "llamacpp-nocache") for m in methods):
            from rlaif.judge.engines.llamacpp_server import start_llamacpp_server

            server = start_llamacpp_server(model_path=args.gguf, threads=args.threads, parallel=1, cache_ram_mib=0)
        for method in methods:
            if method in ("hf-batched", "hf-batched-bf16"):
                spec = args.hf_spec if method == "hf-batched" else with_option(args.hf_spec, "dtype=bf16")
                runners[method], engine = hf_batched(labels, spec)
                tokenizer = getattr(engine, "tokenizer", tokenizer)
            elif method == "hf-naive":
                runners[method] = hf_naive()
            elif method == "llamacpp-native":
                runners[method] = llamacpp_native(native, labels)
            else:
                runners[method] = llamacpp(server, labels, cache_prompt=method == "llamacpp-cache")
        results = {m: Result(m) for m in methods}
        for method in methods:  # warm-up: lazy inits, oneDNN JIT, llama.cpp's first prompts, prefix caches
            runners[method](prompts[:4])
        for run in range(args.runs):
            for method in methods:
                start = time.perf_counter()
                verdicts = runners[method](prompts)
                elapsed = time.perf_counter() - start
                results[method].seconds.append(elapsed)
                results[method].probs = verdicts
                print(f"# run {run + 1}/{args.runs} {method}: {len(prompts) / elapsed:.2f} judgments/s",
                      file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
        if native is not None:
            native.stop()

    if tokenizer is None and not custom:
        tokenizer = load_tokenizer(plain_checkpoint())
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"])
               for p in prompts] if tokenizer is not None else [0]
    medians = {m: statistics.median(r.rates(len(prompts))) for m, r in results.items()}
    reference = medians.get("llamacpp-cache")
    command = "python benchmarks/judge_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"**Judge throughput** — {dt.date.today().isoformat()}, `{command.strip()}`\n")
    print(f"- machine: {machine_line(args.threads)}; load average {load_at_start} at start, "
          f"{load_average()} at end")
    print(f"- software: Python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, xllamacpp {_version('xllamacpp')}")
    model = f"{args.hf_spec} / {args.gguf}" if custom else DEFAULT_MODEL_NAME
    orders = f"{args.pairs} pairs x both orders" if args.both_orders else "one order"
    print(f"- workload: {len(prompts)} pairwise prompts (helpfulness rubric, {orders}), {model}; "
          f"prompt tokens mean {np.mean(lengths):.0f}, min {min(lengths)}, max {max(lengths)}\n")
    print("| method | judgments/s (median) | min | max | runs | × llama.cpp (prompt cache) |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, result in results.items():
        rates = result.rates(len(prompts))
        ratio = f"{medians[method] / reference:.2f}×" if reference else "n/a"
        print(f"| {method} | {medians[method]:.2f} | {min(rates):.2f} | {max(rates):.2f} | {len(rates)} | {ratio} |")
    ours_name = next((m for m in ("hf-batched", "hf-batched-bf16") if m in results), None)
    if ours_name is not None:
        ours = results[ours_name]
        for method, result in results.items():
            if method == ours_name:
                continue
            same = sum(a == b for a, b in zip(ours.verdicts, result.verdicts))
            print(f"\nVerdict agreement {ours_name} vs {method}: {same}/{len(ours.probs)} prompts", end="")
            if args.both_orders:
                mine, theirs = pair_preferences(ours.probs), pair_preferences(result.probs)
                agree = sum(a[0] == b[0] for a, b in zip(mine, theirs))
                gaps = [abs(a[1] - b[1]) for a, b in zip(mine, theirs)]
                print(f"; debiased pair verdicts (A/B/tie, tie margin 0.05) {agree}/{len(mine)} pairs, "
                      f"|P_ours - P_{method}| mean {np.mean(gaps):.3f}, max {max(gaps):.3f}", end="")
        print()
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": machine_line(args.threads),
                                         "lengths": lengths,
                                         "results": {m: r.seconds for m, r in results.items()}}, indent=1))


def pair_preferences(probs: list[float], tie_margin: float = 0.05) -> list[tuple[str, float]]:
    """Per pair (prompts 2i = (A, B), 2i+1 = (B, A)): the debiased P(A) = mean of both orders and its
    verdict by `PairwiseJudge`'s own rule (`order_verdict`)."""
    from rlaif.judge.types import order_verdict

    out = []
    for ab, ba in zip(probs[0::2], probs[1::2]):
        p = (ab + (1.0 - ba)) / 2
        out.append((order_verdict(ab, 1.0 - ba, p, tie_margin)[1].value, p))
    return out


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - reporting only
        return "not installed"


if __name__ == "__main__":
    main()
