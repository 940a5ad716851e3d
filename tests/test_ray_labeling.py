"""`rlaif label --ray` / `rlaif best-of-n --ray` (Ray Data) against the local job, on a local Ray cluster.

- the Ray job writes the local job's dataset row for row and byte for byte (`data.jsonl`), for
  pairwise labeling and for a best-of-n tournament (several judging stages per shard), with the
  real embedded model in the actors and in this process;
- a Ray driver (`rlaif label --ray` in a subprocess) SIGKILLed after its first finished shard
  resumes without recomputing any finished shard, and the result equals the uninterrupted local run;
- a failure inside an actor reaches the driver as `WorkerFailed` naming the shard, the stage, the
  prompt and the samples (failure injection with the deterministic test engine);
- the pure parts (the CLI's per-stage values, the shard store's replay into the progress store).

The cluster is this process's `ray.init(num_cpus=2)` on 127.0.0.1, shared by the module's tests
(a subprocess driver joins it by address). Jobs are tiny (a few prompts, n <= 3, 8 new tokens).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlaif.judge.labeling.config import BestOfNConfig, LabelConfig
from rlaif.judge.labeling.ray_backend import (RayOptions, ShardStore, StageResources, WorkerFailed, parse_stage_values,
                                              ray_options, replay)
from rlaif.judge.labeling.store import ProgressStore

ray = pytest.importorskip("ray")

DATA = Path(__file__).parent / "data"
MT_BENCH = DATA / "mt_bench_questions_sample.jsonl"
TINY = dict(max_new_tokens=8, batch_size=2, progress=False)


# One torch thread here, as in each actor (Ray gives an actor with num_cpus=1 one OpenMP thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray cluster on 127.0.0.1 with a small object store; yields its address for subprocess drivers."""
    import logging

    # Ray's memory monitor counts every process on the machine; on a shared CI box it kills our actors
    # for other processes' memory. The jobs here are small, so leave memory to the kernel.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 * 2**20, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def read_rows(out: Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(out / "dataset")).to_list()


def stage_rows(out: Path) -> dict[tuple[int, str], float]:
    """(batch, stage) -> the time its completion marker was written, read straight from progress.sqlite."""
    with sqlite3.connect(f"file:{out / 'progress.sqlite'}?mode=ro", uri=True, timeout=5.0) as conn:
        return {(batch, stage): finished for batch, stage, finished in conn.execute("SELECT batch, stage, finished FROM stages")}


# ---------------------------------------------------------------------------------- same results as local
@pytest.mark.slow
def test_ray_label_equals_the_local_job_row_for_row(tmp_path, ray_cluster, default_engine):
    from rlaif.judge.labeling.label import run_label

    settings = dict(prompts=MT_BENCH, limit=4, n=3, **TINY)  # 2 shards, a 3-way round robin per prompt
    local = run_label(LabelConfig(out=tmp_path / "local", **settings), policy_engine=default_engine,
                      judge_engine=default_engine)
    on_ray = run_label(LabelConfig(out=tmp_path / "ray", **settings), ray=RayOptions())

    assert on_ray["ray"]["backend"] == "ray" and "ray" not in local
    assert read_rows(tmp_path / "ray") == read_rows(tmp_path / "local")
    assert (tmp_path / "ray" / "data.jsonl").read_bytes() == (tmp_path / "local" / "data.jsonl").read_bytes()
    for key in ("rows", "comparisons_judged", "candidate_pairs", "dropped", "judge_prob", "position_consistency"):
        assert on_ray[key] == local[key], key
    assert set(stage_rows(tmp_path / "ray")) == {(b, s) for b in (0, 1) for s in ("generate", "pairs")}
    assert on_ray["timing"]["samples_per_s"] and on_ray["timing"]["judgments_per_s"], "actor counters reach the summary"


@pytest.mark.slow
def test_ray_best_of_n_tournament_equals_the_local_job(tmp_path, ray_cluster, default_engine):
    from rlaif.judge.labeling.best_of_n import run_best_of_n

    # n=3: two knockout rounds, i.e. two judging stages per shard that the judge actor runs in order.
    settings = dict(prompts=MT_BENCH, limit=3, n=3, selection="tournament", **TINY)
    local = run_best_of_n(BestOfNConfig(out=tmp_path / "local", **settings), policy_engine=default_engine,
                          judge_engine=default_engine)
    on_ray = run_best_of_n(BestOfNConfig(out=tmp_path / "ray", **settings), ray=RayOptions())

    assert (tmp_path / "ray" / "data.jsonl").read_bytes() == (tmp_path / "local" / "data.jsonl").read_bytes()
    assert on_ray["rows"] == local["rows"] == 3 and on_ray["winner_sample_index"] == local["winner_sample_index"]
    assert {stage for _, stage in stage_rows(tmp_path / "ray")} == {"generate", "round-0", "round-1"}


