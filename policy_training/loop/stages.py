"""The four stages of one `rlaif loop` round, each a call into the command that already does it.

- `label`         `rlaif label` (`run_label`): the previous round's policy samples the training prompts,
                  the judge labels pairs; resumes inside from its progress store;
- `reward_model`  `rlaif train-rm` (`RewardModelTrainer`): the distilled RM, continued from the previous
                  round's (`reward_model.init: previous`) on this round's pairs (or all rounds' pairs);
- `rl`            `rlaif ppo` (`PPOTrainer`): the previous round's policy, trained against the RM, the
                  judge or a mix; the reference (KL anchor) stays the round-0 policy; resumes from its
                  latest checkpoint;
- `eval`          `rlaif winrate` (`run_winrate`) of this round's policy against the round-0 policy on
                  held-out prompts, plus the RM's agreement with those verdicts; the measurements
                  the guards and the report read.

Each returns the payload of its done marker (paths and the numbers later stages and the report need).
Stage code adds no second copy of any command: only the wiring (which folder, which policy, which
engine instance) is here. The judge engine is loaded once per process (`JudgeHandle`) and shared
by labeling, judge rewards and the win rate, with one judgment cache for the whole run.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.policy_training.loop.config import LoopConfig, derive, engine_spec_of
from rlaif.policy_training.loop.guards import Measurements
from rlaif.policy_training.loop.layout import RunLayout
from rlaif.policy_training.rewards import RunningNormalizer, WeightedReward

if TYPE_CHECKING:  # pragma: no cover
    from rlaif.judge.cache import JudgmentCache
    from rlaif.judge.engines.base import Engine
    from rlaif.judge.judges import PairwiseJudge
    from rlaif.policy_training.rewards import RewardSource

logger = logging.getLogger(__name__)


class LoopError(Exception):
    """A run that cannot go on for a reason the user must fix (printed as one line)."""


class JudgeHandle:
    """The run's judge, loaded on first use and shared by every stage of this process."""

    def __init__(self, config: LoopConfig, cache_path: Path) -> None:
        self.spec = config.judge
        self.cache_path = cache_path
        self._engine: Engine | None = None
        self._cache: JudgmentCache | None = None
        self._pairwise: PairwiseJudge | None = None

    @property
    def in_process(self) -> bool:
        return self.spec.url is None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from rlaif.judge.engines import build_engine

            self._engine = build_engine(self.spec.engine_spec)
        return self._engine

    @property
    def cache(self) -> JudgmentCache:
        if self._cache is None:
            from rlaif.judge.cache import JudgmentCache

            self._cache = JudgmentCache(self.cache_path)
        return self._cache

    def pairwise(self) -> PairwiseJudge | None:
        """The in-process pairwise judge (None with a judge service: callers use its URL)."""
        if not self.in_process:
            return None
        if self._pairwise is None:
            from rlaif.judge.judges import PairwiseJudge

            calibration = None
            if self.spec.calibration is not None:
                from rlaif.judge.calibration import Calibration

                calibration = Calibration.load(self.spec.calibration)
            self._pairwise = PairwiseJudge(self.engine, self.spec.rubric, mode=self.spec.mode,
                                           tie_margin=self.spec.tie_margin, cache=self.cache, calibration=calibration)
        return self._pairwise

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None


@dataclass
class LoopContext:
    """What every stage needs: the config, the folder layout, the shared judge and the device."""

    config: LoopConfig
    layout: RunLayout
    judge: JudgeHandle
    device: str

    def marker(self, r: int, stage: str) -> dict[str, Any]:
        payload = self.layout.done(r, stage)
        assert payload is not None, f"round {r}: stage {stage} should be done before this one"
        return payload


