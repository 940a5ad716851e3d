"""`LoopConfig`: one `rlaif loop` run, validated at the boundary, loadable from YAML.

The loop owns the run folder and the wiring between stages; each stage's own knobs are the
existing command's config, nested unchanged, so every field keeps one definition:

- `label:`         `rlaif label` fields (`LabelConfig`: n, pairs, temperature, max_new_tokens, ...);
- `reward_model:`  `train:` holds `rlaif train-rm` fields (`RMTrainConfig`), plus how rounds chain;
- `rl:`            a `PPOConfig` (sectioned, as `rlaif ppo --config` reads it);
- `eval:`          the `rlaif winrate` settings;
- `guards:`        the reward-hacking checks (see `guards.py`).

Fields the loop sets itself (prompts, output folders, the policy each round samples from, the
judge, seeds, resume) are refused inside those sections with a message naming the loop field
to use instead, so a config cannot say two different things. All three nested configs are
built once at validation time, so a typo in `rl.ppo.clip_range` fails before any model loads.

Settings that do not change what the stages produce (`rounds`, `guards`, `progress`,
`prune_checkpoints`) are left out of the run's identity (`LoopConfig.identity`): a run can be
extended by more rounds, or re-judged with other guard thresholds, by re-running it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GuardAction = Literal["warn", "stop", "off"]

LABEL_OWNED = {
    "prompts": "prompts.train", "out": "out", "prompt_column": "prompts.prompt_column", "limit": "prompts.train_limit",
    "policy": "policy.model (round 0) / the previous round's policy", "engine": "judge.engine",
    "judge_url": "judge.url", "api_key": "judge.api_key_env", "rubric": "judge.rubric", "mode": "judge.mode",
    "tie_margin": "judge.tie_margin", "calibration": "judge.calibration", "cache_path": "out",
    "no_cache": "out", "overwrite": "out", "progress": "progress", "responses_from": "(not supported by the loop)",
    "seed": "seed",
}
RM_OWNED = {"data": "reward_model.data", "out": "out", "device": "device", "seed": "seed"}
RL_OWNED = {
    ("policy", "model"): "policy.model", ("policy", "prompts"): "prompts.train",
    ("policy", "prompt_column"): "prompts.prompt_column", ("reward", "judge_url"): "judge.url / reward.source",
    ("reward", "engine"): "judge.engine / reward.source", ("reward", "reward_model"): "reward.source",
    ("reward", "calibration"): "judge.calibration", ("logging", "output_dir"): "out",
    ("logging", "resume"): "(always on: the loop resumes)", ("distributed", "device"): "device",
    ("ppo", "seed"): "seed", ("policy", "lora_r"): "(LoRA is not supported by the loop yet: full fine-tuning only)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptSets(_Strict):
    """Training prompts (sampled, labeled, trained on) and held-out prompts (win rate only)."""

    train: Path = Field(description="Training prompts: jsonl/json/parquet/csv or a save_to_disk folder.")
    heldout: Path = Field(description="Held-out prompts for the win rate; must share no prompt with `train`.")
    prompt_column: str | None = Field(None, description="Prompt field or path (e.g. `turns[0]`); unset = detected.")
    train_limit: int | None = Field(None, ge=1, description="Use only the first N training prompts.")
    heldout_limit: int | None = Field(None, ge=1, description="Use only the first N held-out prompts.")


class PolicySpec(_Strict):
    """The round-0 policy: what round 1 samples from, PPO's KL reference and the win rate's baseline."""

    model: str = Field("default", description="`default` (embedded SmolLM2-135M-Instruct), a save_pretrained folder, "
                                              "an HF id or `hf:<id or path>` (must be trainable: no GGUF, no API).")


class JudgeSpec(_Strict):
    """The AI labeler: labels pairs, judges the win rate and (reward.source judge/mix) gives PPO rewards."""

    engine: str | None = Field(None, description="In-process judge engine spec (`default`, `hf:<path>?dtype=bf16`, "
                                                 "`openai:<url>#<model>`); `${VAR}` is expanded. Default: `default`.")
    url: str | None = Field(None, description="A running `rlaif serve` judge service instead of an in-process engine.")
    api_key_env: str = Field("RLAIF_JUDGE_API_KEY", description="Environment variable with the service's bearer key.")
    rubric: str = Field("helpfulness", description="Pairwise rubric id or YAML file.")
    mode: Literal["logprob", "cot"] = Field("logprob", description="Label log-probs, or a rationale then the label.")
    tie_margin: float = Field(0.05, ge=0.0, lt=0.5, description="|P - 0.5| below this is a tie (hard verdicts only).")
    calibration: Path | None = Field(None, description="Calibration file (`rlaif calibrate`) for the in-process judge.")

    @field_validator("engine")
    @classmethod
    def _engine(cls, spec: str | None) -> str | None:
        if spec is None:
            return None
        from rlaif.judge.engines import parse_engine_spec

        spec = expand(spec)
        parse_engine_spec(spec)
        return spec

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeSpec:
        if self.engine is not None and self.url is not None:
            raise ValueError("give judge.engine or judge.url, not both")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge.url must start with http:// or https://, got {self.url!r}")
        if self.calibration is not None and self.url is not None:
            raise ValueError("judge.calibration applies to an in-process judge; a service applies its own")
        return self

    @property
    def engine_spec(self) -> str:
        return self.engine or "default"


def _even_mix() -> dict[Literal["rm", "judge"], float]:
    return {"rm": 0.5, "judge": 0.5}


class RewardChoice(_Strict):
    """What PPO maximizes each round."""

    source: Literal["rm", "judge", "mix"] = Field("rm", description=(
        "`rm`: the round's distilled reward model (RLAIF's distilled setup); `judge`: the judge itself (direct "
        "RLAIF; `rl.reward.reward_mode` score or pairwise); `mix`: weights.rm * RM + weights.judge * judge, each "
        "normalized by running mean/std first so the weights compare like with like."))
    weights: dict[Literal["rm", "judge"], float] = Field(default_factory=_even_mix,
                                                         description="source mix: weight of each component.")


class RewardModelStage(_Strict):
    """How each round's distilled reward model is trained (`rlaif train-rm`)."""

    init: Literal["previous", "base"] = Field("previous", description=(
        "`previous`: round r continues round r-1's RM (round 1 starts from train.base); `base`: a fresh RM "
        "from train.base every round."))
    data: Literal["round", "all"] = Field("round", description=(
        "`round`: the pairs labeled this round (on-policy); `all`: this and every earlier round's pairs."))
    train: dict[str, Any] = Field(default_factory=dict, description="`rlaif train-rm` fields (RMTrainConfig): "
                                                                    "base, epochs, lr, batch_size, max_length, ...")


