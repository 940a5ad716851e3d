"""Rollout collection: prompts -> sampled responses -> per-token log-probs, reference log-probs, values.

`RolloutCollector` owns everything that turns a list of prompts into tensors the estimators
read (PPOTrainer steps 1 and 3):

- `generate(prompts)`: left-padded prompts, `model.generate` with every decoding knob set
  explicitly (the model's own generation_config must not alter the distribution we compute
  log-probs of), responses right-padded and masked after the first EOS;
- `stats(rollout)`: one no-grad forward pass each of the policy, the frozen reference and
  (ppo) the critic over prompt + response, in chunks of `forward_batch_size`, with explicit
  attention masks and position ids. The policy's log-probs are *not* read from generation's
  incremental logits: a full pass like the reference's makes the KL of an unchanged policy
  exactly 0 (generation's KV-cache logits differ from a full pass by float noise);
- `policy_forward(...)`: temperature-scaled logits at response positions only
  (`logits_to_keep`), plus the shared critic's values from the same pass; the update's
  forward pass with gradients;
- `reference_responses(prompts)`: the frozen initial policy's greedy answers, cached per
  prompt, for pairwise rewards against the starting point (RLAIF §3.1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rlaif.policy_training.config import PPOConfig
from rlaif.policy_training.models import PolicyModels
from rlaif.policy_training.ppo_math import entropy_from_logits, logprobs_from_logits
from torch import Tensor, nn

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


class RolloutCollector:
    """Generation and the no-grad / with-grad forward passes over rollouts (see the module docstring)."""

    def __init__(self, config: PPOConfig, models: PolicyModels, device: torch.device) -> None:
        self.config = config
        self.models = models
        self.device = device
        self.tokenizer = models.tokenizer
        self.eos_ids = models.eos_ids
        self._reference_cache: dict[str, str] = {}

    # --------------------------------------------------------------- prompts

    def encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.config.policy.chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        # Keep the end of over-long prompts: it holds the question and the generation prompt.
        return ids[-self.config.policy.max_prompt_length:]

    def encode_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, (N, P): generation continues right after each prompt."""
        encoded = [self.encode_prompt(p) for p in prompts]
        P = max(len(ids) for ids in encoded)
        query_ids = torch.full((len(prompts), P), self.tokenizer.pad_token_id, dtype=torch.long)
        query_mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, ids in enumerate(encoded):
            query_ids[i, P - len(ids):] = torch.tensor(ids)
            query_mask[i, P - len(ids):] = 1
        return query_ids.to(self.device), query_mask.to(self.device)

    # --------------------------------------------------------------- generation

    def generation_config(self, sample: bool) -> Any:
        """Every decoding knob set explicitly: the model's own generation_config (often top_k=50,
        repetition penalties) must not alter the distribution we compute log-probs of."""
        from transformers import GenerationConfig

        cfg = self.config.policy
        knobs: dict[str, Any] = dict(
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        if sample:
            knobs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, typical_p=1.0)
        else:
            knobs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**knobs)

    def run_generate(self, model: Any, query_ids: Tensor, query_mask: Tensor, gen_config: Any) -> Any:
        """`model.generate` with `gen_config` as the model's own config for the call: (N, P + R) ids."""
        generator_model = model.get_base_model() if self.config.policy.lora_r is not None else model
        saved_config = generator_model.generation_config
        generator_model.generation_config = gen_config
        try:
            return model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config)
        finally:
            generator_model.generation_config = saved_config

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Rollout:
        """Sample one response per entry of `prompts` from the current policy."""
        query_ids, query_mask = self.encode_batch(prompts)
        P = query_ids.shape[1]
        pad = self.tokenizer.pad_token_id
        sequences = self.run_generate(self.models.policy, query_ids, query_mask, self.generation_config(sample=True))
        response_ids = sequences[:, P:]  # (N, R)
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

        texts = self.decode(response_ids, response_mask)
        return Rollout(list(prompts), texts, query_ids, query_mask, response_ids, response_mask, has_eos)

    def decode(self, response_ids: Tensor, response_mask: Tensor) -> list[str]:
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
        chunk_size = self.config.distributed.forward_batch_size
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            query_ids, query_mask = self.encode_batch(chunk)
            gen_config = self.generation_config(sample=False)
            if self.models.ref_model is None:  # LoRA: the reference is the policy with its adapter off
                with self.models.policy.disable_adapter():
                    out = self.run_generate(self.models.policy, query_ids, query_mask, gen_config)
            else:
                out = self.run_generate(self.models.ref_model, query_ids, query_mask, gen_config)
            response_ids = out[:, query_ids.shape[1]:]  # (n, R)
            is_eos = torch.isin(response_ids, torch.tensor(self.eos_ids, device=response_ids.device))  # (n, R)
            # Keep tokens before the first EOS: cumsum is 0 exactly there.
            mask = is_eos.int().cumsum(dim=1) == 0  # (n, R)
            self._reference_cache.update(zip(chunk, self.decode(response_ids, mask)))
        return [self._reference_cache[p] for p in prompts]

    # --------------------------------------------------------------- forward passes

    def policy_logits(self, model: nn.Module, rollout: Rollout, idx: Tensor) -> Tensor:
        """Temperature-scaled next-token logits at each response position: (n, R, V)."""
        return self.policy_forward(model, rollout, idx, with_values=False)[0]

    def policy_forward(self, model: nn.Module, rollout: Rollout, idx: Tensor,
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
            assert self.models.value_head is not None
            hidden = out.hidden_states[-1][:, P - 1:P + R - 1]  # (n, R, H): the state before each response token
            values = self.models.value_head(hidden.float()).squeeze(-1)  # (n, R)
        # Log-probs must describe the distribution the tokens were sampled from.
        return logits / self.config.policy.temperature, values

    def values(self, rollout: Rollout, idx: Tensor) -> Tensor:
        """V(s_t) of the separate critic for the state before each response token: (n, R)."""
        assert self.models.value_model is not None
        input_ids, attention_mask, position_ids = sequence_inputs(
            rollout.query_ids[idx], rollout.query_mask[idx], rollout.response_ids[idx], rollout.response_mask[idx])
        P, R = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
        values = self.models.value_model(input_ids, attention_mask, position_ids)  # (n, P+R)
        return values[:, P - 1:P + R - 1]  # (n, R)

    @torch.no_grad()
    def stats(self, rollout: Rollout) -> dict[str, Tensor]:
        """Log-probs of policy and reference, token entropy and values (N, R) each, in chunks."""
        m = self.models
        N = len(rollout.prompts)
        # The policy's log-probs come from a full forward pass, the same kind of pass as the reference's,
        # never from generation's incremental (KV-cache) logits: those differ from a full pass by float
        # noise (~1e-6 per token), enough to make the KL of an unchanged policy nonzero. One pass also
        # gives the shared critic's values (which live on the policy's hidden states).
        parts: dict[str, list[Tensor]] = defaultdict(list)
        for idx in torch.arange(N, device=self.device).split(self.config.distributed.forward_batch_size):
            tokens = rollout.response_ids[idx]
            logits, shared_values = self.policy_forward(m.policy, rollout, idx, m.value_head is not None)
            if shared_values is not None:
                parts["values"].append(shared_values)
            parts["logprobs"].append(logprobs_from_logits(logits, tokens))
            parts["entropy"].append(entropy_from_logits(logits))
            del logits
            if m.ref_model is None:
                with m.policy.disable_adapter():
                    ref_logits = self.policy_logits(m.policy, rollout, idx)
            else:
                ref_logits = self.policy_logits(m.ref_model, rollout, idx)
            parts["ref_logprobs"].append(logprobs_from_logits(ref_logits, tokens))
            del ref_logits
            if m.value_model is not None:
                parts["values"].append(self.values(rollout, idx))
        return {k: torch.cat(v) for k, v in parts.items()}
