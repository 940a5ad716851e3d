"""`PPOTrainer`: fine-tune a causal LM against a `RewardSource` with PPO, RLOO or GRPO.

One training step (Ziegler et al. 2019 / Stiennon et al. 2020 recipe, arithmetic in
`ppo_math.py`):

1. sample `batch_size` prompts, generate `group_size` responses each (temperature, top-p,
   stop at EOS);
2. score them with the reward source (missing scores follow `on_missing_reward`);
3. one no-grad forward pass of policy, frozen reference and (ppo) value model over
   prompt + response with explicit attention masks: left-padded prompts, right-padded
   responses, every token after the first EOS masked out. With `value_model: shared` the
   values come from a head on the policy's last hidden state, in the policy's own pass;
4. advantages: ppo = per-token reward -beta*KL plus the score at the last response token,
   then GAE (Schulman et al. 2015) and whitening; rloo = leave-one-out baseline on
   score - beta*sum KL (Ahmadian et al. 2024); grpo = group-normalized score with a k3 KL
   loss (Shao et al. 2024);
5. `ppo_epochs` passes over shuffled minibatches with the clipped surrogate (Schulman et
   al. 2017), clipped value loss, gradient clipping, AdamW; every loss is a token mean over
   the whole minibatch, so gradient accumulation and data parallelism leave the update as is.

Reward sources may ask for more than (prompt, response): a source with `needs_reference`
gets `reference_responses` (the frozen initial policy's greedy answers, cached per prompt)
through `set_reference_generator`, for pairwise rewards against the starting point; its
`last_metrics` / `last_components` (e.g. judge latency, per-rubric rewards) are logged.

Metrics go to `<output_dir>/metrics.jsonl` (one JSON object per step), TensorBoard when
installed, and `training_curves.png`; checkpoints to `<output_dir>/checkpoint-{step}/`.

    from rlaif.policy_training.config import PPOConfig
    from rlaif.policy_training.ppo import PPOTrainer
    from rlaif.policy_training.rewards import FunctionReward

    trainer = PPOTrainer(PPOConfig(steps=10, output_dir="runs/demo"),
                         FunctionReward(lambda p, r: -abs(len(r) - 40) / 40),
                         prompts=["Write a haiku about autumn."])
    trainer.train()

Dropout stays off throughout (models are kept in eval mode while their gradients flow):
with dropout on, the new/old probability ratio would differ from 1 before any update and
PPO's clipping would fire on noise.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rlaif.policy_training.config import ConfigError, PPOConfig, resolve_device
from rlaif.policy_training.distributed import DistContext
from rlaif.policy_training.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    group_usable_mask,
    grpo_advantages,
    kl_k3,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_token_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    value_loss,
)
from rlaif.policy_training.rewards import RewardSource, iter_reward_sources

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = ".complete"
VALUE_HEAD_FILE = "value_head.safetensors"
PLOT_FILE = "training_curves.png"
PROMPT_COLUMNS = ("prompt", "instruction", "turns")


class MissingRewardError(RuntimeError):
    """The reward source could not score some samples and `on_missing_reward` is `fail`."""


# ----------------------------------------------------------------------------- inputs


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


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Read prompts from .jsonl / .json (a `prompt`, `instruction` or `turns` column) or .txt (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ValueError(f"{path} must hold a JSON list of objects or strings")
        prompts = [_row_prompt(row, column, path, i) for i, row in enumerate(rows)]
    else:
        raise ValueError(f"unsupported prompt file {path}: use .jsonl, .json or .txt")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _row_prompt(row: Any, column: str | None, path: Path, index: int) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{path} row {index}: expected an object or a string, got {type(row).__name__}")
    columns = (column,) if column else PROMPT_COLUMNS
    for name in columns:
        if name in row:
            value = row[name]
            if isinstance(value, str):
                return value
            if isinstance(value, list) and value:
                first = value[0] if name == "turns" else [m for m in value if m.get("role") == "user"][-1]
                return first if isinstance(first, str) else str(first.get("content", ""))
            raise ValueError(f"{path} row {index}: column {name!r} holds {type(value).__name__}, expected text")
    raise ValueError(f"{path} row {index}: no prompt column (looked for {', '.join(columns)}); "
                     f"set prompt_column to the column holding the prompt")


# ----------------------------------------------------------------------------- value model


class ValueModel(nn.Module):
    """A copy of the policy's transformer trunk with a scalar head: V(prompt + response[:t]).

    Separate weights from the policy (no shared trunk) so the value loss cannot distort the
    policy's representations; the head starts at zero, so initial values are 0 rather than
    arbitrary numbers that the first updates would have to unlearn.
    """

    def __init__(self, trunk: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        hidden = hidden_size or trunk.config.get_text_config().hidden_size
        self.head = _zero_linear(hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L) values."""
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        hidden = out.last_hidden_state  # (B, L, H)
        return self.head(hidden.float()).squeeze(-1)  # (B, L)

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


