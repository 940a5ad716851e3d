"""Reward-model input format and batching: what a distilled reward model is trained and served on.

Shared by the reward model's inference (`rlaif.judge.reward_model`, used by the judge
service and by PPO's `RewardModelReward`) and its training (`rlaif.policy_training.reward_model`),
so a served RM sees exactly the token layout it was trained on.

- **Input format** (`PairFormatter`): the prompt is rendered with the tokenizer's chat
  template (user turn + generation header), the response is the assistant turn that
  follows. Too-long inputs are truncated from the left of the prompt (the oldest context
  goes first) and counted, never dropped.
- **Shared-prefix pair batching** (`collate_shared_prefix`): chosen and rejected answer the
  same prompt, so each pair is laid out in ONE row as `prompt | chosen | rejected` with a
  4D attention mask in which rejected tokens see the prompt but not the chosen response,
  and position ids restart after the prompt for the rejected part. Each token then sees
  exactly what it would see in its own sequence, but the prompt is run once instead of
  twice. `collate_flat` is the ordinary layout (one sequence per row), used for models
  whose attention cannot take a custom mask and as the reference in tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

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
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def response_text(self, messages: list[dict[str, str]], prompt_text: str, response: str) -> str:
        end = self.tokenizer.eos_token or ""
        if self.prompt_format == "plain":
            return response + end
        full = str(self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                      tokenize=False))
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


def common_prefix_length(rows: Sequence[Sequence[int]], keep: int = 0) -> int:
    """Length of the longest token prefix all rows start with, leaving each row >= `keep` own tokens."""
    if not rows:
        return 0
    limit = min(len(row) for row in rows) - keep
    first = rows[0]
    length = 0
    while length < limit and all(row[length] == first[length] for row in rows):
        length += 1
    return max(length, 0)


def length_sorted_batches(lengths: Sequence[int], batch_size: int,
                          max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (shortest first): minimal padding.

    `max_batch_tokens` also caps a batch's padded size (rows x its longest row); a row longer than
    the cap runs alone. Why: on a CPU a forward over a few thousand tokens of a small model is
    slower per token than several smaller ones (its activations no longer fit the caches; see
    `RewardModel.max_batch_tokens`), so a row count alone is the wrong limit there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:  # ascending: the row being added is the batch's longest
        if batches and len(batches[-1]) < batch_size and (
                max_batch_tokens is None or (len(batches[-1]) + 1) * lengths[i] <= max_batch_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches

