"""`PPOConfig`: every knob of a policy-training run in six sections, documented once, loadable from YAML.

Sections (one pydantic model each, `extra="forbid"`):

- `policy`       what is fine-tuned, what it is prompted with and how it samples rollouts;
- `reward`       where rewards come from (judge service, in-process judge, distilled RM) and how
                 missing or unnormalized rewards are handled;
- `ppo`          the estimator (ppo / rloo / grpo), its schedule, clipping, GAE and KL settings;
- `optimizer`    AdamW and gradient clipping;
- `logging`      the run directory: metrics, samples, plots, checkpoints, resume;
- `distributed`  how one update is laid out over devices and memory (device, forward chunking,
                 gradient accumulation); none of these change the update, only speed and memory.
                 The data-parallel group itself comes from the launcher (`torchrun`, `accelerate launch`).

Field names are unique across sections, so every field also has a *flat key*: `clip_range`
means `ppo.clip_range`, and `policy` (a string) means `policy.model`. Flat keys are what the
CLI flags are named after (`--clip-range`), what configs before the sections used, and what
`PPOConfig(clip_range=0.1)` accepts; in YAML files they still work but are deprecated in favour
of the sectioned form. Reading `config.clip_range` also still works (untyped; new code reads
`config.ppo.clip_range`).

Defaults follow what published RLHF/RLAIF trainers converge on (see the project's
REFERENCES.md): clip 0.2, value clip 0.2, gamma 1, lambda 0.95, KL coef 0.05 with the k1
estimator in the reward (Ziegler et al. 2019; RLAIF used beta = 0.05), gradient clipping at
1.0, sampling temperature 0.9 (RLAIF). Usage:

    config = PPOConfig.from_yaml("ppo.yaml")                  # or PPOConfig(steps=10, ...)
    config = config.updated(steps=20)                         # overrides (flat or sectioned), validated
    python -m rlaif.policy_training.config --markdown         # the field reference in docs/ppo.md
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from rlaif.policy_training.rubric_weights import parse_rubric_weights

Estimator = Literal["ppo", "rloo", "grpo"]
RewardMode = Literal["score", "pairwise", "checklist", "group"]


class ConfigError(ValueError):
    """A config file could not be read or does not validate; the message says how to fix it."""


def read_yaml_mapping(path: str | Path, *, shape: str = "field: value") -> dict[str, Any]:
    """A YAML config file's top-level mapping; a missing file, bad YAML or a non-mapping is a one-line `ConfigError`.

    Shared by every YAML config (`rlaif ppo --config`, `rlaif loop --config`) so they fail alike."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {shape}, got {type(data).__name__}")
    return data


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicyConfig(_Section):
    """The policy, its prompts and how rollouts are sampled."""

    model: str = Field("default", description=(
        "Policy to fine-tune: `default` (the embedded SmolLM2-135M-Instruct), a local "
        "save_pretrained directory, a Hugging Face model id, or `hf:<id or path>`."))
    dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "Parameter dtype of policy, reference and value model. float32 is the safe choice for "
        "AdamW; bfloat16 halves memory on GPUs."))
    lora_r: int | None = Field(None, ge=1, description=(
        "LoRA rank; unset = full fine-tuning. With LoRA the reference model is the policy with its "
        "adapter disabled, so no second copy of the weights is kept."))
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "LoRA dropout. Kept at 0 by default: dropout makes the PPO ratio differ from 1 before any update."))
    lora_target_modules: list[str] | None = Field(None, description=(
        "Module names LoRA adapts; unset = every linear layer except the LM head (peft's `all-linear`)."))
    prompts: str | None = Field(None, description=(
        "Prompt file: .jsonl/.json with a `prompt`, `instruction` or `turns` column, or .txt with one prompt per line."))
    prompt_column: str | None = Field(None, description="Column holding the prompt; unset = first of prompt, instruction, turns.")
    chat_template: bool = Field(True, description=(
        "Wrap each prompt as a user message with the tokenizer's chat template (when it has one)."))
    max_prompt_length: int = Field(512, ge=1, description="Prompts longer than this many tokens keep their last tokens.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature for rollouts (log-probs use the same temperature).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold for rollouts (1 = off).")
    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens.")


