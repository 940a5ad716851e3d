"""Reward sources for the new modes (issue 13): checklists and reference answers from the prompt file,
group-relative judging for GRPO / RLOO, verifiers, and weighted mixtures of judges and verifiers.

Real-model tests run the embedded SmolLM2 in process and through a live `rlaif serve` app; the
GRPO learning test judges groups with `PreferenceEngine` (whose listwise score is the share of
"x" words) on the tiny policy: the reward must rise, and must not with the advantage sign flipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlaif.judge.checklist import ChecklistJudge
from rlaif.judge.group import GroupJudge
from rlaif.judge.judges import ScoreJudge
from rlaif.judge.types import ChecklistItem, Criterion, GroupItem, ScoreItem
from rlaif.policy_training import estimators as estimator_module
from rlaif.policy_training.config import ConfigError, PPOConfig
from rlaif.policy_training.group_rewards import GroupJudgeReward, split_groups
from rlaif.policy_training.judge_rewards import HTTPJudgeReward, LocalJudgeReward
from rlaif.policy_training.ppo import PPOTrainer
from rlaif.policy_training.rewards import WeightedReward, reward_source_metrics
from rlaif.policy_training.sources import build_reward_source
from rlaif.policy_training.verifiers import VerifierError, VerifierReward, exact_match, load_verifier, numeric_match, regex_match
from rlaif.service.app import create_app
from rlaif.service.settings import ServiceSettings
from tests.fake_engines import ServerThread
from tests.preference_engine import PreferenceEngine
from tests.tiny_policy import PROMPTS, fraction_of_x, make_tiny_policy

TOL = 1e-4
ROWS = [
    {"prompt": "What is 6 * 7?", "reference": "42",
     "criteria": [{"text": "States that the answer is 42", "weight": 2}, "Is one sentence"]},
    {"prompt": "What is 10 - 3?", "reference": "7", "criteria": ["States that the answer is 7"]},
]


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


@pytest.fixture(scope="module")
def live_url(default_engine):
    app = create_app(ServiceSettings(cache=False, max_wait_ms=5), engine=default_engine)
    with ServerThread(app) as server:
        yield server.url


@pytest.fixture()
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- checklists and reference answers


def test_checklist_reward_from_the_prompt_file(default_engine, prompt_file, live_url):
    config = PPOConfig(prompts=str(prompt_file), engine="default", reward_mode="checklist", answer_column="reference")
    from rlaif.policy_training.judge_rewards import config_answers, config_checklists

    checklists, answers = config_checklists(config), config_answers(config)
    assert checklists[ROWS[0]["prompt"]] == (Criterion(text="States that the answer is 42", weight=2.0),
                                             Criterion(text="Is one sentence"))
    source = LocalJudgeReward(default_engine, mode="checklist", checklists=checklists, answers=answers)
    prompts, responses = [ROWS[0]["prompt"], ROWS[1]["prompt"]], ["6 * 7 = 42.", "It is 8."]
    rewards = source.rewards(prompts, responses)
    direct = ChecklistJudge(default_engine).judge([
        ChecklistItem(prompt=p, response=r, criteria=checklists[p], reference=answers[p]) for p, r in zip(prompts, responses)])
    assert rewards == pytest.approx([j.score for j in direct], abs=1e-12)

    http = HTTPJudgeReward(live_url, mode="checklist", checklists=checklists, answers=answers)
    try:
        assert http.rewards(prompts, responses) == pytest.approx(rewards, abs=TOL)
    finally:
        http.close()


def test_reference_answers_reach_reference_guided_rubrics(default_engine, prompt_file):
    config = PPOConfig(prompts=str(prompt_file), engine="default", rubric="correctness", answer_column="reference")
    from rlaif.policy_training.judge_rewards import config_answers

    source = LocalJudgeReward(default_engine, rubrics="correctness", answers=config_answers(config))
    rewards = source.rewards([ROWS[0]["prompt"]], ["42"])
    direct = ScoreJudge(default_engine, "correctness").judge([ScoreItem(prompt=ROWS[0]["prompt"], response="42",
                                                                        reference="42")])[0]
    assert rewards == pytest.approx([direct.score], abs=1e-12)
    with pytest.raises(Exception, match="grades against a reference answer"):
        LocalJudgeReward(default_engine, rubrics="correctness").rewards(["p"], ["r"])


def test_prompt_file_mistakes_name_the_column(default_engine, tmp_path):
    from rlaif.policy_training.judge_rewards import config_checklists

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match="no 'criteria' column"):
        config_checklists(PPOConfig(prompts=str(path), engine="default", reward_mode="checklist"))
    path.write_text(json.dumps({"prompt": "a", "criteria": [{"text": "x", "weight": 0}]}) + "\n")
    with pytest.raises(ValueError, match="criterion 0: weight"):
        config_checklists(PPOConfig(prompts=str(path), engine="default", reward_mode="checklist"))
    with pytest.raises(ValueError, match="none are available"):
        LocalJudgeReward(default_engine, mode="checklist").rewards(["a"], ["b"])


# ----------------------------------------------------------------------------- group rewards


def test_group_reward_local_and_http_agree(default_engine, live_url):
    prompts = ["Name a color."] * 3 + ["What is 2+2?"] * 3
    responses = ["Blue.", "Seven.", "Red.", "4", "5", "Four."]
    local = GroupJudgeReward(3, engine=default_engine, orders=2)
    rewards = local.rewards(prompts, responses)
    direct = GroupJudge(default_engine, orders=2).judge([GroupItem(prompt=prompts[0], responses=tuple(responses[:3])),
                                                         GroupItem(prompt=prompts[3], responses=tuple(responses[3:]))])
    assert rewards == pytest.approx(direct[0].scores + direct[1].scores, abs=1e-12)
    assert {"judge_latency_s", "group_order_spread", "group_label_mass"} <= set(local.last_metrics)
    http = GroupJudgeReward(3, url=live_url, orders=2)
    try:
        assert http.rewards(prompts, responses) == pytest.approx(rewards, abs=TOL)
        robin = GroupJudgeReward(3, url=live_url, method="round_robin").rewards(prompts, responses)
        assert len(robin) == 6 and all(0.0 <= r <= 1.0 for r in robin)
    finally:
        http.close()


def test_group_layout_errors():
    assert split_groups(["a", "a", "b", "b"], 2) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="do not form groups of 2"):
        split_groups(["a", "a", "b"], 2)
    with pytest.raises(ValueError, match="their prompts differ"):
        split_groups(["a", "b", "b", "b"], 2)
    with pytest.raises(ConfigError, match="needs ppo.estimator rloo or grpo"):
        PPOConfig.validated({"engine": "default", "reward_mode": "group"})


def test_grpo_learns_from_a_group_reward(tmp_path, one_thread, monkeypatch):
    policy = make_tiny_policy(tmp_path / "policy")
    engine = PreferenceEngine(lambda text: 5.0 * fraction_of_x("", text) - 2.5)  # listwise score ~ share of "x"

    def curve(out: Path) -> list[float]:
        config = PPOConfig(policy=policy, estimator="grpo", group_size=4, batch_size=4, steps=30, max_new_tokens=8,
                           temperature=1.0, learning_rate=3e-3, kl_coef=0.0, ppo_epochs=4, num_minibatches=2,
                           save_every=0, tensorboard=False, log_samples=0, output_dir=str(out), seed=0,
                           reward_mode="group", engine="unused")
        trainer = PPOTrainer(config, GroupJudgeReward(4, engine=engine, orders=2), prompts=PROMPTS)
        return [r["reward"] for r in trainer.train(progress=False)]

    rising = curve(tmp_path / "up")
    start, end = sum(rising[:3]) / 3, sum(rising[-5:]) / 5
    assert start < 0.2 and end > start + 0.25, f"group reward did not rise: {rising[:3]} ... {rising[-5:]}"

    original = estimator_module.policy_loss

    def flipped(logprobs, old_logprobs, advantages, mask, clip_range, num_tokens=None):
        return original(logprobs, old_logprobs, -advantages, mask, clip_range, num_tokens)

    monkeypatch.setattr(estimator_module, "policy_loss", flipped)
    falling = curve(tmp_path / "down")
    assert sum(falling[-5:]) / 5 <= sum(falling[:3]) / 3 + 0.02, f"rose with the sign flipped: {falling}"


# ----------------------------------------------------------------------------- verifiers


def test_builtin_verifiers():
    completions = ["The answer is 42.", "  forty two ", "1,234.0 apples", "no digits"]
    assert exact_match([""] * 2, ["  Paris. ", "paris is it"], reference=["paris", "Paris"]) == [1.0, 0.0]
    assert numeric_match([""] * 4, completions, reference=["42", "42", "1234", "3"]) == [1.0, 0.0, 1.0, 0.0]
    assert regex_match([""] * 2, ["id: 12-ab", "nothing"], reference=[r"\d+-[a-z]+", r"\d"]) == [1.0, 0.0]
    assert exact_match([""], ["x"], reference=[None]) == [None], "no reference: missing, not 0"
    with pytest.raises(VerifierError, match="answer_column"):
        exact_match([""], ["x"])
    with pytest.raises(VerifierError, match="not a valid pattern"):
        regex_match([""], ["x"], reference=["("])


def test_module_verifiers_and_bad_paths(tmp_path, monkeypatch):
    (tmp_path / "mychecks.py").write_text(textwrap.dedent("""
        import json
        def is_valid_json(prompts, completions, **kwargs):
            out = []
            for c in completions:
                try:
                    json.loads(c)
                    out.append(1.0)
                except ValueError:
                    out.append(0.0)
            return out
        def uses_column(prompts, completions, keyword, **kwargs):
            return [float(k in c) for c, k in zip(completions, keyword)]
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    source = VerifierReward("mychecks:is_valid_json")
    assert source.rewards(["p", "p"], ['{"a": 1}', "{nope"]) == [1.0, 0.0]
    column = VerifierReward("mychecks:uses_column", rows={"p": {"prompt": "p", "keyword": "blue"}})
    assert column.rewards(["p", "p"], ["blue sky", "red"]) == [1.0, 0.0], "prompt-file columns arrive as keywords"
    for spec, message in [("nosuchmodule_xyz:f", "cannot import module"), ("mychecks:missing", "has no attribute"),
                          ("mychecks:NOT_A_FUNCTION", "not a function"), ("justaname", "use a built-in")]:
        with pytest.raises(VerifierError, match=message):
            load_verifier(spec)
    with pytest.raises(ConfigError, match="either `judge"):
        PPOConfig.validated({"rewards": [{"judge": "helpfulness", "verifier": "exact"}]})
    with pytest.raises(ConfigError, match="no judge"):
        PPOConfig.validated({"rewards": [{"judge": "helpfulness"}]})
    with pytest.raises(ConfigError, match="rewards replaces rubric"):
        PPOConfig.validated({"engine": "default", "rubric": "helpfulness", "rewards": [{"verifier": "exact"}]})


