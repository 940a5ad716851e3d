"""Loaders for real human-preference sets and prompt sets.

Human preference files measure how often the judge agrees with people (the RLAIF paper's
"AI labeler alignment", §4.1); prompt sets feed labeling runs, policy rollouts and win-rate
evaluation. Every loader returns typed records (`PreferenceExample`, `PromptRecord`) so the
rest of the code never touches a raw dict or a dataset's own field names. (Over 500 lines:
one small reader per public format, kept side by side so the format detection reads as a table.)

Preference formats, detected from the fields of the first row (the formats of the public sets sliced in tests/data/, see tests/data/LICENSES.md):

- PandaLM (`instruction`, `input`, `response1`, `response2`, `annotator1..3` in {0 tie, 1, 2}):
  the majority of the three annotators decides; rows whose majority is a tie, or that have
  no majority, are dropped and counted, because accuracy against "tie" is undefined.
- LLMBar (`input`, `output_1`, `output_2`, `label` in {1, 2}).
- hh-rlhf (`chosen`, `rejected` as whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts): the
  prompt is the shared dialogue up to and including the last "\\n\\nAssistant:", the responses
  are what follows.
- TRL (`prompt`, `chosen`, `rejected`): strings, or chat-message lists (the response is the
  last assistant message); without `prompt` and with message lists, the prompt is the
  conversation before the last assistant turn (TRL's "implicit prompt" form).

Usage:

    result = load_preferences_with_stats("data/preferences/pandalm_testset_v1.json")
    print(len(result.examples), result.n_dropped)    # 894 105 (the majority was a tie)
    prompts = load_prompts("data/prompts/mt_bench_questions.jsonl", limit=10)
"""

from __future__ import annotations

import csv
import enum
import gzip
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

ChatMessages = list[dict[str, str]]

HH_ASSISTANT_MARKER = "\n\nAssistant:"
"""Turn marker of hh-rlhf transcripts; the last one shared by both transcripts ends the prompt."""

INPUT_SEPARATOR = "\n\n"
"""Joins an instruction and its optional input (PandaLM, self-instruct) into one prompt.

PandaLM's test set is built from the self-instruct user-oriented prompts, so using the same
separator for both keeps a prompt identical whichever file it came from.
"""

_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


class PreferenceExample(BaseModel):
    """One human-labeled comparison: people preferred `chosen` over `rejected` for `prompt`.

    The loaders normalize every format to this orientation, so evaluation code can always
    score P(chosen better) and never has to know which position the file put the winner in.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(description="The instruction (plus input / dialogue history) both responses answer.")
    chosen: str = Field(description="The response the human label prefers.")
    rejected: str = Field(description="The other response.")
    source: str = Field(description="Stem of the file the example came from, e.g. 'llmbar_natural'.")
    id: str = Field(description="Stable id: '<file stem>-<0-based row index in the file>'.")
    chosen_position: Literal[1, 2] | None = Field(
        None, description="Where the file showed the preferred response (1 = first) for formats with an order "
                          "(PandaLM, LLMBar); None when the format lists chosen/rejected by role (hh-rlhf, TRL).")


class PreferenceFormat(str, enum.Enum):
    """The on-disk preference layouts `load_preferences` understands."""

    PANDALM = "pandalm"
    LLMBAR = "llmbar"
    TRL = "trl"
    HH_RLHF = "hh_rlhf"


class DropReason(str, enum.Enum):
    """Why a row produced no `PreferenceExample`."""

    TIE = "tie"
    NO_MAJORITY = "no_majority"
    IDENTICAL_RESPONSES = "identical_responses"


class PreferenceLoad(BaseModel):
    """Examples from one file plus what was read and dropped, so reports can state both."""

    path: str
    format: PreferenceFormat
    examples: list[PreferenceExample]
    rows_read: int = Field(description="Rows looked at; with a limit, reading stops once it is reached.")
    dropped: dict[DropReason, int] = Field(default_factory=dict, description="Rows dropped, by reason.")

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


class PromptRecord(BaseModel):
    """One prompt for labeling, rollouts or win-rate evaluation.

    `text` is always set so plain-text consumers need no special case; `messages` keeps a
    chat-formatted prompt as-is so chat-aware consumers apply their own template to it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="The record's own id (`id`, `uid`, `question_id`) if unique, else '<stem>-<row>'.")
    text: str = Field(description="The prompt as plain text (chat prompts flattened with role names).")
    messages: ChatMessages | None = Field(None, description="The chat messages when the prompt was chat-formatted.")


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _file_stem(path: Path) -> str:
    """`a.jsonl.gz` -> `a`: ids should not change when a file gets compressed."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).stem if Path(name).suffix else name


def _read_text(path: Path) -> str:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    return path.read_text(encoding="utf-8")


def read_json_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON array, a single JSON object, or JSON Lines, telling them apart by content.

    The extension is not trusted because real datasets ship JSON Lines as `.json` and the
    other way round; a document that fails to parse as one JSON value is read line by line.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        records: list[Any] = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {line_number} is neither part of a JSON document "
                                 f"nor a JSON line: {exc}") from None
    else:
        records = document if isinstance(document, list) else [document]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is a {type(record).__name__}, expected a JSON object with named fields")
    return records


# --------------------------------------------------------------------------------------------
# Chat messages
# --------------------------------------------------------------------------------------------


def is_chat_messages(value: object) -> bool:
    """True for a non-empty list of `{"role": str, "content": str}` dicts (HF/OpenAI chat shape)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    )


