"""The README and docs/*.md, checked against the code they describe: a doc edit that breaks a command fails CI.

Every fenced shell block (bash, sh, shell, console) is split into commands (quotes, line continuations,
comments, `;`, `&&`, `|`, `&`, redirections) and each command is checked:

- `rlaif ...` (also after `python -m`, `torchrun ... -m`, `accelerate launch ... -m`): the subcommand and
  every flag exist in the real CLI, read at test time from `rlaif.cli.build_app()` (so flags other work
  adds are known at once), and -- unless the command elides arguments with a literal `...` -- the real
  parser accepts the whole command line (types, choices, required options);
- every file path it names (a path-typed option, or a value that looks like a path) exists in the
  repository or is produced by an earlier command of the same document (`--out`, `--output-dir`, a `>`
  redirection, or a folder below one of those), earlier in its block or in a block above it;
- `python <script>` scripts exist, `python -m <module>` modules import (an allowlist names the external
  tools docs mention, e.g. OpenRLHF), `make <target>` targets exist in the Makefile, `curl` URLs name a
  route of the service app; anything else must be on the list of known programs.

Python blocks run: those that talk to `http://127.0.0.1:8000` against a real `rlaif serve` (embedded
model, started once for this module, the URL rewritten to its port), the others in a fresh working
folder. A block preceded by `<!-- docs-test: fragment: <reason> -->` is a deliberately incomplete
excerpt (placeholders, training runs): it must still compile and its imports must resolve. The curl
commands also run against that service and must succeed.

Run: `RLAIF_CACHE_DIR=/work/cache pytest tests/test_docs.py` (parsing checks: seconds; the service-backed
checks are marked slow: a few minutes on 2 cores).
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py", "python3"}
SERVICE_URL = "http://127.0.0.1:8000"

KNOWN_PROGRAMS = {"curl", "make", "export", "cd", "jq", "tail", "head", "kill", "wait", "sleep", "cat", "ls", "pip",
                  "git", "echo", "mkdir", "rm", "du", "nvidia-smi", "tensorboard"}
"""Programs docs may run besides rlaif/python; their arguments are not checked (curl's and make's are)."""
EXTERNAL_MODULES = {"openrlhf.cli.train_ppo_ray": "OpenRLHF, a separate project (docs show how to point it at us)"}
OUTPUT_OPTIONS = {"out", "output_dir", "out_dir", "cache_path", "json"}
"""Options whose value the command creates."""
PATH_LIKE = re.compile(r"(^|/)[\w.-]+\.(jsonl|json|yaml|yml|parquet|csv|txt|py|gguf|sqlite|md)$")
FRAGMENT = re.compile(r"<!--\s*docs-test:\s*fragment:\s*(?P<reason>[^>]*?)\s*-->\s*$")


# ---------------------------------------------------------------------------------- parsing
@dataclass
class Block:
    file: Path
    line: int
    lang: str
    text: str
    fragment: str | None = None
    """Reason given by a `<!-- docs-test: fragment: ... -->` marker right before the block."""

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def doc_blocks() -> list[Block]:
    blocks = []
    fence = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
    for path in DOC_FILES:
        text = path.read_text()
        for match in fence.finditer(text):
            indent = len(match.group("indent"))
            body = "\n".join(line[indent:] for line in match.group("body").splitlines())
            before = text[:match.start()].rstrip("\n").splitlines()
            marker = FRAGMENT.search(before[-1]) if before else None
            blocks.append(Block(path, text[:match.start()].count("\n") + 1, match.group("lang").lower(), body + "\n",
                                marker.group("reason") if marker else None))
    return blocks


def logical_lines(text: str) -> list[str]:
    """Commands separated by unquoted newlines, with comments and line continuations removed."""
    lines, current, quote, i = [], [], None, 0
    while i < len(text):
        char = text[i]
        if quote:
            current.append(char)
            if char == "\\" and quote == '"' and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif char == quote:
                quote = None
        elif char == "\\" and i + 1 < len(text) and text[i + 1] == "\n":
            current.append(" ")
            i += 1
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char == "#" and (not current or current[-1] in " \t;&|("):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif char == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    lines.append("".join(current))
    return [line for line in (line.strip() for line in lines) if line]


@dataclass
class Command:
    words: list[str]
    redirect_to: list[str] = field(default_factory=list)
    source: str = ""


def shell_commands(text: str) -> list[Command]:
    commands = []
    for line in logical_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = ""
        words: list[str] = []
        redirects: list[str] = []
        tokens = list(lexer)
        k = 0
        while k <= len(tokens):
            token = tokens[k] if k < len(tokens) else ";"
            if token in {";", "&", "&&", "|", "||"}:
                if words:
                    commands.append(Command(words, redirects, line))
                words, redirects = [], []
            elif token in {">", ">>"} and k + 1 < len(tokens):
                redirects.append(tokens[k + 1])
                k += 1
            elif token in {"<", ">&", "2>"}:
                k += 1
            else:
                words.append(token)
            k += 1
    return commands


# ---------------------------------------------------------------------------------- the real CLI
@cache
def cli_root():
    import typer

    from rlaif.cli import build_app

    return typer.main.get_command(build_app())


def rlaif_problems(args: list[str], produced: set[str]) -> list[str]:
    """What is wrong with `rlaif <args>` (empty when nothing), and record what it produces."""
    command, path = cli_root(), ["rlaif"]
    rest = list(args)
    while getattr(command, "commands", None) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in command.commands:
            close = difflib.get_close_matches(name, list(command.commands), n=1)
            return [f"`{' '.join(path)} {name}`: no such command" + (f" (did you mean {close[0]!r}?)" if close else "")]
        command = command.commands[name]
        path.append(name)
    if rest in (["--help"], []) and getattr(command, "commands", None):
        return []
    elided = "..." in rest
    rest = [a for a in rest if a != "..."]
    options = {opt: p for p in command.params if p.param_type_name == "option" for opt in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    problems, values, k = [], [], 0
    while k < len(rest):
        word = rest[k]
        if word.startswith("-"):
            name, eq, value = word.partition("=")
            param = options.get(name)
            if param is None:
                close = difflib.get_close_matches(name, list(options), n=1)
                problems.append(f"`{' '.join(path)}`: no option {name}" + (f" (did you mean {close[0]}?)" if close else ""))
                k += 1
                continue
            if not param.is_flag and not eq:
                value = rest[k + 1] if k + 1 < len(rest) else ""
                k += 1
            if not param.is_flag:
                values.append((param, value))
        elif arguments:
            values.append((arguments.pop(0), word))
        elif not elided:
            problems.append(f"`{' '.join(path)}`: unexpected argument {word!r}")
        k += 1
    if not elided and not problems:
        try:
            command.make_context(" ".join(path), list(rest)).close()
        except Exception as exc:  # the real parser's verdict: bad type, choice, missing required option
            problems.append(f"`{' '.join(path)} {' '.join(rest)}`: {type(exc).__name__}: {exc}")
    for param, value in values:
        if param.name in OUTPUT_OPTIONS:
            produced.add(value.rstrip("/"))
        elif (param.type_descriptor.is_path or looks_like_path(value)) and not path_known(value, produced):
            name = param.opts[0] if param.opts else param.name.upper()
            problems.append(f"`{' '.join(path)}` {name} {value}: no such file in the repository, and no earlier command "
                            "of this document produces it (use a file under tests/data/, or produce it first)")
    return problems


def looks_like_path(value: str) -> bool:
    if not value or value.startswith(("http://", "https://", "-")) or ":" in value or " " in value or value == "default":
        return False
    return "/" in value or bool(PATH_LIKE.search(value))


def path_known(value: str, produced: set[str]) -> bool:
    value = value.rstrip("/")
    if (REPO / value).exists() or Path(value).is_absolute() and Path(value).exists():
        return True
    return any(value == out or value.startswith(out + "/") for out in produced)


@cache
def service_app():
    from rlaif.service.app import create_app
    from rlaif.service.settings import ServiceSettings

    return create_app(ServiceSettings())  # nothing loads before the lifespan starts


def service_has_route(path: str, method: str) -> bool:
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] is Match.FULL for route in service_app().routes)


@cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M))


def command_problems(command: Command, produced: set[str]) -> list[str]:
    words = list(command.words)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)  # VAR=value prefixes
    if not words:
        return []
    program, args = words[0], words[1:]
    for target in command.redirect_to:
        produced.add(target)
    if program == "rlaif":
        return rlaif_problems(args, produced)
    if program in {"python", "python3"}:
        if args[:1] == ["-m"] and len(args) > 1:
            module = args[1]
            if module == "rlaif":
                return rlaif_problems(args[2:], produced)
            if module in EXTERNAL_MODULES:
                return []
            import importlib.util

            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            return [] if found else [f"`python -m {module}`: no such module (add it to EXTERNAL_MODULES if external)"]
        script = args[0] if args else ""
        return [] if (REPO / script).is_file() else [f"`python {script}`: no such script"]
    if program in {"torchrun", "accelerate"}:
        for k in range(len(args) - 1):
            if args[k] == "-m" and args[k + 1] == "rlaif":
                return rlaif_problems(args[k + 2:], produced)
        return [f"`{program}` without `-m rlaif`"]
    if program == "make":
        return [f"`make {t}`: no such target in the Makefile" for t in args if not t.startswith("-") and "=" not in t
                and t not in make_targets()]
    if program == "curl":
        urls = [a for a in args if a.startswith(("http://", "https://"))]
        problems = []
        for url in urls:
            if not url.startswith(SERVICE_URL):
                continue  # another host (a placeholder such as judge-host)
            route = url[len(SERVICE_URL):].split("?")[0] or "/"
            method = "POST" if any(a in {"-d", "--data", "--json"} for a in args) else "GET"
            if not service_has_route(route, method):
                problems.append(f"`curl {url}`: the service has no route {method} {route}")
        return problems
    if program in KNOWN_PROGRAMS:
        return []
    return [f"unknown program `{program}` (add it to KNOWN_PROGRAMS if the docs may use it)"]


BLOCKS = doc_blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in PYTHON]


# ---------------------------------------------------------------------------------- fast checks
def test_the_docs_have_blocks_to_check():
    assert len(SHELL_BLOCKS) >= 15 and len(PYTHON_BLOCKS) >= 5
    assert sum(len(shell_commands(b.text)) for b in SHELL_BLOCKS) >= 40


@pytest.mark.parametrize(("text", "expected"), [
    # a continuation line and a trailing comment
    ("rlaif eval --data a.json \\\n   --limit 2   # note\n", [["rlaif", "eval", "--data", "a.json", "--limit", "2"]]),
    # background job, then a second command; a quoted '#' is not a comment
    ("rlaif serve &\nrlaif judge score --prompt '#1?' --response x\n",
     [["rlaif", "serve"], ["rlaif", "judge", "score", "--prompt", "#1?", "--response", "x"]]),
    # a quoted JSON body over several lines stays one argument
    ("curl -s URL -d '{\n  \"a\": 1}'\n", [["curl", "-s", "URL", "-d", '{\n  "a": 1}']]),
    # pipes and && split commands; redirections are not arguments
    ("rlaif eval --data x | tail -n1 && echo ok > out.txt\n", [["rlaif", "eval", "--data", "x"], ["tail", "-n1"],
                                                                ["echo", "ok"]]),
    # a comment-only line produces nothing
    ("# just words\n", []),
])
def test_shell_splitting(text, expected):
    assert [c.words for c in shell_commands(text)] == expected


@pytest.mark.parametrize(("command", "fragment"), [
    # each of these is a mistake the check must catch
    ("rlaif lable --prompts x", "no such command (did you mean 'label'?)"),
    ("rlaif label --prompts tests/data/mt_bench_questions_sample.jsonl --out runs/x --nn 4", "no option --nn"),
    ("rlaif label --prompts tests/data/mt_bench_questions_sample.jsonl --out runs/x --n four", "--n"),
    ("rlaif label --out runs/x", "Missing"),
    ("rlaif eval --data tests/data/missing.json", "no such file in the repository"),
    ("rlaif winrate --base default --policy runs/ppo/checkpoint-20 --prompts tests/data/arena_hard_v0.1_questions_sample.jsonl",
     "runs/ppo/checkpoint-20"),
    ("torchrun --nproc_per_node 4 -m rlaif ppo --config ppo.yaml", "ppo.yaml"),
    ("make nonsense", "no such target"),
    ("curl -s http://127.0.0.1:8000/v1/nothing", "no route GET /v1/nothing"),
    ("curl -s http://127.0.0.1:8000/v1/judge/pairwise", "no route GET /v1/judge/pairwise"),  # it is a POST
    ("frobnicate --now", "unknown program"),
])
def test_the_checker_catches_broken_commands(command, fragment):
    problems = [p for c in shell_commands(command + "\n") for p in command_problems(c, set())]
    assert any(fragment in p for p in problems), problems


def test_outputs_of_earlier_commands_count_as_existing():
    block = ("rlaif label --prompts tests/data/mt_bench_questions_sample.jsonl --out runs/labels --n 2 --limit 2\n"
             "rlaif train-rm --data runs/labels/dataset --out runs/rm\n")
    produced: set[str] = set()
    assert [p for c in shell_commands(block) for p in command_problems(c, produced)] == []
    assert {"runs/labels", "runs/rm"} <= produced


def produced_before(block: Block) -> set[str]:
    """What the shell blocks above `block` in its file produce: a document is read top-down."""
    produced: set[str] = set()
    for earlier in SHELL_BLOCKS:
        if earlier.file == block.file and earlier.line < block.line:
            for command in shell_commands(earlier.text):
                command_problems(command, produced)
    return produced


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.where)
def test_shell_block_commands_exist_and_name_real_files(block):
    produced = produced_before(block)
    problems = [p for command in shell_commands(block.text) for p in command_problems(command, produced)]
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.where)
def test_python_blocks_compile_and_import(block):
    tree = ast.parse(block.text, filename=block.where)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(body=imports, type_ignores=[]), block.where, "exec"), {})  # noqa: S102


def test_fragments_say_why():
    for block in BLOCKS:
        if block.fragment is not None:
            assert len(block.fragment) >= 10, f"{block.where}: say why the block cannot run"


# ---------------------------------------------------------------------------------- against a real service
@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLAIF_LOG_LEVEL": "WARNING"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "rlaif", "serve", "--port", str(port), "--no-cache",
                                 "--log-level", "warning"], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("rlaif serve not ready in 600 s")
        for _ in range(50):  # the banner is printed just after /readyz turns 200
            if "ready at" in log.read_text():
                break
            time.sleep(0.2)
        assert "is a test judge" in log.read_text(), "the banner must say the embedded judge is a test judge"
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


CURLS = [(b, c) for b in SHELL_BLOCKS for c in shell_commands(b.text)
         if c.words[:1] == ["curl"] and any(w.startswith(SERVICE_URL) for w in c.words)]


@pytest.mark.slow
@pytest.mark.parametrize(("block", "command"), CURLS, ids=[f"{b.where}:{c.words[-1][:30]}" for b, c in CURLS])
def test_curl_examples_work(service, block, command):
    words = [w.replace(SERVICE_URL, service) for w in command.words]
    proc = subprocess.run(["curl", "--fail-with-body", "--max-time", "600", *words[1:]], capture_output=True, text=True,
                          timeout=660, env={**os.environ, "RLAIF_API_KEYS": ""})
    assert proc.returncode == 0, (block.where, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if b.fragment is None], ids=lambda b: b.where)
def test_python_blocks_run(block, service, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = block.text.replace(SERVICE_URL, service)
    exec(compile(code, block.where, "exec"), {"__name__": "__docs__"})  # noqa: S102
