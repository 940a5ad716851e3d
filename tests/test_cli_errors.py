"""A new user's mistakes: one clear line on stderr, exit status 2, no traceback, and no model loaded.

Every case runs the real console entry point in a subprocess with `RLAIF_CACHE_DIR` pointing at an
empty folder: had a command started to load the embedded model, it would have begun dequantizing it
into `<cache>/plain/`, so an empty `plain/` afterwards proves the error came before any model load.
The hub is pointed at a closed local port (`HF_ENDPOINT`), so "offline" is tested the same way on a
connected CI machine and on an air-gapped one. Also here: the help pages (no `<bool>` type on flags,
defaults shown).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
MT_BENCH = str(DATA / "mt_bench_questions_sample.jsonl")
PAIR = ("--prompt", "p", "--response-a", "a", "--response-b", "b")


def run(args: list[str], cache: Path, *, extra_env: dict[str, str] | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RLAIF_CACHE_DIR": str(cache), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HUB_OFFLINE": "0", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "rlaif", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def assert_one_clean_line(proc: subprocess.CompletedProcess[str], *fragments: str, cache: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert not (cache / "plain").exists() or not any((cache / "plain").iterdir()), "a model started loading"


CASES = [
    # (id, argv, fragments of the one error line); {tmp} is a fresh folder, {nodir} a path that does not exist
    ("score-rubric-to-pairwise", ["judge", "pairwise", *PAIR, "--rubric", "score-1-10"],
     ["rubric 'score-1-10' is a score rubric", "needs a pairwise rubric"]),
    ("pairwise-rubric-to-score", ["judge", "score", "--prompt", "p", "--response", "r", "--rubric", "helpfulness"],
     ["rubric 'helpfulness' is a pairwise rubric", "needs a score rubric"]),
    ("cot-without-cot-section", ["judge", "pairwise", *PAIR, "--mode", "cot"], ["mode=cot is unavailable"]),
    ("tie-margin-out-of-range", ["judge", "pairwise", *PAIR, "--tie-margin", "0.7"], ["--tie-margin 0.7", "[0, 0.5)"]),
    ("local-path-that-does-not-exist", ["judge", "pairwise", *PAIR, "--engine", "hf:{nodir}"], ["{nodir}", "no such folder"]),
    ("relative-checkpoint-that-does-not-exist", ["judge", "score", "--prompt", "p", "--response", "r",
                                                 "--engine", "hf:runs/ppo/checkpoint-20"],
     ["runs/ppo/checkpoint-20: no such folder"]),
    ("folder-that-is-no-model", ["judge", "pairwise", *PAIR, "--engine", "hf:{tmp}"], ["no config.json"]),
    ("hub-id-offline", ["judge", "pairwise", *PAIR, "--engine", "hf:nonexistent-org/nonexistent-model"],
     ["nonexistent-org/nonexistent-model", "cannot be reached", "offline"]),
    ("not-a-model-id", ["judge", "pairwise", *PAIR, "--engine", "hf:two words"], ["neither an existing path nor"]),
    ("engine-option-typo", ["judge", "pairwise", *PAIR, "--engine", "default?max_batchsize=8"],
     ["unknown engine option 'max_batchsize'", "did you mean 'max_batch_size'"]),
    ("bad-engine-spec", ["judge", "score", "--prompt", "p", "--response", "r", "--engine", "bogus:thing"],
     ["invalid engine spec"]),
    ("eval-missing-data", ["eval", "--data", "{nodir}/pairs.json"], ["--data", "no such file"]),
    ("eval-score-rubric", ["eval", "--data", str(DATA / "llmbar_natural_sample.json"), "--rubric", "score-1-10"],
     ["is a score rubric"]),
    ("label-score-rubric", ["label", "--prompts", MT_BENCH, "--out", "{tmp}/out", "--rubric", "score-1-10"],
     ["is a score rubric", "needs a pairwise rubric"]),
    ("label-ranking-score-with-pairwise-rubric", ["label", "--prompts", MT_BENCH, "--out", "{tmp}/out", "--ranking", "score",
                                                 "--score-rubric", "helpfulness"], ["is a pairwise rubric"]),
    ("label-missing-prompts", ["label", "--prompts", "{nodir}/p.jsonl", "--out", "{tmp}/out"],
     ["--prompts", "no such prompt file"]),
    ("label-policy-offline", ["label", "--prompts", MT_BENCH, "--out", "{tmp}/out", "--policy", "hf:someone/some-model"],
     ["someone/some-model", "cannot be reached"]),
    ("best-of-n-tournament-with-score-rubric", ["best-of-n", "--prompts", MT_BENCH, "--out", "{tmp}/out",
                                                "--selection", "tournament", "--rubric", "score-1-10"],
     ["is a score rubric", "needs a pairwise rubric"]),
    ("best-of-n-judge-folder-missing", ["best-of-n", "--prompts", MT_BENCH, "--out", "{tmp}/out", "--engine", "hf:{nodir}"],
     ["no such folder"]),
    ("serve-missing-model", ["serve", "--engine", "hf:{nodir}", "--port", "0"], ["no such folder"]),
]


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistakes_are_one_line_before_any_model_loads(tmp_path, argv, fragments):
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    nodir = str(tmp_path / "does-not-exist")

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(work)).replace("{nodir}", nodir)

    proc = run([fill(a) for a in argv], cache)
    assert_one_clean_line(proc, *[fill(f) for f in fragments], cache=cache)


def test_hub_access_turned_off_is_named(tmp_path):
    proc = run(["judge", "pairwise", *PAIR, "--engine", "hf:nonexistent-org/nonexistent-model"], tmp_path / "cache",
               extra_env={"HF_HUB_OFFLINE": "1"})
    assert_one_clean_line(proc, "HF_HUB_OFFLINE=1", cache=tmp_path / "cache")


def test_missing_prompt_column_names_the_flag(tmp_path):
    proc = run(["label", "--prompts", str(DATA / "llmbar_natural_sample.json"), "--out", str(tmp_path / "out"),
                "--prompt-column", "question", "--no-progress"], tmp_path / "cache")
    assert_one_clean_line(proc, "no field 'question'", cache=tmp_path / "cache")
    source = tmp_path / "qa.jsonl"
    source.write_text('{"question": "What is 2+2?"}\n')
    proc = run(["label", "--prompts", str(source), "--out", str(tmp_path / "out2"), "--no-progress"], tmp_path / "cache")
    assert_one_clean_line(proc, "--prompt-column", cache=tmp_path / "cache")
    assert "column=..." not in proc.stderr


# ---------------------------------------------------------------------------------- help pages
def _commands():
    import typer

    from rlaif.cli import build_app

    root = typer.main.get_command(build_app())
    stack = [((), root)]
    while stack:
        path, command = stack.pop()
        yield path, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            stack.append(((*path, name), sub))


@pytest.mark.parametrize("path", [p for p, _ in _commands()], ids=lambda p: " ".join(p) or "rlaif")
def test_help_has_no_flag_types_and_shows_defaults(path):
    """`--flag <bool>` read as if the flag took a value; options with a default must show it."""
    proc = subprocess.run([sys.executable, "-m", "rlaif", *path, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout
    command = dict(_commands())[path]
    checked = 0
    for param in command.params:
        if param.param_type_name != "option" or param.hidden or param.is_flag or param.name == "help":
            continue
        if param.default is None or param.default == () or param.show_default is False:
            continue
        lines = proc.stdout.splitlines()
        at = next((i for i, text in enumerate(lines) if f"{param.opts[0]} " in text), None)
        # the option's row and its wrapped continuation rows (blank option column), up to the next option
        rows = [] if at is None else [lines[at], *itertools.takewhile(
            lambda text: text.startswith("│") and not text[1:].lstrip().startswith("-"), lines[at + 1:])]
        line = " ".join(rows)
        assert "[default:" in line or "(default" in line, (path, param.opts[0], line)
        checked += 1
    if path in {("label",), ("best-of-n",), ("eval",)}:
        assert checked >= 3, f"{path}: no option with a default was checked"


def test_serve_banner_says_the_embedded_judge_is_a_test_judge(capsys):
    from types import SimpleNamespace

    from rlaif.service.cli import _announce_when_ready
    from rlaif.service.settings import ServiceSettings

    for engine, expected in (("default", True), ("hf:Qwen/Qwen2.5-7B-Instruct", False)):
        runtime = SimpleNamespace(ready_event=SimpleNamespace(wait=lambda: True), status="ready", message=None)
        _announce_when_ready(runtime, SimpleNamespace(servers=[]), ServiceSettings(engine=engine), {})
        out = capsys.readouterr().out
        assert "ready at http://127.0.0.1:8000" in out
        assert ("is a test judge" in out) is expected
        assert ("--engine" in out) is expected


def test_a_model_folder_that_fails_to_load_is_one_line(tmp_path):
    """Passes the pre-load checks (it has a config.json) but holds no weights or tokenizer: the loader's
    own error comes back as one line, not transformers' traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    proc = run(["judge", "score", "--prompt", "p", "--response", "r", "--engine", f"hf:{broken}"], tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any(line.startswith("error:") and str(broken) in line for line in proc.stderr.splitlines()), proc.stderr
