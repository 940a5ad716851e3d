"""`build_reward_source(config)`: the reward source a config asks for (what `rlaif ppo` uses).

One of the judge service (`reward.judge_url`, `HTTPJudgeReward`), an in-process judge
(`reward.engine`, `LocalJudgeReward`), group-relative judging (`reward_mode: group`,
`GroupJudgeReward`) or a distilled reward model (`reward.reward_model`, `RewardModelReward`);
or, with `reward.rewards`, a weighted mixture of judge rubrics and verifiers (`WeightedReward`
over one judge source per rubric and one `VerifierReward` per verifier, sharing one in-process
engine), each term logged as `reward/<name>`. Optionally wrapped in a `RunningNormalizer`. It
sits above the modules of each source, so none of them imports another to be built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlaif.policy_training.config import PPOConfig, RewardTerm, resolve_device
from rlaif.policy_training.rewards import RewardSource, RunningNormalizer, WeightedReward

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.judge.engines.base import Engine

NO_REWARD_SOURCE = ("no reward source: give --judge-url URL (a running `rlaif serve`), --engine SPEC (an "
                    "in-process judge, e.g. --engine default) or --reward-model DIR (a `rlaif train-rm` output)")


def build_reward_source(config: PPOConfig) -> RewardSource:
    """The configured reward source, wrapped in a `RunningNormalizer` when normalization or clipping is on."""
    r = config.reward
    if r.rewards is not None:
        source: RewardSource = build_mixture(config)
    elif r.reward_mode == "group" and r.reward_model is None:
        from rlaif.policy_training.group_rewards import GroupJudgeReward

        source = GroupJudgeReward.from_config(config)
    elif r.judge_url:
        from rlaif.policy_training.judge_rewards import HTTPJudgeReward

        source = HTTPJudgeReward.from_config(config)
    elif r.engine:
        from rlaif.policy_training.judge_rewards import LocalJudgeReward

        source = LocalJudgeReward.from_config(config)
    elif r.reward_model:
        from rlaif.policy_training.reward_model.reward import RewardModelReward

        source = RewardModelReward.from_path(r.reward_model, batch_size=r.reward_model_batch_size,
                                             device=resolve_device(config.distributed.device))
    else:
        raise ValueError(NO_REWARD_SOURCE)
    if r.normalize_rewards or r.reward_clip is not None:
        source = RunningNormalizer(source, clip=r.reward_clip, center=r.normalize_rewards, scale=r.normalize_rewards)
    return source


def build_mixture(config: PPOConfig, engine: Engine | None = None) -> WeightedReward:
    """`reward.rewards` as a `WeightedReward`: one source per term, named after it (one engine for all judge terms)."""
    terms = config.reward.rewards or []
    names = [t.label for t in terms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"rewards: terms {repeated} share a name; give them distinct `name:`s (each is logged as "
                         "reward/<name>)")
    if engine is None and config.reward.judge_url is None and any(t.judge is not None for t in terms):
        from rlaif.judge.engines import build_engine

        assert config.reward.engine is not None
        engine = build_engine(config.reward.engine)
    sources = [_term_source(config, term, engine) for term in terms]
    return WeightedReward(sources, [t.weight for t in terms], names)


def _term_source(config: PPOConfig, term: RewardTerm, engine: Engine | None) -> Any:
    from rlaif.policy_training.judge_rewards import config_answers, config_checklists

    r = config.reward
    if term.verifier is not None:
        from rlaif.policy_training.prompt_data import load_prompt_rows
        from rlaif.policy_training.verifiers import VerifierReward

        rows = load_prompt_rows(config.policy.prompts, config.policy.prompt_column) if config.policy.prompts else {}
        return VerifierReward(term.verifier, rows=rows, answers=config_answers(config), name=term.label)
    mode = term.mode or r.reward_mode
    if mode == "group":
        from rlaif.policy_training.group_rewards import GroupJudgeReward

        return GroupJudgeReward.from_config(config, rubric=term.judge, engine=engine)
    from rlaif.policy_training.judge_rewards import HTTPJudgeReward, LocalJudgeReward, _config_references

    common: dict[str, Any] = dict(rubrics=term.judge, mode=mode, scale=r.reward_scale, judge_mode=r.judge_mode,
                                  references=_config_references(config) if mode == "pairwise" else None,
                                  answers=config_answers(config),
                                  checklists=config_checklists(config) if mode == "checklist" else None,
                                  checklist_mode=r.checklist_mode, name=term.label)
    if r.judge_url is not None:
        import os

        return HTTPJudgeReward(r.judge_url, timeout=r.judge_timeout, retries=r.judge_retries,
                               concurrency=r.judge_concurrency, api_key=os.environ.get(r.judge_api_key_env) or None,
                               **common)
    assert engine is not None
    return LocalJudgeReward(engine, calibrations=r.calibration if mode == "pairwise" else None, **common)