def _release() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# ---------------------------------------------------------------------------------- label
def label_stage(ctx: LoopContext, r: int) -> dict[str, Any]:
    """Sample from the round r-1 policy and label pairs: `run_label`, resumed inside when interrupted."""
    from rlaif.judge.labeling.label import run_label

    cfg, layout = ctx.config, ctx.layout
    policy_engine = None
    if r == 1:
        policy_spec, policy_path = engine_spec_of(cfg.policy.model), None
    else:
        previous = ctx.marker(r - 1, "rl")
        policy_path, policy_id = previous["policy_path"], previous["policy_id"]
        policy_spec = f"hf:{policy_path}"
        from rlaif.judge.engines.hf import HFEngine

        # Named by its policy id, so the dataset's `policy_model` column says which round's policy sampled it.
        policy_engine = HFEngine(policy_path, name=policy_id, device=ctx.device)
    label_config = cfg.label_config(r, policy_spec, out=layout.stage_dir(r, "label"), cache_path=layout.cache)
    judge_engine = ctx.judge.engine if ctx.judge.in_process else None
    try:
        summary = run_label(label_config, policy_engine=policy_engine, judge_engine=judge_engine,
                            command=f"rlaif loop (round {r})")
    finally:
        del policy_engine
        _release()
    if summary["rows"] == 0:
        raise LoopError(f"round {r}: labeling wrote no pairs ({summary['dropped']} dropped); raise label.n or "
                        "label.max_new_tokens, or relax label.min_margin / label.drop_inconsistent")
    import datasets

    dataset = datasets.load_from_disk(str(layout.stage_dir(r, "label") / "dataset"))
    prefs = summary["judge_preferences"]
    return {"dataset": str(layout.stage_dir(r, "label") / "dataset"), "rows": summary["rows"],
            "policy_spec": policy_spec, "policy_path": policy_path, "policy_model": dataset[0]["policy_model"],
            "position_consistency": summary["position_consistency"],
            "tie_frac": prefs.get("TIE", 0) / max(1, sum(prefs.values())), "dropped": summary["dropped"],
            "judge_prob": summary["judge_prob"]}


# ---------------------------------------------------------------------------------- reward model
def reward_model_stage(ctx: LoopContext, r: int) -> dict[str, Any]:
    """Train (or continue) the distilled RM with `RewardModelTrainer`; a killed run retrains from scratch."""
    from rlaif.policy_training.reward_model.training import RewardModelTrainer

    cfg, layout = ctx.config, ctx.layout
    data = Path(ctx.marker(r, "label")["dataset"])
    if cfg.reward_model.data == "all" and r > 1:
        data = _concatenate([Path(ctx.marker(k, "label")["dataset"]) for k in range(1, r + 1)],
                            layout.round_dir(r) / "rm_data")
    previous = Path(ctx.marker(r - 1, "reward_model")["path"]) if r > 1 else None
    out = layout.stage_dir(r, "reward_model")
    if out.exists():  # an interrupted training leaves nothing worth keeping
        shutil.rmtree(out)
    rm_config = cfg.rm_config(data, cfg.rm_base(r, previous), out)
    bar = _bar(cfg.progress, f"round {r} reward model", "step")
    try:
        def progress(record: dict[str, Any]) -> None:
            if record.get("event") == "train":
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}", refresh=False)

        trainer = RewardModelTrainer(rm_config, progress=progress)
        bar.reset(total=trainer.total_steps)
        result = trainer.train()
    finally:
        bar.close()
    del trainer
    _release()
    metrics = result.metrics
    evaluation = metrics.get("eval") or metrics.get("eval_initial") or {}
    return {"path": str(out), "base": rm_config.base, "data": str(data),
            "train_pairs": metrics["data"]["train_pairs"], "eval_pairs": metrics["data"]["eval_pairs"],
            "heldout_agreement": evaluation.get("agreement"), "heldout_n": evaluation.get("n"),
            "pairs_per_second": metrics["training"]["pairs_per_second"]}


def _concatenate(datasets_dirs: list[Path], out: Path) -> Path:
    import datasets

    joined = datasets.concatenate_datasets([datasets.load_from_disk(str(d)) for d in datasets_dirs])
    if out.exists():
        shutil.rmtree(out)
    joined.save_to_disk(str(out))
    return out


