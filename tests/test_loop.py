"""`rlaif loop`: config errors, guards, and two tiny rounds end to end with a SIGKILL and a resume.

The end-to-end test runs the real console command in subprocesses on the embedded model (policy =
judge = RM backbone = SmolLM2-135M, a few prompts, a few tokens, two PPO steps per round):

- an uninterrupted run writes every stage's artifact of both rounds, and round 2's dataset was
  sampled by round 1's policy (its `policy_model` column is the policy id round 1's RL stage recorded);
- a second run in another folder is SIGKILLed once a stage marker and a PPO checkpoint show it is in
  the middle of round 1's RL stage, then re-run with the same command: it must end with the same
  final artifacts (texts equal, numbers equal to float tolerance);
- re-running the finished run loads no model and changes nothing; a changed config is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlaif.policy_training.loop.guards import Measurements, check_guards
from rlaif.policy_training.loop.config import Guards
from rlaif.policy_training.loop.stages import rm_agreement

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "loop_demo"
STAGES = ("label", "reward_model", "rl", "eval")


def tiny_config(out: Path) -> dict:
    return {
        "out": str(out), "rounds": 2, "seed": 0, "device": "cpu", "progress": False,
        "prompts": {"train": str(DEMO / "prompts_train.jsonl"), "heldout": str(DEMO / "prompts_heldout.jsonl"),
                    "train_limit": 3, "heldout_limit": 3},
        "policy": {"model": "default"},
        "judge": {"engine": "default"},
        "reward": {"source": "rm"},
        "label": {"n": 2, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 4},
        "reward_model": {"init": "previous", "data": "round",
                         "train": {"epochs": 1, "batch_size": 4, "max_length": 256}},
        "rl": {"policy": {"max_new_tokens": 8}, "reward": {"normalize_rewards": True},
               "ppo": {"value_model": "shared", "steps": 2, "batch_size": 2, "ppo_epochs": 1},
               "optimizer": {"learning_rate": 1.0e-5},
               "logging": {"save_every": 1, "plot_every": 0, "tensorboard": False, "log_samples": 1}},
        "eval": {"max_new_tokens": 8},
    }


def environment(cache: str | None = None) -> dict[str, str]:
    return {**os.environ, "RLAIF_CACHE_DIR": cache or os.environ.get("RLAIF_CACHE_DIR", "/work/cache"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(config_file: Path) -> list[str]:
    return [sys.executable, "-m", "rlaif", "loop", "--config", str(config_file)]


def write_config(tmp: Path, name: str, data: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_to_end(config_file: Path, log: Path, timeout: int = 600) -> dict:
    with open(log, "a") as err:
        proc = subprocess.run(command(config_file), env=environment(), stdout=subprocess.PIPE, stderr=err, text=True,
                              timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------- config errors
def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


ERROR_CASES = [
    ("missing-prompts", lambda c: c.pop("prompts"), ["prompts: required field is missing"]),
    ("unknown-top-level", lambda c: c.update(roundz=3), ["roundz: unknown field"]),
    ("label-field-range", lambda c: c["label"].update(n=1), ["label.n:", "greater than or equal to 2"]),
    ("label-field-owned", lambda c: c["label"].update(policy="default"), ["label.policy is set by the loop"]),
    ("rm-field", lambda c: c["reward_model"]["train"].update(lr=-1), ["reward_model.train.lr", "> 0"]),
    ("ppo-field", lambda c: c["rl"]["ppo"].update(clip_range=-1), ["rl.ppo.clip_range", "greater than 0"]),
    ("ppo-typo", lambda c: c["rl"]["ppo"].update(clip_rang=0.1), ["rl.ppo.clip_rang: unknown field", "clip_range"]),
    ("ppo-owned", lambda c: c["rl"]["logging"].update(output_dir="x"), ["rl.logging.output_dir is set by the loop"]),
    ("reward-source", lambda c: c["reward"].update(source="human"), ["reward.source", "'rm', 'judge' or 'mix'"]),
    ("guard-action", lambda c: c["guards"].update(kl={"action": "panic"}), ["guards.kl.action"]),
    ("judge-spec", lambda c: c["judge"].update(engine="bogus:x"), ["judge.engine", "invalid engine spec"]),
    ("same-prompt-files", lambda c: c["prompts"].update(heldout=c["prompts"]["train"]),
     ["prompts.train and prompts.heldout are the same file"]),
    ("overlapping-prompts", None, ["share 1 prompt(s)"]),
    ("missing-file", lambda c: c["prompts"].update(train="nope/prompts.jsonl"), ["prompts.train: nope/prompts.jsonl does not exist"]),
]


@pytest.mark.parametrize("name, mutate, fragments", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_config_errors_are_one_clear_line(tmp_path, name, mutate, fragments, monkeypatch):
    data = tiny_config(tmp_path / "run")
    data["guards"] = {}
    if name == "overlapping-prompts":  # a held-out file holding one training prompt (a copied line)
        overlap = tmp_path / "overlap.jsonl"
        overlap.write_text((DEMO / "prompts_train.jsonl").read_text().splitlines()[0] + "\n")
        data["prompts"]["heldout"] = str(overlap)
        data["prompts"]["heldout_limit"] = None
    else:
        mutate(data)
    cache = tmp_path / "cache"
    proc = subprocess.run(command(write_config(tmp_path, name, data)), env=environment(str(cache)),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert_one_line_error(proc, *fragments)
    assert not (cache / "plain").exists(), "a config error must come before any model load"
    assert not (tmp_path / "run").exists(), "nothing is written for a config that does not validate"


def test_missing_config_file_is_one_line(tmp_path):
    proc = subprocess.run([*command(tmp_path / "nope.yaml")], env=environment(str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert_one_line_error(proc, "nope.yaml does not exist")


@pytest.mark.parametrize("name", sorted(p.name for p in DEMO.glob("*.yaml")))
def test_the_example_configs_validate(name, monkeypatch, tmp_path):
    """Every config the docs tell users to run is a valid LoopConfig (files it names included)."""
    from rlaif.policy_training.loop.config import LoopConfig

    monkeypatch.setenv("RLAIF_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(REPO)
    config = LoopConfig.from_yaml(DEMO / name)
    if config.judge.calibration is not None:
        assert Path(config.judge.calibration).is_file()


# ---------------------------------------------------------------------------------- guards
def measurements(**changes) -> Measurements:
    values = dict(round=1, n_heldout=64, win_rate=0.55, win_rate_ci95=[0.45, 0.65], soft_win_rate=0.58,
                  soft_win_rate_ci95=[0.55, 0.61], lc_win_rate=0.56, length_slope=0.1, ties=50, consistent_frac=0.2,
                  kl=3.0, kl_max=4.0, rm_agreement=0.8, rm_agreement_pairs=60, rm_agreement_ci95=[0.7, 0.9],
                  rm_heldout_agreement=0.82, mean_length_policy=60.0, mean_length_base=55.0, label_rows=100,
                  label_position_consistency=0.15, label_tie_frac=0.95)
    values.update(changes)
    return Measurements(**values)


def fired(m: Measurements, guards: Guards | None = None) -> set[str]:
    return {g.guard for g in check_guards(m, guards or Guards()) if g.fired}


def test_guards_fire_exactly_on_their_condition():
    assert fired(measurements()) == set()
    assert fired(measurements(soft_win_rate=0.70, lc_win_rate=0.60)) == {"length"}     # wins explained by length
    assert fired(measurements(soft_win_rate=0.55, lc_win_rate=0.65)) == set()          # shorter and better: fine
    assert fired(measurements(kl=10.5)) == {"kl"}
    assert fired(measurements(kl=None)) == set()
    assert fired(measurements(rm_agreement=0.55)) == {"rm_agreement"}                  # below the floor
    assert fired(measurements(rm_agreement=0.65, rm_heldout_agreement=0.9)) == {"rm_agreement"}  # dropped 0.25
    assert fired(measurements(rm_agreement=0.3, rm_agreement_pairs=5)) == set()       # too few pairs to say
    off = Guards.model_validate({"kl": {"action": "off"}, "length": {"max_gap": 0.2}})
    assert fired(measurements(kl=50.0, soft_win_rate=0.70, lc_win_rate=0.60), off) == set()
    actions = {g.guard: g.action for g in check_guards(measurements(), Guards())}
    assert actions == {"length": "warn", "kl": "stop", "rm_agreement": "warn"}


def test_rm_agreement_counts_only_decided_pairs():
    probs = [0.7, 0.3, 0.5, 0.6, 0.8, 0.4]
    policy = [1.0, 1.0, 5.0, 2.0, None, 0.0]
    base = [0.0, 0.0, 0.0, 2.0, 1.0, 1.0]
    # pair 0 agrees, pair 1 disagrees, 2 judge tie, 3 RM tie, 4 missing score, 5 agrees
    assert rm_agreement(probs, policy, base) == (2, 3)


def test_report_reads_a_calibrated_judge_both_ways(tmp_path):
    """A calibrated judge's win rate is reported with the same judgments read without the calibration."""
    from rlaif.policy_training.loop.report import write_report

    context = {"judge": "hf:x", "rubric": "helpfulness", "policy": "default", "reward_source": "rm",
               "max_kl": 10.0, "min_agreement": 0.6, "calibration": "calib.json"}
    plain = measurements()
    calibrated = measurements(round=2, uncalibrated_soft_win_rate=0.512, uncalibrated_soft_win_rate_ci95=[0.5, 0.524])
    write_report(tmp_path, [(plain, []), (calibrated, [])], context, None)
    text = (tmp_path / "report.md").read_text()
    assert "calibrated (`calib.json`)" in text and "0.512 [0.500, 0.524] (round 2)" in text
    assert "(round 1)" not in text  # round 1 had no calibration: nothing to read twice
    write_report(tmp_path, [(plain, [])], {**context, "calibration": None}, None)
    assert "The judge is calibrated" not in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------------- end to end
