"""OpenRLHF's remote reward protocol: from `(query, prompt)` strings to the `(prompt, response)` the judge grades.

OpenRLHF posts `{"query": [...], "prompts": [...], "labels": [...]}` where `query[i]` is the
policy's token sequence decoded with `skip_special_tokens=False`: the *chat-templated* prompt
followed by the response, its end-of-turn token and, in batched (non-packed) rollouts, padding.
Three things make a naive "strip the prompt prefix" wrong, and each is handled here:

1. **Left truncation.** OpenRLHF cuts prompts longer than `prompt_max_len` tokens from the
   left but sends the *original* prompt string, so `prompts[i]` is not a prefix of `query[i]`.
   The response is then what follows the longest suffix of the prompt found in the query
   (binary search over the suffix length with substring checks: "a suffix occurs" is monotone
   in its length, so O(n log n) character compares in C, no quadratic scan). A templated
   prompt's suffix always contains the generation header (`<|im_start|>assistant\\n`), so this is
   also the template boundary. A suffix shorter than `MIN_OVERLAP` characters (and not the whole
   prompt) is treated as chance, not as a boundary.
2. **Chat template markers.** Judging `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`
   as the prompt and `6<|im_end|>` as the response changes the reward (measured: 0.2208 against
   0.2685 for the same plain pair). `plain_prompt` turns a templated prompt (ChatML, Llama-3,
   Gemma, Phi-3/Zephyr, Llama-2/Mistral `[INST]`) back into the user's text (a transcript for
   multi-turn prompts; the policy's system prompt is dropped, it is not what the judge grades),
   and `strip_end_markers` removes trailing end-of-turn, end-of-text and padding tokens.
3. **Padding and BOS.** Leading pad / BOS tokens of the query (and the prompt's own BOS) are
   ignored when looking for the prompt.

Everything here is plain string work, linear or O(n log n) in the text length; the service runs
it off the event loop. No chat template is ever rendered: only markers are recognised.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

MIN_OVERLAP = 16
"""Characters a prompt suffix must have for its occurrence in the query to count as the boundary."""

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "</s>",
               "<end_of_turn>", "<eos>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<｜end▁of▁sentence｜>")
"""End-of-turn, end-of-text and padding tokens of common policy tokenizers (trailing junk of a response)."""

LEADING_MARKERS = (*END_MARKERS, "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<｜begin▁of▁sentence｜>")
"""Tokens that may precede the prompt in a decoded query: left padding and BOS."""

Boundary = Literal["prefix", "recovered", "none"]


@dataclass(frozen=True)
class RolloutSample:
    """What the judge grades for one OpenRLHF sample, and how it was found."""

    prompt: str
    response: str
    boundary: Boundary
    """`prefix`: the prompt starts the query (after padding/BOS); `recovered`: the response follows
    the longest prompt suffix / template boundary found in the query; `none`: no boundary, the
    whole query is the response."""
    template_stripped: bool
    """The prompt's chat template was recognised and removed."""


def split_sample(query: str, prompt: str, *, recover: bool = True, strip_template: bool = True) -> RolloutSample:
    """Split one OpenRLHF sample into (prompt, response). See the module docstring."""
    body, head = _strip_leading(query), _strip_leading(prompt)
    boundary: Boundary = "none"
    response = body
    if body.startswith(head):
        response, boundary = body[len(head):], "prefix"
    elif recover:
        start = _after_longest_suffix(head, body)
        if start is None and strip_template:
            start = _last_reply_start(body)
        if start is not None:
            response, boundary = body[start:], "recovered"
    judged_prompt, stripped = prompt, False
    if strip_template:
        plain = plain_prompt(prompt)
        if plain is not None:
            judged_prompt, stripped = plain, True
        response = strip_end_markers(response)
    return RolloutSample(prompt=judged_prompt, response=response, boundary=boundary, template_stripped=stripped)


def split_samples(queries: Sequence[str], prompts: Sequence[str], *, recover: bool = True,
                  strip_template: bool = True) -> list[RolloutSample]:
    return [split_sample(q, p, recover=recover, strip_template=strip_template) for q, p in zip(queries, prompts)]


# ---------------------------------------------------------------------------------- boundaries
def _after_longest_suffix(prompt: str, query: str) -> int | None:
    """Index in `query` right after the first occurrence of the longest suffix of `prompt` it contains,
    or None when that suffix is shorter than `MIN_OVERLAP` characters (and not the whole prompt)."""
    low, high = 0, min(len(prompt), len(query))  # invariant: the suffix of length `low` occurs in query
    while low < high:
        middle = (low + high + 1) // 2
        if prompt[len(prompt) - middle:] in query:
            low = middle
        else:
            high = middle - 1
    if low < min(len(prompt), MIN_OVERLAP) or low == 0:
        return None
    return query.find(prompt[len(prompt) - low:]) + low


def _markers_regex(markers: Sequence[str]) -> re.Pattern[str]:
    """Matches a run of `markers` (with whitespace between) at the start of a string. Each repetition
    must consume a whole marker, so matching is linear, however many markers there are."""
    alternatives = "|".join(re.escape(marker) for marker in sorted(markers, key=len, reverse=True))
    return re.compile(rf"(?:\s*(?:{alternatives}))+")