def render_messages(messages: Sequence[Mapping[str, str]]) -> str:
    """Flatten chat messages to readable text.

    A lone user message is returned as its content, so a chat-formatted single-turn prompt and
    the same prompt stored as a plain string give identical text; longer conversations become
    "User: ...\\n\\nAssistant: ..." blocks.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return INPUT_SEPARATOR.join(f"{_ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


def _last_assistant_index(messages: Sequence[Mapping[str, str]]) -> int | None:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            return index
    return None


# --------------------------------------------------------------------------------------------
# Preferences
# --------------------------------------------------------------------------------------------

_REQUIRED_FIELDS: dict[PreferenceFormat, tuple[str, ...]] = {
    PreferenceFormat.PANDALM: ("instruction", "response1", "response2", "annotator1", "annotator2", "annotator3"),
    PreferenceFormat.LLMBAR: ("input", "output_1", "output_2", "label"),
    # TRL before hh-rlhf: its fields are a superset, and a `prompt` field means TRL's layout.
    PreferenceFormat.TRL: ("prompt", "chosen", "rejected"),
    PreferenceFormat.HH_RLHF: ("chosen", "rejected"),
}


def detect_preference_format(record: Mapping[str, Any], path: str | Path = "<records>") -> PreferenceFormat:
    """Pick the format whose required fields `record` has; raise naming what is missing otherwise."""
    for fmt, fields in _REQUIRED_FIELDS.items():
        if all(field in record for field in fields):
            return fmt
    present = sorted(record)
    partial = [(fmt, [f for f in fields if f not in record]) for fmt, fields in _REQUIRED_FIELDS.items()
               if any(f in record for f in fields)]
    if partial:
        closest, missing = min(partial, key=lambda item: len(item[1]))
        hint = f" Closest is {closest.value}, which is missing field(s) {missing}."
    else:
        hint = ""
    expected = "; ".join(f"{fmt.value}: {', '.join(fields)}" for fmt, fields in _REQUIRED_FIELDS.items())
    raise ValueError(f"{path}: fields {present} match no known preference format.{hint} Expected one of: {expected}.")


def pandalm_majority(votes: Sequence[int]) -> int | None:
    """The label (0 tie, 1, 2) at least two of the three annotators gave, or None if all differ."""
    label, count = Counter(votes).most_common(1)[0]
    return label if count >= 2 else None


def split_hh_rlhf(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two hh-rlhf transcripts into (prompt, chosen response, rejected response).

    The cut is the last "\\n\\nAssistant:" inside the text both transcripts share. Searching the
    shared text rather than each transcript on its own keeps the split right when a response
    itself contains "\\n\\nAssistant:" (the model role-playing further turns). The prompt keeps
    the Human/Assistant markers and ends with "Assistant:", with the leading blank lines
    removed; responses are stripped.
    """
    shared_length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared_length += 1
    cut = chosen.rfind(HH_ASSISTANT_MARKER, 0, shared_length)
    if cut < 0:
        raise ValueError('the transcripts share no "\\n\\nAssistant:" turn, so there is no common prompt to split off')
    end = cut + len(HH_ASSISTANT_MARKER)
    return chosen[:end].lstrip(), chosen[end:].strip(), rejected[end:].strip()


