"""The distilled reward model: input format, pair batching, Bradley-Terry losses, scoring.

RLAIF (Lee et al. 2023, §2.2.1) distills the AI labeler into a reward model (RM) trained
with a cross-entropy between the labeler's soft preference and the RM's Bradley-Terry
probability sigma(r_chosen - r_rejected). The RM then scores a (prompt, response) with
one forward pass, orders of magnitude cheaper than asking the LLM judge each time.

What this module holds (the training loop is in `rm_training.py`):
- **Input format** (`PairFormatter`): the prompt is rendered with the tokenizer's chat
  template (user turn + generation header), the response is the assistant turn that
  follows. Training and serving call the same code, so a served RM sees exactly what it
  was trained on. Too-long inputs are truncated from the left of the prompt (the oldest
  context goes first) and counted, never dropped.
- **Shared-prefix pair batching** (`collate_shared_prefix`): chosen and rejected answer the
  same prompt, so each pair is laid out in ONE row as `prompt | chosen | rejected` with a
  4D attention mask in which rejected tokens see the prompt but not the chosen response,
  and position ids restart after the prompt for the rejected part. Each token then sees
  exactly what it would see in its own sequence, but the prompt is run once instead of
  twice (the RM equivalent of "prefix sharing" for preference training). `collate_flat`
  is the ordinary layout (chosen and rejected as separate rows in one forward), used for
  models whose attention cannot take a custom mask and as the reference in tests.
- **Losses** (`soft_bradley_terry_loss`, `hard_bradley_terry_loss`): each a few lines, with
  accuracy and margin computed without gradients next to them.
- **`RewardModel`**: load/save, `pair_rewards` for training and evaluation, batched
  `score(prompts, responses)` for serving (`rlaif serve --reward-model`) and PPO
  (`RewardModelReward`).

Rewards are read from the hidden state of the last real token of each sequence, located
from the sequence lengths we built, never from `ids != pad_id` (SmolLM2's EOS is its
default pad token and occurs inside chat prompts).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

RM_CONFIG_FILE = "rlaif_reward_model.json"
"""Sidecar file saved next to the weights: the input format the RM was trained with."""

FORMAT_VERSION = 1
PromptFormat = Literal["chat_template", "plain"]


# ============================================================================ input format


@dataclass(frozen=True)
class EncodedPair:
    """One preference pair as token ids, ready to batch. `target` = P(chosen is better)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    target: float
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def row_length(self) -> int:
        """Length of the shared-prefix row `prompt | chosen | rejected`."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def trained_tokens(self) -> int:
        """Tokens of the two full sequences (prompt counted twice), as TRL's RewardTrainer counts them."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class TruncationStats:
    """How many pairs did not fit `max_length` and were cut (none are dropped).

    `truncated` counts pairs that lost anything; `response_truncated` the subset where a
    response alone was longer than `max_length`, so it lost its own first tokens too.
    """

    total: int = 0
    truncated: int = 0
    response_truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "truncated": self.truncated, "response_truncated": self.response_truncated}


def fit_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int],
             max_length: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], bool, bool]:
    """Cut a pair so `prompt + chosen` and `prompt + rejected` each fit `max_length`.

    The prompt loses tokens from its left (both sides keep the same prompt, which the
    shared-prefix layout needs). Only when one response alone exceeds `max_length` does that
    response lose its own first tokens; its end, where the reward is read, always stays.
    Returns (prompt, chosen, rejected, prompt_truncated, response_truncated).
    """
    assert max_length > 0, f"max_length must be positive, got {max_length}"
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return tuple(prompt), tuple(chosen), tuple(rejected), False, False
    keep = max(0, max_length - longest)
    cut_prompt = tuple(prompt[len(prompt) - keep:])
    response_cut = longest > max_length
    return (cut_prompt, tuple(chosen[-max_length:]), tuple(rejected[-max_length:]),
            len(cut_prompt) < len(prompt), response_cut)


def fit_single(prompt: Sequence[int], response: Sequence[int], max_length: int) -> tuple[int, ...]:
    """`prompt + response` cut from the left to at most `max_length` tokens (serving-time rule)."""
    assert max_length > 0, f"max_length must be positive, got {max_length}"
    ids = tuple(prompt) + tuple(response)
    return ids[len(ids) - max_length:] if len(ids) > max_length else ids