class EvalStage(_Strict):
    """`rlaif winrate` of each round's policy against the round-0 policy on the held-out prompts."""

    max_new_tokens: int = Field(128, ge=1, description="Longest response of each model, in tokens.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (deterministic, the default).")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")
    rm_batch_size: int = Field(16, ge=1, description="Sequences per reward-model forward pass (RM agreement).")


class LengthGuard(_Strict):
    """Wins that come from length: soft win rate minus length-controlled win rate."""

    max_gap: float = Field(0.05, ge=0.0, le=1.0, description="Fire when soft win rate - LC win rate exceeds this.")
    action: GuardAction = "warn"


class KLGuard(_Strict):
    """Drift from the round-0 policy: PPO's sequence KL (nats) at the end of the round."""

    max_kl: float = Field(10.0, gt=0.0, description="Fire when the round's final KL to the round-0 policy exceeds this.")
    action: GuardAction = "stop"


class RMAgreementGuard(_Strict):
    """RM over-optimization: does the RM still agree with the judge on the new policy's answers?"""

    min_agreement: float = Field(0.6, ge=0.0, le=1.0, description="Fire when fresh agreement falls below this.")
    max_drop: float = Field(0.15, ge=0.0, le=1.0, description=(
        "Fire when fresh agreement is this much below the RM's agreement on its own held-out labeled pairs."))
    min_pairs: int = Field(8, ge=1, description="Fewer decided pairs than this: report only, never fire.")
    action: GuardAction = "warn"


class Guards(_Strict):
    """The reward-hacking guards; each warns, stops the loop, or is off. Reported per round either way."""

    length: LengthGuard = Field(default_factory=LengthGuard)
    kl: KLGuard = Field(default_factory=KLGuard)
    rm_agreement: RMAgreementGuard = Field(default_factory=RMAgreementGuard)


