"""The engine protocol every backend implements (HF transformers, vLLM, OpenAI-compatible HTTP).

Judges only ever need a few things from a language model:
- `label_logprobs`: for a closed set of answer labels, log P(the assistant's reply **is exactly**
  that label). This is the one label semantics of the project, identical for every engine:

      P(label) = P(the reply starts with the label's tokens) x P(the token after them ends the label)

  where a token *ends* a label when it is a special/end-of-turn token, or its text starts with a
  character that is not a letter, digit or underscore (space, newline, punctuation), and it does
  not continue the label into another label of the set. So "10" never counts as "1" (a judge
  certain of "10" puts its mass on "10" alone), "A." and "A\n" count as "A", and "Apple" does not.
  Without the second factor, a label that is a prefix of another one ("1" of "10") would
  contain every continuation into the longer label and the score scale would fold over.
  The rows are **not normalized**: `exp(row).sum()` is the label mass, the probability the judge
  put on answering with a label at all (low for a model that starts with "<think>" or "**A**").
  Judges normalize over the label set and report that mass.
- `generate`: free text, for chain-of-thought rationales and for policy rollouts.
- `prompt_token_counts` / `context_length`: token budgets (the service refuses items that would
  not fit, instead of holding the engine for minutes).
- `special_tokens`: the tokenizer's control/special token texts, so user text containing them is
  defused before it reaches the model.

Keeping the protocol this small is what lets the same judge run in-process on CPU, on a
GPU with vLLM, or against any OpenAI-compatible server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rlaif.judge.types import ChatPrompt

LABEL_SEMANTICS = "exact-label-v2"
"""Names the label definition above; part of every judgment cache key, so judgments computed
under an older definition (v1: P(label tokens) with nothing required after them) are never reused."""


class EngineError(RuntimeError):
    """An engine could not produce what was asked (server down, no logprobs, OOM, ...)."""


class GenerationParams(BaseModel):
    """Decoding settings for `Engine.generate`. Part of every cache key that involves generation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64, description="Samples per prompt.")
    seed: int | None = Field(None, description="Seed for sampling; same seed + same batch -> same text.")
    stop: tuple[str, ...] = Field((), description="Extra stop strings (EOS always stops).")


@runtime_checkable
class Engine(Protocol):
    """What a judge needs from a model backend."""

    @property
    def engine_id(self) -> str:
        """Identity of everything that changes a number: resolved model content (a fingerprint of its
        files, not its folder name), dtype, device class and result-affecting options. Cache keys use it."""
        ...

    @property
    def model_name(self) -> str:
        """Human-readable model name reported in judgments."""
        ...

    @property
    def context_length(self) -> int | None:
        """Most tokens one sequence may hold (prompt + generated), or None when unknown."""
        ...

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Texts of the tokenizer's special/control tokens (empty when the engine has no tokenizer)."""
        ...

    def label_logprobs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        """(len(prompts), len(labels)) log P(reply is exactly label), unnormalized (see module docstring)."""
        ...

    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        """Return `params.n` completions for each prompt (outer list aligned with `prompts`)."""
        ...

    def prompt_token_counts(self, prompts: Sequence[ChatPrompt]) -> list[int]:
        """Tokens each prompt occupies after the chat template and generation header."""
        ...


@dataclass(frozen=True)
class LabelDistribution:
    """Label log-probs turned into what judges report: normalized probabilities and the label mass."""

    probs: np.ndarray
    """(N, L) P(label | the reply is one of the labels); rows sum to 1."""
    mass: np.ndarray
    """(N,) P(the reply is one of the labels) before normalizing, in [0, 1]."""


def label_distribution(log_scores: np.ndarray) -> LabelDistribution:
    """Normalize (N, L) label log-probs over the label set, keeping the pre-normalization mass.

    A row whose labels all have probability 0 (every log-prob is -inf) gets a uniform
    distribution and mass 0, never NaN.
    """
    log_scores = np.asarray(log_scores, dtype=np.float64)
    top = log_scores.max(axis=-1, keepdims=True)  # (N, 1)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    weights = np.exp(log_scores - finite_top)  # (N, L)
    totals = weights.sum(axis=-1, keepdims=True)
    empty = totals[:, 0] <= 0
    probs = np.where(totals > 0, weights / np.where(totals > 0, totals, 1.0), 1.0 / log_scores.shape[-1])
    mass = np.where(empty, 0.0, np.exp(np.log(np.where(empty, 1.0, totals[:, 0])) + finite_top[:, 0]))
    return LabelDistribution(probs=probs, mass=np.clip(mass, 0.0, 1.0))