Prompt = str | Sequence[Mapping[str, str]]
"""A prompt as text (one user turn) or as chat messages (TRL's conversational format)."""


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages of a prompt: text becomes a single user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    if not messages:
        raise ValueError("a conversational prompt needs at least one message")
    return messages


def response_content(response: str | Sequence[Mapping[str, str]]) -> str:
    """Text of a response: a string, or (conversational format) its assistant message(s)."""
    if isinstance(response, str):
        return response
    parts = [str(m["content"]) for m in response if m.get("role", "assistant") == "assistant"]
    if not parts:
        raise ValueError(f"a conversational response needs an assistant message, got {list(response)!r}")
    return "".join(parts)


def prompt_key(prompt: Prompt) -> str:
    """A hashable identity for a prompt (text as is, messages as canonical JSON)."""
    return prompt if isinstance(prompt, str) else json.dumps(as_messages(prompt), sort_keys=True)


class PairFormatter:
    """Turns (prompt, response) into the token ids the RM is trained and served on.

    With a chat template: prompt ids = template(prompt messages) + generation header;
    response ids = the rest of template(prompt messages + assistant turn), i.e. the response
    plus the template's end-of-turn tokens. Prompt and response are tokenized separately (a
    shared prompt is then one token sequence for both responses) and that split is the
    canonical format. Without a template, `Role: content` lines and EOS stand in for it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat | None = None) -> None:
        self.tokenizer = tokenizer
        if prompt_format is None:
            prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"
        if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the RM was trained with a chat template but this tokenizer has none; "
                             "load the tokenizer saved with the reward model")
        self.prompt_format: PromptFormat = prompt_format
        self._warned_template = False

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if self.prompt_format == "plain":
            return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def response_text(self, messages: list[dict[str, str]], prompt_text: str, response: str) -> str:
        end = self.tokenizer.eos_token or ""
        if self.prompt_format == "plain":
            return response + end
        full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
        # Some templates rewrite earlier turns once an assistant turn exists (e.g. thinking
        # tags); then the generation prompt is not a prefix and we append EOS ourselves.
        if not self._warned_template:
            logger.warning("chat template: the generation prompt is not a prefix of the full conversation; "
                           "scoring responses as response + EOS after the generation prompt")
            self._warned_template = True
        return response + end

    def _tokenize(self, texts: list[str], *, special: bool) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def encode(self, prompts: Sequence[Prompt], responses_lists: Sequence[Sequence[str | Sequence[Mapping[str, str]]]]
               ) -> tuple[list[tuple[int, ...]], list[list[tuple[int, ...]]]]:
        """Token ids of each prompt and of each of its responses (`responses_lists[k][i]` answers `prompts[i]`).

        Each distinct prompt is rendered and tokenized once, however many pairs share it.
        """
        for responses in responses_lists:
            if len(responses) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        keys = [prompt_key(p) for p in prompts]
        messages = {k: as_messages(p) for k, p in zip(keys, prompts)}
        rendered = {k: self.prompt_text(m) for k, m in messages.items()}
        unique = list(rendered)
        # The plain format has no template text of its own, so BOS etc. come from the tokenizer.
        ids = self._tokenize([rendered[k] for k in unique], special=self.prompt_format == "plain")
        prompt_ids = {k: tuple(i) for k, i in zip(unique, ids)}
        out_responses = []
        for responses in responses_lists:
            texts = [self.response_text(messages[k], rendered[k], response_content(r)) for k, r in zip(keys, responses)]
            out_responses.append([tuple(i) for i in self._tokenize(texts, special=False)])
        return [prompt_ids[k] for k in keys], out_responses

    def encode_pairs(self, prompts: Sequence[Prompt], chosen: Sequence[str | Sequence[Mapping[str, str]]],
                     rejected: Sequence[str | Sequence[Mapping[str, str]]], targets: Sequence[float],
                     max_length: int) -> tuple[list[EncodedPair], TruncationStats]:
        """Tokenize and fit preference pairs; report how many had to be truncated."""
        if not len(prompts) == len(chosen) == len(rejected) == len(targets):
            raise ValueError(f"pairs need equal lengths: {len(prompts)} prompts, {len(chosen)} chosen, "
                             f"{len(rejected)} rejected, {len(targets)} targets")
        prompt_ids, (chosen_ids, rejected_ids) = self.encode(prompts, [chosen, rejected])
        pairs: list[EncodedPair] = []
        stats = TruncationStats()
        for p, c, r, t in zip(prompt_ids, chosen_ids, rejected_ids, targets):
            p2, c2, r2, p_cut, r_cut = fit_pair(p, c, r, max_length)
            stats.total += 1
            stats.truncated += int(p_cut or r_cut)
            stats.response_truncated += int(r_cut)
            pairs.append(EncodedPair(p2, c2, r2, float(t), p_cut, r_cut))
        return pairs, stats


# ============================================================================ batching


@dataclass
class SharedPrefixBatch:
    """B pairs, one row each: `prompt | chosen | rejected | pad`."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    allowed: torch.Tensor  # (B, 1, T, T) bool, True = query may attend to key
    chosen_index: torch.Tensor  # (B,) position of the last chosen token
    rejected_index: torch.Tensor  # (B,) position of the last rejected token


