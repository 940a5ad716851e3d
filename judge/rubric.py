"""Rubrics: validated, sandboxed prompt templates that turn items into judge prompts.

A rubric is data (one YAML file in `prompts/` or a user's own file) loaded into the
`Rubric` model below; see `prompts/README.md` for the format. Two safety properties hold
for every rubric, built-in or not:

- Templates render in Jinja2's `ImmutableSandboxedEnvironment`, so a rubric file cannot
  reach Python internals, and undefined variables fail loudly (`StrictUndefined`).
- User text (prompt, responses) is never rendered *as* a template: it is passed as data,
  wrapped in tag delimiters by `delimit()`, after `neutralize()` has defused anything in it
  that looks like one of those delimiters or like a chat-template control token. A response
  therefore cannot close its own block, open a fake one, or inject a system turn.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import random
import re
from functools import cached_property, lru_cache
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlaif.judge.types import ChatPrompt


class RubricError(ValueError):
    """A rubric file is invalid; the message names the file and the field."""


class RubricNotFound(LookupError):
    """No built-in rubric has this id and no file exists at this path."""


# Tag names that wrap user text. `neutralize` defuses any look-alike of these in user text.
_TAGS = ("user_prompt", "response_a", "response_b", "response", "principle", "reference", "criterion", "criteria")

# What `neutralize` defuses, by the character it swaps: (the rest of a look-alike after that
# character, the characters that rest can start with). Each pass consumes only the swapped
# character and checks the rest in a lookahead, so overlapping look-alikes are all found in one
# left-to-right pass. Whitespace is one `\s*` per run, never two in a row: the old
# `<(?=\s*/?\s*...)` re-split one run between two `\s*` at every backtracking step, which is
# quadratic ("<" + 16,000 spaces took ~6 s, holding the GIL). Here a second run only starts after
# a literal "/", so each character is looked at a bounded number of times: linear time. The
# first-character class in front is only for speed (most "<" in text fail it at once).
_NAME = r"(?=[uUrRpPsScC])(?i:user_prompt|response(?:_a|_b)?|reference|principle|criteri(?:on|a)|s)[>/\s]"
_STRUCTURE = {
    "<": (rf"\s*(?:\||/\s*{_NAME}|{_NAME})", "\\s|/uUrRpPsScC"),  # our tags, ChatML / Llama-3 "<|"
    "|": (r"\s*>", "\\s>"),                                     # "|>" of <|im_end|>, <|eot_id|>
    "[": (r"\s*(?:/\s*)?(?i:INST)\s*\]", "\\s/iI"),          # Llama-2 / Mistral turn markers
}
_SWAPS = {"<": "\u2039", "|": "\u00a6", "[": "\u2045"}  # < -> ‹, | -> ¦, [ -> ⁅
_ZERO_WIDTH_SPACE = "\u200b"


def _trie(words: Sequence[str]) -> str:
    """A regex matching where any of `words` starts, as a trie: at each character at most one branch
    can continue, so checking a position costs O(longest word), however many words there are.

    Only "some word starts here" matters, so a word that is a prefix of another ends its branch."""
    root: dict[str, dict] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node.clear()  # the shorter word already decides; longer continuations are irrelevant
        node[""] = {}

    def build(node: dict[str, dict]) -> str:
        if "" in node:
            return ""
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items())]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return build(root)


def _lookahead(rests: Sequence[str], starts: str) -> str:
    """`(?=[starts])(?=rest-1|rest-2|...)`; no first-character filter when some rest is empty."""
    alternatives = "|".join(rests)
    if any(not rest for rest in rests):
        return f"(?={alternatives})"
    return f"(?=[{starts}])(?={alternatives})"


@lru_cache(maxsize=64)
def _defusers(special_tokens: tuple[str, ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    """(pattern, replacement) passes for one engine's special-token set, compiled once per set."""
    by_first: dict[str, list[str]] = {}
    for token in sorted({token for token in special_tokens if token}):
        by_first.setdefault(token[0], []).append(token[1:])
    passes: list[tuple[re.Pattern[str], str]] = []
    for char, swap in _SWAPS.items():
        structure, starts = _STRUCTURE[char]
        rests = by_first.pop(char, [])
        if not rests:
            lookahead = _lookahead([structure], starts)
        elif all(rests):
            lookahead = _lookahead([structure, _trie(rests)], starts + "".join(re.escape(r[0]) for r in rests))
        else:  # the bare character is itself a special token: every occurrence goes
            lookahead = ""
        passes.append((re.compile(re.escape(char) + lookahead), swap))
    if by_first:  # tokens starting with another character: a zero-width space after it splits them
        first = [re.escape(char) + (f"(?={_trie(rests)})" if all(rests) else "") for char, rests in sorted(by_first.items())]
        passes.append((re.compile("|".join(first)), "\\g<0>" + _ZERO_WIDTH_SPACE))
    return tuple(passes)


