"""The distilled reward model (RLAIF §2.2.1): load, save, score, and the pair forward pass.

RLAIF (Lee et al. 2023) distills the AI labeler into a reward model (RM) trained with a
cross-entropy between the labeler's soft preference and the RM's Bradley-Terry probability
sigma(r_chosen - r_rejected). The RM then scores a (prompt, response) with one forward pass,
orders of magnitude cheaper than asking the LLM judge each time.

`RewardModel` lives in the judge layer because three layers score with it: the judge
service (`rlaif serve --reward-model`), PPO (`RewardModelReward`) and its own training
(`rlaif.policy_training.reward_model`, which adds the losses and the training loop). Input
format and batching are in `reward_format.py`.

Rewards are read from the hidden state of the last real token of each sequence, located
from the sequence lengths we built, never from `ids != pad_id` (SmolLM2's EOS is its
default pad token and occurs inside chat prompts).

Scoring (`score`, `score_pairs`) also runs the token prefix that every row of a call starts with
(a chat template's system prompt, or one prompt scored against many responses) once, and gives
its keys/values to every batch: a causal decoder's prefix states do not depend on what follows.
That is only used where it is exact: architectures `prefix_sharing_support` vouches for, and
after the first batch of each model matched the plain forward (see `RewardModel.prefix_sharing`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlaif.judge.reward_format import (
    FORMAT_VERSION,
    RM_CONFIG_FILE,
    EncodedPair,
    FlatBatch,
    PairFormatter,
    Prompt,
    PromptFormat,
    collate_flat,
    collate_shared_prefix,
    common_prefix_length,
    fit_single,
    length_sorted_batches,
)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlaif.judge.engines.exactness import SharingSupport

logger = logging.getLogger(__name__)

CPU_SCORING_BATCH_TOKENS = 512
"""Default cap on a CPU scoring forward's padded tokens (see `RewardModel.max_batch_tokens`)."""

MIN_SHARED_PREFIX_TOKENS = 8
"""A common prefix shorter than this is recomputed per row: its one extra forward would cost more."""

PREFIX_EXACTNESS_ATOL = 1e-3
"""Largest |reward difference| between the prefix-sharing and the plain forward accepted as "the same"
(fp32 rounding of differently shaped GEMMs is ~1e-6; a wrong position or mask moves rewards by >0.01)."""


@dataclass(frozen=True)
class SharedPrefixKV:
    """Keys/values of the token prefix all rows of one scoring call start with, computed once."""

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    """Per decoder layer (keys, values), each (1, kv_heads, len(tokens), head_dim)."""
    support: SharingSupport
    """The model's exactness rule: sliding-window models share only rows that fit the window."""

    def fits(self, width: int) -> bool:
        """Whether rows of `width` tokens after the prefix may use it."""
        return self.support.allows(len(self.tokens) + width)

    def cache(self, rows: int, config: Any) -> Any:
        """A fresh `DynamicCache` holding the prefix for `rows` rows (views, no copy: the forward
        concatenates new entries into new tensors, so the prefix itself is never written)."""
        from transformers import DynamicCache

        data = [(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) for keys, values in self.layers]
        return DynamicCache(ddp_cache_data=data, config=config)

# ============================================================================ the model


def resolve_base(spec: str) -> str:
    """`default` -> the plain fp32 checkpoint of the embedded SmolLM2; `hf:X` or `X` -> X (HF id or path)."""
    if spec == "default":
        from rlaif.judge.models import plain_checkpoint

        return str(plain_checkpoint())
    return spec.removeprefix("hf:")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the load report ('score.weight MISSING' is expected for a new head) and progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off (as TRL does by default): the two responses of a pair must see the same network."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            setattr(module, "attention_dropout", 0.0)  # noqa: B010 - an attribute nn.Module does not declare