# ---------------------------------------------------------------------------------- rl
def rl_stage(ctx: LoopContext, r: int) -> dict[str, Any]:
    """PPO (or RLOO/GRPO) from the round r-1 policy with `PPOTrainer`, resumed from its latest checkpoint."""
    from rlaif.judge.data import load_prompts
    from rlaif.policy_training.checkpoint import latest_checkpoint
    from rlaif.policy_training.ppo import PPOTrainer

    cfg, layout = ctx.config, ctx.layout
    out = layout.stage_dir(r, "rl")
    if out.exists() and latest_checkpoint(out) is None:  # killed before its first checkpoint: start clean
        shutil.rmtree(out)
    rm_dir = Path(ctx.marker(r, "reward_model")["path"])
    ppo_config = cfg.rl_config(rm_dir, out, r)
    init = ctx.marker(r - 1, "rl")["policy_path"] if r > 1 else None
    prompts = [p.text for p in load_prompts(cfg.prompts.train, cfg.prompts.prompt_column, cfg.prompts.train_limit)]
    source = reward_source(ctx, ppo_config, rm_dir)
    trainer = PPOTrainer(ppo_config, source, prompts=prompts, init_policy=init)
    try:
        trainer.train(progress=cfg.progress)
    finally:
        trainer.close()
        del trainer
        _release()
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None, "PPOTrainer.train always ends with a checkpoint"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kls = [float(rec["kl"]) for rec in records if rec.get("kl") is not None]
    tail = kls[-max(1, len(kls) // 4):] if kls else []
    rewards = [float(rec["reward"]) for rec in records if rec.get("reward") is not None]
    return {"policy_path": str(checkpoint / "policy"), "policy_id": str(checkpoint.relative_to(layout.root)),
            "checkpoint": str(checkpoint), "init_policy": init, "reward_source": cfg.reward.source,
            "steps": len(records), "kl": sum(tail) / len(tail) if tail else None, "kl_max": max(kls) if kls else None,
            "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None}


def reward_source(ctx: LoopContext, ppo_config: Any, rm_dir: Path) -> RewardSource:
    """What PPO maximizes (`reward.source`): the RM and/or the judge, the judge engine shared with the loop."""
    from rlaif.policy_training.config import resolve_device
    from rlaif.policy_training.sources import build_reward_source

    cfg, r = ctx.config, ppo_config.reward
    if cfg.reward.source == "rm" or not ctx.judge.in_process and cfg.reward.source == "judge":
        return build_reward_source(ppo_config)  # exactly what `rlaif ppo --reward-model DIR` / `--judge-url` builds
    from rlaif.policy_training.judge_rewards import HTTPJudgeReward, LocalJudgeReward

    judge: RewardSource
    if ctx.judge.in_process:
        judge = LocalJudgeReward(ctx.judge.engine, rubrics=r.rubric, mode=r.reward_mode, scale=r.reward_scale,
                                 judge_mode=r.judge_mode, cache=ctx.judge.cache, tie_margin=cfg.judge.tie_margin,
                                 calibrations=[str(cfg.judge.calibration)] if cfg.judge.calibration else None)
    else:
        judge = HTTPJudgeReward.from_config(ppo_config)
    if cfg.reward.source == "mix":
        from rlaif.policy_training.reward_model.reward import RewardModelReward

        rm = RewardModelReward.from_path(rm_dir, batch_size=r.reward_model_batch_size,
                                         device=resolve_device(cfg.device))
        weights = cfg.reward.weights
        judge = MixedReward([RunningNormalizer(rm), RunningNormalizer(judge)],
                            [weights.get("rm", 0.0), weights.get("judge", 0.0)], names=["rm", "judge"])
    if r.normalize_rewards or r.reward_clip is not None:
        judge = RunningNormalizer(judge, clip=r.reward_clip, center=r.normalize_rewards, scale=r.normalize_rewards)
    return judge


class MixedReward(WeightedReward):
    """The `mix` reward: sum of weight x normalized component, whose running statistics resume with the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return {name: source.state_dict() for name, source in zip(self.names, self._normalizers())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, source in zip(self.names, self._normalizers()):
            source.load_state_dict(state[name])

    def _normalizers(self) -> list[RunningNormalizer]:
        assert all(isinstance(s, RunningNormalizer) for s in self.sources), "mix components are RunningNormalizers"
        return [s for s in self.sources if isinstance(s, RunningNormalizer)]


def prune_checkpoints(ctx: LoopContext, r: int) -> None:
    """After `rl.done`: keep the final checkpoint's policy/ and trainer_state.json only (idempotent)."""
    from rlaif.policy_training.checkpoint import CHECKPOINT_PREFIX

    out = ctx.layout.stage_dir(r, "rl")
    final = Path(ctx.marker(r, "rl")["checkpoint"])
    for path in out.glob(f"{CHECKPOINT_PREFIX}*"):
        if path.is_dir() and path != final:
            shutil.rmtree(path)
    for name in ("optimizer.pt", "value"):
        target = final / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


# ---------------------------------------------------------------------------------- eval
def eval_stage(ctx: LoopContext, r: int) -> dict[str, Any]:
    """`run_winrate` of round r's policy vs the round-0 policy, then the RM's agreement with those verdicts."""
    from rlaif.judge.metrics import wilson_interval
    from rlaif.policy_training.config import resolve_device
    from rlaif.policy_training.reward_model.reward import RewardModelReward
    from rlaif.policy_training.winrate import SAMPLES_FILE, WinRateSettings, run_winrate

    cfg, layout = ctx.config, ctx.layout
    rl, rm, label = ctx.marker(r, "rl"), ctx.marker(r, "reward_model"), ctx.marker(r, "label")
    out = layout.stage_dir(r, "eval")
    j, e = cfg.judge, cfg.eval
    settings = WinRateSettings(
        base=cfg.policy.model, policy=rl["policy_path"], prompts=str(cfg.prompts.heldout),
        prompt_column=cfg.prompts.prompt_column, limit=cfg.prompts.heldout_limit,
        engine=None if j.url else j.engine_spec, judge_url=j.url, rubric=j.rubric, judge_mode=j.mode,
        max_new_tokens=e.max_new_tokens, temperature=e.temperature, seed=derive(cfg.seed, "eval", r),
        batch_size=e.batch_size, device=resolve_device(cfg.device), out=str(out),
        judge_api_key=os.environ.get(j.api_key_env) if j.url else None)
    summary = run_winrate(settings, judge=ctx.judge.pairwise(), progress=cfg.progress)
    samples = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines() if line.strip()]
    scorer = RewardModelReward.from_path(rm["path"], batch_size=e.rm_batch_size, device=resolve_device(cfg.device))
    prompts = [s["prompt"] for s in samples]
    policy_scores = scorer.rewards(prompts, [s["policy_response"] for s in samples])
    base_scores = scorer.rewards(prompts, [s["base_response"] for s in samples])
    del scorer
    _release()
    agree, decided = rm_agreement([s["prob_policy_better"] for s in samples], policy_scores, base_scores)
    uncalibrated = summary.get("uncalibrated", {})  # present with a calibrated judge
    measurements = Measurements(
        round=r, n_heldout=summary["n"], win_rate=summary["win_rate"], win_rate_ci95=summary["win_rate_ci95"],
        soft_win_rate=summary["mean_prob_policy_better"], soft_win_rate_ci95=summary["mean_prob_policy_better_ci95"],
        lc_win_rate=summary["length_controlled_win_rate"], length_slope=summary["length_slope"], ties=summary["ties"],
        consistent_frac=summary["consistent_frac"], kl=rl["kl"], kl_max=rl["kl_max"],
        rm_agreement=agree / decided if decided else None, rm_agreement_pairs=decided,
        rm_agreement_ci95=list(wilson_interval(agree, decided)) if decided else None,
        rm_heldout_agreement=rm["heldout_agreement"], mean_length_policy=summary["mean_length_tokens"]["policy"],
        mean_length_base=summary["mean_length_tokens"]["base"], label_rows=label["rows"],
        label_position_consistency=label["position_consistency"], label_tie_frac=label["tie_frac"],
        uncalibrated_soft_win_rate=uncalibrated.get("mean_prob_policy_better"),
        uncalibrated_soft_win_rate_ci95=uncalibrated.get("mean_prob_policy_better_ci95"))
    return {"summary": str(out / "summary.json"), "measurements": measurements.model_dump(mode="json")}


def rm_agreement(judge_probs: list[float], policy_scores: list[float | None],
                 base_scores: list[float | None]) -> tuple[int, int]:
    """(agreeing, decided) pairs: decided = the judge is not exactly 0.5 and the RM's two scores differ;
    agreeing = the RM ranks the policy's answer above the base's exactly when the judge's P(policy better) > 0.5."""
    agree = decided = 0
    for p, a, b in zip(judge_probs, policy_scores, base_scores):
        if a is None or b is None or not math.isfinite(p) or abs(p - 0.5) < 1e-12 or a == b:
            continue
        decided += 1
        agree += (a > b) == (p > 0.5)
    return agree, decided


def _bar(enabled: bool, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=None, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


STAGE_FUNCTIONS = {"label": label_stage, "reward_model": reward_model_stage, "rl": rl_stage, "eval": eval_stage}