def neutralize(text: str, special_tokens: Sequence[str] = ()) -> str:
    """Make user text unable to close or imitate our delimiters, chat control tokens or any of the
    engine tokenizer's special tokens.

    Only the opening character of a look-alike is swapped for a visually similar one
    (`<` -> `‹`, `|` -> `¦`, `[` -> `⁅`), so the text stays readable for the judge while no
    longer matching what the template or the tokenizer treat as structure. `special_tokens`
    (the engine tokenizer's own special-token texts, e.g. SmolLM2's `<file_sep>`) are defused
    wherever they occur; one that starts with another character gets a zero-width space after
    its first character (so a one-character token other than `<`, `|`, `[` cannot be defused;
    tokenizers have none). Linear time in `len(text)` for any text and any number of tokens: a
    handful of regex passes, each looking at every character a bounded number of times.
    """
    for pattern, replacement in _defusers(tuple(special_tokens)):
        text = pattern.sub(replacement, text)
    return text


def delimit(tag: str, text: str, special_tokens: Sequence[str] = ()) -> str:
    """Wrap neutralized user text in `<tag>` ... `</tag>` on their own lines."""
    assert tag in _TAGS, f"unknown delimiter tag {tag!r}"
    return f"<{tag}>\n{neutralize(text, special_tokens)}\n</{tag}>"