def _require_str(value: object, path: Path, row: int, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{path}: row {row}: field {field!r} should be a string, got {type(value).__name__}")
    return value


def _response_text(value: object, path: Path, row: int, field: str) -> str:
    """A response as text; JSON scalars are turned back into the text they came from.

    PandaLM's test set stores a few one-word answers as JSON booleans (rows 157-164 hold
    `true` for a model that answered "True"), so scalars are rendered the way Python prints
    them instead of failing the whole file.
    """
    if isinstance(value, (bool, int, float)):
        return str(value)
    return _require_str(value, path, row, field)


def _trl_response(value: object, path: Path, row: int, field: str) -> str:
    if is_chat_messages(value):
        index = _last_assistant_index(value)
        if index is None:
            raise ValueError(f"{path}: row {row}: field {field!r} is a message list without an assistant message")
        return value[index]["content"]
    if isinstance(value, list):
        raise ValueError(f"{path}: row {row}: field {field!r} should be a string or a list of chat messages")
    return _response_text(value, path, row, field)


def _parse_pandalm(record: Mapping[str, Any], path: Path, row: int) -> tuple[str, str, str] | DropReason:
    votes = [record[f"annotator{i}"] for i in (1, 2, 3)]
    if any(vote not in (0, 1, 2) or isinstance(vote, bool) for vote in votes):
        raise ValueError(f"{path}: row {row}: annotator votes {votes} must each be 0 (tie), 1 or 2")
    majority = pandalm_majority(votes)
    if majority is None:
        return DropReason.NO_MAJORITY
    if majority == 0:
        return DropReason.TIE
    instruction = _require_str(record["instruction"], path, row, "instruction")
    extra = record.get("input") or ""
    prompt = instruction + (INPUT_SEPARATOR + _require_str(extra, path, row, "input") if extra else "")
    first = _response_text(record["response1"], path, row, "response1")
    second = _response_text(record["response2"], path, row, "response2")
    return (prompt, first, second) if majority == 1 else (prompt, second, first)


def _parse_llmbar(record: Mapping[str, Any], path: Path, row: int) -> tuple[str, str, str]:
    label = record["label"]
    if label not in (1, 2) or isinstance(label, bool):
        raise ValueError(f"{path}: row {row}: label {label!r} must be 1 or 2 (which output is better)")
    prompt = _require_str(record["input"], path, row, "input")
    first = _response_text(record["output_1"], path, row, "output_1")
    second = _response_text(record["output_2"], path, row, "output_2")
    return (prompt, first, second) if label == 1 else (prompt, second, first)


def _parse_hh(record: Mapping[str, Any], path: Path, row: int) -> tuple[str, str, str]:
    chosen, rejected = record["chosen"], record["rejected"]
    if is_chat_messages(chosen) and is_chat_messages(rejected):
        # TRL's implicit-prompt conversational layout: whole conversations, no `prompt` field.
        index = _last_assistant_index(chosen)
        if index is None:
            raise ValueError(f"{path}: row {row}: 'chosen' has no assistant message")
        prompt = render_messages(chosen[:index])
        return prompt, chosen[index]["content"], _trl_response(rejected, path, row, "rejected")
    chosen = _require_str(chosen, path, row, "chosen")
    rejected = _require_str(rejected, path, row, "rejected")
    try:
        return split_hh_rlhf(chosen, rejected)
    except ValueError as exc:
        raise ValueError(f"{path}: row {row}: {exc}") from None


def _parse_trl(record: Mapping[str, Any], path: Path, row: int) -> tuple[str, str, str]:
    prompt = record["prompt"]
    if is_chat_messages(prompt):
        prompt = render_messages(prompt)
    prompt = _require_str(prompt, path, row, "prompt")
    return prompt, _trl_response(record["chosen"], path, row, "chosen"), _trl_response(record["rejected"], path, row, "rejected")


_PARSERS: dict[PreferenceFormat, Callable[[Mapping[str, Any], Path, int], tuple[str, str, str] | DropReason]] = {
    PreferenceFormat.PANDALM: _parse_pandalm,
    PreferenceFormat.LLMBAR: _parse_llmbar,
    PreferenceFormat.TRL: _parse_trl,
    PreferenceFormat.HH_RLHF: _parse_hh,
}


_FIRST_RESPONSE_FIELD = {PreferenceFormat.PANDALM: "response1", PreferenceFormat.LLMBAR: "output_1"}


def _chosen_position(fmt: PreferenceFormat, record: Mapping[str, Any], chosen: str) -> Literal[1, 2] | None:
    """Original slot of the preferred response, kept so single-order accuracy can be measured in file order."""
    field = _FIRST_RESPONSE_FIELD.get(fmt)
    if field is None:
        return None
    first = record[field]
    return 1 if (first if isinstance(first, str) else str(first)).strip() == chosen.strip() else 2


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None (all rows) or >= 0, got {limit}")


def load_preferences_with_stats(path: str | Path, limit: int | None = None) -> PreferenceLoad:
    """Load a human-preference file in any supported format, with counts of dropped rows.

    `limit` keeps the first `limit` usable rows (dropped rows do not count towards it), so
    `--limit 50` gives 50 scorable comparisons. Rows are dropped when the label cannot be
    scored: a PandaLM majority tie, no PandaLM majority, or two identical responses.
    """
    _check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preference file")
    records = read_json_records(path)
    fmt = detect_preference_format(records[0], path)
    parse = _PARSERS[fmt]
    required = _REQUIRED_FIELDS[fmt]
    stem = _file_stem(path)
    examples: list[PreferenceExample] = []
    dropped: Counter[DropReason] = Counter()
    rows_read = 0
    for row, record in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        rows_read += 1
        missing = [field for field in required if field not in record]
        if missing:
            raise ValueError(f"{path}: row {row}: missing field(s) {missing} required by the {fmt.value} format")
        parsed = parse(record, path, row)
        if isinstance(parsed, DropReason):
            dropped[parsed] += 1
            continue
        prompt, chosen, rejected = parsed
        if chosen == rejected:
            dropped[DropReason.IDENTICAL_RESPONSES] += 1
            continue
        examples.append(PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, source=stem, id=f"{stem}-{row}",
                                          chosen_position=_chosen_position(fmt, record, chosen)))
    if dropped:
        logger.info("%s: dropped %d of %d rows (%s)", path, sum(dropped.values()), rows_read,
                    ", ".join(f"{reason.value}: {count}" for reason, count in dropped.items()))
    return PreferenceLoad(path=str(path), format=fmt, examples=examples, rows_read=rows_read, dropped=dict(dropped))