class RewardTerm(_Section):
    """One term of a reward mixture (`reward.rewards`): a judge rubric or a verifier, with its weight.

    In YAML a mapping (`{judge: helpfulness, weight: 1}`, `{verifier: mypkg.checks:is_valid_json, weight: 0.5}`);
    on the command line a string (`--rewards judge=helpfulness,weight=1 --rewards verifier=numeric,weight=0.5`)."""

    judge: str | None = Field(None, description="Rubric id or YAML path, judged by the configured judge (engine or judge_url).")
    verifier: str | None = Field(None, description=(
        "`module:function` with TRL's reward-function signature, or a built-in check: exact, numeric, regex "
        "(against each prompt's reference answer, `answer_column`)."))
    weight: float = Field(1.0, description="Weight of this term in the sum.")
    mode: RewardMode | None = Field(None, description="Judge terms: reward mode of this term; unset = reward.reward_mode.")
    name: str | None = Field(None, description="Name logged as reward/<name>; unset = the rubric id or the verifier name.")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parsed: dict[str, str] = {}
        for part in value.split(","):
            key, sep, text = part.partition("=")
            if not sep:
                raise ValueError(f"reward term {value!r}: write key=value pairs, e.g. judge=helpfulness,weight=1 or "
                                 "verifier=mypkg.checks:is_valid_json,weight=0.5")
            parsed[key.strip()] = text.strip()
        return parsed

    @model_validator(mode="after")
    def _one_kind(self) -> RewardTerm:
        if (self.judge is None) == (self.verifier is None):
            raise ValueError("a reward term is either `judge: <rubric>` or `verifier: <module:function | exact | "
                             "numeric | regex>`, not both or neither")
        if self.verifier is not None and self.mode is not None:
            raise ValueError(f"`mode` applies to judge terms; verifier {self.verifier!r} scores each response itself")
        return self

    @property
    def label(self) -> str:
        """The name its values are logged under."""
        if self.name:
            return self.name
        if self.judge is not None:
            return Path(self.judge).stem if self.judge.endswith((".yaml", ".yml")) else self.judge
        assert self.verifier is not None
        return self.verifier.rpartition(":")[2] or self.verifier