class CoTConfig(BaseModel):
    """Two-step chain of thought (RLAIF §2.1): decode a rationale, then read the label after it."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(description="Appended to the task instead of `answer_instruction`: asks for reasoning first.")
    label_request: str = Field(description="Follow-up user turn after the rationale that asks for the bare label.")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Rationale length cap.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (the RLAIF paper's choice).")
    samples: int = Field(1, ge=1, le=32, description="Self-consistency: rationales per order, label distributions averaged.")


class Rubric(BaseModel):
    """A judge prompt as data. Field docs double as the YAML format reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Stable identifier, used in APIs and cache keys.")
    version: str = Field(min_length=1, description="Bump whenever the wording changes: cached judgments are keyed by it.")
    kind: Literal["pairwise", "score", "checklist", "group"]
    description: str = ""
    system: str | None = Field(None, description="System message (plain text, not a template).")
    template: str = Field(min_length=1, description="Jinja2 user-message template. Variables: prompt, response_a, response_b (pairwise), response (score, checklist), responses (group: a list), criterion (checklist), criteria (a score rubric for implicit checklists), reference (the item's reference answer, or '' when it has none), principle (constitutions). User text arrives already wrapped in delimiters.")
    answer_instruction: str = Field(description="Appended to the rendered template in log-prob mode: asks for the bare label. Group rubrics: a template with `index`, the 1-based position of the response asked about.")
    labels: list[str] = Field(description="Pairwise: exactly two, [first-better, second-better]. Checklist: exactly two, [yes, no]. Score / group: the score labels, e.g. '1'..'10'.")
    label_values: list[float] | None = Field(None, description="Score and group rubrics: numeric value of each label (default: float(label)).")
    requires_reference: bool = Field(False, description="Reference-guided rubric: every item must carry a `reference` answer (the template uses `reference`).")
    principles: list[str] | None = Field(None, description="A constitution: one principle is rendered per prompt as `principle`.")
    principles_per_comparison: int | None = Field(None, ge=1, description="Principles sampled per item (seeded); null = all, averaged.")
    cot: CoTConfig | None = Field(None, description="Enables `mode=cot`.")
    clamp: tuple[float, float] | None = Field(None, description="Clip probabilities into [lo, hi] (CAI clamped CoT labels to 0.4-0.6).")
    source: str = Field("<memory>", description="Where the rubric was loaded from (set by the loader).")

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, labels: list[str]) -> list[str]:
        if len(labels) < 2:
            raise ValueError("needs at least two labels")
        if len(set(labels)) != len(labels) or any(not label for label in labels):
            raise ValueError("labels must be distinct, non-empty strings")
        return labels

    @model_validator(mode="after")
    def _consistent(self) -> Rubric:
        if self.kind == "pairwise" and len(self.labels) != 2:
            raise ValueError("field 'labels': a pairwise rubric has exactly two labels [first-better, second-better]")
        if self.kind == "checklist":
            if len(self.labels) != 2:
                raise ValueError("field 'labels': a checklist rubric has exactly two labels [yes, no]")
            if "criterion" not in self.template:
                raise ValueError("field 'template': a checklist rubric asks about one `criterion`, which the template never uses")
        if self.kind == "group":
            if "responses" not in self.template:
                raise ValueError("field 'template': a group rubric shows the group as `responses`, which the template never uses")
            if "index" not in self.answer_instruction:
                raise ValueError("field 'answer_instruction': a group rubric asks about response `index`, which it never uses")
        if self.requires_reference and not self.uses_reference:
            raise ValueError("field 'requires_reference': the template never uses `reference`")
        if self.kind in ("score", "group"):
            values = self.label_values
            if values is None:
                try:
                    values = [float(label) for label in self.labels]
                except ValueError:
                    raise ValueError("field 'label_values': required when score labels are not numbers") from None
                object.__setattr__(self, "label_values", values)
            if len(values) != len(self.labels):
                raise ValueError("field 'label_values': needs one value per label")
            if max(values) == min(values):
                raise ValueError("field 'label_values': values must not all be equal")
        if self.clamp is not None and not (0.0 <= self.clamp[0] < self.clamp[1] <= 1.0):
            raise ValueError("field 'clamp': needs 0 <= lo < hi <= 1")
        needs_principle = "principle" in self.template
        if needs_principle and not self.principles:
            raise ValueError("field 'principles': the template uses `principle` but no principles are given")
        if self.principles and not needs_principle:
            raise ValueError("field 'template': principles are given but the template never uses `principle`")
        # Compile now so template errors surface at load time, naming the rubric.
        for name, text in (("template", self.template), ("answer_instruction", self.answer_instruction)):
            try:
                _environment().from_string(text)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"field '{name}': line {exc.lineno}: {exc.message}") from None
        return self

    @property
    def uses_reference(self) -> bool:
        """The template shows the item's reference answer (a reference-guided rubric)."""
        return "reference" in self.template

    @property
    def uses_criteria(self) -> bool:
        """The template shows the whole checklist (`criteria`): a score rubric for implicit checklist grading."""
        return "criteria" in self.template

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything that changes what the judge sees; part of every cache key.

        Fields added after rubrics were first fingerprinted are left out while they hold their
        default, so existing rubrics (and calibration files fit on them) keep their fingerprint."""
        exclude = {"source"} | ({"requires_reference"} if not self.requires_reference else set())
        payload = self.model_dump_json(exclude=exclude)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _messages(self, user: str) -> ChatPrompt:
        messages: ChatPrompt = []
        if self.system:
            messages.append({"role": "system", "content": self.system.strip()})
        messages.append({"role": "user", "content": user})
        return messages

    def _render_task(self, variables: dict[str, Any]) -> str:
        try:
            return _environment().from_string(self.template).render(**variables).strip()
        except jinja2.UndefinedError as exc:
            raise RubricError(f"{self.source}: field 'template': {exc.message}") from None

    def check_item_fields(self, *, reference: str | None, criteria: Sequence[Any] | None = None) -> None:
        """Refuse an item this rubric would silently misjudge: a reference answer it never shows, none
        where it requires one, a checklist it never shows or needs and lacks (`RubricError`, one line)."""
        if reference is not None and not self.uses_reference:
            raise RubricError(f"rubric '{self.id}' does not use a reference answer, but the item has one; use a "
                              "reference-guided rubric (e.g. correctness, correctness-pairwise) or drop the reference")
        if reference is None and self.requires_reference:
            raise RubricError(f"rubric '{self.id}' grades against a reference answer, but the item has none; "
                              "give each item a `reference` (CLI: --reference)")
        if criteria is None and self.uses_criteria:
            raise RubricError(f"rubric '{self.id}' shows a checklist (`criteria`), but the item has none; judge it "
                              "with the checklist judge (implicit mode) and give the item its criteria")

    def task_text(self, *, prompt: str, response_a: str | None = None, response_b: str | None = None,
                  response: str | None = None, principle: str | None = None, reference: str | None = None,
                  criterion: str | None = None, criteria: Sequence[Any] | None = None,
                  responses: Sequence[str] | None = None, special_tokens: Sequence[str] = ()) -> str:
        """Render the user task (without the closing instruction); user text is delimited.

        `reference` (the item's reference answer), `criterion` (checklist rubrics), `criteria` (a
        checklist of `Criterion` shown whole, implicit mode) and `responses` (group rubrics) are
        user text too, delimited and defused like responses. `special_tokens`: the engine
        tokenizer's special-token texts, defused in user text."""
        variables: dict[str, Any] = {"prompt": delimit("user_prompt", prompt, special_tokens),
                                     "reference": delimit("reference", reference, special_tokens) if reference is not None else ""}
        if self.kind == "pairwise":
            assert response_a is not None and response_b is not None, "pairwise rubric needs response_a and response_b"
            variables["response_a"] = delimit("response_a", response_a, special_tokens)
            variables["response_b"] = delimit("response_b", response_b, special_tokens)
        elif self.kind == "group":
            assert responses is not None, "group rubric needs responses"
            variables["responses"] = [delimit("response", text, special_tokens) for text in responses]
        else:
            assert response is not None, f"{self.kind} rubric needs response"
            variables["response"] = delimit("response", response, special_tokens)
        if self.kind == "checklist":
            assert criterion is not None, "checklist rubric needs criterion"
            variables["criterion"] = delimit("criterion", criterion, special_tokens)
        if criteria is not None:
            listed = "\n".join(f"{i}. {getattr(c, 'text', c)}" + (f" (weight {c.weight:g})" if getattr(c, "weight", 1.0) != 1.0 else "")
                                for i, c in enumerate(criteria, 1))
            variables["criteria"] = delimit("criteria", listed, special_tokens)
        if principle is not None:
            variables["principle"] = principle  # rubric-author text, not user text
        return self._render_task(variables)

    def instruction(self, index: int | None = None) -> str:
        """`answer_instruction`, rendered with `index` (the 1-based response position) for group rubrics."""
        if self.kind != "group":
            return self.answer_instruction.strip()
        assert index is not None, "group rubric needs the index of the response asked about"
        return _environment().from_string(self.answer_instruction).render(index=index).strip()

    def render(self, *, index: int | None = None, **kwargs: Any) -> ChatPrompt:
        """Chat messages for log-prob mode: task + `answer_instruction` (group: about response `index`)."""
        return self._messages(f"{self.task_text(**kwargs)}\n\n{self.instruction(index)}")

    def render_cot(self, **kwargs: Any) -> ChatPrompt:
        """Chat messages asking for a rationale (CoT step 1)."""
        if self.cot is None:
            raise RubricError(f"{self.source}: rubric '{self.id}' has no 'cot' section, so mode=cot is unavailable")
        return self._messages(f"{self.task_text(**kwargs)}\n\n{self.cot.instruction.strip()}")

    def render_cot_label(self, cot_messages: ChatPrompt, rationale: str) -> ChatPrompt:
        """CoT step 2: the rationale as the assistant's turn, then a request for the bare label."""
        assert self.cot is not None
        return [*cot_messages, {"role": "assistant", "content": rationale.strip()},
                {"role": "user", "content": self.cot.label_request.strip()}]

    def select_principles(self, item_key: str, seed: int = 0) -> list[str | None]:
        """Principles for one item: all, or `principles_per_comparison` sampled with a seed.

        The sample depends only on (seed, item) so re-judging an item (or resuming a job)
        sees the same principles. Rubrics without principles yield `[None]`.
        """
        if not self.principles:
            return [None]
        k = self.principles_per_comparison
        if k is None or k >= len(self.principles):
            return list(self.principles)
        digest = hashlib.sha256(f"{seed}:{item_key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        return rng.sample(list(self.principles), k)


def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                         keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True)


