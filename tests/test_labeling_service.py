"""`--judge-url`: labeling and best-of-n against a real `rlaif serve` app (uvicorn on a free port)
serving the real embedded model, checked against the in-process judge on the same samples;
service failures surface as a one-line CLI error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlaif.judge.labeling.best_of_n import run_best_of_n
from rlaif.judge.labeling.config import BestOfNConfig, LabelConfig
from rlaif.judge.labeling.label import run_label
from tests.conftest import free_port

DATA = Path(__file__).parent / "data"
PROMPTS = DATA / "mt_bench_questions_sample.jsonl"
TINY = dict(prompts=PROMPTS, limit=3, n=2, max_new_tokens=10, batch_size=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def judge_server(default_engine):
    from rlaif.service.app import create_app
    from rlaif.service.settings import ServiceSettings
    from tests.fake_engines import ServerThread

    app = create_app(ServiceSettings(cache=False, max_items=4), engine=default_engine)
    with ServerThread(app) as server:
        yield server


def rows(out: Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(out / "dataset")).to_list()


@pytest.mark.slow
def test_label_through_the_service_matches_the_in_process_judge(tmp_path, default_engine, judge_server):
    # request_batch_size 3 < the batch's items: the client splits, the server (max_items=4) accepts every piece
    remote = run_label(LabelConfig(out=tmp_path / "remote", judge_url=judge_server.url, request_batch_size=3, **TINY),
                       policy_engine=default_engine)
    local = run_label(LabelConfig(out=tmp_path / "local", **TINY), policy_engine=default_engine,
                      judge_engine=default_engine)
    assert remote["rows"] == local["rows"] > 0
    for got, want in zip(rows(tmp_path / "remote"), rows(tmp_path / "local")):
        assert (got["prompt"], got["chosen"], got["rejected"]) == (want["prompt"], want["chosen"], want["rejected"])
        assert got["judge_prob"] == pytest.approx(want["judge_prob"], abs=1e-4)
        assert got["consistent"] == want["consistent"]
        assert got["judge_model"] == want["judge_model"] == "SmolLM2-135M-Instruct"
    card = (tmp_path / "remote" / "README.md").read_text()
    assert judge_server.url in card

    bon = run_best_of_n(BestOfNConfig(out=tmp_path / "bon", judge_url=judge_server.url, **TINY),
                        policy_engine=default_engine)
    assert bon["rows"] == 3 and all(0.0 <= r["judge_score"] <= 1.0 for r in rows(tmp_path / "bon"))


def test_unreachable_service_is_a_clean_cli_error(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi", "a": "Hello!", "b": "Go away."}) + "\n")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "rlaif", "label", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                           "--responses-from", "a,b", "--judge-url", url, "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: judge service:") and "Traceback" not in done.stderr