def stage_markers(run: Path) -> list[tuple[int, str]]:
    return [(r, s) for r in (1, 2) for s in STAGES if (run / f"round-{r}" / f"{s}.done").is_file()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_artifacts(run: Path) -> dict:
    """What the two runs must agree on, numbers rounded so float noise below 1e-4 does not count."""
    def rounded(value):
        if isinstance(value, float):
            return round(value, 4)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items() if k not in {"seconds", "finished", "pairs_per_second"}}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    out: dict = {}
    for r in (1, 2):
        d = run / f"round-{r}"
        out[f"labels-{r}"] = rounded([{k: row[k] for k in ("prompt_id", "chosen", "rejected", "judge_prob",
                                                             "policy_model")} for row in read_jsonl(d / "labels/data.jsonl")])
        rm = json.loads((d / "rm/metrics.json").read_text())
        out[f"rm-{r}"] = rounded({"eval": rm["eval"], "loss": rm["training"]["final_train_loss"]})
        out[f"rl-{r}"] = rounded([{k: rec.get(k) for k in ("step", "reward", "kl", "response_length", "policy_loss")}
                                  for rec in read_jsonl(d / "rl/metrics.jsonl")])
        out[f"eval-{r}"] = rounded([{k: s[k] for k in ("policy_response", "base_response", "prob_policy_better")}
                                    for s in read_jsonl(d / "eval/samples.jsonl")])
        marker = json.loads((d / "eval.done").read_text())["measurements"]
        out[f"measurements-{r}"] = rounded(marker)
    out["files"] = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
                          and not any(part.startswith(("tensorboard", ".")) for part in p.relative_to(run).parts)
                          and p.suffix in {".done", ".json", ".jsonl", ".md", ".png", ".safetensors"})
    return out