class LoopConfig(_Strict):
    """One iterative RLAIF run: `rounds` x (sample -> label -> train RM -> PPO -> win rate)."""

    out: Path = Field(Path("runs/loop"), description="Run folder: every round's artifacts, markers and the report.")
    rounds: int = Field(2, ge=1, le=100, description="Rounds to run (raise it and re-run to continue a finished run).")
    seed: int = Field(0, description="Base seed: round r samples, labels and trains with seeds derived from (seed, r).")
    device: str = Field("auto", description="`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`: policy, RM, PPO.")
    progress: bool = Field(True, description="Progress bars on stderr.")
    prune_checkpoints: bool = Field(True, description=(
        "After a round's PPO is done, keep only its final checkpoint's policy/ and trainer_state.json (drops the "
        "optimizer state and critic, ~1-2.5 GB per round for a 135M policy, and any intermediate checkpoints)."))
    prompts: PromptSets
    policy: PolicySpec = Field(default_factory=PolicySpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    reward: RewardChoice = Field(default_factory=RewardChoice)
    label: dict[str, Any] = Field(default_factory=dict, description="`rlaif label` fields (LabelConfig).")
    reward_model: RewardModelStage = Field(default_factory=RewardModelStage)
    rl: dict[str, Any] = Field(default_factory=dict, description="A PPOConfig (sections policy/reward/ppo/optimizer/"
                                                                 "logging/distributed) for each round's RL stage.")
    eval: EvalStage = Field(default_factory=EvalStage)
    guards: Guards = Field(default_factory=Guards)

    UNHASHED: ClassVar[frozenset[str]] = frozenset({"rounds", "guards", "progress", "prune_checkpoints", "out"})

    @field_validator("out", mode="before")
    @classmethod
    def _expand_out(cls, value: Any) -> Any:
        return expand(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _stages_validate(self) -> LoopConfig:
        """Build each stage's own config now, so its errors name the field before anything loads."""
        if self.prompts.train.resolve() == self.prompts.heldout.resolve():
            raise ValueError("prompts.train and prompts.heldout are the same file; the win rate needs held-out prompts")
        from rlaif.policy_training.models import resolve_model_path

        if self.policy.model != "default":  # `default` would dequantize the embedded model here; it is trainable
            try:
                resolve_model_path(self.policy.model)  # refuses GGUF and API specs: the policy must be trainable
            except ValueError as exc:
                raise ValueError(f"policy.model: {exc}") from None
        self.label_config(1, engine_spec_of(self.policy.model))
        self.rm_config(Path("labels"), self.rm_base(1), Path("rm"))
        self.rl_config(Path("rm"), Path("rl"), 1)
        return self

    # ------------------------------------------------------------------ stage configs
    def label_config(self, round_index: int, policy_spec: str, out: Path | None = None, cache_path: Path | None = None):
        """The round's `LabelConfig`: the user's `label:` fields plus what the loop decides."""
        from rlaif.judge.labeling.config import LabelConfig

        _refuse_owned("label", self.label, LABEL_OWNED)
        j = self.judge
        values = dict(self.label)
        values.update(prompts=self.prompts.train, out=out or self.out / "round-1" / "labels",
                      prompt_column=self.prompts.prompt_column, limit=self.prompts.train_limit, policy=policy_spec,
                      engine=j.engine_spec, judge_url=j.url, api_key=os.environ.get(j.api_key_env) if j.url else None,
                      rubric=j.rubric, mode=j.mode, tie_margin=j.tie_margin, calibration=j.calibration,
                      cache_path=cache_path, progress=self.progress, seed=derive(self.seed, "label", round_index))
        return _build("label", LabelConfig, values)

    def rm_base(self, round_index: int, previous: Path | None = None) -> str:
        if self.reward_model.init == "previous" and round_index > 1 and previous is not None:
            return str(previous)
        return str(self.reward_model.train.get("base", "default"))

    def rm_config(self, data: Path, base: str, out: Path):
        """The round's `RMTrainConfig`."""
        from rlaif.policy_training.config import resolve_device
        from rlaif.policy_training.reward_model.config import RMTrainConfig

        _refuse_owned("reward_model.train", self.reward_model.train, RM_OWNED)
        values = {**self.reward_model.train, "data": data, "out": out, "base": base,
                  "device": resolve_device(self.device), "seed": self.seed}
        return _build("reward_model.train", RMTrainConfig, values)

    def rl_config(self, rm_dir: Path, out: Path, round_index: int):
        """The round's `PPOConfig`: policy = round-0 model (the KL reference), reward as `reward.source` says."""
        from rlaif.policy_training.config import ConfigError, PPOConfig, nest

        try:
            nested, _ = nest(self.rl, "rl")
        except ConfigError as exc:
            raise ValueError(f"rl: {exc}") from None
        for (section, field), owner in RL_OWNED.items():
            if field in (nested.get(section) or {}):
                raise ValueError(f"rl.{section}.{field} is set by the loop; use {owner}")
        merged = {k: dict(v) if isinstance(v, dict) else v for k, v in nested.items()}
        merged.setdefault("policy", {}).update(model=self.policy.model, prompts=str(self.prompts.train),
                                               prompt_column=self.prompts.prompt_column)
        reward = merged.setdefault("reward", {})
        if self.reward.source == "rm":
            reward["reward_model"] = str(rm_dir)
        elif self.judge.url is not None:
            reward["judge_url"] = self.judge.url
        else:
            reward["engine"] = self.judge.engine_spec
        if self.reward.source != "rm" and reward.get("reward_mode") == "pairwise":
            reward.setdefault("rubric", self.judge.rubric)
        merged.setdefault("logging", {}).update(output_dir=str(out), resume=True)
        merged.setdefault("distributed", {})["device"] = self.device
        merged.setdefault("ppo", {})["seed"] = derive(self.seed, "rl", round_index)
        try:
            return PPOConfig.validated(merged, source="rl")
        except ConfigError as exc:
            lines = [line.strip() for line in str(exc).splitlines()[1:]] or [str(exc)]
            raise ValueError("; ".join(f"rl.{line}" for line in lines)) from None

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        """What decides the artifacts: everything but `UNHASHED` (see the module docstring)."""
        return self.model_dump(mode="json", exclude=set(self.UNHASHED))

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> LoopConfig:
        """Load a YAML file; `overrides` (e.g. `out` from `--out`) win. Errors: `ValueError`, one line."""
        from rlaif.policy_training.config import read_yaml_mapping

        data = read_yaml_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validated(data, source=str(path))

    @classmethod
    def validated(cls, data: dict[str, Any], source: str = "config") -> LoopConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"{source}: {format_errors(exc)}") from None


def format_errors(exc: ValidationError) -> str:
    """pydantic's error list as one line: `field.path: what is wrong` joined by `; `."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (see docs/loop.md for the fields)"
        elif error["type"] == "missing":
            message = "required field is missing"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _refuse_owned(section: str, values: dict[str, Any], owned: dict[str, str]) -> None:
    for key in values:
        if key in owned:
            raise ValueError(f"{section}.{key} is set by the loop; use {owned[key]}")


def _build(section: str, model: type, values: dict[str, Any]) -> Any:
    try:
        return model(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(f"{section}.{where}: {message}" if where else f"{section}: {message}")
        raise ValueError("; ".join(problems)) from None


def engine_spec_of(model: str) -> str:
    """A policy model (`default`, a folder, an HF id, `hf:...`) as the engine spec `rlaif label` samples with."""
    return model if model == "default" or model.startswith("hf:") else f"hf:{model}"


def derive(seed: int, stage: str, round_index: int) -> int:
    """A stable 31-bit seed for one stage of one round."""
    digest = hashlib.sha256(f"{seed}:{stage}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def expand(text: str) -> str:
    """`${VAR}` / `$VAR` from the environment; `RLAIF_CACHE_DIR` falls back to the cache the tools use."""
    if "RLAIF_CACHE_DIR" in text and "RLAIF_CACHE_DIR" not in os.environ:
        from rlaif.judge.models import cache_root

        text = text.replace("${RLAIF_CACHE_DIR}", str(cache_root())).replace("$RLAIF_CACHE_DIR", str(cache_root()))
    return os.path.expandvars(text)
