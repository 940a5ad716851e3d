"""`rlaif serve --ray` as a command: it starts its own local Ray cluster (so this module holds no Ray
session), prints a working curl once its replica has loaded the model, answers, and exits 0 on SIGTERM
with the port closed. The deployment's behaviour is tested in `tests/test_ray_serve.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port

ray = pytest.importorskip("ray")


def item(i: int) -> dict:
    return {"prompt": f"What is {i} + 2?", "response_a": f"It is {i + 2}.", "response_b": f"It is {i + 3}, I think."}


@pytest.mark.slow
def test_rlaif_serve_ray_command(tmp_path):
    """The CLI path: `rlaif serve --ray` starts a local cluster, prints a working curl once ready, stops on SIGTERM."""
    if ray.is_initialized():
        pytest.skip("needs a process without a Ray session (the command starts its own cluster)")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "rlaif", "serve", "--ray", "--replicas", "1", "--replica-cpus", "0.5",
                                "--port", str(port), "--no-cache", "--log-level", "warning"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 400
        while not any("ready on Ray Serve" in line for line in lines):
            assert process.poll() is None, f"serve --ray exited: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "not ready within 400 s"
            lines.append(process.stdout.readline())
        response = httpx.post(f"http://127.0.0.1:{port}/v1/judge/pairwise", json={"items": [item(1)]}, timeout=120)
        assert response.status_code == 200 and response.json()["judgments"][0]["model"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, process.stderr.read()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stdout.close()
        process.stderr.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
