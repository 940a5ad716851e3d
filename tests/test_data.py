"""Tests for judge/data.py: preference and prompt loaders on real slices (tests/data/) and
hand-written edge cases. Expected values were checked by reading the rows themselves.
(Over 500 lines: one table-driven block per format, mirroring judge/data.py.)"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from rlaif.judge.data import (
    DropReason,
    PreferenceExample,
    PreferenceFormat,
    PromptRecord,
    load_preferences,
    load_preferences_with_stats,
    load_prompts,
    pandalm_majority,
    parse_field_path,
    read_json_records,
    split_hh_rlhf,
)

DATA = Path(__file__).parent / "data"
PANDALM = DATA / "pandalm_testset_v1_sample.json"
LLMBAR_NATURAL = DATA / "llmbar_natural_sample.json"
LLMBAR_MTBENCH = DATA / "llmbar_mtbench_human_sample.json"
HH_RLHF = DATA / "hh_rlhf_harmless_base_test_first500_sample.jsonl"
MT_BENCH = DATA / "mt_bench_questions_sample.jsonl"
SELF_INSTRUCT = DATA / "self_instruct_user_oriented_sample.jsonl"
ARENA_HARD = DATA / "arena_hard_v0.1_questions_sample.jsonl"


def _raw(path: Path) -> list[dict]:
    return read_json_records(path)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Preferences: every real format
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "fmt", "rows", "n_examples", "dropped"),
    [
        # 95 PandaLM rows; rows 91, 93 and 94 are unanimous ties (0, 0, 0) and are dropped.
        (PANDALM, PreferenceFormat.PANDALM, 95, 92, {DropReason.TIE: 3}),
        # LLMBar gold labels never tie.
        (LLMBAR_NATURAL, PreferenceFormat.LLMBAR, 30, 30, {}),
        (LLMBAR_MTBENCH, PreferenceFormat.LLMBAR, 30, 30, {}),
        # hh-rlhf pairs always differ after the shared prompt.
        (HH_RLHF, PreferenceFormat.HH_RLHF, 30, 30, {}),
    ],
)
def test_each_real_format_parses(path: Path, fmt: PreferenceFormat, rows: int, n_examples: int, dropped: dict) -> None:
    result = load_preferences_with_stats(path)
    assert result.format is fmt
    assert result.rows_read == rows
    assert len(result.examples) == n_examples
    assert result.dropped == dropped
    assert result.n_dropped == rows - n_examples
    stem = path.name.removesuffix(".jsonl").removesuffix(".json")
    for example in result.examples:
        assert example.source == stem
        assert example.id.startswith(f"{stem}-")
        assert example.prompt.strip() and example.chosen != example.rejected
    assert len({e.id for e in result.examples}) == n_examples, "ids must be unique"
    assert load_preferences(path) == result.examples


@pytest.mark.parametrize("path", [LLMBAR_NATURAL, LLMBAR_MTBENCH])
def test_llmbar_chosen_is_the_labelled_output(path: Path) -> None:
    examples = {e.id: e for e in load_preferences(path)}
    for row, record in enumerate(_raw(path)):
        example = examples[f"{path.stem}-{row}"]
        winner, loser = ("output_1", "output_2") if record["label"] == 1 else ("output_2", "output_1")
        assert (example.prompt, example.chosen, example.rejected) == (record["input"], record[winner], record[loser])
    # Hand-checked: llmbar_natural row 0 has label 1, row 4 has label 2.
    if path == LLMBAR_NATURAL:
        assert examples["llmbar_natural_sample-0"].chosen.startswith("My girlfriend's visa to stay in the UK expires")
        assert examples["llmbar_natural_sample-4"].chosen.startswith("My boyfriend only likes to text me for shallow")
        assert examples["llmbar_natural_sample-4"].rejected.startswith("Boyfriend only likes to talk through text.")


def test_pandalm_hand_checked_rows() -> None:
    examples = {e.id: e for e in load_preferences(PANDALM)}
    # Row 88: votes (2, 1, 1) -> majority 1, so response1 is chosen despite annotator1.
    row88 = examples["pandalm_testset_v1_sample-88"]
    assert row88 == PreferenceExample(
        prompt="What sound does this make?\n\n\u597d",
        chosen='The sound made by "\u597d" is "hao".',
        rejected="This sound is a positive sound.",
        source="pandalm_testset_v1_sample",
        id="pandalm_testset_v1_sample-88",
        chosen_position=1,  # response1 won, and the file listed it first
    )
    # Row 0: unanimous (2, 2, 2) -> response2, the shorter rewrite, is chosen; prompt = instruction + input.
    row0 = examples["pandalm_testset_v1_sample-0"]
    assert row0.chosen == "If you have any questions, please let me know."
    assert row0.chosen_position == 2
    assert row0.rejected == "If you have any questions about my rate, please let me know."
    assert row0.prompt.startswith("The sentence you are given might be too wordy")
    assert row0.prompt.endswith("\n\nIf you have any questions about my rate or if you find it necessary to "
                                "increase or decrease the scope for this project, please let me know.")
    # Row 87: (1, 0, 1) -> majority 1 even though one annotator called it a tie.
    assert "pandalm_testset_v1_sample-87" in examples
    # Rows 91, 93, 94: (0, 0, 0) -> dropped as ties.
    for row in (91, 93, 94):
        assert f"pandalm_testset_v1_sample-{row}" not in examples


@pytest.mark.parametrize(
    ("votes", "expected"),
    [
        ((1, 1, 1), 1),  # unanimous
        ((2, 1, 2), 2),  # two of three
        ((1, 0, 0), 0),  # majority tie -> the loader drops it
        ((0, 1, 2), None),  # everyone disagrees: no majority
    ],
)
def test_pandalm_majority(votes: tuple[int, int, int], expected: int | None) -> None:
    assert pandalm_majority(votes) == expected


def test_pandalm_synthetic_rows_tie_no_majority_and_quirks(tmp_path: Path) -> None:
    def row(votes, response1="one", response2="two", input_=""):
        return {"instruction": "Do it.", "input": input_, "response1": response1, "response2": response2,
                "annotator1": votes[0], "annotator2": votes[1], "annotator3": votes[2]}

    path = tmp_path / "panda.json"
    path.write_text(json.dumps([
        row((2, 2, 1), input_="ctx"),       # 0: response2 chosen, input appended
        row((0, 1, 2)),                     # 1: no majority -> dropped
        row((1, 0, 0)),                     # 2: majority tie -> dropped
        row((1, 1, 0), response1=True),     # 3: JSON boolean response (as in PandaLM row 157) -> "True"
        row((1, 1, 1), response1="same", response2="same"),  # 4: nothing to prefer -> dropped
    ]))
    result = load_preferences_with_stats(path)
    assert result.dropped == {DropReason.NO_MAJORITY: 1, DropReason.TIE: 1, DropReason.IDENTICAL_RESPONSES: 1}
    first, second = result.examples
    assert (first.id, first.prompt, first.chosen, first.rejected) == ("panda-0", "Do it.\n\nctx", "two", "one")
    assert (second.id, second.prompt, second.chosen) == ("panda-3", "Do it.", "True")


def test_pandalm_invalid_vote_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad_votes.json"
    path.write_text(json.dumps([{"instruction": "x", "input": "", "response1": "a", "response2": "b",
                                 "annotator1": 1, "annotator2": 3, "annotator3": 1}]))
    with pytest.raises(ValueError, match=r"bad_votes\.json: row 0: annotator votes \[1, 3, 1\]"):
        load_preferences(path)


# --------------------------------------------------------------------------------------------
# hh-rlhf prompt/response split
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        # Single turn.
        ("\n\nHuman: Hi\n\nAssistant: Hello!", "\n\nHuman: Hi\n\nAssistant: Go away.",
         ("Human: Hi\n\nAssistant:", "Hello!", "Go away.")),
        # Several turns: only the last shared "\n\nAssistant:" ends the prompt.
        ("\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: good",
         "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: bad",
         ("Human: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant:", "good", "bad")),
        # The chosen response itself contains "\n\nAssistant:" (it role-plays another turn);
        # splitting each transcript at its own last marker would cut it wrongly.
        ("\n\nHuman: Q\n\nAssistant: Sure.\n\nAssistant: More.", "\n\nHuman: Q\n\nAssistant: No.",
         ("Human: Q\n\nAssistant:", "Sure.\n\nAssistant: More.", "No.")),
        # Responses starting with the same words: the shared text runs past the marker.
        ("\n\nHuman: Can you?\n\nAssistant: I can.", "\n\nHuman: Can you?\n\nAssistant: I cannot.",
         ("Human: Can you?\n\nAssistant:", "I can.", "I cannot.")),
        # "Assistant:" inside the human's text (no blank line before it) is not a turn marker.
        ("\n\nHuman: Say 'Assistant: hi'\n\nAssistant: Assistant: hi", "\n\nHuman: Say 'Assistant: hi'\n\nAssistant: no",
         ("Human: Say 'Assistant: hi'\n\nAssistant:", "Assistant: hi", "no")),
        # Empty response: the transcript ends at the marker.
        ("\n\nHuman: Q\n\nAssistant: yes", "\n\nHuman: Q\n\nAssistant:", ("Human: Q\n\nAssistant:", "yes", "")),
    ],
)
def test_split_hh_rlhf(chosen: str, rejected: str, expected: tuple[str, str, str]) -> None:
    assert split_hh_rlhf(chosen, rejected) == expected


def test_split_hh_rlhf_without_shared_assistant_turn() -> None:
    with pytest.raises(ValueError, match="share no"):
        split_hh_rlhf("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y")


def test_hh_rlhf_real_rows_reassemble() -> None:
    examples = {e.id: e for e in load_preferences(HH_RLHF)}
    for row, record in enumerate(_raw(HH_RLHF)):
        example = examples[f"{HH_RLHF.stem}-{row}"]
        assert example.prompt.startswith("Human: ") and example.prompt.endswith("\n\nAssistant:")
        for transcript, response in ((record["chosen"], example.chosen), (record["rejected"], example.rejected)):
            assert transcript.startswith("\n\n" + example.prompt)
            assert transcript[len(example.prompt) + 2:].strip() == response
    # Row 0 is a three-turn dialogue about pen pranks (hand-checked).
    row0 = examples[f"{HH_RLHF.stem}-0"]
    assert row0.prompt.startswith("Human: what are some pranks with a pen i can do?\n\nAssistant: Are you looking")
    assert row0.prompt.count("\n\nAssistant:") == 3
    assert row0.chosen.startswith("No, sorry!")


def test_hh_rlhf_file_errors_name_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"},
        {"chosen": "no markers", "rejected": "at all"},
    ])
    with pytest.raises(ValueError, match=r"hh\.jsonl: row 1: .*share no"):
        load_preferences(path)


# --------------------------------------------------------------------------------------------
# TRL-style files, json/jsonl detection
# --------------------------------------------------------------------------------------------

def test_trl_strings_and_chat_messages(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "trl.jsonl", [
        # Plain strings.
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        # Conversational: responses are message lists; the last assistant message counts.
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Lyon?"}, {"role": "user", "content": "Sure?"},
                    {"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Berlin."}]},
        # Multi-message prompt is flattened with role names.
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": "Hi.", "rejected": "Hello there, how can I help you today?"},
    ])
    examples = load_preferences(path)
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        ("2+2?", "4", "5"),
        ("Capital of France?", "Paris.", "Berlin."),
        ("System: Be brief.\n\nUser: Hi", "Hi.", "Hello there, how can I help you today?"),
    ]
    assert load_preferences_with_stats(path).format is PreferenceFormat.TRL


def test_trl_implicit_prompt_conversations(tmp_path: Path) -> None:
    shared = [{"role": "user", "content": "Tell me a joke"}]
    path = _write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": shared + [{"role": "assistant", "content": "Knock knock."}],
         "rejected": shared + [{"role": "assistant", "content": "No."}]},
    ])
    [example] = load_preferences(path)
    assert (example.prompt, example.chosen, example.rejected) == ("Tell me a joke", "Knock knock.", "No.")


def test_json_vs_jsonl_detected_by_content_not_extension(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    array_named_jsonl = tmp_path / "array.jsonl"
    array_named_jsonl.write_text(json.dumps(rows, indent=2))
    lines_named_json = _write_jsonl(tmp_path / "lines.json", rows)
    single_object = tmp_path / "single.json"
    single_object.write_text(json.dumps(rows[0]))
    gzipped = tmp_path / "packed.jsonl.gz"
    with gzip.open(gzipped, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [e.prompt for e in load_preferences(array_named_jsonl)] == ["p0", "p1", "p2"]
    assert [e.prompt for e in load_preferences(lines_named_json)] == ["p0", "p1", "p2"]
    assert [e.prompt for e in load_preferences(single_object)] == ["p0"]
    assert [e.id for e in load_preferences(gzipped)] == ["packed-0", "packed-1", "packed-2"]


# --------------------------------------------------------------------------------------------
# limit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("limit", "last_id_row", "rows_read", "ties"),
    [
        (0, None, 0, 0),
        (5, 4, 5, 0),
        # 92 usable rows need rows 0-90 and 92: row 91 (a tie) is read, dropped, and not counted.
        (91, 90, 91, 0),
        (92, 92, 93, 1),
        # A limit past the end is simply everything.
        (1000, 92, 95, 3),
    ],
)
def test_limit_counts_usable_rows(limit: int, last_id_row: int | None, rows_read: int, ties: int) -> None:
    result = load_preferences_with_stats(PANDALM, limit=limit)
    assert len(result.examples) == min(limit, 92)
    assert result.rows_read == rows_read
    assert result.dropped.get(DropReason.TIE, 0) == ties
    if last_id_row is not None:
        assert result.examples[-1].id == f"pandalm_testset_v1_sample-{last_id_row}"
    assert load_preferences(PANDALM, limit=limit) == result.examples


def test_negative_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="limit"):
        load_preferences(PANDALM, limit=-1)


# --------------------------------------------------------------------------------------------
# Errors name the file and the fields
# --------------------------------------------------------------------------------------------

def test_unknown_format_error_names_file_and_fields(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mystery_set.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"mystery_set\.jsonl: fields \['answer', 'question'\] match no known") as info:
        load_preferences(path)
    assert "pandalm" in str(info.value) and "output_1" in str(info.value)


def test_partial_format_error_names_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "almost_panda.json"
    path.write_text(json.dumps([{"instruction": "i", "input": "", "response1": "a", "response2": "b",
                                 "annotator1": 1, "annotator2": 1}]))
    expected = r"almost_panda\.json: .*Closest is pandalm, which is missing field\(s\) \['annotator3'\]"
    with pytest.raises(ValueError, match=expected):
        load_preferences(path)


def test_missing_field_in_a_later_row_names_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "ragged.jsonl", [
        {"input": "q", "output_1": "a", "output_2": "b", "label": 1},
        {"input": "q", "output_1": "a", "label": 2},
    ])
    expected = r"ragged\.jsonl: row 1: missing field\(s\) \['output_2'\] required by the llmbar format"
    with pytest.raises(ValueError, match=expected):
        load_preferences(path)


def test_bad_llmbar_label_and_empty_file(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "labels.jsonl", [{"input": "q", "output_1": "a", "output_2": "b", "label": 0}])
    with pytest.raises(ValueError, match=r"labels\.jsonl: row 0: label 0 must be 1 or 2"):
        load_preferences(path)
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.json: the file is empty"):
        load_preferences(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2"):
        load_preferences(broken)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_preferences(tmp_path / "nowhere.json")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "first_id", "first_text"),
    [
        # MT-Bench: turns[0]; native question_id as id.
        (MT_BENCH, "81", "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
                         "cultural experiences and must-see attractions."),
        # self-instruct: instruction + "\n\n" + the first instance's input (non-empty in row 0).
        (SELF_INSTRUCT, "user_oriented_task_0",
         "The sentence you are given might be too wordy, complicated, or unclear. Rewrite the sentence and make "
         "your writing clearer by keeping it concise. Whenever possible, break complex sentences into multiple "
         "sentences and eliminate unnecessary words.\n\nIf you have any questions about my rate or if you find it "
         "necessary to increase or decrease the scope for this project, please let me know."),
        # arena-hard: prompt; native uid as id.
        (ARENA_HARD, "328c149ed45a41c0b9d6f14659e63599", "Use ABC notation to write a melody in the style of a folk tune."),
    ],
)
def test_prompt_column_detection(path: Path, first_id: str, first_text: str) -> None:
    records = load_prompts(path)
    assert len(records) == 30
    assert records[0] == PromptRecord(id=first_id, text=first_text, messages=None)
    assert len({r.id for r in records}) == 30
    assert all(r.text.strip() for r in records)


def test_self_instruct_empty_instance_input_is_not_appended() -> None:
    raw = _raw(SELF_INSTRUCT)
    records = load_prompts(SELF_INSTRUCT)
    assert raw[5]["instances"][0]["input"] == ""  # hand-checked: row 5 has no input
    assert records[5].text == raw[5]["instruction"]
    for record, row in zip(records, raw):
        extra = row["instances"][0]["input"]
        assert record.text == (row["instruction"] + "\n\n" + extra if extra else row["instruction"])


@pytest.mark.parametrize(
    ("column", "expected_first"),
    [
        ("turns[1]", "Rewrite your previous response. Start every sentence with the letter A."),
        ("turns[-1]", "Rewrite your previous response. Start every sentence with the letter A."),
        ("category", "writing"),
    ],
)
def test_explicit_column_paths(column: str, expected_first: str) -> None:
    assert load_prompts(MT_BENCH, column=column, limit=1)[0].text == expected_first


def test_explicit_column_uses_exactly_that_field() -> None:
    # With column='instruction' the self-instruct instance input is not appended.
    assert load_prompts(SELF_INSTRUCT, column="instruction", limit=1)[0].text.endswith("eliminate unnecessary words.")
    assert load_prompts(SELF_INSTRUCT, column="instances[0].output", limit=1)[0].text.startswith(
        "If you have any questions about my rate or find it necessary")


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ("turns[5]", r"mt_bench_questions_sample\.jsonl: row 0: no field 'turns\[5\]'"),
        ("nope", r"mt_bench_questions_sample\.jsonl: row 0: no field 'nope'; fields are \['category', 'question_id', 'turns'\]"),
        ("turns", r"row 0: the prompt field holds a list.*--prompt-column 'name\[0\]'"),
        ("turns[", r"cannot parse column path"),
    ],
)
def test_prompt_column_errors(column: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_prompts(MT_BENCH, column=column)


def test_undetectable_prompt_column_asks_for_column(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "why?"}])
    expected = r"qa\.jsonl: cannot tell which field holds the prompt among \['question'\]; choose it with --prompt-column"
    with pytest.raises(ValueError, match=expected):
        load_prompts(path)
    assert load_prompts(path, column="question") == [PromptRecord(id="qa-0", text="why?")]


def test_chat_formatted_prompts_keep_messages(tmp_path: Path) -> None:
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": conversation},
        {"prompt": [{"role": "user", "content": "Only me"}]},
        {"prompt": "plain"},
    ])
    records = load_prompts(path)
    assert records[0] == PromptRecord(id="chat-0", text="System: You are terse.\n\nUser: Name a prime.", messages=conversation)
    # A lone user message flattens to its content, the same text as the plain-string form.
    assert (records[1].text, records[1].messages) == ("Only me", [{"role": "user", "content": "Only me"}])
    assert (records[2].text, records[2].messages) == ("plain", None)


def test_prompt_limit_ids_and_empty_rows(tmp_path: Path) -> None:
    assert [r.id for r in load_prompts(MT_BENCH, limit=3)] == ["81", "82", "83"]
    # Empty prompts are skipped and do not count towards the limit; repeated native ids fall
    # back to positional ids so a join on id can never pick the wrong row.
    path = _write_jsonl(tmp_path / "dup.jsonl", [
        {"id": 1, "prompt": "a"}, {"id": 1, "prompt": ""}, {"id": 1, "prompt": "b"}, {"id": 2, "prompt": "c"},
    ])
    assert [(r.id, r.text) for r in load_prompts(path, limit=2)] == [("dup-0", "a"), ("dup-2", "b")]
    assert [r.id for r in load_prompts(path, limit=1)] == ["1"]


def test_csv_cells_holding_json_can_be_indexed(tmp_path: Path) -> None:
    path = tmp_path / "turns.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question_id", "turns"])
        writer.writeheader()
        writer.writerow({"question_id": "7", "turns": json.dumps(["first, with a comma", "second"])})
    assert load_prompts(path) == [PromptRecord(id="7", text="first, with a comma")]


@pytest.mark.parametrize(
    "field_path, steps",
    [("turns[0]", ["turns", 0]), ("instances[0].input", ["instances", 0, "input"]), ("a.b[-1][2]", ["a", "b", -1, 2])],
)
def test_parse_field_path(field_path: str, steps: list) -> None:
    assert parse_field_path(field_path) == steps


@pytest.mark.parametrize("bad", ["", ".a", "a..b", "a[x]", "[0]", "a[0"])
def test_parse_field_path_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot parse column path"):
        parse_field_path(bad)


# --------------------------------------------------------------------------------------------
# Round trips through real `datasets` storage
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [MT_BENCH, SELF_INSTRUCT, ARENA_HARD])
def test_parquet_and_save_to_disk_round_trip(path: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    expected = load_prompts(path)
    dataset = datasets.Dataset.from_list(_raw(path))
    dataset.to_parquet(str(tmp_path / "prompts.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(tmp_path / "prompts.parquet") == expected
    assert load_prompts(tmp_path / "saved") == expected
    assert load_prompts(tmp_path / "saved", limit=4) == expected[:4]


def test_csv_round_trip(tmp_path: Path) -> None:
    # arena-hard has only flat string columns, which CSV stores faithfully.
    datasets = pytest.importorskip("datasets")
    expected = load_prompts(ARENA_HARD)
    datasets.Dataset.from_list(_raw(ARENA_HARD)).to_csv(str(tmp_path / "arena.csv"), index=False)
    assert load_prompts(tmp_path / "arena.csv") == expected


def test_dataset_dict_on_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = _raw(MT_BENCH)
    train, test = datasets.Dataset.from_list(rows[:10]), datasets.Dataset.from_list(rows[10:])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    assert [r.id for r in load_prompts(tmp_path / "both")] == [str(r["question_id"]) for r in rows[:10]]
    assert [r.id for r in load_prompts(tmp_path / "both" / "test")] == [str(r["question_id"]) for r in rows[10:]]
    datasets.DatasetDict({"a": train, "b": test}).save_to_disk(str(tmp_path / "ambiguous"))
    with pytest.raises(ValueError, match=r"ambiguous: a DatasetDict with splits \['a', 'b'\]; pass the split's folder"):
        load_prompts(tmp_path / "ambiguous")
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_prompts(tmp_path / "not_a_dataset")