class RewardConfig(_Section):
    """Where rewards come from and what happens to them before the estimator sees them."""

    judge_url: str | None = Field(None, description="URL of a running `rlaif serve` judge service to score responses.")
    engine: str | None = Field(None, description=(
        "Engine spec for an in-process judge (`default`, `hf:<model>`, `vllm:<model>`, `openai:<url>#<model>`)."))
    reward_model: str | None = Field(None, description=(
        "Directory written by `rlaif train-rm`: score responses with this distilled reward model (one forward "
        "pass per response) instead of a judge. Its raw scores are the rewards (reward_mode/rubric do not apply)."))
    reward_model_batch_size: int = Field(16, ge=1, description="reward_model: sequences per scoring forward pass.")
    rubric: str | None = Field(None, description=(
        "Rubric id (built-in library) or rubric YAML path; unset = the judge's default for reward_mode. Several "
        "rubrics are combined as a weighted sum: `helpfulness:0.7,harmlessness:0.3` (in YAML also a list of "
        "`id:weight` strings or a mapping id: weight). A sample missing any component gets no reward."))
    reward_mode: RewardMode = Field("score", description=(
        "`score`: the judge's rescaled score of each response (d-RLAIF); `pairwise`: win probability against a "
        "reference response (the frozen initial policy's greedy answer, or reference_column); `checklist`: weighted "
        "P(yes) over each prompt's own criteria (criteria_column); `group`: the group_size responses of a prompt "
        "judged together (group_method), for estimator rloo / grpo."))
    checklist_mode: Literal["explicit", "implicit"] = Field("explicit", description=(
        "reward_mode checklist: `explicit` = one yes/no question per criterion; `implicit` = the whole checklist in one "
        "score prompt."))
    criteria_column: str | None = Field(None, description=(
        "reward_mode checklist: column of the prompt file holding each prompt's checklist (a list of texts or "
        "{text, weight}); unset = `criteria`."))
    answer_column: str | None = Field(None, description=(
        "Column of the prompt file holding each prompt's reference answer: shown to reference-guided rubrics "
        "(correctness, correctness-pairwise; checklist and group rubrics use it too) and passed to verifiers as "
        "`reference`."))
    group_method: Literal["listwise", "round_robin"] = Field("listwise", description=(
        "reward_mode group: `listwise` = the group in one prompt, averaged over group_orders seeded orders; "
        "`round_robin` = every pair in both orders, Bradley-Terry fit."))
    group_orders: int = Field(4, ge=1, le=32, description=(
        "reward_mode group, listwise: presentation orders averaged (each costs about one pass over the group)."))
    rewards: list[RewardTerm] | None = Field(None, description=(
        "A weighted mixture of judge rubrics and verifiers, e.g. `[{judge: helpfulness, weight: 1}, {verifier: "
        "mypkg.checks:is_valid_json, weight: 0.5}]`; each term is logged as reward/<name>. Judge terms use "
        "engine / judge_url; a mixture of verifiers alone needs no judge. Replaces `rubric`."))
    reward_scale: Literal["unit", "signed"] = Field("unit", description=(
        "Judge rewards in [0, 1] (`unit`) or rescaled to [-1, 1] as 2r - 1 (`signed`, d-RLAIF's range)."))
    judge_mode: Literal["logprob", "cot"] = Field("logprob", description=(
        "`logprob`: read the label distribution directly; `cot`: generate a rationale first (the rubric needs a cot section)."))
    calibration: list[str] | None = Field(None, description=(
        "engine + reward_mode pairwise: calibration files (`rlaif calibrate`), one per pairwise rubric, applied to that "
        "rubric's judgments. A judge service (judge_url) applies its own (`rlaif serve --calibration`)."))
    reference_column: str | None = Field(None, description=(
        "reward_mode pairwise: column of the prompt file holding each prompt's reference response; unset = the "
        "frozen initial policy's greedy response, generated once per prompt by the trainer."))
    judge_timeout: float = Field(300.0, gt=0, description=(
        "judge_url: seconds one HTTP request may take; a request that times out leaves its samples without reward."))
    judge_retries: int = Field(4, ge=0, description=(
        "judge_url: extra attempts (exponential backoff, honouring Retry-After) on 429/503/connection errors."))
    judge_concurrency: int = Field(4, ge=1, description=(
        "judge_url: requests in flight at once (one per rubric and chunk); the service batches them together."))
    judge_api_key_env: str = Field("RLAIF_JUDGE_API_KEY", description=(
        "judge_url: environment variable holding the service's bearer token (the key itself never goes in a config "
        "file, which is copied into every checkpoint)."))
    normalize_rewards: bool = Field(False, description="Normalize rewards with running mean/std before use.")
    reward_clip: float | None = Field(None, gt=0, description="Clip (normalized) rewards to [-reward_clip, reward_clip]; unset = no clipping.")
    on_missing_reward: Literal["fail", "skip"] = Field("fail", description=(
        "When the reward source cannot score a sample (returns None): `fail` stops the run, `skip` drops "
        "those samples from the step's loss and logs how many."))
    missing_eos_penalty: float | None = Field(None, ge=0, description=(
        "Subtracted from the reward of responses that hit max_new_tokens without EOS; unset = no penalty."))

    @field_validator("rubric", mode="before")
    @classmethod
    def _rubric_weights_to_text(cls, value: Any) -> Any:
        """A YAML list (`[helpfulness:0.7, harmlessness:0.3]`) or mapping (`{helpfulness: 0.7}`) becomes the
        one-line form, so the field, its CLI flag and checkpoints all hold one spelling."""
        if isinstance(value, dict):
            return ",".join(f"{k}:{v}" for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return value

    @model_validator(mode="after")
    def _check_sources(self) -> RewardConfig:
        if self.rewards is not None:
            if not self.rewards:
                raise ValueError("rewards: give at least one term, or remove the field")
            if self.rubric is not None:
                raise ValueError("rewards replaces rubric: write each rubric as a `{judge: <rubric>, weight: w}` term")
            if self.reward_model is not None:
                raise ValueError("rewards mixes judges and verifiers; a reward_model cannot be one of its terms")
            if any(t.judge is not None for t in self.rewards) and self.judge_url is None and self.engine is None:
                raise ValueError("rewards has judge terms but no judge: set engine (in-process) or judge_url (a service)")
        given = [name for name in ("judge_url", "engine", "reward_model") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one reward source, not {' and '.join(given)}: judge_url (a judge service), "
                             "engine (an in-process judge) or reward_model (a `rlaif train-rm` directory)")
        if self.reward_model is not None and (self.rubric is not None or self.reward_mode != "score"
                                              or self.reference_column is not None):
            raise ValueError("rubric, reward_mode: pairwise and reference_column configure a judge; a reward_model "
                             "scores each response directly, so remove them or drop reward_model")
        pairwise_terms = self.reward_mode == "pairwise" or any(t.mode == "pairwise" for t in self.rewards or [])
        if self.reference_column is not None and not pairwise_terms:
            raise ValueError("reference_column only applies to reward_mode: pairwise; remove it or set reward_mode: pairwise")
        if self.reward_model is not None and (self.answer_column or self.criteria_column):
            raise ValueError("answer_column and criteria_column feed the judge and verifiers; a reward_model ignores them")
        if self.rubric is not None:
            parse_rubric_weights(self.rubric)  # raises ValueError with the accepted forms
        return self


class EstimatorConfig(_Section):
    """The policy-gradient estimator, its schedule and its clipping / GAE / KL settings."""

    estimator: Estimator = Field("ppo", description=(
        "`ppo`: GAE with a learned value model; `rloo`: leave-one-out group baseline (Ahmadian et al. 2024); "
        "`grpo`: group-normalized advantages with a k3 KL loss (Shao et al. 2024)."))
    group_size: int = Field(1, ge=1, description=(
        "Responses sampled per prompt. rloo and grpo need >= 2; ppo may use any value."))
    value_model: Literal["separate", "shared"] = Field("separate", description=(
        "ppo critic: `separate` = its own copy of the policy trunk with a scalar head (TRL 1.12's layout; value "
        "updates cannot disturb the policy); `shared` = a scalar head on the policy's last hidden state, trained "
        "through the policy trunk with weight vf_coef (TRL <= 0.11's value head, trlx): one forward and one "
        "backward per micro-batch instead of two, about half the update time and one model less in memory."))
    vf_coef: float = Field(0.1, ge=0, description="value_model shared: weight of the value loss in the joint loss.")
    steps: int = Field(100, ge=1, description="Training steps; each step samples `batch_size` prompts.")
    batch_size: int = Field(8, ge=1, description="Prompts per step (the rollout batch holds batch_size * group_size responses).")
    ppo_epochs: int = Field(4, ge=1, description="Optimization passes over each rollout batch.")
    num_minibatches: int = Field(1, ge=1, description="Minibatches per pass: one optimizer step each.")
    seed: int = Field(0, description="Seed for prompt order, sampling and value-head initialization.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip: new values stay within this of the rollout values.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor (1 = undiscounted, usual for LM episodes).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: bias/variance trade-off of the advantage estimate.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (0 = none).")
    whiten_advantages: bool = Field(True, description=(
        "Normalize advantages to zero mean / unit variance over the batch (ppo and rloo; grpo already normalizes per group)."))
    kl_coef: float = Field(0.05, ge=0, description=(
        "KL coefficient beta. ppo: per-token penalty in the reward; rloo: on the sequence reward; grpo: weight of the k3 KL loss."))
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimator used in the reward penalty (ppo, rloo).")
    adaptive_kl: bool = Field(False, description="Adapt kl_coef toward kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Target sequence KL (nats) of the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller horizon in samples: larger = slower changes.")

    @model_validator(mode="after")
    def _check_groups(self) -> EstimatorConfig:
        if self.estimator in ("rloo", "grpo") and self.group_size < 2:
            raise ValueError(
                f"estimator={self.estimator!r} compares samples of the same prompt, so it needs group_size >= 2 "
                f"(got {self.group_size}); set e.g. group_size: 4")
        return self


class OptimizerConfig(_Section):
    """AdamW for the policy (and the critic) and gradient clipping."""

    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate of the policy (1e-6 to 3e-6 is typical for full fine-tuning; ~1e-5 for LoRA).")
    value_learning_rate: float | None = Field(None, gt=0, description="AdamW learning rate of the value model; unset = learning_rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm of each model to this; unset = no clipping.")


class LoggingConfig(_Section):
    """The run directory: metrics, samples, plots and checkpoints."""

    output_dir: str = Field("runs/ppo", description=(
        "Run directory: metrics.jsonl, samples.jsonl, plots, checkpoint-*/ and `latest` (a link to the newest checkpoint)."))
    save_every: int = Field(50, ge=0, description="Save checkpoint-{step}/ every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(1, ge=0, description=(
        "Complete checkpoints kept in output_dir: after each save the older ones are deleted (1 = only the latest, "
        "all that resume needs; 0 = keep every one). A full fine-tune of the 135M policy is ~3.1 GB per checkpoint."))
    save_optimizer: bool = Field(True, description=(
        "Save the AdamW states (optimizer.pt, two thirds of a full fine-tune's checkpoint). Without them resume "
        "restarts the optimizer from zero moments (weights, KL coefficient, prompt order and RNG still continue)."))
    resume: bool = Field(False, description="Continue from the latest complete checkpoint in output_dir.")
    log_every: int = Field(1, ge=1, description="Write metrics every N steps.")
    plot_every: int = Field(10, ge=0, description="Redraw training_curves.png every N steps (0 = only at checkpoints and the end).")
    log_samples: int = Field(2, ge=0, description="Prompt/response/reward examples written to samples.jsonl per logged step.")
    tensorboard: bool = Field(True, description="Also log to TensorBoard when the `tensorboard` package is installed.")