def label_probs(engine: Engine, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
    """(N, L) label distribution normalized over the label set (what a judge reads as its verdict)."""
    if not prompts:
        return np.zeros((0, len(labels)))
    return label_distribution(engine.label_logprobs(prompts, labels)).probs


def normalize_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for very negative log-probs. (N, L) -> (N, L)."""
    return label_distribution(log_probs).probs


# ---------------------------------------------------------------------------------- label boundaries
def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def ends_label(label: str, following: str, labels: Sequence[str], *, special: bool = False) -> bool:
    """Whether a token whose text is `following`, right after `label`, ends that label.

    `special`: the token is a special/end-of-turn token (it always ends the reply). Empty text
    counts as special (servers render end-of-turn tokens as ""). The Unicode replacement
    character (a partial UTF-8 byte token) is treated as a continuation: it may be the start
    of a letter, so counting it would overstate the label.
    """
    if special or following == "":
        return True
    first = following[0]
    if first == "\ufffd" or _is_word_char(first):
        return False
    extended = label + following
    return not any(other != label and other.startswith(label) and (extended.startswith(other) or other.startswith(extended))
                   for other in labels)


def check_labels(labels: Sequence[str]) -> list[str]:
    """Labels as the reply must read them; whitespace-only or duplicate labels are errors."""
    targets = [label.strip() for label in labels]
    if any(not target for target in targets):
        raise EngineError(f"labels must contain non-whitespace text, got {list(labels)!r}")
    if len(set(targets)) != len(targets):
        raise EngineError(f"labels must be distinct after stripping whitespace, got {list(labels)!r}")
    return targets


# ---------------------------------------------------------------------------------- top-k engines
PrefixT = TypeVar("PrefixT", bound=Hashable)


@dataclass(frozen=True)
class TopCandidate:
    """One entry of a server's top-k for the next token."""

    text: str
    logprob: float
    special: bool = False


def missing_label_floor(log_probs: Sequence[float]) -> float:
    """Log-prob assigned to a label token absent from the returned top-k.

    The smaller of the lowest returned log-prob and log(1 - returned mass), minus ln 2: at most
    half of what the missing token could possibly have, so it ends up clearly below every label
    that does show up.
    """
    if not log_probs:
        return math.log(0.5)
    lowest = min(log_probs)
    leftover = 1.0 - sum(math.exp(lp) for lp in log_probs)  # what every unseen token shares, at most
    if leftover < -1e-9:  # inconsistent numbers (a server's rounding): only the lowest shown value bounds it
        return lowest - math.log(2.0)
    return min(lowest, math.log(max(leftover, 1e-12))) - math.log(2.0)


def boundary_logprob(label: str, candidates: Sequence[TopCandidate], labels: Sequence[str]) -> float:
    """log P(the next token ends `label`) from a top-k list: the mass of the ending tokens it shows.

    What a top-k list cannot show: ending tokens outside the top-k, so this is a lower bound
    (exact when the shown mass is ~1, which is the case for a judge that answers with a label).
    """
    mass = sum(math.exp(c.logprob) for c in candidates if ends_label(label, c.text, labels, special=c.special))
    return math.log(mass) if mass > 0 else -math.inf


def exact_label_scores(labels: Sequence[str], fetch: Callable[[str], Sequence[TopCandidate]], *,
                       normalize: Callable[[str, bool], str] | None = None,
                       can_continue: bool = True) -> np.ndarray:
    """log P(reply is exactly label) for each label, from top-k lists of the next token. (L,)

    `fetch(prefix)` returns the top-k of the token after the reply has started with the text
    `prefix` ("" for the first token). Labels are followed through the candidates as text:
    a candidate whose text completes the label moves to the label's boundary check; one whose
    text is a proper prefix of the label is followed with a further `fetch`. `normalize(text,
    at_start)` maps a server's token text to how it reads in the reply (space markers, leading
    whitespace at the start). With `can_continue=False` (a server that cannot continue a reply
    from a prefix) only the first token is visible: single-token labels that are no prefix of
    another label get P(end) = 1 (documented as what such a server cannot show), and a label set
    that needs more raises `EngineError`.
    """
    targets = check_labels(labels)
    norm = normalize or (lambda text, at_start: text.lstrip() if at_start else text)
    memo: dict[str, Sequence[TopCandidate]] = {}

    def top(prefix: str) -> Sequence[TopCandidate]:
        if prefix not in memo:
            memo[prefix] = fetch(prefix)
        return memo[prefix]

    def score(target: str, prefix: str) -> float:
        candidates = top(prefix)
        total = -math.inf
        children: dict[str, float] = {}
        for candidate in candidates:
            piece = norm(candidate.text, not prefix)
            if not piece or candidate.special:
                continue
            text = prefix + piece
            if text == target or target.startswith(text):
                children[text] = float(np.logaddexp(children.get(text, -math.inf), candidate.logprob))
        if not children:
            return missing_label_floor([c.logprob for c in candidates])
        for text, logprob in children.items():
            if text == target:
                total = float(np.logaddexp(total, logprob + end(target)))
            elif can_continue:
                total = float(np.logaddexp(total, logprob + score(target, text)))
            else:
                raise EngineError(f"label {target!r} spans several tokens, which needs a server that can continue "
                                  "a reply from a prefix")
        return total

    def end(target: str) -> float:
        if not can_continue:
            if any(other != target and other.startswith(target) for other in targets):
                raise EngineError(f"label {target!r} is a prefix of another label; telling them apart needs a server "
                                  "that can continue a reply from a prefix")
            return 0.0
        return boundary_logprob(target, top(target), targets)

    return np.array([score(target, "") for target in targets], dtype=np.float64)


# ---------------------------------------------------------------------------------- tokenizers
def encode_chat_prompt(tokenizer: Any, prompt: ChatPrompt) -> list[int]:
    """Chat template + generation header, tokenized without adding extra special tokens.

    Engines that tokenize locally (HF, vLLM) share this, so both see the same ids for a prompt."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_label_ids(tokenizer: Any, label: str) -> list[int]:
    """Token ids of a label as it follows the prompt; a label that tokenizes to nothing is an error."""
    ids = list(tokenizer(label.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise EngineError(f"label {label!r} tokenizes to nothing")
    return ids


def tokenizer_special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every special/control token text of a HF tokenizer: its named specials and every added
    token marked special (SmolLM2 has 17: `<|im_start|>`, `<file_sep>`, `<repo_name>`, ...)."""
    found: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder: Mapping[int, Any] = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for added in decoder.values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return tuple(sorted((token for token in found if token), key=lambda t: (-len(t), t)))


def vocab_following_texts(tokenizer: Any) -> tuple[list[str], np.ndarray]:
    """For every token id: the text it adds after a plain word, and whether it is special.

    Decoding a token on its own loses a SentencePiece token's leading space ("▁is" -> "is"), so
    each token is decoded after an anchor word and the anchor's text removed. Used to build the
    per-vocabulary "ends a label" masks of local-tokenizer engines. (V,) texts, (V,) bool.
    """
    size = len(tokenizer)
    anchor = encode_label_ids(tokenizer, "a")[:1]
    anchor_text = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pairs = [anchor + [token] for token in range(size)]
    decoded = tokenizer.batch_decode(pairs, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    texts = [text[len(anchor_text):] if text.startswith(anchor_text) else text for text in decoded]
    special = np.zeros(size, dtype=bool)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            special_ids.add(int(token_id))
    for token_id in special_ids:
        if 0 <= token_id < size:
            special[token_id] = True
    return texts, special


def ending_token_mask(label: str, labels: Sequence[str], texts: Sequence[str], special: np.ndarray) -> np.ndarray:
    """(V,) bool: which next tokens end `label` (see `ends_label`)."""
    return np.fromiter((ends_label(label, text, labels, special=bool(flag)) for text, flag in zip(texts, special)),
                       dtype=bool, count=len(texts))


class LocalTokenizerMixin:
    """The tokenization half of the engine protocol for engines that hold a HF tokenizer (hf, vllm),
    and the per-label-set masks of tokens that end each label (`ending_token_mask`), built once per set.

    Both engines then tokenize prompts and labels, and decide where a label ends, with one code path.
    """

    tokenizer: Any
    _following: tuple[list[str], np.ndarray] | None = None
    _label_endings: dict[tuple[str, ...], list[np.ndarray]]

    def prompt_token_counts(self, prompts: Sequence[ChatPrompt]) -> list[int]:
        return [len(self.encode_prompt(p)) for p in prompts]

    def encode_prompt(self, prompt: ChatPrompt) -> list[int]:
        return encode_chat_prompt(self.tokenizer, prompt)

    def encode_label(self, label: str) -> list[int]:
        return encode_label_ids(self.tokenizer, label)

    def label_ending_masks(self, labels: tuple[str, ...]) -> list[np.ndarray]:
        """(V_tokenizer,) bool mask per label of the tokens that may follow it and end it, cached per label set."""
        if not hasattr(self, "_label_endings"):
            self._label_endings = {}
        if labels not in self._label_endings:
            if self._following is None:
                self._following = vocab_following_texts(self.tokenizer)
            texts, special = self._following
            self._label_endings[labels] = [ending_token_mask(label, labels, texts, special) for label in labels]
        return self._label_endings[labels]