@dataclass
class FlatBatch:
    """N sequences, right-padded, one per row."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    last_index: torch.Tensor  # (N,)


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def collate_shared_prefix(pairs: Sequence[EncodedPair], pad_id: int) -> SharedPrefixBatch:
    """Lay each pair out in one row and build the mask that keeps chosen and rejected apart.

    Causal order is the row order, so "key <= query" already keeps the prompt and chosen
    tokens from seeing anything later; the one extra rule is that rejected queries must not
    see chosen keys. Padding keys are hidden; a padding query attends only to itself so no
    softmax row is empty (its output is never read).
    """
    assert pairs, "collate_shared_prefix needs at least one pair"
    width = max(p.row_length for p in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), PAD, dtype=torch.long)
    chosen_index = torch.empty(n, dtype=torch.long)
    rejected_index = torch.empty(n, dtype=torch.long)
    for b, pair in enumerate(pairs):
        lp, lc, lr = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        assert lc > 0 and lr > 0, "every response must have at least one token"
        end_c, end_r = lp + lc, lp + lc + lr
        input_ids[b, :end_r] = torch.tensor(pair.prompt + pair.chosen + pair.rejected, dtype=torch.long)
        position_ids[b, :end_c] = torch.arange(end_c)
        position_ids[b, end_c:end_r] = torch.arange(lp, lp + lr)  # rejected continues right after the prompt
        segment[b, :lp] = PROMPT
        segment[b, lp:end_c] = CHOSEN
        segment[b, end_c:end_r] = REJECTED
        chosen_index[b] = end_c - 1
        rejected_index[b] = end_r - 1
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    query, key = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = causal & (key != PAD) & ~((query == REJECTED) & (key == CHOSEN))  # (B, T, T)
    allowed |= torch.eye(width, dtype=torch.bool) & (query == PAD)
    return SharedPrefixBatch(input_ids, position_ids, allowed[:, None], chosen_index, rejected_index)


def collate_flat(sequences: Sequence[Sequence[int]], pad_id: int) -> FlatBatch:
    """Right-pad sequences into one batch; the last real token is at `length - 1`."""
    assert sequences, "collate_flat needs at least one sequence"
    lengths = [len(s) for s in sequences]
    assert min(lengths) > 0, "every sequence must have at least one token"
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    return FlatBatch(input_ids, attention_mask, torch.tensor(lengths, dtype=torch.long) - 1)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (shortest first): minimal padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ============================================================================ losses


def _pair_stats(margin: torch.Tensor, target: torch.Tensor, r_chosen: torch.Tensor,
                r_rejected: torch.Tensor) -> dict[str, float]:
    """Agreement with the label's direction (ties, target == 0.5, excluded), margin, reward level."""
    with torch.no_grad():
        decided = target != 0.5
        agree = ((margin > 0) == (target > 0.5)) & decided
        n_decided = int(decided.sum())
        rewards = torch.cat([r_chosen, r_rejected])
        return {
            "accuracy": float(agree.sum()) / n_decided if n_decided else float("nan"),
            "margin": float(margin.mean()),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        }


def _centering(r_chosen: torch.Tensor, r_rejected: torch.Tensor, coef: float | None) -> torch.Tensor | float:
    """Auxiliary loss pulling rewards toward zero mean (Eisenstein et al. 2023, as TRL's center_rewards_coefficient)."""
    return coef * ((r_chosen + r_rejected) ** 2).mean() if coef else 0.0