_LEADING = _markers_regex(LEADING_MARKERS)
_TRAILING_REVERSED = _markers_regex([marker[::-1] for marker in END_MARKERS])  # matched on the reversed text


def _strip_leading(text: str) -> str:
    """`text` without leading padding / BOS tokens; whitespace after the last one is kept."""
    match = _LEADING.match(text)
    return text[match.end():] if match else text


def strip_end_markers(response: str) -> str:
    """`response` without trailing end-of-turn / end-of-text / padding tokens and the whitespace around them.

    A response without such tokens is returned unchanged (its own trailing whitespace included)."""
    match = _TRAILING_REVERSED.match(response[::-1])
    return response[:len(response) - match.end()].rstrip() if match else response


# ---------------------------------------------------------------------------------- chat templates
@dataclass(frozen=True)
class _TurnFormat:
    """A template whose turns read `start + role + header_end + content + end`."""

    start: str
    header_end: str
    end: str
    assistant: str = "assistant"


_TURN_FORMATS = (
    _TurnFormat("<|im_start|>", "\n", "<|im_end|>"),                              # ChatML: SmolLM2, Qwen, ...
    _TurnFormat("<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>"),  # Llama-3
    _TurnFormat("<start_of_turn>", "\n", "<end_of_turn>", assistant="model"),   # Gemma
)
_ROLE_TAG = re.compile(r"<\|(system|user|assistant)\|>\n?")  # Phi-3 / Zephyr: <|user|>\n ... <|end|> or </s>
_ROLES = {"system", "user", "assistant", "model", "tool", "ipython"}

Turn = tuple[str, str, bool]
"""(role, content, closed): closed = the turn's end marker was present."""


def _turns(text: str) -> list[Turn] | None:
    """The conversation a templated text encodes, or None when it is not one we recognise."""
    body = _strip_leading(text)
    for fmt in _TURN_FORMATS:
        if body.startswith(fmt.start):
            return _split_turns(body, fmt)
    if _ROLE_TAG.match(body):
        return _split_role_tags(body)
    if body.startswith("[INST]"):
        return _split_inst(body)
    return None


def _split_turns(body: str, fmt: _TurnFormat) -> list[Turn] | None:
    turns: list[Turn] = []
    for chunk in body.split(fmt.start)[1:]:
        role, found, rest = chunk.partition(fmt.header_end)
        if not found or role.strip() not in _ROLES:
            return None
        content, closed, tail = rest.partition(fmt.end)
        if _strip_leading(tail).strip():  # text outside any turn: not a template we understand
            return None
        turns.append(("assistant" if role.strip() == fmt.assistant else role.strip(), content, bool(closed)))
    return turns


def _split_role_tags(body: str) -> list[Turn] | None:
    pieces = _ROLE_TAG.split(body)  # ["", role, content, role, content, ...]
    if pieces[0].strip():
        return None
    turns: list[Turn] = []
    for role, content in zip(pieces[1::2], pieces[2::2]):
        closed = strip_end_markers(content)
        turns.append((role, closed, closed != content))
    return turns


def _split_inst(body: str) -> list[Turn] | None:
    turns: list[Turn] = []
    for chunk in body.split("[INST]")[1:]:
        user, found, reply = chunk.partition("[/INST]")
        if not found:
            return None
        system, marker, rest = user.partition("<</SYS>>")
        if marker:
            turns.append(("system", system.replace("<<SYS>>", "").strip(), True))
            user = rest
        turns.append(("user", user.strip(), True))
        closed = strip_end_markers(reply)
        turns.append(("assistant", closed.strip(), closed != reply))
    return turns


def plain_prompt(prompt: str) -> str | None:
    """The user text of a chat-templated prompt ending in the generation header, or None if `prompt` is not one.

    One user turn gives its content; a multi-turn prompt gives a `User: ...` / `Assistant: ...`
    transcript. System turns (the policy's own system prompt) are dropped."""
    turns = _turns(prompt)
    if not turns or len(turns) < 2:
        return None
    role, content, closed = turns[-1]
    if role != "assistant" or closed or content.strip():
        return None  # not a prompt that ends by opening the assistant's turn
    history = [(r, c.strip()) for r, c, _ in turns[:-1] if r != "system"]
    if not history or any(not closed_turn for _, _, closed_turn in turns[:-1]):
        return None
    if len(history) == 1 and history[0][0] == "user":
        return history[0][1] or None
    return "\n\n".join(f"{role.capitalize()}: {text}" for role, text in history) or None


_REPLY_HEADERS = (*(f"{fmt.start}{fmt.assistant}{fmt.header_end}" for fmt in _TURN_FORMATS), "<|assistant|>\n",
                  "[/INST]")


def _last_reply_start(query: str) -> int | None:
    """Where the last assistant turn's content starts in a templated query, or None.

    Used when the prompt matches nothing in the query: the template itself still marks where
    the policy's reply begins."""
    for header in _REPLY_HEADERS:
        position = query.rfind(header)
        if position >= 0:
            return position + len(header)
    return None