class RewardModel:
    """A sequence-classification model with one output, plus the input format it was trained on."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 1024,
                 prompt_format: PromptFormat | None = None, metadata: dict[str, Any] | None = None,
                 max_batch_tokens: int | None = None) -> None:
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model has one output; this model has num_labels={model.config.num_labels}")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            from rlaif.judge.models import ensure_distinct_pad_token

            ensure_distinct_pad_token(tokenizer)
        embeddings: Any = model.get_input_embeddings()
        if len(tokenizer) > embeddings.weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        # Keep HF's own last-token pooling (pipelines, TRL, other servers) correct as well.
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.formatter = PairFormatter(tokenizer, prompt_format)
        self.metadata = dict(metadata or {})
        self.head = self._find_head(model)
        self.cpu_kernels = "torch"
        """`onednn` once `pack_for_inference` swapped the trunk's linear layers."""
        self.inference_only = False
        self.backbone: Any = getattr(model, model.base_model_prefix, None) if self.head is not None else None
        self.max_batch_tokens = max_batch_tokens  # validated by the setter
        self.share_common_prefix = True
        """Scoring runs the rows' common token prefix once (where exact); False recomputes it per row."""
        self._prefix_verdict: tuple[bool, str] | None = None

    @property
    def max_batch_tokens(self) -> int | None:
        """Cap on one scoring forward's padded tokens (rows x longest row); None = rows only.

        Unset (or set to None), it is `CPU_SCORING_BATCH_TOKENS` on a CPU and no cap on a GPU; a very
        large number turns the cap off on a CPU as well. Why a cap on a CPU: the
        135M RM scored 84 held-out loop pairs (shared-prefix rows of 238 tokens on average) at 1.64
        pairs/s in batches of 16 rows and at 2.21 pairs/s in batches of at most 512 tokens, and 64
        hh-rlhf pairs at 1.48 vs 2.11 (same kernels, 2-core AVX2 EPYC; caps of 512-1024 within 7% of
        each other): a big batch pads more and its activations spill out of the caches, while
        a 135M model's GEMMs are already efficient at a few hundred rows."""
        if self._max_batch_tokens is not None:
            return self._max_batch_tokens
        return CPU_SCORING_BATCH_TOKENS if self.device.type == "cpu" else None

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int | None) -> None:
        if value is not None and value < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {value}")
        self._max_batch_tokens = value

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _find_head(model: nn.Module) -> nn.Linear | None:
        """The decoder-style scalar head applied per position (`score` in Llama/Qwen/Mistral/GPT-2)."""
        head = getattr(model, "score", None)
        return head if isinstance(head, nn.Linear) and head.out_features == 1 else None

    @classmethod
    def from_base(cls, spec: str = "default", *, max_length: int = 1024, device: str = "cpu") -> RewardModel:
        """A fresh RM: the base model's body plus a new scalar head, in fp32 (CPU training path)."""
        from rlaif.judge.models import load_tokenizer
        from transformers import AutoModelForSequenceClassification

        path = resolve_base(spec)
        with _quiet_loading():
            tokenizer = load_tokenizer(path)
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
            except (ValueError, ImportError):  # architecture without SDPA support
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.to(device)
        rm = cls(model, tokenizer, max_length=max_length, metadata={"base_model": spec, "base_path": path})
        return rm

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *, inference: bool = False) -> RewardModel:
        """Load a directory written by `save` (or by `rlaif train-rm`), ready to score.

        `inference=True` (PPO reward source, service) also swaps in the fast CPU kernels
        (`pack_for_inference`); leave it off to fine-tune or re-save the loaded model."""
        from rlaif.judge.models import load_tokenizer
        from transformers import AutoModelForSequenceClassification

        path = Path(path)
        sidecar = path / RM_CONFIG_FILE
        if not sidecar.is_file():
            raise FileNotFoundError(f"{path} is not an rlaif reward model (no {RM_CONFIG_FILE}); "
                                    "train one with `rlaif train-rm`")
        meta = json.loads(sidecar.read_text())
        with _quiet_loading():
            tokenizer = load_tokenizer(path)
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
        model.to(device)
        model.eval()
        rm = cls(model, tokenizer, max_length=int(meta["max_length"]), prompt_format=meta["prompt_format"],
                 metadata=meta)
        if inference:
            rm.pack_for_inference()
        return rm

    def pack_for_inference(self) -> bool:
        """Scoring only from now on: on CPU (fp32), run the trunk's linear layers through oneDNN
        with pre-packed weights (`rlaif.judge.cpu_kernels`, ~2x on AMD CPUs; scores agree to ~1e-5).
        The scalar head stays a plain `nn.Linear`. Afterwards the model can be neither trained nor
        saved. Returns whether the fast kernels are in use (False on CUDA or without oneDNN)."""
        from rlaif.judge.cpu_kernels import use_onednn_linears

        packed = use_onednn_linears(self.model, self.device, exclude=[self.head] if self.head is not None else [])
        if packed:
            self.cpu_kernels = "onednn"
            self.inference_only = True
        return packed

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """`save_pretrained` weights + tokenizer + the sidecar describing the input format."""
        if self.inference_only:
            raise RuntimeError("this reward model was packed for inference (load(..., inference=True)); "
                               "load it without inference=True to save or train it")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        meta = {**self.metadata, **(extra or {}), "format_version": FORMAT_VERSION, "max_length": self.max_length,
                "prompt_format": self.formatter.prompt_format, "pad_token_id": self.tokenizer.pad_token_id}
        (path / RM_CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ forward passes
    def _attention_mask_from(self, allowed: torch.Tensor) -> torch.Tensor:
        """SDPA takes the boolean mask as is; eager attention adds the mask, so it needs 0 / -inf form."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    @property
    def supports_shared_prefix(self) -> bool:
        """Custom 4D masks need per-position hidden states (a `score` head) and SDPA/eager attention."""
        return self.backbone is not None and self.model.config._attn_implementation in {"sdpa", "eager"}

    def sequence_rewards(self, batch: FlatBatch, prefix: SharedPrefixKV | None = None) -> torch.Tensor:
        """One reward per right-padded sequence, read at its last real token. (N,)

        With `prefix`, the batch holds each sequence's tokens after it, computed on top of its cache."""
        device = self.device
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask
        if self.head is None:  # e.g. encoder models: use the model's own pooling
            assert prefix is None, "a shared prefix needs a per-position `score` head"
            return self.model(input_ids=input_ids, attention_mask=attention_mask.to(device)).logits[:, 0]
        rows, width = input_ids.shape
        position_ids = cache = None
        if prefix is not None:
            start = len(prefix.tokens)
            attention_mask = torch.cat([torch.ones((rows, start), dtype=attention_mask.dtype), attention_mask], dim=1)
            position_ids = torch.arange(start, start + width, device=device).expand(rows, -1)
            cache = prefix.cache(rows, self.model.config)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask.to(device), position_ids=position_ids,
                               past_key_values=cache, use_cache=cache is not None).last_hidden_state  # (N, T, H)
        return self.head(hidden[torch.arange(rows, device=device), batch.last_index.to(device)]).squeeze(-1)  # (N,)

    def pair_rewards(self, pairs: Sequence[EncodedPair], *, shared_prefix: bool,
                     prefix: SharedPrefixKV | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), each (B,), for a batch of pairs in a single forward pass.

        Gradients flow if the caller has them enabled; evaluation wraps this in inference_mode.
        With `prefix` (shared-prefix rows only), every prompt starts with its tokens: only the rest
        of each row is computed, on top of its cache.
        """
        device = self.device
        assert prefix is None or shared_prefix, "a common-prefix KV is only used with shared-prefix rows"
        if shared_prefix:
            start = len(prefix.tokens) if prefix is not None else 0
            batch = collate_shared_prefix([EncodedPair(p.prompt[start:], p.chosen, p.rejected, p.target)
                                           for p in pairs] if start else pairs, self.pad_id)
            allowed, cache = batch.allowed, None
            if prefix is not None:
                width = batch.input_ids.shape[1]
                allowed = torch.cat([torch.ones((len(pairs), 1, width, start), dtype=torch.bool), allowed], dim=-1)
                cache = prefix.cache(len(pairs), self.model.config)
            hidden = self.backbone(input_ids=batch.input_ids.to(device), position_ids=(batch.position_ids + start).to(device),
                                   attention_mask=self._attention_mask_from(allowed.to(device)),
                                   past_key_values=cache, use_cache=cache is not None).last_hidden_state  # (B, T, H)
            rows = torch.arange(len(pairs), device=device)
            last = torch.cat([hidden[rows, batch.chosen_index.to(device)],
                              hidden[rows, batch.rejected_index.to(device)]])  # (2B, H)
            assert self.head is not None, "shared-prefix scoring needs a per-position `score` head"
            rewards = self.head(last).squeeze(-1)  # (2B,)
        else:
            sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
            rewards = self.sequence_rewards(collate_flat(sequences, self.pad_id))  # (2B,)
        return rewards[: len(pairs)], rewards[len(pairs):]

    def check_shared_prefix(self, pair: EncodedPair, atol: float = 1e-3) -> tuple[bool, str]:
        """Does the shared-prefix forward give the same rewards as separate sequences on this model?

        Run once before training: architectures that ignore custom masks or position ids, or
        attend bidirectionally, fail here and training falls back to the flat layout.
        """
        if not self.supports_shared_prefix:
            return False, (f"needs a decoder with a `score` head and sdpa/eager attention "
                           f"(got head={self.head is not None}, attn={self.model.config._attn_implementation})")
        short = EncodedPair(pair.prompt[-32:], pair.chosen[-32:], pair.rejected[-32:], pair.target)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                shared = torch.stack(self.pair_rewards([short], shared_prefix=True))
                flat = torch.stack(self.pair_rewards([short], shared_prefix=False))
        finally:
            self.model.train(was_training)
        diff = float((shared - flat).abs().max())
        if not torch.isfinite(shared).all() or diff > atol:
            return False, f"shared-prefix rewards differ from separate sequences by {diff:.2e}"
        return True, f"max |diff| {diff:.1e}"

    # ------------------------------------------------------------------ common-prefix KV (scoring only)
    @property
    def prefix_sharing(self) -> str:
        """Whether scoring shares a common prefix's KV on this model, and why: "unverified" until the
        first scoring call with a common prefix compared one batch both ways; then "exact (...)" or
        "off: <reason>" for the lifetime of this object."""
        if not self.share_common_prefix:
            return "off: share_common_prefix is False"
        if self._prefix_verdict is None:
            support, why = self._prefix_support()
            return "unverified" if support is not None else f"off: {why}"
        ok, why = self._prefix_verdict
        return f"exact ({why})" if ok else f"off: {why}"

    @property
    def _prefix_refused(self) -> bool:
        """The first-batch check found sharing inexact on this model."""
        return self._prefix_verdict is not None and not self._prefix_verdict[0]

    def _prefix_support(self) -> tuple[SharingSupport | None, str]:
        """The model's exactness rule, or None and why this model can never share a prefix
        (a rule that allows it still leaves the first-batch check)."""
        from rlaif.judge.engines.exactness import prefix_sharing_support

        if not self.supports_shared_prefix:
            return None, (f"needs a decoder with a `score` head and sdpa/eager attention "
                          f"(head={self.head is not None}, attn={self.model.config._attn_implementation})")
        support = prefix_sharing_support(self.model)
        if not support.batch_invariant or (not support.exact and support.window is None):
            return None, support.reason
        return support, ""

    def _shared_prefix(self, rows: Sequence[Sequence[int]], keep: int) -> SharedPrefixKV | None:
        """The KV of the rows' longest common prefix (each row keeps >= `keep` tokens of its own),
        or None where sharing is off, would not pay, or was found inexact on this model."""
        if not self.share_common_prefix or len(rows) < 2 or self._prefix_refused:
            return None
        support, _ = self._prefix_support()
        length = common_prefix_length(rows, keep=keep)
        if support is None or length < MIN_SHARED_PREFIX_TOKENS:
            return None
        tokens = tuple(rows[0][:length])
        out = self.backbone(input_ids=torch.tensor([tokens], device=self.device), use_cache=True)
        layers = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        return SharedPrefixKV(tokens, layers, support)

    def _batched_rewards(self, lengths: Sequence[int], batch_size: int, prefix: SharedPrefixKV | None,
                         rewards: Callable[[list[int], SharedPrefixKV | None], torch.Tensor],
                         ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(row indices, their rewards) per length-sorted batch. Rows of `lengths` tokens start with
        `prefix` (if any); a batch uses it where the exactness rule allows, the first one also the
        plain way (`_checked`), and none after a mismatch. `rewards(indices, prefix or None)`."""
        skip = len(prefix.tokens) if prefix is not None else 0
        for idx in length_sorted_batches([n - skip for n in lengths], batch_size, self.max_batch_tokens):
            if prefix is not None and prefix.fits(max(lengths[i] for i in idx) - skip):
                out = self._checked(rewards(idx, prefix), partial(rewards, idx, None))
                if self._prefix_refused:
                    prefix = None
            else:
                out = rewards(idx, None)
            yield idx, out

    def _checked(self, shared: torch.Tensor, plain: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The first prefix-sharing batch of this model is also run the plain way: keep sharing only
        if both agree (else warn once, use the plain rewards, and never share on this model again)."""
        if self._prefix_verdict is not None:
            return shared
        reference = plain()
        diff = float((shared - reference).abs().max())
        if bool(torch.isfinite(shared).all()) and diff <= PREFIX_EXACTNESS_ATOL:
            self._prefix_verdict = (True, f"first batch max |diff| {diff:.1e}")
            return shared
        self._prefix_verdict = (False, f"common-prefix KV rewards differed from the plain forward by {diff:.2e}")
        logger.warning("reward model: %s; scoring without prefix sharing from now on", self._prefix_verdict[1])
        return reference

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score_pairs(self, pairs: Sequence[EncodedPair], batch_size: int = 16,
                    shared_prefix: bool | None = None) -> tuple[list[float], list[float]]:
        """Rewards of the chosen and rejected side of each pair (batched, length-sorted)."""
        if shared_prefix is None:
            shared_prefix = self.supports_shared_prefix
        self.model.eval()
        chosen = [0.0] * len(pairs)
        rejected = [0.0] * len(pairs)
        assert shared_prefix is not None

        def rewards(idx: list[int], prefix: SharedPrefixKV | None) -> torch.Tensor:  # (2B,): chosen, then rejected
            return torch.cat(self.pair_rewards([pairs[i] for i in idx], shared_prefix=shared_prefix, prefix=prefix))

        prefix = self._shared_prefix([p.prompt for p in pairs], keep=0) if shared_prefix else None
        for idx, both in self._batched_rewards([p.row_length for p in pairs], batch_size, prefix, rewards):
            values = both.float().tolist()
            for i, c, r in zip(idx, values[: len(idx)], values[len(idx):]):
                chosen[i], rejected[i] = c, r
        return chosen, rejected

    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """Reward of each (prompt, response), formatted exactly as in training. Batched, length-sorted.

        A prompt is text (one user turn) or a list of chat messages.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not responses:
            return []
        self.model.eval()
        prompt_ids, (response_ids,) = self.formatter.encode(prompts, [responses])
        sequences = [fit_single(p, r, self.max_length) for p, r in zip(prompt_ids, response_ids)]
        out = [0.0] * len(sequences)

        def rewards(idx: list[int], prefix: SharedPrefixKV | None) -> torch.Tensor:
            start = len(prefix.tokens) if prefix is not None else 0
            return self.sequence_rewards(collate_flat([sequences[i][start:] for i in idx], self.pad_id), prefix)

        prefix = self._shared_prefix(sequences, keep=1)  # the reward is read at a row's own last token
        for idx, values in self._batched_rewards([len(s) for s in sequences], batch_size, prefix, rewards):
            for i, value in zip(idx, values.float().tolist()):
                out[i] = value
        return out