def soft_bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, target: torch.Tensor,
                            center_coef: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy between the judge's P(chosen better) and sigma(r_chosen - r_rejected) (RLAIF §2.2.1).

    With target = 1 this is the hard Bradley-Terry loss; a soft target keeps the labeler's
    uncertainty instead of pretending every AI label is certain (CAI found soft labels better).
    """
    margin = r_chosen - r_rejected  # (B,)
    loss = F.binary_cross_entropy_with_logits(margin, target.to(margin.dtype)) + _centering(r_chosen, r_rejected, center_coef)
    return loss, _pair_stats(margin, target, r_chosen, r_rejected)


def hard_bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, target: torch.Tensor | None = None,
                            center_coef: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigma(r_chosen - r_rejected): every pair treated as a certain preference for `chosen`.

    `target` is accepted so both losses share one signature, and ignored: `chosen` is the
    labeler's pick by construction of the dataset.
    """
    margin = r_chosen - r_rejected  # (B,)
    loss = -F.logsigmoid(margin).mean() + _centering(r_chosen, r_rejected, center_coef)
    return loss, _pair_stats(margin, torch.ones_like(margin), r_chosen, r_rejected)


LOSSES = {"soft": soft_bradley_terry_loss, "hard": hard_bradley_terry_loss}


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
            module.attention_dropout = 0.0


class RewardModel:
    """A sequence-classification model with one output, plus the input format it was trained on."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 1024,
                 prompt_format: PromptFormat | None = None, metadata: dict[str, Any] | None = None) -> None:
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model has one output; this model has num_labels={model.config.num_labels}")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            from rlaif.judge.models import ensure_distinct_pad_token

            ensure_distinct_pad_token(tokenizer)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
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
        self.backbone = getattr(model, model.base_model_prefix, None) if self.head is not None else None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _find_head(model: nn.Module) -> nn.Linear | None:
        """The decoder-style scalar head applied per position (`score` in Llama/Qwen/Mistral/GPT-2)."""
        head = getattr(model, "score", None)
        return head if isinstance(head, nn.Linear) and head.out_features == 1 else None

    @classmethod
    def from_base(cls, spec: str = "default", *, max_length: int = 1024, device: str = "cpu") -> RewardModel:
        """A fresh RM: the base model's body plus a new scalar head, in fp32 (CPU training path)."""
        from transformers import AutoModelForSequenceClassification

        from rlaif.judge.models import load_tokenizer

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
        from transformers import AutoModelForSequenceClassification

        from rlaif.judge.models import load_tokenizer

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

    def sequence_rewards(self, batch: FlatBatch) -> torch.Tensor:
        """One reward per right-padded sequence, read at its last real token. (N,)"""
        device = self.device
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        if self.head is None:  # e.g. encoder models: use the model's own pooling
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (N, T, H)
        rows = torch.arange(hidden.shape[0], device=device)
        return self.head(hidden[rows, batch.last_index.to(device)]).squeeze(-1)  # (N,)

    def pair_rewards(self, pairs: Sequence[EncodedPair], *, shared_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), each (B,), for a batch of pairs in a single forward pass.

        Gradients flow if the caller has them enabled; evaluation wraps this in inference_mode.
        """
        device = self.device
        if shared_prefix:
            batch = collate_shared_prefix(pairs, self.pad_id)
            hidden = self.backbone(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                                   attention_mask=self._attention_mask_from(batch.allowed.to(device)),
                                   use_cache=False).last_hidden_state  # (B, T, H)
            rows = torch.arange(len(pairs), device=device)
            last = torch.cat([hidden[rows, batch.chosen_index.to(device)],
                              hidden[rows, batch.rejected_index.to(device)]])  # (2B, H)
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
        for idx in length_sorted_batches([p.row_length for p in pairs], batch_size):
            r_c, r_r = self.pair_rewards([pairs[i] for i in idx], shared_prefix=shared_prefix)
            for i, c, r in zip(idx, r_c.float().tolist(), r_r.float().tolist()):
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
        for idx in length_sorted_batches([len(s) for s in sequences], batch_size):
            rewards = self.sequence_rewards(collate_flat([sequences[i] for i in idx], self.pad_id))
            for i, value in zip(idx, rewards.float().tolist()):
                out[i] = value
        return out