def test_mixture_of_judge_and_verifier_logs_each_source(default_engine, prompt_file):
    config = PPOConfig.validated({
        "policy": {"prompts": str(prompt_file)},
        "reward": {"engine": "default", "answer_column": "reference",
                   "rewards": [{"judge": "correctness", "weight": 1.0}, {"verifier": "numeric", "weight": 0.5}]}})
    from rlaif.policy_training.sources import build_mixture

    source = build_mixture(config, engine=default_engine)
    assert isinstance(source, WeightedReward) and source.names == ["correctness", "numeric"]
    prompts, responses = [ROWS[0]["prompt"], ROWS[1]["prompt"]], ["42", "It is 8."]
    total = source.rewards(prompts, responses)
    judged = ScoreJudge(default_engine, "correctness").judge([
        ScoreItem(prompt=p, response=r, reference=row["reference"]) for p, r, row in zip(prompts, responses, ROWS)])
    assert total == pytest.approx([judged[0].score + 0.5, judged[1].score + 0.0], abs=1e-12)
    metrics = reward_source_metrics(source)
    assert metrics["reward/numeric"] == 0.5 and "reward/correctness" in metrics
    assert {"reward_s/correctness", "reward_s/numeric"} <= set(metrics)
    only_verifiers = build_reward_source(PPOConfig.validated({
        "policy": {"prompts": str(prompt_file)}, "reward": {"answer_column": "reference", "rewards": ["verifier=exact"]}}))
    assert only_verifiers.rewards(prompts, ["42", "7"]) == [1.0, 1.0]