# ---------------------------------------------------------------------------------- a killed driver resumes
def label_command(out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "rlaif", "label", "--prompts", str(MT_BENCH), "--out", str(out), "--limit", "8",
            "--n", "2", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress", "--ray", "--ray-address", address]


@pytest.mark.slow
def test_killed_ray_driver_resumes_without_recomputing_finished_shards(tmp_path, ray_cluster, default_engine):
    from rlaif.judge.labeling.label import run_label

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    driver = subprocess.Popen(label_command(out, ray_cluster), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 400
    try:
        while not any(stage == "pairs" for _, stage in (stage_rows(out) if (out / "progress.sqlite").exists() else {})):
            assert driver.poll() is None, f"driver ended before it could be killed: {driver.stderr.read()[-3000:]!r}"
            assert time.monotonic() < deadline, "no shard finished within 400 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.stderr.close()
    at_kill = stage_rows(out)
    finished = {batch for batch, stage in at_kill if stage == "pairs"}
    assert 1 <= len(finished) < 4, "the kill must land mid-job for this test to mean anything"
    assert not (out / "summary.json").exists()

    resumed = subprocess.run(label_command(out, ray_cluster), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    after = stage_rows(out)
    # Finished shards were neither sent to an actor nor rewritten: their markers keep the first run's times.
    assert {key: after[key] for key in at_kill if key[0] in finished} == {key: at_kill[key] for key in at_kill
                                                                           if key[0] in finished}
    assert summary["resumed"] is True and summary["batches_resumed"] == len(finished)
    assert summary["timing"]["sessions"] == 2

    reference = tmp_path / "local"
    run_label(LabelConfig(prompts=MT_BENCH, out=reference, limit=8, n=2, **TINY), policy_engine=default_engine,
              judge_engine=default_engine)
    assert (out / "data.jsonl").read_bytes() == (reference / "data.jsonl").read_bytes()


# ---------------------------------------------------------------------------------- worker errors
def deterministic_engine(spec: str):
    """Engine factory for the actors: the hash-based test engine, which raises on any input holding POISON."""
    from tests.fake_engines import DeterministicEngine

    return DeterministicEngine()


def test_worker_error_names_the_shard_stage_prompt_and_samples(tmp_path, ray_cluster):
    from rlaif.judge.labeling.label import run_label
    from tests.fake_engines import POISON

    source = tmp_path / "pairs.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"question {i}", "a": f"answer {i}", "b": f"other {i}"} for i in range(4)]
    rows[3]["b"] = f"other {POISON}"  # only this comparison fails, and only in the judge stage
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = LabelConfig(prompts=source, out=tmp_path / "out", responses_from=("a", "b"), batch_size=2, progress=False)

    with pytest.raises(WorkerFailed) as failure:
        run_label(config, ray=RayOptions(engine_factory=deterministic_engine))
    message = str(failure.value)
    assert "shard 1 (prompts 2-3), stage 'judge'" in message
    assert "judging prompt 'p3', sample 0 vs sample 1" in message
    assert "EngineError: poisoned input" in message and "run the same command again" in message

    # A policy failure is named by prompt in the generate stage.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q0", "prompt": "fine"}) + "\n" + json.dumps({"id": "q1", "prompt": POISON}) + "\n")
    with pytest.raises(WorkerFailed, match=r"shard 0 \(prompts 0-1\), stage 'generate': generating for prompt 'q1'"):
        run_label(LabelConfig(prompts=prompts, out=tmp_path / "gen", n=2, batch_size=2, progress=False),
                  ray=RayOptions(engine_factory=deterministic_engine))


# ---------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("4", "actors", {"generate": 4, "judge": 4}),                       # one value: both stages
    ("generate=4,judge=1-3", "actors", {"generate": 4, "judge": (1, 3)}),  # per stage; MIN-MAX autoscales
    ("judge=2", "actors", {"judge": 2}),                                  # the other stage keeps its default
    ("0.5", "float", {"generate": 0.5, "judge": 0.5}),
    ("generate=1, judge=0.25", "float", {"generate": 1.0, "judge": 0.25}),  # spaces are fine
])
def test_parse_stage_values(text, kind, expected):
    assert parse_stage_values(text, flag="--x", kind=kind) == expected


@pytest.mark.parametrize(("text", "kind", "error"), [
    ("tokenize=2", "actors", "unknown stage 'tokenize'"),   # only generate and judge exist
    ("two", "actors", "cannot read 'two'"),
    ("judge=a-b", "actors", "cannot read 'a-b'"),
    ("judge=lots", "float", "cannot read 'lots'"),
])
def test_parse_stage_values_errors_name_the_problem(text, kind, error):
    with pytest.raises(ValueError, match=error):
        parse_stage_values(text, flag="--x", kind=kind)


def test_ray_options_from_cli_strings_and_validation():
    options = ray_options("auto", actors="generate=2,judge=1-4", gpus="judge=0.5")
    assert options.address == "auto"
    assert options.generate == StageResources(actors=2) and options.judge == StageResources(actors=(1, 4), num_gpus=0.5)
    with pytest.raises(ValueError, match="actors must be >= 1"):
        StageResources(actors=(3, 2))


def test_shard_store_replay_writes_what_the_local_job_writes(tmp_path):
    """Commits recorded in a ShardStore, replayed, leave the progress store as direct writes would."""
    direct, replayed = ProgressStore(tmp_path / "direct.sqlite"), ProgressStore(tmp_path / "replayed.sqlite")
    shard = ShardStore(responses={}, records={}, meta={})
    for store in (direct, shard):
        assert not store.stage_done(3, "generate")
        store.set_meta("policy_model", "m")
        store.save_responses(3, {6: ["a", "b"], 7: ["c", "d"]}, 1.5)
        store.save_records(3, "round-0", ['{"x": 1}', '{"x": 2}'], 0.5, 2)
        store.save_records(3, "round-1", ['{"x": 3}'], 0.25, 0)
    moved = ShardStore.from_state(json.loads(json.dumps(shard.state())))  # the trip through Ray is JSON
    assert moved.stage_done(3, "round-0") and moved.load_records(3, "round-1") == ['{"x": 3}']
    replay(replayed, moved.state()["commits"])
    for store in (direct, replayed):
        assert store.load_responses([6, 7]) == {6: ["a", "b"], 7: ["c", "d"]}
        assert store.load_records(3, "round-0") == ['{"x": 1}', '{"x": 2}'] and store.get_meta("policy_model") == "m"
    assert replayed.stage_totals() == direct.stage_totals()
    direct.close()
    replayed.close()