class DistributedConfig(_Section):
    """Where the work runs and how it is chunked; changes speed and memory, never the update."""

    device: str = Field("auto", description="`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ...")
    forward_batch_size: int = Field(16, ge=1, description="Sequences per no-grad forward pass when computing rollout log-probs and values.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated into each minibatch's optimizer step.")


SECTIONS: dict[str, type[_Section]] = {
    "policy": PolicyConfig, "reward": RewardConfig, "ppo": EstimatorConfig, "optimizer": OptimizerConfig,
    "logging": LoggingConfig, "distributed": DistributedConfig,
}
"""Section name -> its model, in the order of the YAML layout and the docs."""

FLAT_ALIASES = {("policy", "model"): "policy"}
"""Fields whose flat key is not their own name (`policy: default` predates the `policy` section)."""

FLAT_KEYS: dict[str, tuple[str, str]] = {
    FLAT_ALIASES.get((section, field), field): (section, field)
    for section, model in SECTIONS.items() for field in model.model_fields
}
"""Flat key (CLI flag name, pre-section YAML key) -> (section, field)."""


def flat_key(section: str, field: str) -> str:
    return FLAT_ALIASES.get((section, field), field)


def nest(data: Mapping[str, Any], source: str = "config") -> tuple[dict[str, Any], list[str]]:
    """Move flat keys into their sections. Returns the nested mapping and the flat keys that were moved.

    `policy` is the section when it holds a mapping and the flat key of `policy.model` when it
    holds anything else. A flat key and its sectioned spelling with different values is an error.
    Unknown keys are left where they are, so validation reports them with a suggestion.
    """
    nested: dict[str, Any] = {}
    moved: list[str] = []
    flat_items = []
    for key, value in data.items():
        if isinstance(value, _Section):
            value = value.model_dump()
        if key in SECTIONS and (key != "policy" or isinstance(value, Mapping)):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section `{key}` must be a mapping of field: value, got {value!r}")
            nested.setdefault(key, {}).update(value)
        else:
            flat_items.append((key, value))
    for key, value in flat_items:
        if key not in FLAT_KEYS:
            nested[key] = value
            continue
        section, field = FLAT_KEYS[key]
        target = nested.setdefault(section, {})
        if field in target and target[field] != value:
            raise ConfigError(f"{source}: `{key}` is given twice, as `{key}: {value!r}` and as "
                              f"`{section}.{field}: {target[field]!r}`; keep the `{section}:` one")
        target[field] = value
        moved.append(key)
    return nested, moved


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` wins, section by section."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


class PPOConfig(BaseModel):
    """Configuration of one PPO / RLOO / GRPO run: six sections (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    policy: PolicyConfig = Field(default_factory=PolicyConfig, description=PolicyConfig.__doc__)
    reward: RewardConfig = Field(default_factory=RewardConfig, description=RewardConfig.__doc__)
    ppo: EstimatorConfig = Field(default_factory=EstimatorConfig, description=EstimatorConfig.__doc__)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description=OptimizerConfig.__doc__)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description=LoggingConfig.__doc__)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description=DistributedConfig.__doc__)

    @model_validator(mode="before")
    @classmethod
    def _accept_flat_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return nest(data)[0]
        return data

    @model_validator(mode="after")
    def _check_group_rewards(self) -> PPOConfig:
        modes = {self.reward.reward_mode} if self.reward.rewards is None else {
            t.mode or self.reward.reward_mode for t in self.reward.rewards if t.judge is not None}
        if "group" in modes and self.ppo.estimator not in ("rloo", "grpo"):
            raise ValueError(f"reward_mode group judges the group_size responses of each prompt against each other; it "
                             f"needs ppo.estimator rloo or grpo (got {self.ppo.estimator!r}), whose advantages are "
                             "relative within a group too")
        return self

    @model_validator(mode="after")
    def _check_layout(self) -> PPOConfig:
        rollouts = self.ppo.batch_size * self.ppo.group_size
        parts = self.ppo.num_minibatches * self.distributed.gradient_accumulation_steps
        if rollouts < parts:
            raise ValueError(
                f"ppo.batch_size * ppo.group_size = {rollouts} responses cannot fill ppo.num_minibatches * "
                f"distributed.gradient_accumulation_steps = {parts} micro-batches; lower num_minibatches or "
                f"gradient_accumulation_steps, or raise batch_size")
        return self

    if not TYPE_CHECKING:  # flat reads for configs written before the sections; invisible to the type checker
        def __getattr__(self, name: str) -> Any:
            if name in FLAT_KEYS:
                section, field = FLAT_KEYS[name]
                return getattr(getattr(self, section), field)
            return super().__getattr__(name)

    def flat(self) -> dict[str, Any]:
        """Every field under its flat key (JSON-compatible values): the CLI's and old checkpoints' view."""
        dumped = self.model_dump(mode="json")
        return {flat_key(s, f): dumped[s][f] for s, model in SECTIONS.items() for f in model.model_fields}

    def updated(self, **changes: Any) -> PPOConfig:
        """A validated copy with `changes` (flat keys or sections) applied."""
        return type(self).validated(_merge(self.model_dump(), nest(changes)[0]), source="overrides")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PPOConfig:
        """Load a config from a YAML mapping; `overrides` (e.g. CLI flags, flat keys) win over the file."""
        data = read_yaml_mapping(path, shape="section: {field: value}")
        nested, moved = nest(data, str(path))
        if moved:
            where = ", ".join(f"{k} -> {FLAT_KEYS[k][0]}.{FLAT_KEYS[k][1]}" for k in moved)
            warnings.warn(f"{path}: flat keys are deprecated in config files; write them under their sections "
                          f"({where})", DeprecationWarning, stacklevel=2)
        given, _ = nest({k: v for k, v in overrides.items() if v is not None}, "overrides")
        return cls.validated(_merge(nested, given), source=str(path))

    @classmethod
    def validated(cls, data: Mapping[str, Any], source: str = "config") -> PPOConfig:
        """Validate `data` (flat or sectioned), turning pydantic's error list into one message per field with a fix."""
        try:
            return cls.model_validate(nest(data, source)[0])
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    def to_yaml(self, path: str | Path) -> None:
        """Write the full config (all sections, defaults included) as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def flatten_saved(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict from a checkpoint, sectioned (now) or flat (before the sections), as flat keys."""
    flat: dict[str, Any] = {}
    for key, value in saved.items():
        if key in SECTIONS and isinstance(value, Mapping):
            flat.update({flat_key(key, f): v for f, v in value.items()})
        else:
            flat[key] = value
    return flat


def resolve_device(spec: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; any other device string as given."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: section.field, what is wrong, and what the field expects."""
    lines = [f"invalid PPO config in {source}:"]
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {'.'.join(loc)}: unknown field{_suggestion(loc)}; see `rlaif ppo --help` for the fields")
            continue
        if not loc:  # a cross-section check: its message says it all
            lines.append(f"  {msg}")
            continue
        section = SECTIONS.get(loc[0])
        field = section.model_fields.get(loc[1]) if section is not None and len(loc) > 1 else None
        if field is None:  # a check across one section's fields
            lines.append(f"  {'.'.join(loc)}: {msg}")
            continue
        hint = f" -- {field.description}" if field.description else ""
        lines.append(f"  {'.'.join(loc)}: {msg} (got {err.get('input')!r}){hint}")
    return "\n".join(lines)


def _suggestion(loc: list[str]) -> str:
    import difflib

    if len(loc) == 1:  # a top-level key: a section or a flat key
        match = difflib.get_close_matches(loc[0], [*FLAT_KEYS, *SECTIONS], n=1)
        if not match:
            return ""
        where = f", i.e. {'.'.join(FLAT_KEYS[match[0]])}" if match[0] in FLAT_KEYS else " (a section)"
        return f" (did you mean `{match[0]}`{where}?)"
    section = SECTIONS.get(loc[0])
    match = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1) if section is not None else []
    if match:
        return f" (did you mean `{loc[0]}.{match[0]}`?)"
    owner = FLAT_KEYS.get(loc[-1])
    return f" (`{loc[-1]}` belongs in `{owner[0]}`)" if owner else ""


def config_reference_markdown() -> str:
    """The field reference of `PPOConfig` as Markdown tables, one per section, generated from the descriptions.

    docs/ppo.md embeds this output, so the documentation cannot drift from the code:
    `python -m rlaif.policy_training.config --markdown`.
    """
    import json
    import typing

    def type_name(annotation: Any) -> str:
        if typing.get_origin(annotation) is Literal:
            return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
        text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
        return f"`{text or str(annotation).replace('typing.', '')}`".replace("|", "\\|")  # | would end the cell

    lines: list[str] = []
    for name, section in SECTIONS.items():
        lines += [f"**`{name}`**: {section.__doc__}", "",
                  "| field | flat key / flag | type | default | description |", "|---|---|---|---|---|"]
        for field_name, field in section.model_fields.items():
            default = json.dumps(field.default)
            description = (field.description or "").replace("|", "\\|")
            flat = flat_key(name, field_name)
            lines.append(f"| `{name}.{field_name}` | `{flat}` / `--{flat.replace('_', '-')}` | "
                         f"{type_name(field.annotation)} | `{default}` | {description} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the PPOConfig field reference.")
    parser.add_argument("--markdown", action="store_true", help="as Markdown tables (the only format)")
    parser.parse_args()
    print(config_reference_markdown())