def _zero_linear(hidden: int) -> nn.Linear:
    """A float32 scalar head starting at 0, so initial values are 0 rather than noise to unlearn."""
    head = nn.Linear(hidden, 1, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One batch of sampled responses, N = batch_size * group_size."""

    prompts: list[str]  # (N,) raw prompt text, each repeated group_size times in a row
    responses: list[str]  # (N,) decoded response text (EOS and padding removed)
    query_ids: Tensor  # (N, P) left-padded prompt tokens
    query_mask: Tensor  # (N, P) 1 on real prompt tokens
    response_ids: Tensor  # (N, R) right-padded response tokens
    response_mask: Tensor  # (N, R) bool, True up to and including the first EOS
    has_eos: Tensor  # (N,) bool

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)  # (N,)


def sequence_inputs(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate prompt and response into one forward-pass input.

    Position ids come from the attention mask (count of real tokens before each one), so a
    left-padded prompt sees the same positions as it would unpadded, and the forward pass
    agrees with generation, which numbers positions the same way.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (N, P+R)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)  # (N, P+R)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (N, P+R)
    return input_ids, attention_mask, position_ids


# ----------------------------------------------------------------------------- trainer


class PPOTrainer:
    """Policy-gradient fine-tuning of a causal LM against a reward source (see module docstring).

    `prompts` overrides `config.prompts` (a file). With `config.resume`, the latest complete
    checkpoint in `output_dir` is loaded: weights, optimizer states, KL coefficient, prompt
    order and RNG states, so the run continues as if it had not stopped.
    """

    def __init__(self, config: PPOConfig, reward_source: RewardSource, prompts: Sequence[str] | None = None) -> None:
        self.config = config
        self.reward_source = reward_source
        if prompts is None:
            if config.prompts is None:
                raise ConfigError("no prompts: set `prompts` in the config (a .jsonl/.json/.txt file) or pass prompts=[...]")
            prompts = load_prompts(config.prompts, config.prompt_column)
        self.prompts = list(prompts)
        if not self.prompts:
            raise ConfigError("the prompt list is empty")

        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        device = resolve_device(config.device)
        # Under `accelerate launch` / torchrun: join the group; each process drives its own GPU.
        self.dist = DistContext.from_env(device)
        if self.dist.enabled and device == "cuda":
            device = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
        self.step_count = 0
        self.history: list[dict[str, Any]] = []

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.sampler_gen = torch.Generator().manual_seed(config.seed)
        self.update_gen = torch.Generator().manual_seed(config.seed + 1)
        self._order: list[int] = []
        self._pointer = 0
        self._token_cache: dict[int, list[int]] = {}

        checkpoint = self.latest_checkpoint(self.output_dir) if config.resume else None
        if config.resume and checkpoint is None:
            logger.info("resume requested but %s holds no complete checkpoint; starting fresh", self.output_dir)
        if checkpoint is not None:
            self._check_resumable(checkpoint)
        self._build_models(checkpoint)
        if self.dist.enabled:
            self.dist.broadcast_parameters(self._trainable_parameters())
            # Same weights everywhere, but each process samples its own responses.
            torch.manual_seed(config.seed + self.dist.rank)
        self.kl_ctl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                       if config.adaptive_kl else FixedKLController(config.kl_coef))
        if checkpoint is not None:
            self._load_state(checkpoint)
        self._tb = self._make_tensorboard()
        # Pairwise judge rewards compare each response with the initial policy's answer to the
        # same prompt; sources that ask for it (`needs_reference`) get our cached generator.
        self._reference_cache: dict[str, str] = {}
        for source in iter_reward_sources(reward_source):
            if getattr(source, "needs_reference", False):
                source.set_reference_generator(self.reference_responses)

    # --------------------------------------------------------------- construction

    def _build_models(self, checkpoint: Path | None) -> None:
        from rlaif.judge.models import load_causal_lm

        cfg = self.config
        base_path = resolve_model_path(cfg.policy)
        device = str(self.device)
        base, tokenizer = load_causal_lm(base_path, dtype=cfg.dtype, device=device)
        self.tokenizer = tokenizer
        eos = {tokenizer.eos_token_id}
        gen_eos = base.generation_config.eos_token_id
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids = sorted(i for i in eos if i is not None)
        assert self.eos_ids, "the tokenizer has no EOS token; the trainer needs one to end responses"
        assert tokenizer.pad_token_id not in self.eos_ids, "pad token must differ from EOS (see rlaif.judge.models)"

        self.value_model: ValueModel | None = None
        self.value_head: nn.Linear | None = None
        if cfg.estimator == "ppo" and cfg.value_model == "shared":
            # V(s) read from the policy's own last hidden state: one forward serves both.
            self.value_head = _zero_linear(base.config.get_text_config().hidden_size)
            if checkpoint is not None:
                from safetensors.torch import load_file

                self.value_head.load_state_dict(load_file(str(checkpoint / VALUE_HEAD_FILE)))
            self.value_head.to(self.device)
        elif cfg.estimator == "ppo":
            if checkpoint is not None:
                self.value_model = ValueModel.from_pretrained(checkpoint / "value", dtype=self.dtype)
            else:
                # The critic starts from the same pretrained trunk as the policy (TRL, OpenRLHF).
                self.value_model = ValueModel(copy.deepcopy(base.base_model))
            self.value_model.to(self.device).eval()

        if cfg.lora_r is not None:
            from peft import LoraConfig, PeftModel, get_peft_model

            for p in base.parameters():
                p.requires_grad_(False)
            if checkpoint is not None:
                self.policy = PeftModel.from_pretrained(base, str(checkpoint / "policy"), is_trainable=True)
            else:
                lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
                self.policy = get_peft_model(base, lora)
            self.ref_model = None  # the reference is the policy with its adapter disabled
        else:
            if checkpoint is not None:  # the reference is always the initial policy, never the checkpoint
                self.ref_model = base
                self.policy, _ = load_causal_lm(checkpoint / "policy", dtype=cfg.dtype, device=device)
            else:
                self.ref_model = copy.deepcopy(base)
                self.policy = base
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.policy.to(self.device).eval()

        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        assert policy_params, "the policy has no trainable parameters"
        groups: list[dict[str, Any]] = [{"params": policy_params}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": cfg.value_learning_rate or cfg.learning_rate})
        self.policy_optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.value_optimizer = None
        if self.value_model is not None:
            self.value_optimizer = torch.optim.AdamW(
                self.value_model.parameters(), lr=cfg.value_learning_rate or cfg.learning_rate,
                weight_decay=cfg.weight_decay)

    def _trainable_parameters(self) -> list[nn.Parameter]:
        optimizers = [self.policy_optimizer] + ([self.value_optimizer] if self.value_optimizer is not None else [])
        return [p for opt in optimizers for p in _optimized_parameters(opt)]

    def _make_tensorboard(self) -> Any:
        if not self.config.tensorboard or not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    # --------------------------------------------------------------- prompts and generation

    def _next_prompts(self) -> list[str]:
        """This process's `batch_size` prompts of the next step.

        All processes walk the same seeded shuffle (reshuffled after each pass over the file)
        and take disjoint slices of `batch_size * world_size` consecutive entries."""
        wanted = self.config.batch_size * self.dist.world_size
        picked: list[int] = []
        while len(picked) < wanted:
            if self._pointer >= len(self._order):
                self._order = torch.randperm(len(self.prompts), generator=self.sampler_gen).tolist()
                self._pointer = 0
            take = min(wanted - len(picked), len(self._order) - self._pointer)
            picked.extend(self._order[self._pointer:self._pointer + take])
            self._pointer += take
        mine = picked[self.dist.rank * self.config.batch_size:(self.dist.rank + 1) * self.config.batch_size]
        return [self.prompts[i] for i in mine]

    def _encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.config.chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        # Keep the end of over-long prompts: it holds the question and the generation prompt.
        return ids[-self.config.max_prompt_length:]

    def _encode_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, (N, P): generation continues right after each prompt."""
        encoded = [self._encode_prompt(p) for p in prompts]
        P = max(len(ids) for ids in encoded)
        query_ids = torch.full((len(prompts), P), self.tokenizer.pad_token_id, dtype=torch.long)
        query_mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, ids in enumerate(encoded):
            query_ids[i, P - len(ids):] = torch.tensor(ids)
            query_mask[i, P - len(ids):] = 1
        return query_ids.to(self.device), query_mask.to(self.device)

    def _generation_config(self, sample: bool) -> Any:
        """Every decoding knob set explicitly: the model's own generation_config (often top_k=50,
        repetition penalties) must not alter the distribution we compute log-probs of."""
        from transformers import GenerationConfig

        cfg = self.config
        knobs: dict[str, Any] = dict(
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        if sample:
            knobs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, typical_p=1.0)
        else:
            knobs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**knobs)

    def _run_generate(self, model: nn.Module, query_ids: Tensor, query_mask: Tensor, gen_config: Any) -> Tensor:
        """`model.generate` with `gen_config` as the model's own config for the call; returns (N, P + R) ids."""
        generator_model = model.get_base_model() if self.config.lora_r is not None else model
        saved_config = generator_model.generation_config
        generator_model.generation_config = gen_config
        try:
            return model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config)
        finally:
            generator_model.generation_config = saved_config

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Rollout:
        """Sample one response per entry of `prompts` from the current policy."""
        query_ids, query_mask = self._encode_batch(prompts)
        P = query_ids.shape[1]
        pad = self.tokenizer.pad_token_id
        out = self._run_generate(self.policy, query_ids, query_mask, self._generation_config(sample=True))
        response_ids = out[:, P:]  # (N, R)
        if response_ids.shape[1] == 0:  # cannot happen with max_new_tokens >= 1; keeps shapes honest
            response_ids = torch.full((len(prompts), 1), self.eos_ids[0], dtype=torch.long, device=self.device)

        is_eos = torch.isin(response_ids, torch.tensor(self.eos_ids, device=self.device))  # (N, R)
        has_eos = is_eos.any(dim=1)  # (N,)
        R = response_ids.shape[1]
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, R - 1, dtype=torch.long))
        positions = torch.arange(R, device=self.device)[None, :]  # (1, R)
        response_mask = positions <= first_eos[:, None]  # (N, R): EOS itself is an action the policy takes
        # Generation pads finished rows with the pad id; normalize anyway so nothing after EOS leaks.
        response_ids = torch.where(response_mask, response_ids, torch.full_like(response_ids, pad))

        texts = self._decode(response_ids, response_mask)
        return Rollout(list(prompts), texts, query_ids, query_mask, response_ids, response_mask, has_eos)

    def _decode(self, response_ids: Tensor, response_mask: Tensor) -> list[str]:
        texts = []
        for row, mask in zip(response_ids.tolist(), response_mask.tolist()):
            kept = [t for t, m in zip(row, mask) if m and t not in self.eos_ids]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True))
        return texts

    @torch.no_grad()
    def reference_responses(self, prompts: Sequence[str]) -> list[str]:
        """The frozen initial policy's greedy response to each prompt, generated once per distinct prompt.

        Pairwise judge rewards compare each sampled response with this answer (RLAIF §3.1's
        "win rate against the SFT policy" as a reward). Greedy decoding makes the baseline a
        fixed target, so caching it per prompt is exact and a resumed run regenerates the same
        text; it costs one generation per prompt over the whole run, not per step.
        """
        todo = list(dict.fromkeys(p for p in prompts if p not in self._reference_cache))
        for start in range(0, len(todo), self.config.forward_batch_size):
            chunk = todo[start:start + self.config.forward_batch_size]
            query_ids, query_mask = self._encode_batch(chunk)
            gen_config = self._generation_config(sample=False)
            if self.ref_model is None:  # LoRA: the reference is the policy with its adapter off
                with self.policy.disable_adapter():
                    out = self._run_generate(self.policy, query_ids, query_mask, gen_config)
            else:
                out = self._run_generate(self.ref_model, query_ids, query_mask, gen_config)
            response_ids = out[:, query_ids.shape[1]:]  # (n, R)
            is_eos = torch.isin(response_ids, torch.tensor(self.eos_ids, device=response_ids.device))  # (n, R)
            # Keep tokens before the first EOS: cumsum is 0 exactly there.
            mask = is_eos.int().cumsum(dim=1) == 0  # (n, R)
            self._reference_cache.update(zip(chunk, self._decode(response_ids, mask)))
        return [self._reference_cache[p] for p in prompts]

    # --------------------------------------------------------------- forward passes

    def _policy_logits(self, model: nn.Module, rollout: Rollout, idx: Tensor) -> Tensor:
        """Temperature-scaled next-token logits at each response position: (n, R, V)."""
        return self._policy_forward(model, rollout, idx, with_values=False)[0]

    def _policy_forward(self, model: nn.Module, rollout: Rollout, idx: Tensor,
                        with_values: bool) -> tuple[Tensor, Tensor | None]:
        """Logits (n, R, V) and, with the shared critic, values (n, R) from the same forward pass."""
        input_ids, attention_mask, position_ids = sequence_inputs(
            rollout.query_ids[idx], rollout.query_mask[idx], rollout.response_ids[idx], rollout.response_mask[idx])
        P, R = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
        # Only the last R+1 positions matter: position P-1 predicts response token 0, etc.
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=R + 1, output_hidden_states=with_values)
        logits = out.logits[:, :-1].float()  # (n, R, V)
        values = None
        if with_values:
            assert self.value_head is not None
            hidden = out.hidden_states[-1][:, P - 1:P + R - 1]  # (n, R, H): the state before each response token
            values = self.value_head(hidden.float()).squeeze(-1)  # (n, R)
        # Log-probs must describe the distribution the tokens were sampled from.
        return logits / self.config.temperature, values

    def _values(self, rollout: Rollout, idx: Tensor) -> Tensor:
        """V(s_t) for the state before each response token: (n, R)."""
        assert self.value_model is not None
        input_ids, attention_mask, position_ids = sequence_inputs(
            rollout.query_ids[idx], rollout.query_mask[idx], rollout.response_ids[idx], rollout.response_mask[idx])
        P, R = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
        values = self.value_model(input_ids, attention_mask, position_ids)  # (n, P+R)
        return values[:, P - 1:P + R - 1]  # (n, R)

    @torch.no_grad()
    def _rollout_stats(self, rollout: Rollout) -> dict[str, Tensor]:
        """Log-probs of policy and reference, token entropy and values, in chunks."""
        N = len(rollout.prompts)
        parts: dict[str, list[Tensor]] = defaultdict(list)
        for idx in torch.arange(N, device=self.device).split(self.config.forward_batch_size):
            tokens = rollout.response_ids[idx]
            logits, shared_values = self._policy_forward(self.policy, rollout, idx, self.value_head is not None)
            if shared_values is not None:
                parts["values"].append(shared_values)
            parts["logprobs"].append(logprobs_from_logits(logits, tokens))
            parts["entropy"].append(entropy_from_logits(logits))
            del logits
            if self.ref_model is None:
                with self.policy.disable_adapter():
                    ref_logits = self._policy_logits(self.policy, rollout, idx)
            else:
                ref_logits = self._policy_logits(self.ref_model, rollout, idx)
            parts["ref_logprobs"].append(logprobs_from_logits(ref_logits, tokens))
            del ref_logits
            if self.value_model is not None:
                parts["values"].append(self._values(rollout, idx))
        return {k: torch.cat(v) for k, v in parts.items()}

    # --------------------------------------------------------------- rewards

    def _score(self, rollout: Rollout) -> tuple[Tensor, Tensor, int]:
        """Rewards (N,) and a validity mask (N,); applies the missing-reward policy."""
        raw = self.reward_source.rewards(rollout.prompts, rollout.responses)
        if len(raw) != len(rollout.responses):
            raise ValueError(f"reward source returned {len(raw)} rewards for {len(rollout.responses)} responses")
        present = [r is not None and math.isfinite(float(r)) for r in raw]
        n_missing = present.count(False)
        if n_missing and self.config.on_missing_reward == "fail":
            missing = [i for i, ok in enumerate(present) if not ok]
            raise MissingRewardError(
                f"the reward source could not score {n_missing} of {len(raw)} responses (indices {missing[:10]}); "
                f"set on_missing_reward: skip to drop such samples instead")
        valid = torch.tensor(present, dtype=torch.bool, device=self.device)
        # Missing entries hold a placeholder that every later use masks out via `valid`.
        scores = torch.tensor([float(r) if ok else 0.0 for r, ok in zip(raw, present)],
                              dtype=torch.float32, device=self.device)
        return scores, valid, n_missing

    # --------------------------------------------------------------- one step

    def step(self) -> dict[str, Any]:
        """Run one training step (rollout, scoring, updates) and return its metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        batch_prompts = self._next_prompts()
        prompts = [p for p in batch_prompts for _ in range(cfg.group_size)]  # (N,) groups are contiguous

        t_gen = time.perf_counter()
        rollout = self.generate(prompts)
        generation_s = time.perf_counter() - t_gen
        t_rew = time.perf_counter()
        scores, valid, n_missing = self._score(rollout)
        reward_latency_s = time.perf_counter() - t_rew

        stats = self._rollout_stats(rollout)
        mask = rollout.response_mask  # (N, R)
        lengths = rollout.lengths  # (N,)
        beta = self.kl_ctl.value

        penalized = scores.clone()  # (N,)
        if cfg.missing_eos_penalty is not None:
            penalized = torch.where(rollout.has_eos, penalized, penalized - cfg.missing_eos_penalty)
        kl_tokens = kl_penalty(stats["logprobs"], stats["ref_logprobs"], cfg.kl_estimator)  # (N, R)
        kl_seq = masked_sum(kl_tokens, mask, dim=1)  # (N,)
        seq_reward = penalized - beta * kl_seq  # (N,): what the estimator maximizes

        advantages, returns, usable = self._advantages(stats, mask, penalized, seq_reward, kl_tokens, valid)

        record: dict[str, Any] = {
            "step": self.step_count + 1,
            "reward": _mean(scores[valid]),
            "reward_std": float(scores[valid].std()) if int(valid.sum()) > 1 else 0.0,
            "reward_with_kl": _mean(seq_reward[valid]),
            "kl": _mean(masked_sum(stats["logprobs"] - stats["ref_logprobs"], mask, dim=1)[valid]),
            "kl_coef": beta,
            "entropy": float(masked_mean(stats["entropy"], mask)),
            "response_length": float(lengths.float().mean()),
            "eos_missing_frac": float((~rollout.has_eos).float().mean()),
            "reward_missing": n_missing,
            "samples_used": int(usable.sum()),
            "reward_latency_s": reward_latency_s,
            "generation_s": generation_s,
            "tokens_per_s": float(lengths.sum()) / max(generation_s, 1e-9),
        }
        for source in iter_reward_sources(self.reward_source):
            components = getattr(source, "last_components", None)
            if isinstance(components, dict):
                for name, values in components.items():
                    present = [v for v in values if v is not None]
                    record[f"reward/{name}"] = sum(present) / len(present) if present else float("nan")
            metrics = getattr(source, "last_metrics", None)  # e.g. judge latency, failed requests
            if isinstance(metrics, dict):
                record.update({k: float(v) for k, v in metrics.items()})
        if returns is not None:
            record["explained_variance"] = float(explained_variance(stats["values"], returns, mask & valid[:, None]))

        if int(usable.sum()) == 0 and not self.dist.enabled:
            logger.warning("step %d: no usable samples (all rewards missing); skipping the update", self.step_count + 1)
        else:  # distributed: every process joins each gradient all-reduce, with or without samples
            keep = usable.nonzero().squeeze(1)  # indices of samples that enter the loss
            record.update(self._update(rollout, keep, stats, advantages, returns))
        record = self.dist.merge_records(record)
        self.kl_ctl.update(record["kl"], len(rollout.prompts) * self.dist.world_size)
        self.step_count += 1
        record["step_s"] = time.perf_counter() - t0
        if self.dist.is_main:
            self._write_samples(rollout, scores, valid)
        return record

    def _advantages(self, stats: dict[str, Tensor], mask: Tensor, penalized: Tensor, seq_reward: Tensor,
                    kl_tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Per-token advantages (N, R), value targets (N, R) for ppo (else None), and which samples
        may enter the loss (N,)."""
        cfg = self.config
        beta = self.kl_ctl.value
        returns = None
        if cfg.estimator == "ppo":
            usable = valid
            token_rewards = -beta * kl_tokens  # (N, R)
            last = (mask.sum(dim=1) - 1).clamp(min=0)  # (N,) index of the last real token
            # The sequence-level score arrives with the final action (Ziegler et al. 2019).
            token_rewards = token_rewards.scatter_add(1, last[:, None], penalized[:, None])
            advantages, returns = compute_gae(token_rewards, stats["values"], mask, cfg.gamma, cfg.lam)
        else:
            usable = group_usable_mask(valid, cfg.group_size)
            if cfg.estimator == "rloo":
                seq_adv = rloo_advantages(seq_reward, cfg.group_size, valid)  # (N,)
            else:  # grpo: KL enters as a loss term, not through the reward
                seq_adv = grpo_advantages(penalized, cfg.group_size, valid)  # (N,)
            # Every token of a response shares its sequence advantage.
            advantages = seq_adv[:, None].expand_as(kl_tokens).contiguous()  # (N,) -> (N, R)
        # Whitened over the whole step's batch (all processes' usable tokens), before any split
        # into minibatches, micro-batches or processes can change the statistics.
        if (cfg.whiten_advantages and cfg.estimator != "grpo"
                and int(self.dist.sum_across(usable.sum())) > 1):
            advantages = masked_whiten(advantages, mask & usable[:, None], all_sum=self.dist.sum_across)
        return advantages, returns, usable

    def _update(self, rollout: Rollout, keep: Tensor, stats: dict[str, Tensor], advantages: Tensor,
                returns: Tensor | None) -> dict[str, float]:
        """`ppo_epochs` passes of minibatch updates over the usable samples `keep`.

        Each loss term is a token mean over the whole minibatch, on all processes together:
        every micro-batch adds its token sum divided by the minibatch's token count (see
        `_minibatch_tokens`), so `gradient_accumulation_steps` and the number of processes
        change memory use and speed, never the update. Logged losses and stats are the same
        minibatch token means, averaged over minibatches and epochs.
        """
        cfg = self.config
        logs: dict[str, list[float]] = defaultdict(list)
        beta = self.kl_ctl.value
        grpo_kl = cfg.estimator == "grpo" and beta > 0
        has_critic = self.value_model is not None or self.value_head is not None
        # Every process logs every key, zeros included, so the merged record averages over all of them.
        keys = (["policy_loss", "approx_kl", "clipfrac", "ratio_mean"] + (["kl_loss"] if grpo_kl else [])
                + (["value_loss", "vf_clipfrac"] if has_critic else []))
        for _ in range(cfg.ppo_epochs):
            perm = keep[torch.randperm(len(keep), generator=self.update_gen).to(keep.device)]
            for minibatch in perm.tensor_split(cfg.num_minibatches):
                if len(minibatch) == 0 and not self.dist.enabled:
                    continue  # distributed: every process joins each all-reduce, with or without samples
                num_tokens = self._minibatch_tokens(rollout.response_mask[minibatch])
                shares = dict.fromkeys(keys, 0.0)  # this process's share of each minibatch token mean
                for micro in minibatch.tensor_split(cfg.gradient_accumulation_steps):
                    if len(micro) == 0:
                        continue
                    mask = rollout.response_mask[micro]  # (n, R)
                    # (n, R, V) logits; with the shared critic also (n, R) values from the same pass
                    logits, shared_values = self._policy_forward(self.policy, rollout, micro,
                                                                 with_values=self.value_head is not None)
                    logprobs = logprobs_from_logits(logits, rollout.response_ids[micro])  # (n, R)
                    pg_loss, pg_stats = policy_loss(logprobs, stats["logprobs"][micro], advantages[micro], mask,
                                                    cfg.clip_range, num_tokens)
                    loss = pg_loss
                    if cfg.entropy_coef > 0:
                        entropy = masked_token_mean(entropy_from_logits(logits), mask, num_tokens)
                        loss = loss - cfg.entropy_coef * entropy
                    if grpo_kl:
                        kl_loss = masked_token_mean(kl_k3(logprobs, stats["ref_logprobs"][micro]), mask, num_tokens)
                        loss = loss + beta * kl_loss
                        shares["kl_loss"] += float(kl_loss.detach())
                    if shared_values is not None:  # one backward through the shared trunk
                        assert returns is not None
                        v_loss, v_stats = value_loss(shared_values, stats["values"][micro], returns[micro], mask,
                                                     cfg.clip_range_value, num_tokens)
                        loss = loss + cfg.vf_coef * v_loss
                        shares["value_loss"] += float(v_loss.detach())
                        for k, v in v_stats.items():
                            shares[k] += float(v)
                    loss.backward()
                    shares["policy_loss"] += float(pg_loss.detach())
                    for k, v in pg_stats.items():
                        shares[k] += float(v)
                    if self.value_model is not None:
                        assert returns is not None
                        values = self._values(rollout, micro)  # (n, R)
                        v_loss, v_stats = value_loss(values, stats["values"][micro], returns[micro], mask,
                                                     cfg.clip_range_value, num_tokens)
                        v_loss.backward()
                        shares["value_loss"] += float(v_loss.detach())
                        for k, v in v_stats.items():
                            shares[k] += float(v)
                for k, v in shares.items():
                    logs[k].append(v)
                logs["grad_norm"].append(self._optimizer_step(self.policy_optimizer))
                if self.value_model is not None:
                    assert self.value_optimizer is not None
                    logs["value_grad_norm"].append(self._optimizer_step(self.value_optimizer))
        return {k: sum(v) / len(v) for k, v in logs.items() if v}

    def _minibatch_tokens(self, mask: Tensor) -> Tensor:
        """The divisor that turns a micro-batch's token sum into its share of the minibatch token mean.

        That is the minibatch's response tokens on all processes, over the number of processes:
        `average_gradients` divides the processes' summed gradients by their number, so
        sum / (tokens / world_size) on each process averages to sum / tokens over all of them.
        """
        tokens = self.dist.sum_across(mask.sum())  # exact integer count of the whole minibatch
        return tokens.to(torch.float32) / self.dist.world_size

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> float:
        # Everything the optimizer updates is clipped together (the shared critic's head included).
        self.dist.average_gradients(_optimized_parameters(optimizer))
        params = [p for p in _optimized_parameters(optimizer) if p.grad is not None]
        if not params:
            return 0.0
        if self.config.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # --------------------------------------------------------------- loop

    def train(self, progress: bool = True) -> list[dict[str, Any]]:
        """Run until `config.steps` steps are done; returns all logged records."""
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step_count, disable=not progress or not self.dist.is_main,
                   desc="ppo", unit="step")
        try:
            while self.step_count < cfg.steps:
                record = self.step()
                if self.step_count % cfg.log_every == 0 or self.step_count == cfg.steps:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
                if cfg.save_every and self.step_count % cfg.save_every == 0:
                    self.save_checkpoint()
                elif cfg.plot_every and self.step_count % cfg.plot_every == 0 and self.dist.is_main:
                    self.plot()
            if not (self.output_dir / f"{CHECKPOINT_PREFIX}{self.step_count}").is_dir():
                self.save_checkpoint()
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.flush()
        return self.history

    def close(self) -> None:
        """Leave the process group this trainer joined (distributed runs); a no-op otherwise."""
        self.dist.close()

    def _log(self, record: dict[str, Any]) -> None:
        # NaN (e.g. explained variance of constant returns) becomes null: metrics.jsonl stays strict JSON.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.history.append(record)
        if not self.dist.is_main:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def _write_samples(self, rollout: Rollout, scores: Tensor, valid: Tensor) -> None:
        if not self.config.log_samples:
            return
        with open(self.output_dir / "samples.jsonl", "a") as f:
            for i in range(min(self.config.log_samples, len(rollout.prompts))):
                f.write(json.dumps({"step": self.step_count, "prompt": rollout.prompts[i],
                                    "response": rollout.responses[i],
                                    "reward": float(scores[i]) if bool(valid[i]) else None}) + "\n")

    def plot(self) -> Path:
        """Redraw `training_curves.png` from the logged history."""
        return plot_training_curves(self.history, self.output_dir / PLOT_FILE)

    # --------------------------------------------------------------- checkpoints

    @staticmethod
    def latest_checkpoint(output_dir: str | Path) -> Path | None:
        """The complete `checkpoint-{step}` directory with the highest step, if any."""
        found = []
        for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
            suffix = path.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit() and (path / COMPLETE_MARKER).is_file():
                found.append((int(suffix), path))
        return max(found)[1] if found else None

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-{step}/`; a temp folder renamed at the end, so a crash never leaves half a checkpoint.

        Distributed: rank 0 writes the (identical) weights and optimizer state, every process
        its own RNG state; the others wait until the checkpoint is complete."""
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step_count}"
        tmp = self.output_dir / f".tmp-{CHECKPOINT_PREFIX}{self.step_count}"
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "sampler": self.sampler_gen.get_state(), "update": self.update_gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / _rng_file(self.dist.rank))
        self.dist.barrier()
        if self.dist.is_main:
            self._write_checkpoint(tmp, final)
        self.dist.barrier()
        return final

    def _write_checkpoint(self, tmp: Path, final: Path) -> None:
        self.policy.save_pretrained(tmp / "policy")
        self.tokenizer.save_pretrained(tmp / "policy")
        if self.value_model is not None:
            self.value_model.save_pretrained(tmp / "value")
        if self.value_head is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(tmp / VALUE_HEAD_FILE))
        optim = {"policy": self.policy_optimizer.state_dict()}
        if self.value_optimizer is not None:
            optim["value"] = self.value_optimizer.state_dict()
        torch.save(optim, tmp / "optimizer.pt")
        state = {
            "step": self.step_count,
            "kl_controller": self.kl_ctl.state_dict(),
            "prompt_order": self._order,
            "prompt_pointer": self._pointer,
            "reward_source_state": (self.reward_source.state_dict()
                                    if callable(getattr(self.reward_source, "state_dict", None)) else None),
            "config": self.config.model_dump(mode="json"),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self.plot()
        logger.info("saved %s", final)

    def _check_resumable(self, checkpoint: Path) -> None:
        """Refuse a checkpoint whose model layout differs from the config, before loading any weights."""
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
        saved.setdefault("value_model", "separate")  # checkpoints from before the option existed
        for key in ("policy", "estimator", "lora_r", "group_size", "value_model"):
            if saved.get(key) != getattr(self.config, key):
                raise ConfigError(f"cannot resume from {checkpoint}: it was trained with {key}={saved.get(key)!r}, "
                                  f"the config now says {getattr(self.config, key)!r}; restore that value or use a "
                                  f"fresh output_dir")

    def _load_state(self, checkpoint: Path) -> None:
        """Restore everything but the weights (loaded in `_build_models`) from `checkpoint`."""
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        self.step_count = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self._order = list(state["prompt_order"])
        self._pointer = int(state["prompt_pointer"])
        if state.get("reward_source_state") is not None and callable(getattr(self.reward_source, "load_state_dict", None)):
            self.reward_source.load_state_dict(state["reward_source_state"])
        optim = torch.load(checkpoint / "optimizer.pt", map_location=self.device, weights_only=False)
        self.policy_optimizer.load_state_dict(optim["policy"])
        if self.value_optimizer is not None:
            self.value_optimizer.load_state_dict(optim["value"])
        own = checkpoint / _rng_file(self.dist.rank)
        rng = torch.load(own if own.is_file() else checkpoint / _rng_file(0), weights_only=False)
        # The prompt order and minibatch shuffles are the same on every rank.
        self.sampler_gen.set_state(rng["sampler"])
        self.update_gen.set_state(rng["update"])
        if own.is_file():
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # resumed with more processes than the run had: a fresh sampling stream for this rank
            logger.info("%s has no RNG state for rank %d; seeding it afresh", checkpoint, self.dist.rank)
            torch.manual_seed(self.config.seed + self.dist.rank + 7919 * self.step_count)
        self._truncate_logs(checkpoint)

    def _truncate_logs(self, checkpoint: Path) -> None:
        """Steps logged after this checkpoint will be redone: drop them so the log has no duplicates."""
        if not self.dist.is_main:
            logger.info("resumed from %s at step %d", checkpoint, self.step_count)
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.output_dir / name
            if path.is_file():
                lines = [line for line in path.read_text().splitlines()
                         if line.strip() and json.loads(line)["step"] <= self.step_count]
                path.write_text("".join(line + "\n" for line in lines))
                if name == "metrics.jsonl":
                    self.history = [json.loads(line) for line in lines]
        logger.info("resumed from %s at step %d", checkpoint, self.step_count)


def _optimized_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _rng_file(rank: int) -> str:
    """Each process's RNG state; rank 0 keeps the single-process name, so checkpoints stay compatible."""
    return "rng_state.pt" if rank == 0 else f"rng_state_rank{rank}.pt"


def _mean(x: Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


PLOT_PANELS = (
    ("reward", "reward (after normalize/clip, if on)"), ("reward_with_kl", "reward - beta*KL"), ("kl", "KL(policy || ref), nats"),
    ("entropy", "token entropy"), ("response_length", "response length (tokens)"), ("clipfrac", "clip fraction"),
    ("approx_kl", "approx KL per update"), ("value_loss", "value loss"), ("explained_variance", "explained variance"),
)


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """A grid of the main curves (reward, KL, entropy, length, ...) against step, as a PNG.

    Uses matplotlib's object API with the Agg canvas: no global backend switch, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(k, title) for k, title in PLOT_PANELS if any(k in r for r in records)] or [("reward", "reward")]
    # Per-component rewards as the source produced them (e.g. a judge's raw win probability per rubric).
    components = sorted({k for r in records for k in r if k.startswith("reward/")})
    panels[1:1] = [(k, f"{k[len('reward/'):]} (component, raw)") for k in components]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