def load_preferences(path: str | Path, limit: int | None = None) -> list[PreferenceExample]:
    """`load_preferences_with_stats(path, limit).examples`; the drop counts go to the log."""
    return load_preferences_with_stats(path, limit).examples


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

_FIELD_PATH = re.compile(r"[^.\[\]]+(?:\[-?\d+\]|\.[^.\[\]]+)*")
_FIELD_STEP = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")
_NATIVE_ID_FIELDS = ("id", "uid", "question_id")


def parse_field_path(column: str) -> list[str | int]:
    """'instances[0].input' -> ['instances', 0, 'input']; raise on anything it cannot read fully."""
    if not _FIELD_PATH.fullmatch(column):
        raise ValueError(f"cannot parse column path {column!r}; use a field name or a path such as 'turns[0]' or 'a.b[1].c'")
    return [name if name else int(index) for name, index in _FIELD_STEP.findall(column)]


class _MissingPath(LookupError):
    pass


def get_field(record: Mapping[str, Any], steps: Sequence[str | int]) -> Any:
    """Follow a parsed field path through nested dicts/lists.

    A string met where a container is needed is decoded as JSON first: CSV cells hold lists
    and objects as JSON text, and `turns[0]` should still work on them.
    """
    value: Any = record
    for step in steps:
        if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(step, int):
            if not isinstance(value, (list, tuple)) or not -len(value) <= step < len(value):
                raise _MissingPath(step)
            value = value[step]
        else:
            if not isinstance(value, Mapping) or step not in value:
                raise _MissingPath(step)
            value = value[step]
    return value


