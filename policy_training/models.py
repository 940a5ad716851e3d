"""The trainer's models: policy, frozen reference, critic (separate `ValueModel` or a shared head), optimizers.

`build_models(config, device, checkpoint)` loads everything one run trains or reads:

- the policy (full fine-tuning, or LoRA adapters via peft);
- the reference: a frozen copy of the initial policy (with LoRA: the policy with its adapter
  disabled, so no second copy of the weights is kept); resuming never replaces it by the
  checkpoint's policy;
- the critic, only for the `ppo` estimator: `ValueModel`, a copy of the policy's trunk with a
  zero-initialized scalar head (TRL 1.12 / OpenRLHF layout), or with `value_model: shared` a
  scalar head on the policy's own last hidden state (TRL <= 0.11's value head);
- AdamW for the policy (plus the shared head) and, with a separate critic, for the critic.
  The fused CPU/GPU kernel is used where torch has one (what HF `Trainer`, and so TRL,
  uses by default): the same update as the per-parameter loop, one pass over the weights.

Dropout stays off throughout (models are kept in eval mode while their gradients flow):
with dropout on, the new/old probability ratio would differ from 1 before any update and
PPO's clipping would fire on noise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rlaif.policy_training.config import ConfigError, PPOConfig
from torch import Tensor, nn

VALUE_HEAD_FILE = "value_head.safetensors"


def resolve_model_path(spec: str) -> str:
    """Policy spec -> something `from_pretrained` accepts. `default` = the embedded SmolLM2."""
    if spec == "default":
        from rlaif.judge.models import plain_checkpoint

        return str(plain_checkpoint())
    if spec.startswith("hf:"):
        spec, _, query = spec[3:].partition("?")
        if "gguf_file" in query:
            raise ConfigError(f"policy {spec!r} with a GGUF file is quantized and cannot be fine-tuned; "
                              f"convert it to a plain checkpoint first (see rlaif.judge.models.plain_checkpoint)")
    if spec.startswith(("vllm:", "openai:")):
        raise ConfigError(f"policy {spec!r} is an inference-only engine spec; the policy must be trainable: "
                          f"give `default`, a directory, a Hugging Face id or `hf:<id or path>`")
    return spec


class ValueModel(nn.Module):
    """A copy of the policy's transformer trunk with a scalar head: V(prompt + response[:t]).

    Separate weights from the policy (no shared trunk) so the value loss cannot distort the
    policy's representations; the head starts at zero, so initial values are 0 rather than
    arbitrary numbers that the first updates would have to unlearn.
    """

    head: nn.Linear

    def __init__(self, trunk: Any, hidden_size: int | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        hidden = hidden_size or trunk.config.get_text_config().hidden_size
        self.head = zero_linear(hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L) values."""
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        hidden = out.last_hidden_state  # (B, L, H)
        values: Tensor = self.head(hidden.float()).squeeze(-1)  # (B, L)
        return values

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        self.trunk.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(path / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ValueModel:
        from safetensors.torch import load_file
        from transformers import AutoModel

        trunk = AutoModel.from_pretrained(str(path), dtype=dtype)
        model = cls(trunk)
        model.head.load_state_dict(load_file(str(Path(path) / VALUE_HEAD_FILE)))
        return model


def zero_linear(hidden: int) -> nn.Linear:
    """A float32 scalar head starting at 0, so initial values are 0 rather than noise to unlearn."""
    head = nn.Linear(hidden, 1, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@dataclass
class PolicyModels:
    """Everything with weights in one run."""

    policy: Any  # a transformers causal LM, or a peft `PeftModel` around one
    ref_model: Any | None  # None with LoRA: the reference is the policy with its adapter disabled
    tokenizer: Any
    eos_ids: list[int]
    value_model: ValueModel | None
    value_head: nn.Linear | None
    policy_optimizer: torch.optim.Optimizer
    value_optimizer: torch.optim.Optimizer | None

    @property
    def has_critic(self) -> bool:
        return self.value_model is not None or self.value_head is not None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.policy_optimizer] + ([self.value_optimizer] if self.value_optimizer is not None else [])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for opt in self.optimizers for p in optimized_parameters(opt)]