def policy_weights_close(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


@pytest.mark.slow
def test_two_rounds_end_to_end_then_sigkill_and_resume(tmp_path):
    # ---- uninterrupted run: every artifact, on-policy relabeling, report
    straight = tmp_path / "straight"
    uninterrupted = tiny_config(straight)
    uninterrupted["rl"]["logging"]["save_every"] = 0  # only the final checkpoint: same results, less disk time
    config_a = write_config(tmp_path, "a", uninterrupted)
    started = time.monotonic()
    summary = run_to_end(config_a, tmp_path / "a.log")
    straight_s = time.monotonic() - started
    assert summary["rounds_done"] == 2 and summary["stopped_by"] is None
    assert stage_markers(straight) == [(r, s) for r in (1, 2) for s in STAGES]
    for r in (1, 2):
        d = straight / f"round-{r}"
        assert (d / "labels/dataset/dataset_info.json").is_file() and (d / "labels/README.md").is_file()
        assert (d / "rm/rlaif_reward_model.json").is_file() and (d / "rm/model.safetensors").is_file()
        checkpoint = Path(json.loads((d / "rl.done").read_text())["checkpoint"])
        assert checkpoint.parent == d / "rl" and (checkpoint / "policy/model.safetensors").is_file()
        assert not (checkpoint / "optimizer.pt").exists(), "prune_checkpoints drops the optimizer state"
        assert [p.name for p in (d / "rl").glob("checkpoint-*")] == [checkpoint.name]
        assert (d / "rl/metrics.jsonl").is_file() and (d / "eval/summary.json").is_file()
        assert len(read_jsonl(d / "eval/samples.jsonl")) == 3
    round1_rl = json.loads((straight / "round-1/rl.done").read_text())
    labels1, labels2 = read_jsonl(straight / "round-1/labels/data.jsonl"), read_jsonl(straight / "round-2/labels/data.jsonl")
    assert {row["policy_model"] for row in labels1} == {"SmolLM2-135M-Instruct"}  # round 1: the round-0 policy
    assert {row["policy_model"] for row in labels2} == {round1_rl["policy_id"]}   # round 2: round 1's policy
    assert round1_rl["policy_id"] == "round-1/rl/" + Path(round1_rl["checkpoint"]).name  # relative to the run folder
    assert json.loads((straight / "round-2/rl.done").read_text())["init_policy"] == round1_rl["policy_path"]
    assert json.loads((straight / "round-2/reward_model.done").read_text())["base"] == str(straight / "round-1/rm")
    report = (straight / "report.md").read_text()
    assert "| 1 | 3 |" in report and "| 2 | 3 |" in report and "## Guards" in report
    assert (straight / "report.png").stat().st_size > 10_000
    assert len(read_jsonl(straight / "rounds.jsonl")) == 2

    # ---- a finished run re-run: nothing redone, no model loaded (seconds), same report
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*.done")}
    started = time.monotonic()
    again = run_to_end(config_a, tmp_path / "a.log")
    assert again["resumed"] and again["rounds"] == summary["rounds"]
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*.done")} == before
    assert time.monotonic() - started < 60

    # ---- a changed config is refused, naming the field
    changed = yaml.safe_load(config_a.read_text())
    changed["label"]["n"] = 3
    proc = subprocess.run(command(write_config(tmp_path, "changed", changed)), env=environment(), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert_one_line_error(proc, "different config", "label.n")

    # ---- SIGKILL in the middle of round 1's RL stage, then the same command again
    killed = tmp_path / "killed"
    config_b = write_config(tmp_path, "b", tiny_config(killed))
    with open(tmp_path / "b.log", "w") as err:
        process = subprocess.Popen(command(config_b), env=environment(), stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    deadline = time.monotonic() + 600
    try:
        # In a later stage: round 1's reward model is done, and PPO has written its first checkpoint.
        while not ((killed / "round-1/reward_model.done").is_file()
                   and (killed / "round-1/rl/checkpoint-1/.complete").is_file()):
            assert process.poll() is None, f"the loop ended before it could be killed: {(tmp_path / 'b.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "round 1's PPO never checkpointed"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert stage_markers(killed) == [(1, "label"), (1, "reward_model")], "the kill must land inside round 1's RL stage"
    assert json.loads((killed / "progress.json").read_text())["stage"] == "rl"
    resumed = run_to_end(config_b, tmp_path / "b.log")
    assert resumed["resumed"] and resumed["rounds_done"] == 2
    assert final_artifacts(killed) == final_artifacts(straight)
    final = "round-2/rl/checkpoint-2/policy/model.safetensors"
    assert policy_weights_close(killed / final, straight / final) < 1e-4
    print(f"uninterrupted run: {straight_s:.0f} s")