@pytest.mark.slow
def test_ppo_cli_with_a_verifier_mixture(tmp_path, prompt_file):
    policy = make_tiny_policy(tmp_path / "policy")
    proc = subprocess.run([sys.executable, "-m", "rlaif", "ppo", "--policy", policy, "--prompts", str(prompt_file),
                           "--rewards", "verifier=numeric,weight=1", "--rewards", "verifier=exact,weight=0.5",
                           "--answer-column", "reference", "--estimator", "grpo", "--group-size", "2", "--batch-size",
                           "2", "--steps", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "run"),
                           "--no-tensorboard"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/numeric", "reward/exact", "reward_s/numeric"} <= set(records[-1])


# ----------------------------------------------------------------------------- rlaif label with reference answers


def test_label_passes_reference_answers_to_the_judge(tmp_path, default_engine):
    import datasets

    from rlaif.judge.judges import PairwiseJudge
    from rlaif.judge.labeling.config import LabelConfig
    from rlaif.judge.labeling.label import run_label
    from rlaif.judge.types import PairwiseItem

    source = [{"prompt": "What is 6 * 7?", "x": "42", "y": "48", "answer": "42"},
              {"prompt": "What is 10 - 3?", "x": "It is 6.", "y": "7", "answer": "7"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in source))
    config = LabelConfig(prompts=path, out=tmp_path / "out", responses_from=("x", "y"), answer_column="answer",
                         rubric="correctness-pairwise", format="standard", progress=False, no_cache=True)
    summary = run_label(config, judge_engine=default_engine)
    rows = datasets.load_from_disk(str(tmp_path / "out" / "dataset")).to_list()
    assert summary["rows"] == 2
    judge = PairwiseJudge(default_engine, "correctness-pairwise")
    for row, original in zip(rows, source):
        direct = judge.judge([PairwiseItem(prompt=original["prompt"], response_a=row["chosen"],
                                           response_b=row["rejected"], reference=original["answer"])])[0]
        assert abs(row["judge_prob"] - direct.prob_a) < TOL, "the dataset's verdict is the reference-guided one"
    missing = LabelConfig(prompts=path, out=tmp_path / "out2", responses_from=("x", "y"), progress=False,
                          no_cache=True)  # no answer column: the reference-guided rubric refuses
    with pytest.raises(ValueError, match="has none"):
        run_label(missing.model_copy(update={"rubric": "correctness-pairwise"}), judge_engine=default_engine)