def optimized_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def adamw(params: Any, device: torch.device, **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this device has one (same update, one pass over the weights)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def build_models(config: PPOConfig, device: torch.device, checkpoint: Path | None,
                 init_policy: str | Path | None = None) -> PolicyModels:
    """Load policy, reference, critic and optimizers (weights from `checkpoint` when resuming).

    `init_policy`: start the policy from these weights (a `policy/` folder of an earlier run: full
    weights, or LoRA adapters over `config.policy.model`) while the reference stays
    `config.policy.model`. `rlaif loop` uses it so that every round continues the previous round's
    policy and its KL is still measured against the round-0 policy. A `checkpoint` wins over it."""
    from rlaif.judge.models import load_causal_lm

    cfg = config
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.policy.dtype]
    base, tokenizer = load_causal_lm(resolve_model_path(cfg.policy.model), dtype=cfg.policy.dtype, device=str(device))
    eos = {tokenizer.eos_token_id}
    gen_eos = base.generation_config.eos_token_id
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    eos_ids = sorted(i for i in eos if i is not None)
    assert eos_ids, "the tokenizer has no EOS token; the trainer needs one to end responses"
    assert tokenizer.pad_token_id not in eos_ids, "pad token must differ from EOS (see rlaif.judge.models)"

    value_model: ValueModel | None = None
    value_head: nn.Linear | None = None
    if cfg.ppo.estimator == "ppo" and cfg.ppo.value_model == "shared":
        # V(s) read from the policy's own last hidden state: one forward serves both.
        value_head = zero_linear(base.config.get_text_config().hidden_size)
        if checkpoint is not None:
            from safetensors.torch import load_file

            value_head.load_state_dict(load_file(str(checkpoint / VALUE_HEAD_FILE)))
        value_head.to(device)
    elif cfg.ppo.estimator == "ppo":
        if checkpoint is not None:
            value_model = ValueModel.from_pretrained(checkpoint / "value", dtype=dtype)
        else:
            # The critic starts from the same pretrained trunk as the policy (TRL, OpenRLHF).
            value_model = ValueModel(copy.deepcopy(base.base_model))
        value_model.to(device).eval()

    ref_model: Any | None
    policy: Any
    if cfg.policy.lora_r is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        for p in base.parameters():
            p.requires_grad_(False)
        if checkpoint is not None or init_policy is not None:
            adapters = checkpoint / "policy" if checkpoint is not None else Path(init_policy)  # type: ignore[arg-type]
            policy = PeftModel.from_pretrained(base, str(adapters), is_trainable=True)
        else:
            lora = LoraConfig(r=cfg.policy.lora_r, lora_alpha=cfg.policy.lora_alpha, lora_dropout=cfg.policy.lora_dropout,
                              target_modules=cfg.policy.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
            policy = get_peft_model(base, lora)
        ref_model = None  # the reference is the policy with its adapter disabled
    else:
        if checkpoint is not None or init_policy is not None:  # the reference stays the initial policy
            ref_model = base
            start = checkpoint / "policy" if checkpoint is not None else Path(init_policy)  # type: ignore[arg-type]
            policy, _ = load_causal_lm(start, dtype=cfg.policy.dtype, device=str(device))
        else:
            ref_model = copy.deepcopy(base)
            policy = base
        for p in ref_model.parameters():
            p.requires_grad_(False)
    policy.to(device).eval()

    opt = cfg.optimizer
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    assert policy_params, "the policy has no trainable parameters"
    groups: list[dict[str, Any]] = [{"params": policy_params}]
    if value_head is not None:
        groups.append({"params": list(value_head.parameters()), "lr": opt.value_learning_rate or opt.learning_rate})
    policy_optimizer = adamw(groups, device, lr=opt.learning_rate, weight_decay=opt.weight_decay)
    value_optimizer = None
    if value_model is not None:
        value_optimizer = adamw(value_model.parameters(), device, lr=opt.value_learning_rate or opt.learning_rate,
                                weight_decay=opt.weight_decay)
    return PolicyModels(policy, ref_model, tokenizer, eos_ids, value_model, value_head, policy_optimizer,
                        value_optimizer)