def builtin_rubric_dir() -> Path:
    """Folder of the rubric YAML files shipped in the `prompts` package."""
    return Path(str(importlib.resources.files("rlaif.prompts")))


def builtin_rubric_ids() -> list[str]:
    return sorted(p.stem for p in builtin_rubric_dir().glob("*.yaml"))


def load_rubric(id_or_path: str | Path) -> Rubric:
    """Load a built-in rubric by id, or a rubric YAML file by path.

    Raises `RubricNotFound` for an unknown id/missing file and `RubricError` (naming file and
    field) for an invalid one.
    """
    candidate = Path(id_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.is_file():
        if not candidate.is_file():
            raise RubricNotFound(f"rubric file not found: {candidate}")
        return rubric_from_file(candidate)
    builtin = builtin_rubric_dir() / f"{id_or_path}.yaml"
    if not builtin.is_file():
        raise RubricNotFound(f"unknown rubric {str(id_or_path)!r}; built-in rubrics: {', '.join(builtin_rubric_ids())} (or pass a YAML file path)")
    return rubric_from_file(builtin)


def rubric_from_file(path: Path) -> Rubric:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RubricError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RubricError(f"{path}: expected a mapping of rubric fields at the top level")
    return rubric_from_mapping(raw, source=str(path))


def rubric_from_mapping(raw: dict, source: str = "<memory>") -> Rubric:
    try:
        return Rubric.model_validate({**raw, "source": source})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "(rubric)"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"field '{field}': {message}" if not message.startswith("field '") else message)
        raise RubricError(f"{source}: " + "; ".join(problems)) from None


def load_all_builtin() -> dict[str, Rubric]:
    return {rubric_id: load_rubric(rubric_id) for rubric_id in builtin_rubric_ids()}
