"""`PPOConfig`: every knob of a policy-training run, documented once, loadable from YAML.

Defaults follow what published RLHF/RLAIF trainers converge on (see
/work/shared/REFERENCES.md): clip 0.2, value clip 0.2, gamma 1, lambda 0.95, KL coef 0.05
with the k1 estimator in the reward (Ziegler et al. 2019; RLAIF used beta = 0.05), gradient
clipping at 1.0, sampling temperature 0.9 (RLAIF).

The CLI (`rlaif ppo`) turns every field into a flag, so the `description` below is also the
`--help` text. Usage:

    config = PPOConfig.from_yaml("ppo.yaml")           # or PPOConfig(steps=10, ...)
    config = config.model_copy(update={"steps": 20})   # overrides; re-validate with
    PPOConfig.model_validate(config.model_dump())       # if the values came from users
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Estimator = Literal["ppo", "rloo", "grpo"]


class ConfigError(ValueError):
    """A config file could not be read or does not validate; the message says how to fix it."""


class PPOConfig(BaseModel):
    """Configuration of one PPO / RLOO / GRPO run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- models
    policy: str = Field("default", description=(
        "Policy to fine-tune: `default` (the embedded SmolLM2-135M-Instruct), a local "
        "save_pretrained directory, a Hugging Face model id, or `hf:<id or path>`."))
    dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "Parameter dtype of policy, reference and value model. float32 is the safe choice for "
        "AdamW; bfloat16 halves memory on GPUs."))
    device: str = Field("auto", description="`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ...")
    lora_r: int | None = Field(None, ge=1, description=(
        "LoRA rank; unset = full fine-tuning. With LoRA the reference model is the policy with its "
        "adapter disabled, so no second copy of the weights is kept."))
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "LoRA dropout. Kept at 0 by default: dropout makes the PPO ratio differ from 1 before any update."))
    lora_target_modules: list[str] | None = Field(None, description=(
        "Module names LoRA adapts; unset = every linear layer except the LM head (peft's `all-linear`)."))

    # --- data
    prompts: str | None = Field(None, description=(
        "Prompt file: .jsonl/.json with a `prompt`, `instruction` or `turns` column, or .txt with one prompt per line."))
    prompt_column: str | None = Field(None, description="Column holding the prompt; unset = first of prompt, instruction, turns.")
    chat_template: bool = Field(True, description=(
        "Wrap each prompt as a user message with the tokenizer's chat template (when it has one)."))
    max_prompt_length: int = Field(512, ge=1, description="Prompts longer than this many tokens keep their last tokens.")

    # --- reward
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
    reward_mode: Literal["score", "pairwise"] = Field("score", description=(
        "`score`: the judge's rescaled score of each response (d-RLAIF); `pairwise`: win probability against a "
        "reference response (the frozen initial policy's greedy answer, or reference_column)."))
    reward_scale: Literal["unit", "signed"] = Field("unit", description=(
        "Judge rewards in [0, 1] (`unit`) or rescaled to [-1, 1] as 2r - 1 (`signed`, d-RLAIF's range)."))
    judge_mode: Literal["logprob", "cot"] = Field("logprob", description=(
        "`logprob`: read the label distribution directly; `cot`: generate a rationale first (the rubric needs a cot section)."))
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

    # --- estimator
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

    # --- schedule
    steps: int = Field(100, ge=1, description="Training steps; each step samples `batch_size` prompts.")
    batch_size: int = Field(8, ge=1, description="Prompts per step (the rollout batch holds batch_size * group_size responses).")
    ppo_epochs: int = Field(4, ge=1, description="Optimization passes over each rollout batch.")
    num_minibatches: int = Field(1, ge=1, description="Minibatches per pass: one optimizer step each.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated into each minibatch's optimizer step.")
    forward_batch_size: int = Field(16, ge=1, description="Sequences per no-grad forward pass when computing rollout log-probs and values.")

    # --- optimization
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate of the policy (1e-6 to 3e-6 is typical for full fine-tuning; ~1e-5 for LoRA).")
    value_learning_rate: float | None = Field(None, gt=0, description="AdamW learning rate of the value model; unset = learning_rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm of each model to this; unset = no clipping.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip: new values stay within this of the rollout values.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor (1 = undiscounted, usual for LM episodes).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: bias/variance trade-off of the advantage estimate.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (0 = none).")
    whiten_advantages: bool = Field(True, description=(
        "Normalize advantages to zero mean / unit variance over the batch (ppo and rloo; grpo already normalizes per group)."))

    # --- KL
    kl_coef: float = Field(0.05, ge=0, description=(
        "KL coefficient beta. ppo: per-token penalty in the reward; rloo: on the sequence reward; grpo: weight of the k3 KL loss."))
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimator used in the reward penalty (ppo, rloo).")
    adaptive_kl: bool = Field(False, description="Adapt kl_coef toward kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Target sequence KL (nats) of the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller horizon in samples: larger = slower changes.")

    # --- sampling
    temperature: float = Field(0.9, gt=0, description="Sampling temperature for rollouts (log-probs use the same temperature).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold for rollouts (1 = off).")
    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens.")

    # --- run
    seed: int = Field(0, description="Seed for prompt order, sampling and value-head initialization.")
    output_dir: str = Field("runs/ppo", description="Run directory: metrics.jsonl, samples.jsonl, plots, checkpoint-*/.")
    save_every: int = Field(50, ge=0, description="Save checkpoint-{step}/ every N steps (0 = only at the end).")
    resume: bool = Field(False, description="Continue from the latest complete checkpoint in output_dir.")
    log_every: int = Field(1, ge=1, description="Write metrics every N steps.")
    plot_every: int = Field(10, ge=0, description="Redraw training_curves.png every N steps (0 = only at checkpoints and the end).")
    log_samples: int = Field(2, ge=0, description="Prompt/response/reward examples written to samples.jsonl per logged step.")
    tensorboard: bool = Field(True, description="Also log to TensorBoard when the `tensorboard` package is installed.")

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
    def _check_consistency(self) -> PPOConfig:
        if self.estimator in ("rloo", "grpo") and self.group_size < 2:
            raise ValueError(
                f"estimator={self.estimator!r} compares samples of the same prompt, so it needs group_size >= 2 "
                f"(got {self.group_size}); set e.g. group_size: 4")
        rollouts = self.batch_size * self.group_size
        parts = self.num_minibatches * self.gradient_accumulation_steps
        if rollouts < parts:
            raise ValueError(
                f"batch_size * group_size = {rollouts} responses cannot fill num_minibatches * "
                f"gradient_accumulation_steps = {parts} micro-batches; lower num_minibatches or "
                f"gradient_accumulation_steps, or raise batch_size")
        given = [name for name in ("judge_url", "engine", "reward_model") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one reward source, not {' and '.join(given)}: judge_url (a judge service), "
                             "engine (an in-process judge) or reward_model (a `rlaif train-rm` directory)")
        if self.reward_model is not None and (self.rubric is not None or self.reward_mode != "score"
                                              or self.reference_column is not None):
            raise ValueError("rubric, reward_mode: pairwise and reference_column configure a judge; a reward_model "
                             "scores each response directly, so remove them or drop reward_model")
        if self.reference_column is not None and self.reward_mode != "pairwise":
            raise ValueError("reference_column only applies to reward_mode: pairwise; remove it or set reward_mode: pairwise")
        if self.rubric is not None:
            from rlaif.policy_training.judge_rewards import parse_rubric_weights

            parse_rubric_weights(self.rubric)  # raises ValueError with the accepted forms
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PPOConfig:
        """Load a config from a YAML mapping; `overrides` (e.g. CLI flags) win over the file."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of field: value, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validated(data, source=str(path))

    @classmethod
    def validated(cls, data: dict[str, Any], source: str = "config") -> PPOConfig:
        """Validate `data`, turning pydantic's error list into one message per field with a fix."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    def to_yaml(self, path: str | Path) -> None:
        """Write the full config (all fields, defaults included) as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def resolve_device(spec: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; any other device string as given."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: field, what is wrong, and what the field expects."""
    lines = [f"invalid PPO config in {source}:"]
    fields = PPOConfig.model_fields
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            close = _closest(str(err["loc"][0]), list(fields))
            hint = f" (did you mean `{close}`?)" if close else ""
            lines.append(f"  {loc}: unknown field{hint}; see `rlaif ppo --help` for the fields")
            continue
        if not err["loc"]:  # a cross-field check from the model validator: its message says it all
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        field = fields.get(str(err["loc"][0]))
        hint = f" -- {field.description}" if field is not None and field.description else ""
        lines.append(f"  {loc}: {msg} (got {err.get('input')!r}){hint}")
    return "\n".join(lines)


def _closest(name: str, candidates: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, candidates, n=1)
    return match[0] if match else None


def config_reference_markdown() -> str:
    """The field reference of `PPOConfig` as a Markdown table, generated from the field descriptions.

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

    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in PPOConfig.model_fields.items():
        default = json.dumps(field.default)
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {type_name(field.annotation)} | `{default}` | {description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the PPOConfig field reference.")
    parser.add_argument("--markdown", action="store_true", help="as a Markdown table (the only format)")
    parser.parse_args()
    print(config_reference_markdown())