def _iter_table(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a prompt source as plain dicts, whatever the storage."""
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if "train" in loaded:
                loaded = loaded["train"]
            elif len(splits) == 1:
                loaded = loaded[splits[0]]
            else:
                raise ValueError(f"{path}: a DatasetDict with splits {splits}; pass the split's folder, e.g. {path / splits[0]}")
        yield from loaded
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)
    else:
        yield from read_json_records(path)


def _detect_prompt_column(record: Mapping[str, Any], path: Path) -> tuple[list[str | int], bool]:
    """Default prompt field: (path steps, whether to append self-instruct's first instance input)."""
    if "turns" in record:
        return ["turns", 0], False  # MT-Bench: the first turn is the standalone prompt
    if "instruction" in record:
        return ["instruction"], "instances" in record  # self-instruct
    if "prompt" in record:
        return ["prompt"], False  # arena-hard, TRL prompt datasets
    raise ValueError(f"{path}: cannot tell which field holds the prompt among {sorted(record)}; "
                     "choose it with --prompt-column (column= in Python), e.g. --prompt-column question or "
                     "--prompt-column 'turns[0]'")


def _first_instance_input(record: Mapping[str, Any]) -> str:
    try:
        value = get_field(record, ["instances", 0, "input"])
    except _MissingPath:
        return ""
    return value if isinstance(value, str) else ""


def load_prompts(source: str | Path, column: str | None = None, limit: int | None = None) -> list[PromptRecord]:
    """Load prompts (see `load_prompts_with_rows`, which also returns each prompt's source row)."""
    return [record for record, _ in load_prompts_with_rows(source, column, limit)]


def load_prompts_with_rows(source: str | Path, column: str | None = None,
                           limit: int | None = None) -> list[tuple[PromptRecord, Mapping[str, Any]]]:
    """Load prompts from a jsonl/json/parquet/csv file or a `save_to_disk` directory.

    Without `column`, the prompt field is detected: `turns[0]` (MT-Bench), `instruction`
    plus the first non-empty `instances[].input` (self-instruct), or `prompt` (arena-hard).
    With `column` (a field name or a path such as `turns[0]` or `conversation[0].content`)
    exactly that field is used. A chat-formatted prompt keeps its messages and gets a
    flattened `text`. Rows with an empty prompt are skipped; `limit` keeps the first
    `limit` usable rows. Each prompt comes with its whole source row, so per-prompt columns
    (reference answers, checklists) are read from the very row the prompt came from.
    """
    _check_limit(limit)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such prompt file or dataset directory")
    steps = parse_field_path(column) if column is not None else None
    append_instance_input = False
    stem = _file_stem(path)
    used_rows: list[Mapping[str, Any]] = []
    records: list[PromptRecord] = []
    skipped = 0
    for row, record in enumerate(_iter_table(path)):
        if limit is not None and len(records) >= limit:
            break
        if steps is None:
            steps, append_instance_input = _detect_prompt_column(record, path)
        try:
            value = get_field(record, steps)
        except _MissingPath:
            shown = column or "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")
            raise ValueError(f"{path}: row {row}: no field {shown!r}; fields are {sorted(record)}") from None
        messages: ChatMessages | None = None
        if is_chat_messages(value):
            messages = [{"role": m["role"], "content": m["content"]} for m in value]
            text = render_messages(messages)
        elif isinstance(value, str):
            text = value
            if append_instance_input and (extra := _first_instance_input(record)):
                text = text + INPUT_SEPARATOR + extra
        else:
            raise ValueError(f"{path}: row {row}: the prompt field holds a {type(value).__name__}, expected a string or "
                             f"a list of {{role, content}} messages; pick an element with --prompt-column 'name[0]' "
                             "(column= in Python)")
        if not text.strip():
            skipped += 1
            continue
        used_rows.append(record)
        records.append(PromptRecord(id=f"{stem}-{row}", text=text, messages=messages))
    if skipped:
        logger.info("%s: skipped %d rows with an empty prompt", path, skipped)
    return list(zip(_with_native_ids(records, used_rows), used_rows))


def _with_native_ids(records: list[PromptRecord], rows: Iterable[Mapping[str, Any]]) -> list[PromptRecord]:
    """Use the dataset's own ids when every row has one and they are unique.

    Native ids (MT-Bench `question_id`, arena-hard `uid`) let results be joined back to the
    source's reference answers; a missing or repeated id would make that join wrong, so
    then the positional '<stem>-<row>' ids stay.
    """
    rows = list(rows)
    for field in _NATIVE_ID_FIELDS:
        values = [row.get(field) for row in rows]
        if rows and all(v is not None and str(v) != "" for v in values) and len({str(v) for v in values}) == len(values):
            return [record.model_copy(update={"id": str(value)}) for record, value in zip(records, values)]
    return records
